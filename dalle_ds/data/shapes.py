"""Synthetic "shapes" text-to-image data: coloured shapes on black with exact, machine-readable captions.

Why this dataset exists
-----------------------
No pretrained CLIP/Inception weights can be fetched offline, so FID or CLIP scores are unavailable. Instead every
sample carries its *structured scene* next to the caption, and ``dalle_ds.eval.shapes_scorer`` reads a generated
image back with a rule-based detector. A perfect generator scores ~100% exact match, a caption-ignoring one ~0%,
and held-out (colour, shape) pairs in ``test_ood`` measure compositional generalisation
(gap = exact(test_id) - exact(test_ood)). The design follows the measured proposal in
``shared/research/data_eval.md`` section 4; the code here is written from that description.

Vocabulary
----------
* 8 well-separated colours (``COLORS``) on a black background.
* 4 shapes at 64 px (``SHAPES``: circle, square, triangle, cross). ``EXTRA_SHAPES`` (diamond, star) are only
  offered at 128 px (``extra_shapes=True``): at 64 px a small star or diamond is ~10 px across and blurs into a
  circle/cross, which made the scorer unreliable in the prototype measurements (93.7% exact under blur).
* 2 sizes, a 3x3 grid of named positions, 4 spatial relations.

Scenes
------
30% of scenes have one object at a named grid cell ("a small red circle in the top left"), 70% have two objects
in a relation ("a large blue square above a small green cross"). A scene is a JSON-serialisable dict::

    {
      "image_size": 64,              # pixel frame of the coordinates below (64 or 128)
      "objects": [                   # in caption order
        {"color": "red", "shape": "circle", "size": "small",
         "center": [x, y],           # pixels; continuous coordinates, pixel i covers [i, i+1)
         "half_size": 6.1},          # half the side of the shape's axis-aligned box, pixels
        ...
      ],
      "relation": "above" | "below" | "left of" | "right of" | None,  # objects[0] <relation> objects[1]
      "position": "top left" | ... | "bottom right" | None,          # grid cell of objects[0] (one-object scenes)
      "caption": "a small red circle in the top left",
      "shape_set": ["circle", "square", "triangle", "cross"],         # shapes this dataset draws from
    }

Every shape exactly fills its box ``[cx - h, cx + h] x [cy - h, cy + h]`` (the triangle points up with its base
on the box's bottom edge; the star is stretched to touch all four sides), so the box extent 2h *is* the size and
the box centre *is* the position for every shape.

Geometry constraints (in 64-px units, scaled by ``image_size / 64``) and why they exist
--------------------------------------------------------------------------------------
The scorer can only be ~100% right on ground truth if every caption attribute is unambiguous in the image:

* half-size 5-7 px (small) or 10.5-13 px (large): box extents 10-14 vs 21-26 px leave a wide gap around the
  scorer's 17 px threshold, so +-1 px of blur or anti-aliasing never flips the size.
* every shape box stays >= 2 px inside the image, so blur never clips a shape at the border.
* two objects' boxes are separated by >= 4 px along at least one axis: the shapes never touch, and stay separate
  connected components even after a sigma=1 blur (each fringe is below the foreground threshold 2 px out).
* relation: the centre offset along the relation's axis must satisfy |main| >= 1.5 |other| + 4 px, so "above"
  is never confusable with "left of" and small centre errors never flip it.
* one object: its centre stays >= 4 px inside its grid cell, so the named position is never borderline.
* two objects never share the same (colour, shape), so matching detections to caption objects is unambiguous.

Positions are sampled uniformly under those constraints by vectorised rejection sampling, so the distribution is
uniform over all valid layouts (no hand-placed slots).

Held-out compositions (``HELD_OUT_PAIRS``)
-----------------------------------------
A "diagonal" of (colour, shape) pairs: colour i (in ``COLORS`` order) with shape ``i mod len(shapes)``. With the
4 shapes: red circle, green square, blue triangle, yellow cross, purple circle, cyan square, orange triangle,
white cross. Every colour is still seen with 3 other shapes and every shape with 6 other colours in ``train``;
``train`` and ``test_id`` never contain a held-out pair and every ``test_ood`` scene contains at least one.

Determinism
-----------
Sample ``index`` of ``split`` uses ``np.random.default_rng([seed, split_id, index])`` with
``split_id = SPLITS.index(split)`` (train 0, test_id 1, test_ood 2): random access by index
with no files, identical across processes and machines. The geometry is sampled in 64-px units, so the same
(seed, split, index) gives the same scene and caption at 64 and 128 px (only ``extra_shapes`` changes the draw).

Rendering draws each shape from its analytic inside-test at 4x4 supersampling and box-averages, which gives
anti-aliased edges: against the black background a pixel is exactly coverage * colour, which the scorer reads
back as a sub-pixel coverage map.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

#: Colour name -> RGB. Saturated, pairwise >= 127 apart in RGB (closest pairs: red/orange, orange/yellow), so a
#: per-channel shift of +-30 or JPEG chroma noise never moves a colour to a neighbour.
COLORS: "OrderedDict[str, tuple[int, int, int]]" = OrderedDict(
    [
        ("red", (255, 0, 0)),
        ("green", (0, 200, 0)),
        ("blue", (40, 80, 255)),
        ("yellow", (255, 255, 0)),
        ("purple", (170, 0, 255)),
        ("cyan", (0, 255, 255)),
        ("orange", (255, 128, 0)),
        ("white", (255, 255, 255)),
    ]
)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

#: Shapes used at 64 px (and by default at 128 px).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Shapes added with ``extra_shapes=True``; only allowed at 128 px (too small to tell apart at 64 px).
EXTRA_SHAPES: tuple[str, ...] = ("diamond", "star")
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTRA_SHAPES

SIZES: tuple[str, ...] = ("small", "large")
#: Half-size ranges in 64-px units (half the side of the shape's box).
HALF_SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (5.0, 7.0), "large": (10.5, 13.0)}
#: Box extent (2 * half-size, 64-px units) separating small from large; midway between 14 and 21.
SIZE_THRESHOLD: float = 17.0

#: 3x3 grid cells, row-major (row 0 = top). ``POSITIONS[3 * row + col]``.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
#: ``objects[0] <relation> objects[1]``. Image y grows downwards.
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

SPLITS: tuple[str, ...] = ("train", "test_id", "test_ood")
IMAGE_SIZES: tuple[int, ...] = (64, 128)
ONE_OBJECT_PROB: float = 0.3

# Geometry constants, 64-px units (see the module docstring for why each exists).
BASE_SIZE: int = 64
BORDER_MARGIN: float = 2.0
OBJECT_GAP: float = 4.0
CELL_MARGIN: float = 4.0
AXIS_RATIO: float = 1.5
AXIS_MARGIN: float = 4.0
SUPERSAMPLE: int = 4
#: Half-width of a cross arm relative to the half-size.
CROSS_ARM: float = 0.36

#: Caption phrases per position; the first is the canonical wording, the others are paraphrases.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "at the top center", "in the top middle"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "at the left", "in the middle left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "in the middle right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
#: Caption phrases per relation (first = canonical). "A above B" and "B below A" both occur, because the relation
#: is drawn uniformly from all four: the same picture gets either description.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "above": ("above",),
    "below": ("below", "under"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}


def held_out_pairs(shapes: Sequence[str] = SHAPES) -> tuple[tuple[str, str], ...]:
    """The diagonal hold-out: colour i (in ``COLORS`` order) with shape ``i mod len(shapes)``."""
    return tuple((color, shapes[i % len(shapes)]) for i, color in enumerate(COLORS))


#: (colour, shape) pairs that never appear in ``train``/``test_id`` and appear in every ``test_ood`` scene.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = held_out_pairs(SHAPES)

# --------------------------------------------------------------------------------------------------------------
# Shape geometry: inside-tests in the unit box [-1, 1]^2 (v grows downwards). Shared with the scorer's templates.
# --------------------------------------------------------------------------------------------------------------


def _star_polygon(points: int = 5, inner: float = 0.5) -> np.ndarray:
    """A point-up star, stretched to fill [-1, 1]^2 exactly (so its box extent is its size, like other shapes)."""
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return 2.0 * (xy - lo) / (hi - lo) - 1.0


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over points."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    xj, yj = poly[-1]
    for xi, yi in poly:
        crosses = (yi > v) != (yj > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (xj - xi) * (v - yi) / (yj - yi) + xi
        inside ^= crosses & (u < x_at)
        xj, yj = xi, yi
    return inside


SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0),
    # Apex up, base along the bottom edge: fills the box (extent 2h both ways).
    "triangle": lambda u, v: (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0),
    "cross": lambda u, v: ((np.abs(u) <= CROSS_ARM) & (np.abs(v) <= 1.0))
    | ((np.abs(v) <= CROSS_ARM) & (np.abs(u) <= 1.0)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "star": lambda u, v: _inside_polygon(u, v, _STAR),
}


def shape_coverage(shape: str, height: int, width: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` filling a ``height x width`` pixel box exactly."""
    ys = (np.arange(height * supersample) + 0.5) / (height * supersample) * 2.0 - 1.0
    xs = (np.arange(width * supersample) + 0.5) / (width * supersample) * 2.0 - 1.0
    inside = SHAPE_TESTS[shape](xs[None, :], ys[:, None]).astype(np.float32)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


