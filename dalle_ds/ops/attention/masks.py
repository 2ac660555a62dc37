"""The one definition of the stage-2 attention masks (Ramesh et al. 2021, §2.3 and Appendix B.1, Figure 11).

The sequence is ``[T text tokens][W*W image tokens]``; image token ``p = r*W + c`` sits at sequence index ``T + p``
(raster order). Every mask is causal (key index <= query index) and contains the same text prefix:

* text -> text: causal;
* image -> text: every image query sees **all** T text keys;
* image -> image: one of

  - ``row``: key k visible iff ``q - W <= k <= q`` (raster positions). The window wraps into the previous row and
    its oldest key is the same column one row up: ``W + 1`` image keys for interior queries (33 at W = 32).
  - ``column``: key k visible iff ``k <= q`` and ``(q - k) mod W == 0`` (same column, all earlier rows).
  - ``conv``: the causal half of a ``K x K`` window centred on the query (K = ``conv_kernel`` = 11, radius
    R = 5), see *Conv wraparound* below.
  - ``causal``: plain causal attention (for dense layers and baselines).

Conv wraparound. The paper says the convolutional mask has "wraparound behavior (similar to the row attention)".
The default, ``conv_wrap="raster"``, reads that literally: the row mask is a fixed set of *raster offsets*
(``{0..W}``) that wraps across row ends, so the conv mask here is the fixed offset set
``d = q - k in {0..R} U {dr*W + dc : 1 <= dr <= R, -R <= dc <= R}`` (the causal half of the window, as offsets).
Near the left/right edge the window's columns wrap into the neighbouring row, exactly as the row window does;
near the top it is clipped by the grid start. Every query at raster position ``p >= R*W + R`` sees exactly
``R + 1 + R*K`` = 61 image keys. This is also the most regular choice for block-sparse kernels (a union of
``R + 1`` diagonal bands), and at K = 3, W = 4 it gives the raster offsets {0, 1, 3, 4, 5} that ru-dalle's
"masks like openai" conv test hard-codes (research/dalle_anchors.md §2.1).
``conv_wrap="none"`` is the clipped 2-D window (ru-dalle's ``hf_version='v3'``): ``|rq - rk| <= R``,
``|cq - ck| <= R``, ``k <= q``, no wraparound; at the paper's shape it keeps 98.6% as many pairs as "raster".
(ru-dalle ``v2`` wraps on a torus, which lets bottom-row queries see top-row keys; not offered.)

Column attention and the kernel order. In raster order the column mask is a stride-W pattern that no block skips;
with the image states transposed (column-major image order, ``t = c*W + r``) it becomes a contiguous window
(the earlier part of the query's own column), which is what the paper does for GPU efficiency. ``MaskSpec.order``
names the order the block-sparse kernels work in ("column_major" for column, "raster" otherwise);
``kernel_to_raster`` maps kernel-order indices to raster indices and ``visible_in_kernel_order`` is, by
construction, ``visible`` composed with that map, so causality is preserved (``k <= q`` in raster order).

Everything that needs the mask (block layouts, the dense reference, FlexAttention's ``mask_mod``, the Triton
kernels' in-block masks) derives from :func:`visible`; the tests prove they agree. :func:`visible` uses only
elementwise torch ops, so it works on broadcast index tensors and under ``torch.vmap`` (FlexAttention).

The 4 x 4 grid with T = 2 (from ``MaskSpec(kind, 2, 4).render()``; rows are queries, ``#`` = visible; the conv
panel uses ``conv_kernel=3`` (offsets {0, 1, W-1, W, W+1}); the last panel is column attention in the kernel order)::

    row                 column              conv (K=3)          column, kernel order
    #.................  #.................  #.................  #.................
    ##................  ##................  ##................  ##................
    ###...............  ###...............  ###...............  ###...............
    ####..............  ##.#..............  ####..............  ####..............
    #####.............  ##..#.............  ##.##.............  #####.............
    ######............  ##...#............  ###.##............  ######............
    #######...........  ###...#...........  ####.##...........  ##....#...........
    ##.#####..........  ##.#...#..........  #####.##..........  ##....##..........
    ##..#####.........  ##..#...#.........  ##.###.##.........  ##....###.........
    ##...#####........  ##...#...#........  ##..###.##........  ##....####........
    ##....#####.......  ###...#...#.......  ##...###.##.......  ##........#.......
    ##.....#####......  ##.#...#...#......  ##....###.##......  ##........##......
    ##......#####.....  ##..#...#...#.....  ##.....###.##.....  ##........###.....
    ##.......#####....  ##...#...#...#....  ##......###.##....  ##........####....
    ##........#####...  ###...#...#...#...  ##.......###.##...  ##............#...
    ##.........#####..  ##.#...#...#...#..  ##........###.##..  ##............##..
    ##..........#####.  ##..#...#...#...#.  ##.........###.##.  ##............###.
    ##...........#####  ##...#...#...#...#  ##..........###.##  ##............####

"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MaskKind = Literal["causal", "row", "column", "conv"]
ConvWrap = Literal["raster", "none"]
KINDS: tuple[str, ...] = ("causal", "row", "column", "conv")
CONV_WRAPS: tuple[str, ...] = ("raster", "none")


@dataclass(frozen=True)
class MaskSpec:
    """Geometry and kind of one attention mask. Hashable, so it keys layout and kernel caches."""

    kind: MaskKind
    """Which image->image pattern: "row", "column", "conv" or "causal" (plain causal over the whole sequence)."""
    text_len: int
    """T: number of text positions before the image (0 allowed)."""
    grid: int
    """W: the image is a W x W grid of tokens (4..64 is the tested range; any W >= 1 works)."""
    conv_kernel: int = 11
    """K: side of the conv window (odd); only used by kind="conv". The paper uses 11."""
    conv_wrap: ConvWrap = "raster"
    """How the conv window treats the grid edges: "raster" (wraps like the row mask, default) or "none" (clipped)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("text_len", "grid", "conv_kernel"):  # 2.5 or "3" failed only inside a kernel
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.text_len < 0:
            raise ValueError(f"text_len must be >= 0, got {self.text_len}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be a positive odd number, got {self.conv_kernel}")
        if self.conv_wrap not in CONV_WRAPS:
            raise ValueError(f"conv_wrap must be one of {CONV_WRAPS}, got {self.conv_wrap!r}")

    @property
    def seq_len(self) -> int:
        """N = T + W*W."""
        return self.text_len + self.grid * self.grid

    @property
    def conv_radius(self) -> int:
        return self.conv_kernel // 2

    @property
    def order(self) -> str:
        """Token order the block-sparse kernels use: "column_major" (image transposed) for column, else "raster"."""
        return "column_major" if self.kind == "column" else "raster"

    @property
    def transposed(self) -> bool:
        return self.order == "column_major"

    @property
    def name(self) -> str:
        """Short self-describing name, e.g. ``conv_T256_W32_k11_raster`` (used in logs and benchmark rows)."""
        extra = f"_k{self.conv_kernel}_{self.conv_wrap}" if self.kind == "conv" else ""
        return f"{self.kind}_T{self.text_len}_W{self.grid}{extra}"

    # -- the predicate ------------------------------------------------------------------------------------------
    def visible(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Bool tensor: may query ``q_idx`` attend to key ``k_idx`` (raster-order sequence indices, broadcast)."""
        return visible(self, q_idx, k_idx)

    def visible_in_kernel_order(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """:meth:`visible` for indices given in the kernel order (column-major image for column attention)."""
        return visible(self, kernel_to_raster(self, q_idx), kernel_to_raster(self, k_idx))

    def dense(self, device: torch.device | str = "cpu", order: str = "raster") -> torch.Tensor:
        """The full [N, N] boolean mask (rows = queries) in raster order or in the kernel order."""
        n = self.seq_len
        idx = torch.arange(n, device=device)
        if order == "raster":
            return visible(self, idx[:, None], idx[None, :])
        if order == "kernel":
            return self.visible_in_kernel_order(idx[:, None], idx[None, :])
        raise ValueError(f"order must be 'raster' or 'kernel', got {order!r}")

    def render(self, order: str = "raster") -> str:
        """ASCII drawing of the mask (``#`` visible, ``.`` masked), one line per query."""
        m = self.dense(order=order)
        return "\n".join("".join("#" if x else "." for x in row.tolist()) for row in m)


def _image_visible(spec: MaskSpec, pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
    """Image->image part on raster image positions (only meaningful where both are >= 0)."""
    W = spec.grid
    d = pq - pk  # raster offset; causal means d >= 0
    causal = d >= 0
    if spec.kind == "causal":
        return causal
    if spec.kind == "row":
        return causal & (d <= W)
    if spec.kind == "column":
        return causal & (torch.remainder(d, W) == 0)
    # conv
    R = spec.conv_radius
    if spec.conv_wrap == "raster":
        # offsets {0..R} (the current row, to the left) U {dr*W-R .. dr*W+R} for the R rows above.
        ok = causal & (d <= R)
        for dr in range(1, R + 1):
            ok = ok | ((d >= dr * W - R) & (d <= dr * W + R))
        return ok & causal  # for W <= R the bands above can reach d < 0: keep causality explicit
    rq, cq = torch.div(pq, W, rounding_mode="floor"), torch.remainder(pq, W)
    rk, ck = torch.div(pk, W, rounding_mode="floor"), torch.remainder(pk, W)
    return causal & ((rq - rk).abs() <= R) & ((cq - ck).abs() <= R)


def visible(spec: MaskSpec, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """The element predicate over raster-order sequence indices (broadcasting; vmap-safe).

    ``causal & (key is text  or  image->image rule)``: a text key is visible to every later query (text queries
    see earlier text, image queries see all text); an image key is visible only to image queries (causality
    excludes text queries) and then only under the kind's rule.
    """
    T = spec.text_len
    causal = k_idx <= q_idx
    k_text = k_idx < T
    if spec.kind == "causal":
        return causal
    return causal & (k_text | _image_visible(spec, q_idx - T, k_idx - T))


def kernel_to_raster(spec: MaskSpec, idx: torch.Tensor) -> torch.Tensor:
    """Map kernel-order sequence indices to raster-order indices (identity unless the spec is transposed).

    Column-major image index ``t = c*W + r`` is raster index ``p = r*W + c``; text indices are unchanged.
    The map is an involution on the image part (transposing twice is the identity).
    """
    if not spec.transposed:
        return idx
    T, W = spec.text_len, spec.grid
    t = (idx - T).clamp(min=0)
    c, r = torch.div(t, W, rounding_mode="floor"), torch.remainder(t, W)
    return torch.where(idx >= T, T + r * W + c, idx)


def kernel_order_index(spec: MaskSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """``perm`` with ``x_kernel = x_raster.index_select(-2, perm)``; the same tensor undoes it (involution)."""
    return kernel_to_raster(spec, torch.arange(spec.seq_len, device=device))


def layer_kind(layer: int, num_layers: int) -> str:
    """The paper's schedule (1-based layer ``i`` of ``L``): conv for the last layer, column if (i - 2) mod 4 == 0,
    row otherwise. Layers 1..4 are row, column, row, row."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in 1..{num_layers}, got {layer}")
    if layer == num_layers:
        return "conv"
    return "column" if (layer - 2) % 4 == 0 else "row"


def layer_schedule(num_layers: int) -> list[str]:
    """``[layer_kind(i, L) for i in 1..L]``: for L = 64, 47 row, 16 column and 1 conv layers."""
    return [layer_kind(i, num_layers) for i in range(1, num_layers + 1)]


def keys_per_query(spec: MaskSpec) -> torch.Tensor:
    """int64 [N]: how many keys each query (raster order) sees, itself included: the keys a cached decode step at
    that position reads."""
    n = spec.seq_len
    idx = torch.arange(n)
    # chunked, so W = 64 (N = 4352 + T) stays small in memory
    return torch.cat([visible(spec, idx[s : s + 1024, None], idx[None, :]).sum(dim=1) for s in range(0, n, 1024)])


def kept_elements(spec: MaskSpec) -> int:
    """Number of visible (query, key) pairs: the work a perfect kernel does (FLOPs = 4 * D * this per head)."""
    return int(keys_per_query(spec).sum())
