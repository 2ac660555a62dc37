"""Image fidelity as the paper measures it (§3.2, Fig. 9): the Fréchet distance and the Inception score of samples
against held-out images, each after a Gaussian blur of one radius applied to the held-out images and the samples
alike (the dVAE's reconstructions lose fine detail, so the paper also reports FID at growing blur radii).

Two feature spaces:

* ``"inception"``: FID and IS with the standard Inception-v3 (the TensorFlow-compatible port of torch-fidelity),
  through torchmetrics. Needs ``pip install "dalle_ds[fid]"`` (torch-fidelity, which imports torchvision: use the
  torchvision that matches your torch) and the network's weights: torch-fidelity downloads them on first use, or
  ``weights=`` names a local copy for machines without internet. Comparable with published FIDs only for the same
  reference images, image count and resolution.
* ``"clip"``: the Fréchet distance in the image-embedding space of a CLIP trained by this project ("FD-CLIP"). No
  download, runs anywhere; not comparable with any FID, and biased toward samples reranked by that same CLIP (use
  another CLIP for the features where you can). No Inception score.

The Fréchet distance and the Inception score are torchmetrics' (``FrechetInceptionDistance`` with the feature
network passed in, ``InceptionScore``); under ``torch.distributed`` their states are summed / gathered over the ranks
when computed. One feature network serves every radius and every set of samples: :class:`_LastCall` runs it once
per batch of images even though each (radius, set) pair has a metric of its own.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

FEATURES = ("inception", "clip")
#: torch-fidelity's Inception-v3 outputs used here: the 2048 pool features (FID) and the 1008 logits (IS)
INCEPTION_WIDTHS = {"2048": 2048, "logits_unbiased": 1008}


class FidelityUnavailable(RuntimeError):
    """The chosen feature network cannot be built here (a missing package or weights file); the message says why."""


def gaussian_blur(images: torch.Tensor, radius: float) -> torch.Tensor:
    """uint8 [N, C, H, W] blurred by PIL's Gaussian filter of ``radius`` (its standard deviation in pixels; radius 0
    returns the input). PIL is what "radius" means in the paper's image tooling; each image is filtered on its own."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"gaussian_blur wants uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if radius < 0:
        raise ValueError(f"blur radius must be ≥ 0, got {radius}")
    if radius == 0:
        return images
    out = []
    for im in images.permute(0, 2, 3, 1).cpu().numpy():
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous().to(images.device)


class _LastCall(torch.nn.Module):
    """A feature network that remembers its last input and output: the metrics of every radius and every set of
    samples call it with the same tensor object, and it runs once. ``num_features`` tells torchmetrics the width."""

    def __init__(self, net: torch.nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images or self._last[1] != images._version:
            self._last = (images, images._version, self.net(images))
        return self._last[2]


class ClipImageFeatures(torch.nn.Module):
    """uint8 [N, 3, H, W] → the unit-norm image embeddings of a :class:`dalle_ds.sample.clip.ClipReranker`."""

    def __init__(self, reranker):
        super().__init__()
        self.reranker = reranker
        self.num_features = int(reranker.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.reranker.image_embeddings(images).float()


def inception_unavailable() -> str | None:
    """Why features "inception" cannot run here (torch-fidelity missing), or None: cheap, so a command line can be
    refused before any model or data is loaded."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        return ('features "inception" need torch-fidelity: pip install "dalle_ds[fid]" (and the torchvision built for '
                'your torch); or use features "clip"')
    return None


def _inception(feature: str, weights: str | None) -> torch.nn.Module:
    missing = inception_unavailable()
    if missing:
        raise FidelityUnavailable(missing)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                                  feature_extractor_weights_path=weights)
    except (ImportError, OSError, RuntimeError) as e:  # torchvision built for another torch; no network, no file
        hint = "" if weights else " (no internet? download the weights once and pass their file)"
        raise FidelityUnavailable(f"could not build torch-fidelity's Inception-v3: {e}{hint}") from e


class FidelityMeter:
    """Fréchet distance (and, with Inception features, Inception score) of each named set of samples against the
    real images, at each blur radius. Feed it batches: ``update(real, "real")``, ``update(samples, name)`` for each
    name in ``sets``; then :meth:`compute`. Works per rank under ``torch.distributed`` (compute gathers)."""

    def __init__(self, features: str, sets: Sequence[str], radii: Sequence[float] = (0,), clip=None,
                 inception_weights: str | None = None, device: torch.device | str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore

        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if not sets or "real" in sets or len(set(sets)) != len(sets):
            raise ValueError(f"sets must be distinct names other than 'real', got {list(sets)}")
        if not radii or any(r < 0 for r in radii) or len(set(radii)) != len(radii):
            raise ValueError(f"radii must be distinct and ≥ 0, got {list(radii)}")
        self.features, self.sets, self.radii, self.device = features, list(sets), list(radii), torch.device(device)
        if features == "clip":
            if clip is None:
                raise ValueError('features "clip" need a CLIP (a ClipReranker) for the embeddings')
            embed = ClipImageFeatures(clip)
            fd_net, is_net = _LastCall(embed, embed.num_features), None
        else:
            fd_net, is_net = (_LastCall(_inception(f, inception_weights), INCEPTION_WIDTHS[f])
                              for f in ("2048", "logits_unbiased"))
        self.fd, self.inception_score = {}, {}  # (set name, radius) -> metric
        for name in self.sets:
            for r in self.radii:
                self.fd[name, r] = FrechetInceptionDistance(feature=fd_net, reset_real_features=False).to(self.device)
                if is_net is not None:
                    with warnings.catch_warnings():  # "will save all extracted features in buffer": 1008 per image
                        warnings.simplefilter("ignore", UserWarning)
                        self.inception_score[name, r] = InceptionScore(feature=is_net).to(self.device)
        self.counts = dict.fromkeys(["real", *self.sets], 0)

    def update(self, images: torch.Tensor, name: str) -> None:
        """Add uint8 [N, 3, H, W] images to the set ``name`` ("real" for the reference images)."""
        if name not in self.counts:
            raise ValueError(f"unknown set {name!r}; this meter has 'real' and {self.sets}")
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.counts[name] += len(images)
        for r in self.radii:
            blurred = gaussian_blur(images, r).to(self.device)
            for s in (self.sets if name == "real" else [name]):
                self.fd[s, r].update(blurred, real=name == "real")
            if name != "real" and (name, r) in self.inception_score:
                self.inception_score[name, r].update(blurred)

    def global_counts(self) -> dict[str, int]:
        """Images per set, summed over the ranks (a collective under ``torch.distributed``: call it on every rank)."""
        counts = torch.tensor(list(self.counts.values()), dtype=torch.int64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(self.device)
            torch.distributed.all_reduce(counts)
        return dict(zip(self.counts, counts.tolist()))

    def compute(self, seed: int = 0) -> dict:
        """``{"fd": {set: {radius: value}}, "inception_score": {set: {radius: [mean, std]}}}`` (the second empty for
        CLIP features), gathered over the ranks. ``seed``: the Inception score's random split of the samples."""
        out = {"fd": {s: {} for s in self.sets}, "inception_score": {}}
        for (s, r), metric in self.fd.items():
            out["fd"][s][r] = float(metric.compute())
        for (s, r), metric in self.inception_score.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                mean, std = metric.compute()
            out["inception_score"].setdefault(s, {})[r] = [float(mean), float(std)]
        return out