# --------------------------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------------------------


def _check_args(split: str, image_size: int, extra_shapes: bool) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    if extra_shapes and image_size != 128:
        raise ValueError(
            f"extra_shapes (diamond, star) needs image_size=128; at {image_size} px they are not reliably "
            "distinguishable from circle/cross"
        )


def shape_set(extra_shapes: bool = False) -> tuple[str, ...]:
    """The shapes a dataset draws from."""
    return ALL_SHAPES if extra_shapes else SHAPES


def _pick_pairs(rng: np.random.Generator, split: str, n_objects: int, shapes: Sequence[str]) -> list[tuple[str, str]]:
    """(colour, shape) per object: no held-out pair outside test_ood, at least one inside it, all distinct."""
    held = set(held_out_pairs(shapes))
    all_pairs = [(c, s) for c in COLORS for s in shapes]
    seen = [p for p in all_pairs if p not in held]
    if split != "test_ood":
        idx = rng.choice(len(seen), size=n_objects, replace=False)
        return [seen[i] for i in idx]
    held_list = list(held_out_pairs(shapes))
    forced = held_list[rng.integers(len(held_list))]
    if n_objects == 1:
        return [forced]
    others = [p for p in all_pairs if p != forced]
    other = others[rng.integers(len(others))]
    return [forced, other] if rng.integers(2) == 0 else [other, forced]


