"""The dVAE weights OpenAI released with the paper (github.com/openai/DALL-E) as this project's :class:`DiscreteVAE`.

The release is two pickled modules, ``encoder.pkl`` and ``decoder.pkl`` (https://cdn.openai.com/dall-e/encoder.pkl
and .../decoder.pkl), instances of the ``dall_e`` package's ``Encoder`` and ``Decoder``: 4 groups of 2 bottleneck
resblocks, 256 hidden channels, K = 8192 codes, a 128-channel decoder input, trained on 256×256 images (a 32×32 grid).
That is the architecture of :mod:`dalle_ds.models.dvae` (and its ``paper`` preset), parameter for parameter; only the
names differ. With it, stage 2 can start from the paper's own stage 1 instead of a 3M-update dVAE run.

Reading the files needs no ``dall_e`` package and runs no code from them: ``torch.load(weights_only=True)`` with the
release's five classes allowlisted under their names as empty ``nn.Module`` stand-ins, so unpickling only rebuilds the
module tree and its tensors (the release's ``Conv2d`` keeps its weight and bias as ``w`` and ``b``). A state dict saved
from those modules (``torch.save(enc.state_dict(), ...)``) is read the same way.

The correspondence (release name → this project's), for group g and block b (1-based), G groups, B blocks each:

* encoder ``blocks.input`` → ``encoder.net.0``; ``blocks.group_g.block_b`` → ``encoder.net.{1 + (g-1)(B+1) + b-1}``
  (a max-pool follows each group but the last); ``blocks.output.conv`` → the last module of ``encoder.net``;
* decoder ``blocks.input`` → ``decoder.input``; ``blocks.group_g.block_b`` → ``decoder.net.{(g-1)(B+1) + b-1}``
  (an upsampling follows each group but the last); ``blocks.output.conv`` → the last module of ``decoder.net``;
* inside a block: ``id_path`` → ``id_path``; ``res_path.conv_k`` → ``res_path.{2k-1}`` (a ReLU precedes each conv).

``tests/test_openai_dvae.py`` builds the release's own classes (the ``DALL-E`` package from PyPI), randomizes every
weight and bias, pickles them as the release did, and checks that the imported model's logits, codes and decoded
pixels equal theirs.
"""
from __future__ import annotations

import collections
import pickle
import re
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dalle_ds.config import DVAEConfig
from dalle_ds.models.dvae import DiscreteVAE
from dalle_ds.utils.errors import first_line

__all__ = ["RELEASE_URLS", "read_release_state", "release_config", "convert_release", "import_release"]

#: Where OpenAI serves the released weights (the README of github.com/openai/DALL-E).
RELEASE_URLS = {"encoder": "https://cdn.openai.com/dall-e/encoder.pkl",
                "decoder": "https://cdn.openai.com/dall-e/decoder.pkl"}

# The release's classes, by the names its pickles refer to them with.
_RELEASE_CLASSES = ("dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.decoder.Decoder",
                    "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d")
# The torch modules inside them (no parameters of their own).
_TORCH_CLASSES = (nn.Sequential, nn.Identity, nn.ReLU, nn.MaxPool2d, nn.Upsample)


class _ReleaseModule(nn.Module):
    """Stand-in for a ``dall_e`` class while unpickling: holds the submodules and tensors, runs nothing."""


#: The classes a release file may name, by the names its pickles use: the stand-ins and the torch modules.
_ALLOWED: dict[str, type] = {
    **{name: type(name.rsplit(".", 1)[1], (_ReleaseModule,), {}) for name in _RELEASE_CLASSES},
    **{f"{cls.__module__}.{cls.__name__}": cls for cls in _TORCH_CLASSES},
}


