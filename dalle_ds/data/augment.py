"""The paper's training-time image augmentation: random square crops (Ramesh et al. 2021, Listings 1 and 2).

The paper gives its TensorFlow preprocessing code for both stages. In words, for an image of ``w x h`` pixels,
``s = min(w, h)`` and a target size ``S`` (256 in the paper):

* **dVAE (Listing 1):** a ``s x s`` square at a uniformly random offset; an integer side ``t`` drawn uniformly from
  ``[min(s, round(9/8 S)), min(s, round(12/8 S))]``; the square resized to ``t x t`` (TF's ``AREA`` method); a
  uniformly random ``S x S`` crop of that; a horizontal flip with probability 1/2.
* **prior (Listing 2):** a ``s x s`` square whose offset along the longer side is drawn from ``[a, max(a + 1, b))``
  with ``a = 3 (l - s) // 8``, ``b = 5 (l - s) // 8`` (``l`` that side's length): the middle quarter of the slack,
  so the crop stays near the centre and keeps what the caption names; ``t`` from ``[S, min(s, round(9/8 S))]``;
  resize, random ``S x S`` crop as above; **no flip** ("the image may contain text").

Choices of ours, where the listings leave room:

* Resizing is TF's ``AREA`` method done here (:func:`area_resize`): each output pixel is the mean of the input over
  the square it covers, partly covered pixels weighted by the fraction covered, in float32 as TF's kernel, then
  rounded (tested against a float64 definition). Pillow has no such filter: its ``BOX`` weighs whole pixels and
  rounds to 8 bits between its horizontal and vertical passes (up to 1 level off the block mean at a 2x reduction).
  The listing's TF1 call sets ``align_corners=True``, which for ``AREA`` stretches the footprint to (s - 1)/(t - 1)
  input pixels instead of s/t (less than one input pixel over the whole image); we use s/t, as TF2's
  ``tf.image.resize`` does.
* Images smaller than ``S`` (``s < S``): the listings would fail there (a crop larger than the image). The square is
  chosen as above, then scaled up to ``S`` with the antialiased bicubic filter that
  :func:`dalle_ds.data.images.to_chw_uint8` uses, and the dVAE's flip still applies.
* Integer draws follow the listings' bounds (``tf.random.uniform`` with an exclusive upper bound, TF's
  ``random_crop`` with offsets ``0 ... t - S``), from a numpy generator seeded per sample by (run seed, listing,
  epoch, index): each epoch sees new crops and a resumed run the same ones.

Evaluation and anything read without a sample key keep the deterministic centre square of
:func:`~dalle_ds.data.images.to_chw_uint8`; token shards hold the centre square, or with ``tokenize_images.py
--crops K`` K crops of Listing 2 per image.

Appendix C's filter sits beside it: :func:`aspect_ratio_ok` (the paper keeps images whose aspect ratio lies in
[1/2, 2], so that the square crops keep what the caption names).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dalle_ds.utils.seeds import sample_seed

from .images import to_rgb

__all__ = ["LISTINGS", "CropPlan", "dvae_plan", "prior_plan", "apply_plan", "area_resize", "PaperCrop",
           "aspect_ratio_ok", "describe_crops"]

LISTINGS = ("dvae", "prior")
_UPSCALE = Image.Resampling.BICUBIC  # as in images.to_chw_uint8


@dataclass(frozen=True)
class CropPlan:
    """One draw of a listing for one image: the ``side``-square at (``left``, ``top``), resized to ``t`` x ``t``,
    the ``size``-square at (``x``, ``y``) of that, mirrored when ``flip``. ``t < size`` (only for images smaller
    than ``size``) means: scale the square up to ``size`` instead (``x = y = 0``)."""

    left: int
    top: int
    side: int
    t: int
    x: int
    y: int
    flip: bool


def _offsets(t: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """TF's ``random_crop`` of a ``size``-square from a ``t``-square: offsets uniform in 0 ... t - size."""
    if t <= size:
        return 0, 0
    x, y = rng.integers(0, t - size + 1, size=2)
    return int(x), int(y)