def _relation_ok(dx: np.ndarray, dy: np.ndarray, relation: str) -> np.ndarray:
    """Centre offset d = c1 - c0 (object 1 minus object 0) unambiguously realises ``objects[0] relation objects[1]``."""
    main, other = {
        "above": (dy, dx),       # object 0 higher: smaller y
        "below": (-dy, dx),
        "left of": (dx, dy),     # object 0 further left: smaller x
        "right of": (-dx, dy),
    }[relation]
    return main >= AXIS_RATIO * np.abs(other) + AXIS_MARGIN


def _two_object_layout(
    rng: np.random.Generator, relation: str, sizes: Sequence[str]
) -> tuple[list[float], list[tuple[float, float]]]:
    """Rejection-sample half-sizes and centres (64-px units) for two objects in ``relation``."""
    for _ in range(100):
        halves = [float(rng.uniform(*HALF_SIZE_RANGE[s])) for s in sizes]
        lo = np.array(halves) + BORDER_MARGIN
        hi = BASE_SIZE - lo
        for _ in range(20):
            c0 = rng.uniform(lo[0], hi[0], size=(512, 2))
            c1 = rng.uniform(lo[1], hi[1], size=(512, 2))
            d = c1 - c0
            reach = halves[0] + halves[1]
            # Boxes separated by >= OBJECT_GAP along at least one axis: never touching.
            gap_ok = np.maximum(np.abs(d[:, 0]), np.abs(d[:, 1])) - reach >= OBJECT_GAP
            ok = np.flatnonzero(gap_ok & _relation_ok(d[:, 0], d[:, 1], relation))
            if ok.size:
                k = ok[0]
                return halves, [(float(c0[k, 0]), float(c0[k, 1])), (float(c1[k, 0]), float(c1[k, 1]))]
    raise RuntimeError(f"could not place two {sizes} objects {relation!r}; geometry constants are inconsistent")