class _LegacyUnpickler(pickle.Unpickler):
    """For files in torch's pre-1.6 (non-zip) format, where ``weights_only`` refuses pickled modules: only
    :data:`_ALLOWED` plus what tensors and module state are rebuilt from may be named."""

    _extra = {"collections.OrderedDict": collections.OrderedDict, "builtins.set": set, "__builtin__.set": set,
              "torch.device": torch.device, "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
              "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter}
    _extra.update({f"torch.{t}": getattr(torch, t) for t in ("FloatStorage", "HalfStorage", "DoubleStorage",
                                                            "BFloat16Storage")})

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        found = _ALLOWED.get(full) or self._extra.get(full)
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {full}: not part of the released dVAE")
        return found


#: A ``pickle_module`` for ``torch.load`` that unpickles with :class:`_LegacyUnpickler`.
_legacy_pickle = types.ModuleType("dalle_ds_release_pickle")
_legacy_pickle.Unpickler = _LegacyUnpickler
_legacy_pickle.load = lambda f, **kw: _LegacyUnpickler(f, **kw).load()


def _load(p: Path) -> Any:
    if zipfile.is_zipfile(p):  # torch >= 1.6's format
        with torch.serialization.safe_globals([(cls, name) for name, cls in _ALLOWED.items()]):
            return torch.load(p, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # torch compares pickled class sources with the classes it got: stand-ins here
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        return torch.load(p, map_location="cpu", weights_only=False, pickle_module=_legacy_pickle)


def read_release_state(path: str | Path, part: str) -> dict[str, torch.Tensor]:
    """The state dict of a released ``encoder.pkl`` / ``decoder.pkl`` (``part``: "encoder" or "decoder"); also accepts
    a file holding that state dict. Raises ValueError when the file is not the named part of the release."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{part} file not found: {p}")
    try:
        obj: Any = _load(p)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{p}: not a torch file of the released dVAE {part} (torch.load: {first_line(e, 160)}); "
                         f"want {RELEASE_URLS[part]} or a state dict saved from it") from e
    if isinstance(obj, nn.Module):
        kind = type(obj).__name__
        if kind != part.capitalize():
            raise ValueError(f"{p}: holds the release's {kind}, not its {part.capitalize()} (swapped files?)")
        state = obj.state_dict()
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        raise ValueError(f"{p}: holds a {type(obj).__name__}, not the released dVAE {part} or its state dict")
    if "blocks.input.w" not in state or "blocks.output.conv.w" not in state:
        raise ValueError(f"{p}: no blocks.input.w / blocks.output.conv.w: not the released dVAE's {part} layout "
                         f"(first keys: {', '.join(list(state)[:4])})")
    return {k: v.detach() for k, v in state.items()}


def _layout(state: dict[str, torch.Tensor], part: str) -> tuple[int, int]:
    """(groups, blocks per group) read off the key names; every group must have the same number of blocks."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"blocks\.group_(\d+)\.block_(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    groups = sorted(blocks)
    if not groups or groups != list(range(1, len(groups) + 1)):
        raise ValueError(f"the {part}'s groups are {groups}, want 1..G")
    counts = {len(b) for b in blocks.values()}
    if len(counts) != 1 or any(sorted(b) != list(range(1, len(b) + 1)) for b in blocks.values()):
        raise ValueError(f"the {part}'s groups have blocks {dict(sorted(blocks.items()))}: want 1..B in each")
    return len(groups), counts.pop()


def release_config(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], image_size: int = 256) -> DVAEConfig:
    """The :class:`DVAEConfig` of a released encoder/decoder pair, read off the tensor shapes (the release itself is
    256 px, K = 8192, hidden 256, 4 × 2 blocks, decoder input 128: the ``paper`` preset). ``image_size``: the side
    the model is fed; the network is convolutional, the release was trained at 256."""
    groups, per_group = _layout(enc, "encoder")
    if _layout(dec, "decoder") != (groups, per_group):
        raise ValueError(f"encoder has {groups} groups × {per_group} blocks but the decoder "
                         f"{_layout(dec, 'decoder')}: not one release")
    hidden, channels = enc["blocks.input.w"].shape[:2]
    vocab = enc["blocks.output.conv.w"].shape[0]
    init, dec_vocab = dec["blocks.input.w"].shape[:2]
    out_maps, dec_hidden = dec["blocks.output.conv.w"].shape[:2]
    if dec_vocab != vocab:
        raise ValueError(f"encoder has K = {vocab} codes but the decoder reads {dec_vocab}: not one release")
    if out_maps != 2 * channels or dec_hidden != hidden:
        raise ValueError(f"decoder ends in {dec_hidden} → {out_maps} maps, want {hidden} → {2 * channels} (location "
                         f"and log-scale of {channels} channels): not the encoder's partner")
    return DVAEConfig(image_size=image_size, channels=int(channels), vocab_size=int(vocab), hidden=int(hidden),
                      blocks_per_group=per_group, groups=groups, decoder_init=int(init)).validate("release")


def _block_keys(src: str, dst: str, has_id_path: bool) -> list[tuple[str, str]]:
    pairs = [(f"{src}.res_path.conv_{k}", f"{dst}.res_path.{2 * k - 1}") for k in range(1, 5)]
    return pairs + ([(f"{src}.id_path", f"{dst}.id_path")] if has_id_path else [])


def _conv_pairs(cfg: DVAEConfig, enc: dict, dec: dict) -> list[tuple[str, str, dict]]:
    """(release conv name, this project's conv name, the release state it is in), every conv once."""
    G, B = cfg.groups, cfg.blocks_per_group
    out: list[tuple[str, str, dict]] = [("blocks.input", "encoder.net.0", enc), ("blocks.input", "decoder.input", dec)]
    for g in range(1, G + 1):
        for b in range(1, B + 1):
            src = f"blocks.group_{g}.block_{b}"
            for state, dst in ((enc, f"encoder.net.{1 + (g - 1) * (B + 1) + b - 1}"),
                               (dec, f"decoder.net.{(g - 1) * (B + 1) + b - 1}")):
                out += [(s, d, state) for s, d in _block_keys(src, dst, f"{src}.id_path.w" in state)]
    last_enc = 1 + G * B + (G - 1) + 1  # input conv, blocks, pools, then ReLU and the output conv
    last_dec = G * B + (G - 1) + 1      # blocks, upsamplings, then ReLU and the output conv
    out += [("blocks.output.conv", f"encoder.net.{last_enc}", enc), ("blocks.output.conv", f"decoder.net.{last_dec}",
                                                                     dec)]
    return out


def convert_release(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor],
                    cfg: DVAEConfig) -> dict[str, torch.Tensor]:
    """The release's two state dicts as one :class:`DiscreteVAE` state dict (fp32); every tensor of the release is
    used exactly once, or ValueError names what is left over."""
    state: dict[str, torch.Tensor] = {}
    used: dict[int, set[str]] = {id(enc): set(), id(dec): set()}
    for src, dst, release in _conv_pairs(cfg, enc, dec):
        for s, d in ((".w", ".weight"), (".b", ".bias")):
            if src + s not in release:
                raise ValueError(f"the release has no {src + s}")
            state[dst + d] = release[src + s].float().clone()
            used[id(release)].add(src + s)
    for name, release in (("encoder", enc), ("decoder", dec)):
        extra = sorted(set(release) - used[id(release)])
        if extra:
            raise ValueError(f"the {name} has tensors this architecture has no place for: {', '.join(extra[:6])}")
    return state


def import_release(encoder: str | Path, decoder: str | Path, image_size: int = 256) -> DiscreteVAE:
    """The released encoder and decoder files as a :class:`DiscreteVAE` in eval mode (every tensor's shape checked
    against the model first, so a mismatch names the tensor)."""
    enc = read_release_state(encoder, "encoder")
    dec = read_release_state(decoder, "decoder")
    cfg = release_config(enc, dec, image_size)
    model = DiscreteVAE(cfg)
    state = convert_release(enc, dec, cfg)
    for name, want in model.state_dict().items():  # the shapes read off the tensors must fit every tensor
        if state[name].shape != want.shape:
            raise ValueError(f"not the release's layout: the tensor for {name} has shape {tuple(state[name].shape)}, "
                             f"a {cfg.groups} x {cfg.blocks_per_group}-block dVAE with hidden {cfg.hidden} wants "
                             f"{tuple(want.shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()