def _check_geometry(width: int, height: int, size: int) -> None:
    """An image of at least 1 x 1 pixel and a positive int target side (a 0-pixel image became a black square)."""
    for name, value in (("width", width), ("height", height), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def dvae_plan(width: int, height: int, size: int, rng: np.random.Generator) -> CropPlan:
    """Listing 1 (dVAE training): random square, resize to 9/8-12/8 of ``size``, random crop, random flip."""
    _check_geometry(width, height, size)
    s = min(width, height)
    left, top = int(rng.integers(0, width - s + 1)), int(rng.integers(0, height - s + 1))
    t = int(rng.integers(min(s, round(9 / 8 * size)), min(s, round(12 / 8 * size)) + 1))
    x, y = _offsets(t, size, rng)
    return CropPlan(left, top, s, t, x, y, bool(rng.random() < 0.5))


def _near_centre(length: int, s: int, rng: np.random.Generator) -> int:
    low = 3 * (length - s) // 8
    return int(rng.integers(low, max(low + 1, 5 * (length - s) // 8)))


def prior_plan(width: int, height: int, size: int, rng: np.random.Generator) -> CropPlan:
    """Listing 2 (transformer training): near-centre square, resize to 1-9/8 of ``size``, random crop, no flip."""
    _check_geometry(width, height, size)
    s = min(width, height)
    top, left = _near_centre(height, s, rng), _near_centre(width, s, rng)
    t_max = min(s, round(9 / 8 * size))
    t = int(rng.integers(size, t_max + 1)) if t_max >= size else s
    x, y = _offsets(t, size, rng)
    return CropPlan(left, top, s, t, x, y, False)


def _area_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Area-average ``a`` along ``axis`` to ``n_out`` samples (float32, as TF computes it): output k is the mean of
    the piecewise-constant input over [e_k, e_k+1), e_k = k * n_in / n_out.

    Shrinking (``n_out`` ≤ ``n_in``, every window at least one input sample wide): the sum of the whole samples from
    floor(e_k) to floor(e_k+1) (``np.add.reduceat``), less the uncovered part of the first, plus the covered part of
    the last: one pass over the input. Growing: differences of the running integral at the edges."""
    n_in = a.shape[axis]
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    first = np.minimum(np.floor(edges).astype(np.int64), n_in - 1)  # the sample each edge falls in
    shape = [1] * a.ndim
    shape[axis] = n_out + 1
    frac = (edges - first).astype(np.float32).reshape(shape)  # how far into it (1 at the end of the last one)
    lead, trail = np.take(frac, range(n_out), axis=axis), np.take(frac, range(1, n_out + 1), axis=axis)
    if n_out <= n_in:
        out = np.add.reduceat(a, first[:-1], axis=axis, dtype=np.float32)
        out -= lead * np.take(a, first[:-1], axis=axis)
        out += trail * np.take(a, first[1:], axis=axis)
        # the last window's reduceat sum already holds the last sample whole; its trailing edge added it again
        last = [slice(None)] * a.ndim
        last[axis] = n_out - 1
        out[tuple(last)] -= np.take(a, n_in - 1, axis=axis)
    else:
        integral = np.cumsum(a, axis=axis, dtype=np.float64)
        integral = np.concatenate([np.zeros_like(np.take(integral, [0], axis=axis)), integral], axis=axis)
        at = np.take(integral, first, axis=axis) + frac * np.take(a, first, axis=axis)
        out = (np.take(at, range(1, n_out + 1), axis=axis) - np.take(at, range(n_out), axis=axis)).astype(np.float32)
    out *= np.float32(n_out / n_in)
    return out


def area_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """TF's ``ResizeMethod.AREA`` of an H x W (x C) uint8 image to ``size`` x ``size``: fractional-coverage means in
    float32 (as TF's kernel), rounded to nearest (``rint``) and clipped, as the listings cast back to uint8."""
    if arr.dtype != np.uint8:  # float pixels in [0, 1] came back as 0s and 1s
        raise TypeError(f"area_resize takes uint8 pixels (0..255), got {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"area_resize takes an H x W (x C) image, got shape {arr.shape}")
    _check_geometry(arr.shape[1], arr.shape[0], size)
    out = _area_axis(_area_axis(arr, size, 0), size, 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_plan(img: Image.Image, plan: CropPlan, size: int) -> Image.Image:
    """The RGB ``size``-square that ``plan`` describes (``img`` in any Pillow mode; ``plan`` drawn for its size)."""
    _check_geometry(*img.size, size)
    if plan.left + plan.side > img.width or plan.top + plan.side > img.height:
        raise ValueError(f"the plan's square ({plan.left}, {plan.top}, side {plan.side}) does not fit a "
                         f"{img.width} x {img.height} image: it was drawn for another image")
    img = to_rgb(img)
    if plan.t < size:  # an image smaller than the target: scale its square up instead of failing
        box = (plan.left, plan.top, plan.left + plan.side, plan.top + plan.side)
        out = np.asarray(img.resize((size, size), _UPSCALE, box=box))
    else:
        square = np.asarray(img)[plan.top:plan.top + plan.side, plan.left:plan.left + plan.side]
        if plan.t != plan.side:
            square = area_resize(square, plan.t)
        out = square[plan.y:plan.y + size, plan.x:plan.x + size]
    return Image.fromarray(np.ascontiguousarray(out[:, ::-1] if plan.flip else out))


_PLANS = {"dvae": dvae_plan, "prior": prior_plan}


@dataclass(frozen=True)
class PaperCrop:
    """One stage's listing at one target size, seeded per sample: ``crop(img, key)`` → an RGB ``size``-square.

    ``key`` is the sample's (epoch, index) (:class:`dalle_ds.train.data_loading.EpochTagged`); the draws are a pure
    function of (``seed``, ``listing``, key)."""

    listing: str
    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.listing not in LISTINGS:
            raise ValueError(f"listing must be one of {', '.join(LISTINGS)}, got {self.listing!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")

    def plan(self, width: int, height: int, key: tuple[int, int]) -> CropPlan:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"key must be the sample's (epoch, index), got {key!r}")
        rng = np.random.default_rng(sample_seed(self.seed, f"crop/{self.listing}", key))
        return _PLANS[self.listing](width, height, self.size, rng)

    def __call__(self, img: Image.Image, key: tuple[int, int]) -> Image.Image:
        return apply_plan(img, self.plan(*img.size, key), self.size)


def aspect_ratio_ok(width: int, height: int, max_ratio: float) -> bool:
    """Appendix C's filter: the longer side at most ``max_ratio`` times the shorter (``max_ratio`` ≤ 0: no limit)."""
    if max_ratio <= 0:
        return True
    return max(width, height) <= max_ratio * min(width, height)


def describe_crops(dataset) -> str:
    """What a training dataset's images are, for the trainers' start-up log: the paper's random crops, crops stored
    in token shards, or the centred square."""
    crop = getattr(dataset, "crop", None)
    if isinstance(crop, PaperCrop):
        listing = LISTINGS.index(crop.listing) + 1
        return f"random crops of the paper's Listing {listing} ({crop.listing}), new each epoch"
    stored = getattr(dataset, "crops", 0)
    if stored:
        return f"{stored} stored random crops per image (Listing 2), crop e mod {stored} in epoch e"
    return "centred squares"