def _one_object_layout(rng: np.random.Generator, size: str, position: str) -> tuple[float, tuple[float, float]]:
    half = float(rng.uniform(*HALF_SIZE_RANGE[size]))
    row, col = divmod(POSITIONS.index(position), 3)
    cell = BASE_SIZE / 3.0
    centre = []
    for k in (col, row):
        lo = max(k * cell + CELL_MARGIN, half + BORDER_MARGIN)
        hi = min((k + 1) * cell - CELL_MARGIN, BASE_SIZE - half - BORDER_MARGIN)
        centre.append(float(rng.uniform(lo, hi)))
    return half, (centre[0], centre[1])


def object_phrase(obj: dict) -> str:
    """"a small red circle" (size omitted when the object has none, as in parsed user prompts)."""
    words = ["a"] + ([obj["size"]] if obj.get("size") else []) + [obj["color"], obj["shape"]]
    return " ".join(words)


def scene_caption(objects: Sequence[dict], phrase: str) -> str:
    """The caption grammar: the first object, the position or relation phrase, then the second object if any
    ("a small red circle in the top left corner", "a large blue square above a small white cross")."""
    words = [object_phrase(objects[0])] + ([phrase] if phrase else []) + [object_phrase(o) for o in objects[1:]]
    return " ".join(words)


def sample_scene(seed: int, split: str, index: int, image_size: int = 64, extra_shapes: bool = False) -> dict:
    """Sample scene ``index`` of ``split``; deterministic in (seed, split, index[, extra_shapes]).

    Coordinates are drawn in 64-px units and stored in pixels of ``image_size`` (scale ``image_size / 64``).
    Raises ``ValueError`` for an unknown split, an image size other than 64/128, ``extra_shapes`` below 128 px, or
    a negative index/seed.
    """
    _check_args(split, image_size, extra_shapes)
    if int(index) != index or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    shapes = shape_set(extra_shapes)
    scale = image_size / BASE_SIZE

    n_objects = 1 if rng.random() < ONE_OBJECT_PROB else 2
    pairs = _pick_pairs(rng, split, n_objects, shapes)
    sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=n_objects)]
    relation: str | None = None
    position: str | None = None
    if n_objects == 1:
        position = POSITIONS[rng.integers(len(POSITIONS))]
        half, centre = _one_object_layout(rng, sizes[0], position)
        halves, centres = [half], [centre]
        phrases = POSITION_PHRASES[position]
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        halves, centres = _two_object_layout(rng, relation, sizes)
        phrases = RELATION_PHRASES[relation]
    phrase = phrases[rng.integers(len(phrases))]

    objects = [
        {
            "color": color,
            "shape": shape,
            "size": size,
            # Rounded in 64-px units, then scaled by exactly 1 or 2: the 128-px scene is the 64-px one doubled.
            "center": [round(cx, 3) * scale, round(cy, 3) * scale],
            "half_size": round(half, 3) * scale,
        }
        for (color, shape), size, half, (cx, cy) in zip(pairs, sizes, halves, centres)
    ]
    caption = scene_caption(objects, phrase)
    return {
        "image_size": image_size,
        "objects": objects,
        "relation": relation,
        "position": position,
        "caption": caption,
        "shape_set": list(shapes),
    }


#: What :func:`contrast_caption` may change; position applies to one-object scenes, relation to two-object ones.
CONTRAST_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "relation")


