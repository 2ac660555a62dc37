"""Run configuration: dataclasses with presets, dotted overrides, and validation before any work starts.

DeepSpeed owns its own JSON schema (batch size, optimizer, scheduler, ZeRO, precision, monitors); everything else a
run needs lives here. A run is built from a named preset, then an optional JSON file, then ``--set a.b=value``
overrides; ``validate()`` runs on the result and any problem is reported as one :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


class ConfigError(ValueError):
    """A bad key, value, path or combination in a run configuration."""


@contextlib.contextmanager
def as_config_error(where: str) -> Iterator[None]:
    """Inside the block, a FileNotFoundError or ValueError (an input that is missing or does not read) becomes a
    :class:`ConfigError` prefixed with ``where``, which the trainers report as one line instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _fail(where: str, msg: str) -> None:
    raise ConfigError(f"{where}: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# Generic helpers for nested dataclasses
# ----------------------------------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(where: str, key: str, valid: list[str]) -> None:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    _fail(where, f"unknown key '{key}'{hint}; valid keys: {', '.join(sorted(valid))}")


def _coerce(where: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from JSON or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(where, args[0], value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp in NAMED_PRESETS:  # model=350M: a preset of that config by name
            presets = NAMED_PRESETS[tp]
            if value not in presets:
                _fail(where, f"unknown preset {value!r}; choose from {', '.join(presets)} (or set its fields: "
                             f"{where}.<field>=...)")
            return dataclasses.replace(presets[value])
        if not isinstance(value, dict):
            _fail(where, f"expected a mapping, got {value!r}")
        return apply_overrides(tp(), value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        _fail(where, f"expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            _fail(where, f"expected a number, got {value!r}")
        try:
            if tp is int:
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            f = float(value)
        except (TypeError, ValueError):
            _fail(where, f"expected {tp.__name__}, got {value!r}")
        if not math.isfinite(f):  # no setting here means anything at NaN or ±inf; a NaN would train to loss=nan
            _fail(where, f"expected a finite number, got {value!r}")
        return f
    if tp is str:
        if not isinstance(value, str):
            _fail(where, f"expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        (elem,) = typing.get_args(tp)[:1] or (Any,)
        return [(_coerce(where, elem, v) if elem is not Any else v) for v in value]
    return value


NAMED_PRESETS: dict[type, dict[str, Any]] = {}
"""Config classes that a string may name a preset of, in a JSON file or ``--set`` (``--set model=350M``); filled in
below, where the preset tables are defined."""


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str = "config") -> Any:
    """Return a copy of dataclass ``obj`` with ``overrides`` applied.

    Keys may be nested mappings (``{"data": {"image_size": 64}}``) or dotted (``{"data.image_size": "64"}``).
    """
    types = _field_types(type(obj))
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in types:
            _unknown_key(where, head, list(types))
        if rest:
            if not dataclasses.is_dataclass(types[head]):
                _fail(f"{where}.{head}", f"is a value, not a section: '{head}.{rest}' names nothing")
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(types[head]) and isinstance(value, dict):
            nested.setdefault(head, {}).update(value)
        else:
            changes[head] = _coerce(f"{where}.{head}", types[head], value)
    for head, sub in nested.items():
        base = changes.get(head, getattr(obj, head))
        changes[head] = apply_overrides(base, sub, f"{where}.{head}")
    return dataclasses.replace(obj, **changes)


def parse_set_args(items: list[str] | None, flag: str = "--set") -> dict[str, str]:
    """``["train.steps=100", "data.name=shapes"]`` → ``{"train.steps": "100", ...}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} expects key=value, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(obj), indent=2, sort_keys=True) + "\n")


def load_json_config(path: str | Path, flag: str = "--config") -> dict[str, Any]:
    """A JSON object from ``path``; errors name the command-line ``flag`` that gave it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {p}: the top level must be a JSON object")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: the dVAE
# ----------------------------------------------------------------------------------------------------------------

DVAE_LIKELIHOODS = ("logit_laplace", "gaussian")


@dataclass
class DVAEConfig:
    """Shape of the discrete VAE (paper: 256×256 → 32×32 grid, K = 8192, 4 groups × 2 blocks, 256 hidden)."""

    image_size: int = 256
    """Side of the square input image, in pixels."""
    channels: int = 3
    """Image channels (RGB)."""
    vocab_size: int = 8192
    """K, the number of codes."""
    hidden: int = 256
    """Width of the first group; each later group doubles it."""
    blocks_per_group: int = 2
    """Resblocks per group."""
    groups: int = 4
    """Groups; a ×2 max-pool sits between consecutive groups, so the downsampling factor is 2**(groups-1)."""
    decoder_init: int = 128
    """Width of the decoder's 1×1 input conv."""
    likelihood: str = "logit_laplace"
    """Pixel likelihood: "logit_laplace" (the paper's, Appendix A.3) or "gaussian" (fixed σ = 0.1 in the mapped pixel
    space, i.e. a scaled MSE). On the CPU demo's 64×64 shapes the logit-Laplace's learned scale lets the model spend its
    codes on the black background and decode every object in one colour; the Gaussian learns colour in a few hundred
    updates (docs/dvae_cpu_trials.md, "Bottleneck probe")."""
    code_embedding_std: float = 0.0
    """If > 0, the decoder's input 1×1 conv (the code embeddings) starts as N(0, std²) with zero bias instead of
    PyTorch's default U(±1/√K), so that codes are distinguishable to the decoder from the first update."""

    @property
    def downsample(self) -> int:
        return 2 ** (self.groups - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    def validate(self, where: str = "model") -> "DVAEConfig":
        for name in ("image_size", "channels", "vocab_size", "hidden", "blocks_per_group", "groups", "decoder_init"):
            if getattr(self, name) < 1:
                _fail(f"{where}.{name}", f"must be ≥ 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            _fail(f"{where}.vocab_size", "needs at least 2 codes")
        if self.image_size % self.downsample:
            _fail(where, f"image_size {self.image_size} is not divisible by the downsampling factor "
                         f"{self.downsample} (= 2**(groups-1) with groups={self.groups})")
        if self.likelihood not in DVAE_LIKELIHOODS:
            _fail(f"{where}.likelihood", f"must be one of {', '.join(DVAE_LIKELIHOODS)}, got '{self.likelihood}'")
        if self.code_embedding_std < 0:
            _fail(f"{where}.code_embedding_std", "must be ≥ 0 (0 = PyTorch's default init)")
        return self


DVAE_PRESETS: dict[str, DVAEConfig] = {
    # CPU demo and tests: 64×64 → 16×16 grid (a CPU trial found an 8×8 grid caps the shapes scorer near 20%).
    "tiny": DVAEConfig(image_size=64, vocab_size=512, hidden=32, blocks_per_group=1, groups=3, decoder_init=64),
    # 64×64 → 8×8, for the smallest prior contexts.
    "tiny8": DVAEConfig(image_size=64, vocab_size=512, hidden=32, blocks_per_group=1, groups=4, decoder_init=64),
    # 128×128 → 16×16.
    "small": DVAEConfig(image_size=128, vocab_size=1024, hidden=64, blocks_per_group=2, groups=4, decoder_init=128),
    # The paper's: 256×256 → 32×32, K = 8192 (Appendix A.1; widths as in the openai/DALL-E release).
    "paper": DVAEConfig(),
}


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: the transformer prior
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DalleConfig:
    """Shape of the prior. Paper (12B): 64 layers, 62 heads × 64 = d_model 3968, 256 text + 32×32 image tokens."""

    text_vocab_size: int = 16384
    """BPE vocabulary size (size it from the trained tokenizer; ≤ 16384 in the paper)."""
    text_len: int = 256
    """T: text positions, including the leading <bos> (so captions get T − 1 tokens)."""
    image_vocab_size: int = 8192
    """K: dVAE codes."""
    image_grid: int = 32
    """W: the image is a W × W grid of codes."""
    d_model: int = 3968
    n_layers: int = 64
    n_heads: int = 62
    mlp_ratio: int = 4
    conv_kernel: int = 11
    """Side of the conv mask's window in the last layer (paper: 11 × 11)."""
    attn_backend: str = "auto"
    """Attention backend: auto, triton, flex, sdpa or dense (see dalle_ds.ops.attention)."""
    dropout: float = 0.0
    init_std: float = 0.02
    bos_id: int = 1
    """The tokenizer's <bos> id, put at text position 0."""
    resblock_grad_scaling: bool = False
    """Per-resblock gradient scaling (paper §2.4, App. D; dalle_ds.precision): one scale per attention/MLP block."""
    resblock_dtype: str = "float32"
    """Compute dtype of the resblock branches (float32, float16, bfloat16) via autocast; the residual stream, gains,
    biases, embeddings and logits stay fp32. float16 needs resblock_grad_scaling."""
    activation_checkpointing: bool = False
    """Recompute every resblock's branch in the backward pass (torch non-reentrant checkpoint)."""
    logits_matmul: str = "fp32"
    """The output heads' matmuls (their logits are fp32 either way): fp32 = IEEE fp32 (on a GPU: CUDA cores, ~1/15 of
    the bf16 tensor-core rate on an H100), tf32 = TF32 tensor cores on CUDA (inputs rounded to a 10-bit significand,
    fp32 accumulation; identical to fp32 on CPU). See dalle_ds.precision.tf32."""

    @property
    def image_len(self) -> int:
        return self.image_grid ** 2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def text_classes(self) -> int:
        """Text output classes: the BPE vocabulary plus one padding token per text position."""
        return self.text_vocab_size + self.text_len

    def validate(self, where: str = "model") -> "DalleConfig":
        for name in ("text_vocab_size", "text_len", "image_vocab_size", "image_grid", "d_model", "n_layers",
                     "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be ≥ 1, got {getattr(self, name)}")
        if self.text_len < 2:
            raise ConfigError(f"{where}.text_len: needs ≥ 2 positions (<bos> and one caption token)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0.0:
            raise ConfigError(f"{where}.init_std: must be > 0 (the std of the initial weights), got {self.init_std}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{where}: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.attn_backend not in ("auto", "triton", "flex", "sdpa", "dense"):
            raise ConfigError(f"{where}.attn_backend: choose auto, triton, flex, sdpa or dense, "
                              f"got {self.attn_backend!r}")
        if not 0 <= self.bos_id < self.text_vocab_size:
            raise ConfigError(f"{where}.bos_id {self.bos_id} is outside the text vocabulary")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ConfigError(f"{where}.conv_kernel: must be odd, got {self.conv_kernel}")
        if self.resblock_dtype not in ("float32", "float16", "bfloat16"):
            _fail(f"{where}.resblock_dtype", f"choose float32, float16 or bfloat16, got {self.resblock_dtype!r}")
        if self.logits_matmul not in ("fp32", "tf32"):
            _fail(f"{where}.logits_matmul", f"choose fp32 or tf32, got {self.logits_matmul!r}")
        if self.resblock_dtype == "float16" and not self.resblock_grad_scaling:
            _fail(f"{where}.resblock_dtype", "float16 resblocks underflow without gradient scaling: set "
                                             "resblock_grad_scaling=true (or use bfloat16)")
        return self


def _paper_family(d_model: int, n_layers: int, **kw) -> DalleConfig:
    return DalleConfig(d_model=d_model, n_layers=n_layers, n_heads=d_model // 64, **kw)


DALLE_PRESETS: dict[str, DalleConfig] = {
    # CPU demo on shapes: 16×16 image codes, short captions.
    # d_model 128: about 0.5 s per update of 16 sequences per rank on one CPU thread.
    "tiny": DalleConfig(text_vocab_size=512, text_len=24, image_vocab_size=512, image_grid=16, d_model=128,
                        n_layers=4, n_heads=4, conv_kernel=5),
    # Unit tests.
    "test": DalleConfig(text_vocab_size=300, text_len=16, image_vocab_size=32, image_grid=4, d_model=32,
                        n_layers=4, n_heads=2, conv_kernel=3),
    # GPT-style sizes at the paper's 256 + 32×32 tokens (head dim 64), for throughput work.
    "125M": _paper_family(768, 12),
    "350M": _paper_family(1024, 24),
    "1.3B": _paper_family(2048, 24),
    # The paper's Table 1 widths (2.8B: d 1920, 5.6B: d 2688, 12B: d 3968), 64 layers.
    "2.8B": _paper_family(1920, 64),
    "5.6B": _paper_family(2688, 64),
    "12B": DalleConfig(),
}
NAMED_PRESETS.update({DVAEConfig: DVAE_PRESETS, DalleConfig: DALLE_PRESETS})



# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

DATASET_NAMES = ("shapes", "fashion_mnist", "imagefolder", "webdataset")
_PHOTO_DATASETS = ("imagefolder", "webdataset")  # the user's images, of any size and shape
AUGMENTS = ("none", "paper")
_KNOWN_SPLITS = {"shapes": ("train", "test_id", "test_ood"), "fashion_mnist": ("train", "test")}
_DEFAULT_EVAL_SPLIT = {"shapes": "test_id", "fashion_mnist": "test", "imagefolder": "train", "webdataset": "train"}


@dataclass
class DataConfig:
    """Which images (and captions) to train on."""

    name: str = "shapes"
    """One of: shapes, fashion_mnist, imagefolder, webdataset."""
    path: str | None = None
    """imagefolder: the folder; webdataset: a shard file, glob or brace pattern; fashion_mnist: the idx folder."""
    train_samples: int = 20000
    """shapes only: number of training scenes (rendered on the fly)."""
    eval_samples: int = 256
    """Held-out images used for evaluation during and after training."""
    train_split: str = "train"
    eval_split: str | None = None
    """Split for evaluation; default: test_id (shapes), test (fashion_mnist), train (imagefolder, webdataset)."""
    seed: int = 0
    """shapes only: the dataset seed (samples are a pure function of seed, split and index)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process). The workers persist across epochs;
    on a GPU batches come in pinned memory and are copied without a host wait (dalle_ds/train/data_loading.py). With
    0 a GPU waits while each batch is decoded or rendered: set a few (2-8) there."""
    augment: str = "none"
    """imagefolder / webdataset training images: "none" (the centred square) or "paper", the paper's random crops for
    the stage being trained (dVAE: Listing 1, a random square resized to 9/8-12/8 of the size, a random crop and a
    horizontal flip; prior with images encoded on the fly: Listing 2, a near-centre square resized to 1-9/8, a
    random crop, no flip). New crops every epoch, the same ones in a resumed run; evaluation images stay centred
    (dalle_ds/data/augment.py)."""
    max_aspect_ratio: float = 0.0
    """imagefolder / webdataset: leave out images whose longer side exceeds this multiple of the shorter, in every
    split. The paper keeps aspect ratios within [1/2, 2] (2.0; Appendix C). 0 keeps every image."""
    image_key: str | None = None
    """webdataset: the member holding the image (e.g. "webp"); default: the first of png, jpg, jpeg, webp, ... found."""
    caption_key: str | None = None
    """imagefolder: the caption column of metadata.jsonl / .csv; webdataset: the caption member (e.g. "json.text").
    Default: the first of the usual names found (text, caption, txt, ...)."""
    check_images: bool = True
    """imagefolder / webdataset: decode every image once before training, so unreadable ones are left out and counted
    up front (a progress bar shows the pass). false skips that pass, for datasets too large to decode twice: an
    unreadable image met in training is logged, counted and replaced by the next readable sample
    (dalle_ds/data/folder.py)."""

    def validate(self, image_size: int, where: str = "data") -> "DataConfig":
        if self.name not in DATASET_NAMES:
            close = difflib.get_close_matches(self.name, DATASET_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(f"{where}.name", f"unknown dataset '{self.name}'{hint}; choose one of {', '.join(DATASET_NAMES)}")
        if self.name in ("imagefolder", "webdataset"):
            if not self.path:
                _fail(f"{where}.path", f"dataset '{self.name}' needs a path")
            if self.name == "imagefolder":
                if not Path(self.path).is_dir():
                    _fail(f"{where}.path", f"no such directory: {self.path}")
                from dalle_ds.data.folder import iter_image_files
                if next(iter_image_files(self.path), None) is None:  # stops at the first image
                    _fail(f"{where}.path", f"no image files (.png, .jpg, .webp, ...) under {self.path}")
            else:
                from dalle_ds.data.folder import resolve_shards
                try:
                    resolve_shards(self.path)
                except FileNotFoundError as e:
                    _fail(f"{where}.path", f"{e} (a .tar file, a glob such as /data/shard-*.tar, or braces "
                                           "shard-{000..099}.tar)")
        if self.name == "fashion_mnist" and self.path and not Path(self.path).is_dir():
            _fail(f"{where}.path", f"no such directory: {self.path}")
        if self.name == "shapes" and image_size not in (64, 128):
            _fail(where, f"the shapes dataset renders 64 or 128 px images, but the model expects {image_size}")
        if self.name in _KNOWN_SPLITS:
            for key in ("train_split", "eval_split"):
                split = getattr(self, key)
                if split is not None and split not in _KNOWN_SPLITS[self.name]:
                    _fail(f"{where}.{key}", f"'{split}' is not a split of {self.name} "
                                            f"({', '.join(_KNOWN_SPLITS[self.name])})")
        if self.train_samples < 1 or self.eval_samples < 0 or self.num_workers < 0:
            _fail(where, "train_samples must be ≥ 1, eval_samples and num_workers ≥ 0")
        if self.augment not in AUGMENTS:
            _fail(f"{where}.augment", f"choose {' or '.join(AUGMENTS)}, got {self.augment!r}")
        if self.max_aspect_ratio != 0 and not self.max_aspect_ratio >= 1:
            _fail(f"{where}.max_aspect_ratio",
                  f"must be ≥ 1 (the paper: 2) or 0 (no limit), got {self.max_aspect_ratio}")
        if self.image_key is not None and self.name != "webdataset":
            _fail(f"{where}.image_key", f"names a WebDataset member; {self.name} has none")
        for key, off in (("augment", "none"), ("max_aspect_ratio", 0), ("caption_key", None), ("check_images", True)):
            if getattr(self, key) != off and self.name not in _PHOTO_DATASETS:
                _fail(f"{where}.{key}", f"applies to {' and '.join(_PHOTO_DATASETS)} images; {self.name} renders its "
                                        f"images at the model's size (set {where}.{key}={off})")
        return self

    @property
    def resolved_eval_split(self) -> str:
        return self.eval_split or _DEFAULT_EVAL_SPLIT[self.name]

    def dataset_kwargs(self, split: str, image_size: int, crop: str | None = None, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments for :func:`dalle_ds.data.registry.build_dataset` for one split.

        ``crop`` ("dvae" or "prior"): the training split of that stage, which gets the paper's listing when
        ``augment`` is "paper", seeded by the run's ``seed``. Evaluation splits leave it out."""
        kw: dict[str, Any] = {"image_size": image_size}
        if self.name == "shapes":
            kw.update(num_samples=self.train_samples if split == self.train_split else self.eval_samples,
                      seed=self.seed)
        elif self.name == "fashion_mnist":
            if self.path:
                kw["root"] = self.path
        else:  # the user's images: every rank of a training run builds them together (folder.ImageTextFolder)
            kw.update(path=self.path, across_ranks=True, validate=self.check_images)
            if self.caption_key is not None:
                kw["caption_column" if self.name == "imagefolder" else "caption_key"] = self.caption_key
            if self.image_key is not None:
                kw["image_key"] = self.image_key
            if self.max_aspect_ratio:
                kw["max_aspect_ratio"] = self.max_aspect_ratio
            if crop is not None and self.augment == "paper":
                from dalle_ds.data.augment import PaperCrop

                kw["crop"] = PaperCrop(crop, image_size, seed)
        return kw


# ----------------------------------------------------------------------------------------------------------------
# Stage-1 training run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DVAETrainConfig:
    """Everything a dVAE run needs besides the DeepSpeed JSON (which owns batch size, optimizer and scheduler)."""

    model: DVAEConfig = field(default_factory=lambda: DVAE_PRESETS["paper"])
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 3_000_000
    """Optimizer updates (paper: 3M). Fills a scheduler's "auto" total_num_steps in the DeepSpeed config."""
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    """Relaxation temperature, annealed with a cosine from tau_start to tau_end (paper: 1 → 1/16)."""
    tau_anneal_steps: int = 150_000
    """Paper: the first 150,000 updates ("a linear schedule typically led to divergence")."""
    kl_weight: float = 6.6
    """β at the end of its anneal (paper: 6.6, chosen for codebook usage and reconstruction error)."""
    kl_anneal_steps: int = 5_000
    """Paper: β rises from 0 with a cosine over the first 5,000 updates."""
    ema_decay: float = 0.999
    """Exponential moving average of the weights (paper: 0.999); the EMA weights are what gets exported."""
    head_init: str = "default"
    """"default" (PyTorch's init) or "kmeans": the encoder's last 1×1 conv starts as the nearest-centroid rule of a
    k-means on its input features over the first ``head_init_images`` training images (see
    ``dalle_ds.models.dvae.kmeans_init_head``; not in the paper, which does not state its init)."""
    head_init_images: int = 256
    channels_last: bool = True
    """Keep the convolution weights (and so the activations) in NHWC layout, oneDNN's and cuDNN's fast path (with
    ZeRO stage 0: dalle_ds/train/channels_last.py says why). With bf16 autocast (``torch_autocast`` in
    ds_configs/cpu_dvae.json) a demo update takes ~0.5× the time of NCHW fp32 on the dev CPU
    (benchmarks/bench_dvae_step.py). Numerics are unchanged but for summation order."""
    log_every: int = 10
    eval_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 1234
    """Seeds parameter init, data order and Gumbel noise (all derived per step, so resume is exact)."""

    def validate(self, where: str = "dvae_run") -> "DVAETrainConfig":
        self.model.validate(f"{where}.model")
        self.data.validate(self.model.image_size, f"{where}.data")
        if self.steps < 1:
            _fail(f"{where}.steps", "must be ≥ 1")
        if self.model.channels != 3:  # dalle_ds.data.images converts every image to RGB (grey and RGBA included)
            _fail(f"{where}.model.channels", f"the data loaders deliver RGB images (3 channels), got "
                                              f"{self.model.channels}")
        if not (0 < self.tau_end <= self.tau_start):
            _fail(where, f"need 0 < tau_end ≤ tau_start, got {self.tau_end}, {self.tau_start}")
        if self.kl_weight < 0:
            _fail(f"{where}.kl_weight", "must be ≥ 0")
        if not (0 <= self.ema_decay < 1):
            _fail(f"{where}.ema_decay", "must be in [0, 1)")
        if self.head_init not in ("default", "kmeans"):
            _fail(f"{where}.head_init", f'must be "default" or "kmeans", got "{self.head_init}"')
        if self.head_init_images < 1:
            _fail(f"{where}.head_init_images", "must be ≥ 1")
        for name in ("tau_anneal_steps", "kl_anneal_steps", "log_every", "eval_every", "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 0:
                _fail(f"{where}.{name}", "must be ≥ 0")
        return self


DVAE_RUN_PRESETS: dict[str, DVAETrainConfig] = {
    # Needs your data: --set data.path=DIR (or data.name=webdataset with a shard pattern). Listing 1's random crops
    # and flips, and Appendix C's aspect-ratio filter ([1/2, 2]).
    "paper": DVAETrainConfig(data=DataConfig(name="imagefolder", num_workers=4, augment="paper",
                                             max_aspect_ratio=2.0)),
    # The CPU demo: shapes at 64×64 → 16×16 codes in 1,600 updates (~9.5 min on 2 cores with bf16 autocast and
    # channels_last), far too few for the paper's anneals. Small-budget choices, each measured in
    # docs/dvae_cpu_trials.md: a Gaussian likelihood, N(0, 1) code embeddings, a k-means init of the encoder head, τ
    # held at 1 and no KL term (β = 0), with a constant learning rate after warm-up (ds_configs/cpu_dvae.json). With
    # the paper's logit-Laplace, default init and schedules the codes carry no colour at this budget (scorer colour
    # 0.127, exact 0.004); with the paper-shaped τ/β schedules and the three options, exact 0.195-0.25 (600 updates);
    # as set here with lr 1e-3, exact 0.805-0.855 (1,600-1,700 updates, three runs), with 8-10 codes in use; at lr 2e-3
    # (ds_configs/cpu_dvae.json since 2026-12-05) 0.957 at 1,600 updates with 15 codes (seed 1234; seed 4321 was at
    # 0.832 after 1,200).
    "demo": DVAETrainConfig(
        model=dataclasses.replace(DVAE_PRESETS["tiny"], likelihood="gaussian", code_embedding_std=1.0),
        data=DataConfig(name="shapes", train_samples=20000, eval_samples=256, num_workers=0),
        steps=1600, tau_end=1.0, tau_anneal_steps=0, kl_anneal_steps=0, kl_weight=0.0, ema_decay=0.99,
        head_init="kmeans", log_every=10, eval_every=400, save_every=400),
    # Unit tests: seconds.
    "test": DVAETrainConfig(
        model=DVAEConfig(image_size=64, vocab_size=64, hidden=8, blocks_per_group=1, groups=3, decoder_init=16),
        data=DataConfig(name="shapes", train_samples=256, eval_samples=16, num_workers=0),
        steps=20, tau_anneal_steps=20, kl_anneal_steps=10, ema_decay=0.9,
        log_every=5, eval_every=0, save_every=10),
}


def build_run_config(cls: type, presets: dict[str, Any], preset: str, config_file: str | None = None,
                     sets: list[str] | None = None) -> Any:
    """Preset → JSON file → ``--set`` overrides → validate. Raises :class:`ConfigError` on any problem."""
    if preset not in presets:
        _unknown_key("--preset", preset, list(presets))
    cfg = dataclasses.replace(presets[preset])
    if config_file:
        cfg = apply_overrides(cfg, load_json_config(config_file), where=str(config_file))
    cfg = apply_overrides(cfg, parse_set_args(sets), where="--set")
    return cfg.validate()


# ----------------------------------------------------------------------------------------------------------------
# Stage-2 training run
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class DalleDataConfig:
    """Where the prior's (caption, image codes) pairs come from.

    Either token shards written by ``launch/tokenize_images.py`` (``train_tokens``/``val_tokens``), or images encoded
    on the fly by a trained dVAE (``dvae`` + ``images``). The text side needs a tokenizer: ``tokenizer`` names a
    saved one, otherwise one is trained on the training captions and saved in the run folder.
    """

    train_tokens: str | None = None
    val_tokens: str | None = None
    dvae: str | None = None
    """dvae.pt for on-the-fly encoding (used when train_tokens is not set)."""
    images: DataConfig = field(default_factory=DataConfig)
    """The image dataset for on-the-fly encoding."""
    tokenizer: str | None = None
    """A saved caption tokenizer folder; None trains one on the training captions (saved as <run>/tokenizer)."""
    tokenizer_vocab_size: int = 16384
    """Upper bound for a tokenizer trained here (paper: 16,384)."""
    bpe_dropout: float = 0.0
    """BPE dropout rate for the training captions (paper §2.2 footnote 5: 0.1, set by the ``paper`` preset): each
    caption's segmentation is drawn anew every epoch, seeded by (run seed, epoch, sample index) so a resumed run
    sees the same ones. Validation and sampling captions are never dropped."""
    val_batches: int = 8
    """Micro-batches of the held-out split per validation."""
    num_workers: int = 0
    """DataLoader worker processes per rank for the training pairs (0 = load in the training process; see
    DataConfig.num_workers). Token shards are cheap to read and collate, so 0 suits them; with images encoded on the
    fly (``dvae`` + ``images``) a GPU run wants a few workers to decode the images while it steps."""

    def validate(self, where: str = "data") -> "DalleDataConfig":
        if isinstance(self.bpe_dropout, bool) or not isinstance(self.bpe_dropout, (int, float)) \
                or not 0.0 <= self.bpe_dropout < 1.0:
            _fail(f"{where}.bpe_dropout", f"must be a number in [0, 1), got {self.bpe_dropout!r} (paper: 0.1)")
        if self.train_tokens:
            from dalle_ds.data.token_shards import read_meta

            for key in ("train_tokens", "val_tokens"):
                path = getattr(self, key)
                if not path:
                    continue
                try:
                    meta = read_meta(path)
                except FileNotFoundError:
                    _fail(f"{where}.{key}", f"{path} is not a token-shard folder (no meta.json); "
                                            "write one with launch/tokenize_images.py")
                except ValueError as e:  # not JSON, not an index, or a format this version does not read
                    _fail(f"{where}.{key}", str(e))
                if meta.get("num_samples") == 0:
                    _fail(f"{where}.{key}", f"{path} holds 0 token rows (did tokenize_images.py read any image?)")
            if self.images.augment != "none":
                _fail(f"{where}.images.augment", "token shards hold the crops tokenize_images.py stored (the "
                                                 "centred square, or K random ones with --crops K); data.images."
                                                 "augment is for images encoded on the fly (data.dvae + data.images)")
        elif self.dvae:
            if not Path(self.dvae).is_file():
                _fail(f"{where}.dvae", f"file not found: {self.dvae}")
        else:
            _fail(where, "set train_tokens (token shards) or dvae (+ images) for on-the-fly encoding")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            _fail(f"{where}.tokenizer", f"no such directory: {self.tokenizer}")
        if self.dvae and not Path(self.dvae).is_file():
            _fail(f"{where}.dvae", f"no such file: {self.dvae}")
        if self.val_batches < 0 or self.num_workers < 0:
            _fail(where, "val_batches and num_workers must be ≥ 0")
        if self.images.num_workers != DataConfig.num_workers:  # the nested DataConfig's own key is not read here
            _fail(f"{where}.images.num_workers", f"is not read by the prior's trainer: its loader workers are "
                                                 f"{where}.num_workers (set that instead)")
        if not 260 <= self.tokenizer_vocab_size <= 16384:  # 256 byte symbols + 4 specials .. the paper's bound
            _fail(f"{where}.tokenizer_vocab_size", f"must be in 260..16384, got {self.tokenizer_vocab_size}")
        return self


@dataclass
class PowerSGDConfig:
    """The hierarchical PowerSGD gradient all-reduce (paper §2.5, Appendix E; ``dalle_ds.dist.powersgd``)."""

    enabled: bool = False
    rank: int = 896
    """Total compression rank per machine; each GPU compresses its shards with rank // local_size (paper B.2: 896,
    i.e. 112 per GPU with 8 GPUs per machine, for the 12B model)."""
    start_step: int = 0
    """Optimizer steps reduced uncompressed in fp32 before compression starts."""
    local_size: int = 0
    """GPUs per machine; 0 = from the ranks' hostnames (all-gathered when the groups are built; machines of unequal
    rank counts or not numbered node by node are refused, and a launcher LOCAL_WORLD_SIZE / LOCAL_SIZE that
    disagrees with them). A value > 0 overrides them: a smaller one makes one box emulate several machines."""
    compress: str = r"^layers\.\d+\.(attn|mlp)\.fn\.\w+\.weight$"
    """Regular expression on parameter names: the matrices to compress (default: the four of every resblock)."""
    orthogonalization: str = "qr"
    """"qr": torch.linalg.qr (LAPACK / cuSOLVER Householder QR, the fastest here); "householder": ours in torch ops
    (same method, slower: benchmarks/results/powersgd_cpu_20261123.md); "gram_schmidt": for comparison only."""
    warm_start: bool = False
    """Not the paper (which keeps Q fixed): reuse last step's Q' as Q, as torch's powerSGD_hook does."""
    checkpoint_buffers: str = "sum"
    """"sum": the paper's sum of error buffers over machines per local rank; "per_rank": every rank's own codes
    (bit-exact resume, machines x the storage)."""
    seed: int = 0
    """Seed of the fixed Gaussian Q matrices."""
    error_dtype: str = "fp169"
    """Error-buffer storage: "fp169" (the paper) or "fp32" (an ablation: twice the memory)."""
    diagnostics: bool = False
    """Also log powersgd/delayed_norm, spread_norm, sent_fraction, rounding_ratio and swamped_fraction
    (``HierarchicalPowerSGD.diagnostics``): one fp32 all-reduce of every error buffer per log step and one more
    decode of every buffer per step, so off by default."""
    recenter_every: int = 0
    """Not the paper: every this many steps, set each machine's error buffer to the mean over machines (one 16-bit
    all-reduce of the buffers, counted in the bytes); keeps the buffers' machine-specific part, which the paper lets
    grow, from coarsening their 1-6-9 spacing. 0 = never (the paper). Measured: no help with the batch-256 failure
    that an uncompressed start (``start_step``) removes (docs/powersgd.md)."""

    def validate(self, where: str = "powersgd") -> "PowerSGDConfig":
        import re
        from dalle_ds.dist.orthogonalize import ORTHOGONALIZERS
        from dalle_ds.dist.powersgd import ERROR_DTYPES
        if self.rank < 1:
            _fail(f"{where}.rank", "must be ≥ 1")
        if self.start_step < 0:
            _fail(f"{where}.start_step", "must be ≥ 0")
        if self.local_size < 0:
            _fail(f"{where}.local_size", "must be ≥ 0 (0 = from the ranks' hostnames)")
        try:
            re.compile(self.compress)
        except re.error as e:
            _fail(f"{where}.compress", f"not a valid regular expression ({e})")
        if self.orthogonalization not in ORTHOGONALIZERS:
            _fail(f"{where}.orthogonalization", f"must be one of {sorted(ORTHOGONALIZERS)}")
        if self.checkpoint_buffers not in ("sum", "per_rank"):
            _fail(f"{where}.checkpoint_buffers", 'must be "sum" or "per_rank"')
        if self.error_dtype not in ERROR_DTYPES:
            _fail(f"{where}.error_dtype", f"must be one of {list(ERROR_DTYPES)}")
        if self.recenter_every < 0:
            _fail(f"{where}.recenter_every", "must be ≥ 0 (0 = never)")
        return self


ADAM_MOMENTS: tuple[str, ...] = ("fp32", "16bit")
"""Where the prior's Adam moments live: fp32, or the paper's 16-bit formats (dalle_ds.precision.adam_moments)."""


@dataclass
class DalleTrainConfig:
    """A prior training run. ``model`` sizes that come from the data (text vocabulary from the tokenizer, image
    vocabulary and grid from the shards or the dVAE) are filled in at start-up."""

    model: DalleConfig = field(default_factory=lambda: DALLE_PRESETS["12B"])
    data: DalleDataConfig = field(default_factory=DalleDataConfig)
    steps: int = 430_000
    """Optimizer updates (paper: 430k at batch 1024). Fills a scheduler's "auto" total_num_steps."""
    ema_decay: float = 0.999
    """Decay of the weight average per averaging (dalle_ds/train/ema.py)."""
    ema_every: int = 1
    """Average after every ``ema_every``-th update (paper App. B.2: 25, with decay 0.99)."""
    ema_on_host: bool = False
    """Keep the fp32 weight average in host memory, folded in by a worker thread from asynchronous copies (paper
    App. B.2): 4 bytes per parameter off each GPU (per parameter of its partition under ZeRO-3), the same in host
    memory plus a pinned staging copy in the parameters' dtype."""
    log_every: int = 10
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 1234
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)
    compile: bool = False
    """torch.compile every resblock before DeepSpeed wraps the model (DALLE.compile_resblocks): fuses the
    elementwise work around the matmuls; ZeRO 0-2 (ZeRO-3's parameter hooks would run inside compiled blocks)."""
    adam_moments: str = "fp32"
    """fp32, or 16bit: the resblock matmul weights' Adam mean in 1-6-9 and variance in 0-6-10 clipped at 5, as the
    paper (App. B.2; dalle_ds.precision.adam_moments); the other parameters keep fp32 moments."""
    init_from: str = ""
    """An exported prior (a run's ``dalle.pt``) whose weights this run starts from: fine-tuning. The architecture
    must be the same (the keys a resume may change may differ), and so must the caption tokenizer: the prior's own
    (saved beside it) unless ``data.tokenizer`` names one with the same vocabulary. The optimizer, learning-rate
    schedule and EMA start afresh. A run folder that holds a checkpoint resumes from it instead."""

    def validate(self, where: str = "dalle_run") -> "DalleTrainConfig":
        self.model.validate(f"{where}.model")
        self.data.validate(f"{where}.data")
        self.powersgd.validate(f"{where}.powersgd")
        if self.adam_moments not in ADAM_MOMENTS:
            _fail(f"{where}.adam_moments", f"choose {' or '.join(ADAM_MOMENTS)}, got {self.adam_moments!r}")
        if self.steps < 1:
            _fail(f"{where}.steps", "must be ≥ 1")
        if not (0 <= self.ema_decay < 1):
            _fail(f"{where}.ema_decay", "must be in [0, 1)")
        if self.ema_every < 1:
            _fail(f"{where}.ema_every", f"must be ≥ 1, got {self.ema_every}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                _fail(f"{where}.{name}", "must be ≥ 0")
        return self


DALLE_RUN_PRESETS: dict[str, DalleTrainConfig] = {
    # The paper recomputes the resblocks' activations in the backward pass (§2.4) and drops 10% of the captions' BPE
    # merges (§2.2, footnote 5); `--set model=<size>` picks a size preset as it is (checkpointing off),
    # `model.activation_checkpointing=true` turns it back on. Its weight average is the paper's too (App. B.2):
    # every 25 updates, decay 0.99, kept on the host.
    "paper": DalleTrainConfig(model=dataclasses.replace(DALLE_PRESETS["12B"], activation_checkpointing=True),
                              data=DalleDataConfig(bpe_dropout=0.1), ema_decay=0.99, ema_every=25,
                              ema_on_host=True),
    # CPU demo: 1,500 updates (~12 min on 2 cores) with bf16 resblock branches, which step 1.15× faster than fp32 on
    # this CPU (587 s for 1,200 against 557 s for 1,000). docs/dvae_cpu_trials.md: the prior is the stage that holds
    # exact match back; all-candidate exact on 256 test_id captions x 16 was 0.083 at 1,000 fp32 updates, 0.117 at
    # 1,200 bf16 ones, 0.148 with lr 2e-3 (ds_configs/cpu_dalle.json); 1,500 spends the demo's remaining minutes.
    "demo": DalleTrainConfig(model=dataclasses.replace(DALLE_PRESETS["tiny"], resblock_dtype="bfloat16"), steps=1500,
                             ema_decay=0.99, log_every=10, eval_every=500, save_every=500),
    "test": DalleTrainConfig(model=DALLE_PRESETS["test"], steps=20, ema_decay=0.9, log_every=1, eval_every=0,
                             save_every=10, data=DalleDataConfig(val_batches=2)),
}


# ----------------------------------------------------------------------------------------------------------------
# The contrastive reranker
# ----------------------------------------------------------------------------------------------------------------

VISION_POSITION_INITS: tuple[str, ...] = ("sincos2d", "default")


@dataclass
class ClipModelConfig:
    """A small CLIP for reranking samples of the project's own data (widths and depths for CPU training)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 2
    heads: int = 4
    projection_dim: int = 128
    text_len: int = 32
    """Text positions including <bos> and <|endoftext|>."""
    logit_scale_init: float = 2.6592
    """Initial log of the contrastive logit scale (CLIP's ln(1/0.07) by default; trained from there)."""
    vision_position_init: str = "sincos2d"
    """How the vision tower's learned position embeddings start: ``"sincos2d"`` (a 2-D sine/cosine table over the
    patch grid, MAE's fixed embedding, Chen et al. 2021 / He et al. 2022, used here as the starting point of learned
    ones) or ``"default"`` (transformers' N(0, 0.02²), which is small next to the patch content: a CLIP trained from
    it stays at chance on position and relation for hundreds of updates, docs/dvae_cpu_trials.md)."""


@dataclass
class ClipTrainConfig:
    """Training a small CLIP (``transformers.CLIPModel``) on the project's own (image, caption) data for reranking."""

    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(num_workers=0))
    """The images and captions; loaded in the training process by default (``data.num_workers=0``): on a GPU set a
    few workers (DataConfig.num_workers)."""
    tokenizer: str | None = None
    """A saved caption tokenizer folder (e.g. the prior's <run>/tokenizer); None trains one on the captions."""
    dvae: str | None = None
    """A dvae.pt: train on images passed through it (encode → codes → decode), the kind of image the reranker will
    judge, instead of the clean originals."""
    steps: int = 800
    hard_negatives: int = 0
    """Hard negative captions per image: its caption with one attribute made false, a different attribute each
    (shapes data only; dalle_ds.data.shapes.contrast_caption); at most the attributes a scene has (4)."""
    binding_negatives: bool = False
    """Add, per two-object image, the captions that its scene makes false only in binding
    (dalle_ds.data.shapes.binding_captions: the opposite relation, the colours traded); shapes data only."""
    mirror_negatives: bool = False
    """Add one hard negative image per image: its scene re-rendered mirrored so that the caption's position or
    relation is false (shapes data only; dalle_ds.data.shapes.spatial_contrast_scene)."""
    ema_decay: float = 0.0
    """0 exports the final weights."""
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 400
    keep_checkpoints: int = 1
    seed: int = 1234

    def validate(self, where: str = "clip_run") -> "ClipTrainConfig":
        m = self.model
        for name in ("image_size", "patch_size", "width", "layers", "heads", "projection_dim", "text_len"):
            if getattr(m, name) < 1:
                _fail(f"{where}.model.{name}", "must be ≥ 1")
        if m.text_len < 3:
            _fail(f"{where}.model.text_len", f"needs ≥ 3 positions (<bos>, a caption token, <|endoftext|>), got "
                                             f"{m.text_len}")
        if m.image_size % m.patch_size:
            _fail(f"{where}.model", f"image_size {m.image_size} is not divisible by patch_size {m.patch_size}")
        if m.width % m.heads:
            _fail(f"{where}.model", f"width {m.width} is not divisible by heads {m.heads}")
        if m.vision_position_init not in VISION_POSITION_INITS:
            _fail(f"{where}.model.vision_position_init",
                  f"{m.vision_position_init!r} is not one of {', '.join(VISION_POSITION_INITS)}")
        if m.vision_position_init == "sincos2d" and m.width % 4:
            _fail(f"{where}.model", f"vision_position_init 'sincos2d' needs width divisible by 4, got {m.width}")
        self.data.validate(m.image_size, f"{where}.data")
        if self.data.augment != "none":
            _fail(f"{where}.data.augment", "the paper gives the random crops of the dVAE and the prior only; the CLIP "
                                           "trains on centred squares")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            _fail(f"{where}.tokenizer", f"no such directory: {self.tokenizer}")
        if self.dvae and not Path(self.dvae).is_file():
            _fail(f"{where}.dvae", f"no such file: {self.dvae}")
        if self.steps < 1 or not (0 <= self.ema_decay < 1):
            _fail(where, "steps must be ≥ 1 and ema_decay in [0, 1)")
        if not 0 <= self.hard_negatives <= 4:
            _fail(f"{where}.hard_negatives", f"must be 0..4 (a scene has at most 4 attributes to make false), got "
                                             f"{self.hard_negatives}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                _fail(f"{where}.{name}", "must be ≥ 0")
        if (self.hard_negatives or self.binding_negatives or self.mirror_negatives) and self.data.name != "shapes":
            _fail(where, f"hard_negatives / binding_negatives / mirror_negatives are built from the shapes data's "
                         f"scenes, and data.name is {self.data.name!r}: set hard_negatives=0, "
                         "binding_negatives=false and mirror_negatives=false (the demo preset turns them on)")
        return self


CLIP_RUN_PRESETS: dict[str, ClipTrainConfig] = {
    # Binding negatives and two one-attribute contrasts per image (docs/dvae_cpu_trials.md: the two-object mirror test
    # 0.52 -> 0.89 with binding negatives; with the contrasts too, relation 0.94 and shape 0.85 on clean images).
    "demo": ClipTrainConfig(steps=600, save_every=300, binding_negatives=True, hard_negatives=2,
                            data=DataConfig(train_samples=10000, eval_samples=256, num_workers=0)),
    "test": ClipTrainConfig(model=ClipModelConfig(width=32, layers=1, heads=2, projection_dim=32, text_len=24),
                            data=DataConfig(train_samples=256, eval_samples=32, num_workers=0), steps=10,
                            log_every=1, save_every=5),
}