def contrast_attributes(scene: dict) -> list[str]:
    """The attributes :func:`contrast_caption` can make false in ``scene``, in ``CONTRAST_ATTRIBUTES`` order."""
    return [a for a in CONTRAST_ATTRIBUTES
            if (a != "size" or all(o.get("size") for o in scene["objects"]))
            and (a != "position" or scene.get("position"))
            and (a != "relation" or scene.get("relation"))]


def caption_phrase(scene: dict) -> str:
    """The position or relation phrase of the scene's caption, in its own wording ("in the top left corner",
    "to the right of"); ValueError when the caption does not follow the scene's objects."""
    phrases = [object_phrase(o) for o in scene["objects"]]
    caption = scene["caption"]
    if not caption.startswith(phrases[0]) or (len(phrases) == 2 and not caption.endswith(phrases[1])):
        raise ValueError(f"caption {caption!r} does not follow the scene's objects")
    return caption[len(phrases[0]):len(caption) - (len(phrases[1]) if len(phrases) == 2 else 0)].strip()


def edit_object(scene: dict, index: int, **changes: str) -> dict:
    """``scene`` with object ``index``'s colour or shape changed (``color=``, ``shape=``) where it stands, and the
    caption rewritten in the same wording: what a caption asks for when it edits one object of a picture. (Not the
    size: that is the object's extent, which its layout was drawn for.)"""
    unknown = set(changes) - {"color", "shape"}
    if unknown:
        raise ValueError(f"edit_object changes color or shape, not {sorted(unknown)}")
    objects = [dict(o) for o in scene["objects"]]
    objects[index].update(changes)
    return dict(scene, objects=objects, caption=scene_caption(objects, caption_phrase(scene)))


def contrast_caption(scene: dict, rng: np.random.Generator, attribute: str | None = None) -> tuple[str, str]:
    """A caption that ``scene`` makes false in exactly one attribute: ``(caption, attribute)``.

    One object's colour, shape or size is replaced by another value, or the position / relation by another one (for
    a relation, every other relation is false: ``_relation_ok`` keeps the four unambiguous). The rest of the caption
    keeps the scene's own wording. These are the hard negatives of contrastive training (as in NegCLIP, Yuksekgonul
    et al., 2023): in-batch captions mostly differ in colour, so without them a CLIP learns little about shape,
    position or relation, which is what a reranker of samples must tell apart. ``attribute`` picks which one
    (``ValueError`` if the scene cannot change it); by default one is drawn uniformly from those that apply.
    """
    objects = [dict(o) for o in scene["objects"]]
    caption, middle = scene["caption"], caption_phrase(scene)
    applicable = contrast_attributes(scene)
    if attribute is None:
        attribute = applicable[rng.integers(len(applicable))]
    elif attribute not in applicable:
        raise ValueError(f"cannot contrast {attribute!r} in {caption!r} (can: {applicable})")

    def other(values: Sequence[str], current: str, exclude: Sequence[str] = ()) -> str:
        choices = [v for v in values if v != current and v not in exclude]
        return choices[rng.integers(len(choices))]

    if attribute in ("color", "shape", "size"):
        k = int(rng.integers(len(objects)))
        values = {"color": tuple(COLORS), "shape": tuple(scene.get("shape_set") or SHAPES), "size": SIZES}[attribute]
        # Scenes never hold two equal (colour, shape) objects, so neither does a contrast caption.
        twin = [o[attribute] for o in objects if o is not objects[k] and attribute != "size"
                and all(o[a] == objects[k][a] for a in ("color", "shape") if a != attribute)]
        objects[k][attribute] = other(values, objects[k][attribute], twin)
    elif attribute == "position":
        alternatives = POSITION_PHRASES[other(POSITIONS, scene["position"])]
        middle = alternatives[rng.integers(len(alternatives))]
    else:
        alternatives = RELATION_PHRASES[other(RELATIONS, scene["relation"])]
        middle = alternatives[rng.integers(len(alternatives))]
    return scene_caption(objects, middle), attribute


#: The other relation on the same axis: the one a caption gets when its two objects trade places.
OPPOSITE_RELATION: dict[str, str] = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def binding_captions(scene: dict) -> list[str]:
    """Captions a two-object scene makes false only in how attributes bind to objects, same words otherwise: the
    opposite relation on the same axis ("A below B" for "A above B": which object is where), and, when the two
    colours differ, the colours traded between the objects (which shape has which colour). Telling these apart needs
    binding, which in-batch negatives and the one-attribute contrasts (mostly a change of axis or of a word) hardly
    ask for. One-object scenes have none (``[]``)."""
    if not scene.get("relation"):
        return []
    a, b = scene["objects"]
    out = [scene_caption([a, b], RELATION_PHRASES[OPPOSITE_RELATION[scene["relation"]]][0])]
    if a["color"] != b["color"]:
        traded = [dict(a, color=b["color"]), dict(b, color=a["color"])]
        out.append(scene_caption(traded, RELATION_PHRASES[scene["relation"]][0]))
    return out


#: Per mirror axis, the relations it turns into their opposites (the others it leaves as they are).
_MIRRORED_RELATION = {axis: {r: OPPOSITE_RELATION[r] for r in relations}
                      for axis, relations in (("x", ("left of", "right of")), ("y", ("above", "below")))}


def mirror_scene(scene: dict, axis: str) -> dict:
    """``scene`` mirrored left-right (``axis="x"``) or top-bottom (``"y"``): the object centres move, the shapes stay
    upright (the scene is re-rendered, not the image flipped, so a triangle still points up). The margins are
    symmetric, so the mirrored layout is as valid as the original. Position, relation and caption (canonical
    wording) describe the mirrored picture."""
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    k, size = (0 if axis == "x" else 1), scene["image_size"]
    objects = []
    for o in scene["objects"]:
        centre = list(o["center"])
        centre[k] = size - centre[k]
        objects.append({**o, "center": centre})
    position, relation = scene.get("position"), scene.get("relation")
    if position is not None:
        row, col = divmod(POSITIONS.index(position), 3)
        position = POSITIONS[3 * row + 2 - col] if axis == "x" else POSITIONS[3 * (2 - row) + col]
        caption = scene_caption(objects, POSITION_PHRASES[position][0])
    else:
        relation = _MIRRORED_RELATION[axis].get(relation, relation)
        caption = scene_caption(objects, RELATION_PHRASES[relation][0])
    return {**scene, "objects": objects, "position": position, "relation": relation, "caption": caption}


def spatial_contrast_scene(scene: dict, rng: np.random.Generator) -> dict | None:
    """A mirror image of ``scene`` that makes its caption false in position or relation only (colours, shapes and
    sizes unchanged): the image-side hard negative for spatial words. ``None`` when no mirror changes what the
    caption says (an object in the center cell; left/right relations are unchanged by a top-bottom mirror, and
    the other way round)."""
    axes = [a for a in ("x", "y") if (m := mirror_scene(scene, a))["position"] != scene.get("position")
            or m["relation"] != scene.get("relation")]
    return mirror_scene(scene, axes[rng.integers(len(axes))]) if axes else None


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def render_scene(scene: dict, image_size: int | None = None) -> np.ndarray:
    """Render ``scene`` as uint8 ``[H, W, 3]``, anti-aliased by 4x4 supersampling.

    ``image_size`` defaults to the scene's own ``image_size`` (64 if absent); a different value rescales the
    scene's coordinates, so a scene sampled at 64 px can be drawn at 128 px.
    """
    size = int(image_size if image_size is not None else scene.get("image_size", BASE_SIZE))
    if size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {size!r}")
    scale = size / float(scene.get("image_size", BASE_SIZE))
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    ss = SUPERSAMPLE
    for obj in scene["objects"]:
        if "center" not in obj or "half_size" not in obj:
            raise ValueError(
                "scene object has no geometry (center/half_size); only sampled scenes can be rendered, "
                "not scenes parsed from captions"
            )
        if obj["shape"] not in SHAPE_TESTS or obj["color"] not in COLORS:
            raise ValueError(f"unknown shape or colour in {obj!r}")
        cx, cy = (float(c) * scale for c in obj["center"])
        half = float(obj["half_size"]) * scale
        x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)), size)
        y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)), size)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss - cx) / half
        ys = (y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss - cy) / half
        inside = SHAPE_TESTS[obj["shape"]](xs[None, :], ys[:, None]).astype(np.float32)
        alpha = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]
        region = canvas[y0:y1, x0:x1]
        region += alpha * (np.asarray(COLORS[obj["color"]], dtype=np.float32) - region)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# torch Dataset and image-folder export
# --------------------------------------------------------------------------------------------------------------


def render_scene_tensor(scene: dict, image_size: int | None = None) -> torch.Tensor:
    """:func:`render_scene` as a torch uint8 ``[3, H, W]`` image, the layout the models and ``ShapesDataset`` use."""
    return torch.from_numpy(render_scene(scene, image_size)).permute(2, 0, 1).contiguous()


class ShapesDataset(Dataset):
    """Shapes samples rendered on the fly: ``{"image": uint8 [3, H, W], "caption": str, "scene": dict}``.

    No files are involved; item ``i`` is ``sample_scene(seed, split, i, image_size)`` rendered, so any worker or
    rank can fetch any index and get the same sample.
    """

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 10000,
        seed: int = 0,
        image_size: int = 64,
        extra_shapes: bool = False,
    ) -> None:
        _check_args(split, image_size, extra_shapes)
        if int(num_samples) != num_samples or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.num_samples, self.seed = split, int(num_samples), int(seed)
        self.image_size, self.extra_shapes = image_size, extra_shapes

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> dict:
        """The scene of item ``index`` without rendering it."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        if index >= self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return sample_scene(self.seed, self.split, int(index), self.image_size, self.extra_shapes)

    def captions(self, limit: int | None = None) -> list[str]:
        """Captions of the first ``limit`` items (all by default) without rendering, e.g. to train the tokenizer."""
        n = self.num_samples if limit is None else min(max(int(limit), 0), self.num_samples)
        return [self.scene(i)["caption"] for i in range(n)]

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = render_scene_tensor(scene)
        return {"image": image, "caption": scene["caption"], "scene": scene}


def write_imagefolder(
    out_dir: str | Path,
    split: str,
    num_samples: int,
    seed: int = 0,
    image_size: int = 64,
    extra_shapes: bool = False,
) -> Path:
    """Write ``num_samples`` PNGs and a ``metadata.jsonl`` (``{"file_name", "text", "scene"}``) into ``out_dir``.

    This is the Hugging Face ``imagefolder`` layout, one split per folder; load it with
    ``datasets.load_dataset("imagefolder", data_dir=out_dir, split="train")`` (the split *name* there is HF's,
    the shapes split is whatever was written). The folder is flat on purpose: HF infers splits from sub-folder
    names and would fold ``test_id``/``test_ood`` together. Returns the path of ``metadata.jsonl``.
    """
    from PIL import Image

    dataset = ShapesDataset(split, num_samples, seed, image_size, extra_shapes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(max(num_samples - 1, 0))))
    meta_path = out / "metadata.jsonl"
    tmp_path = out / "metadata.jsonl.tmp"
    with open(tmp_path, "w", encoding="utf-8") as meta:
        for i in range(num_samples):
            scene = dataset.scene(i)
            name = f"{i:0{width}d}.png"
            Image.fromarray(render_scene(scene)).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": scene["caption"], "scene": scene}) + "\n")
    tmp_path.replace(meta_path)
    return meta_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dalle_ds.data.shapes",
        description="Write synthetic shapes samples as a Hugging Face imagefolder (PNGs + metadata.jsonl).",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--n", type=int, default=100, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, choices=IMAGE_SIZES)
    parser.add_argument("--extra-shapes", action="store_true", help="add diamond and star (128 px only)")
    args = parser.parse_args(argv)
    try:
        path = write_imagefolder(args.out, args.split, args.n, args.seed, args.image_size, args.extra_shapes)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.n} {args.split} samples to {path.parent} ({path.name})")


if __name__ == "__main__":
    main()
