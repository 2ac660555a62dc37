"""Hierarchical PowerSGD with 1-6-9 error buffers: DALL-E's compressed gradient all-reduce (arXiv 2102.12092, §2.5,
Appendix E.2), independent of DeepSpeed (``dalle_ds.dist.deepspeed_powersgd`` plugs it into the engine).

:meth:`HierarchicalPowerSGD.reduce_` takes this rank's full gradients (each rank's gradient of its own mean loss) and
writes back, on every rank, an estimate of their average over all ranks. For each compressed matrix:

1. intra-machine reduce-scatter (fp32, an all-to-all on the machine's group): local rank j receives the sum over the
   machine of its row block ("shard") and divides by the world size, so that summing the shards of all machines gives
   the global average ("global-sum units", the paper's loss divided by the global batch);
2. if the shard is finite, add it (divided by the resblock's gradient scale, 1 without per-resblock scaling) into the
   1-6-9 error buffer in place; otherwise leave the buffer alone;
3. P = E Q with Q a fixed Gaussian drawn once from (seed, parameter, local rank) and never resampled; Q is stored in
   1-6-9 with columns of unit expected norm (entries N(0, 1/cols));
4. P is all-reduced (averaged) across machines among ranks of this ordinal, in 1-6-9 scaled by ``p_scale``, one grouped
   call for all matrices of the call; infinities are clamped to the format's maximum with their sign;
5. P + eps I is orthogonalized (Householder); the result is stored in 1-6-9 without scaling;
6. Q' = E^T P, all-reduced the same way (scaled by ``q_scale``) and multiplied by the number of machines (a sum);
7. the shard's estimate P Q'^T is formed in fp32;
8. if P and Q' were finite everywhere: E -= (P Q'^T) / machines; otherwise E is kept if finite, zeroed if not;
9. everything not compressed (1-D gains and biases, embeddings, matrices whose rows do not split evenly) goes in one
   fp32 all-reduce over the world; the global norm is sum ||Q'||^2 over shards plus ||g||^2 of the rest, infinite if
   any nonfinite flag (synchronized over the world in one small all-reduce) was raised, and then a nonfinite value is
   written into the output so that the optimizer wrapped around it skips the step;
10. an intra-machine all-gather (fp32) puts the estimated shards back into full gradients (the DeepSpeed ZeRO-0/1/2
    hook contract is a fully reduced gradient); under ZeRO-3 (:meth:`HierarchicalPowerSGD.reduce_partitions_`) each
    rank needs only its flat partition of every gradient, so an intra-machine all-to-all sends each rank just the
    pieces of the machine's estimated shards that fall in its partition (the paper's sharded parameters need no
    all-gather of gradients either: each GPU updates its own shard).

Choices the paper leaves open, made here:

* **Shard axis.** Shards are row blocks of the gradient matrix viewed so that its longer side is the row axis: the
  torch weights ``[out, in]`` of qkv, attention out and the first MLP matrix are split along ``out``, the second MLP
  matrix ``[d, 4d]`` along ``in`` -- the paper's "axis 1 except the second MLP matrix" in its [in, out] convention.
* **Scales.** ``p_scale = q_scale = 2**-8``: P and Q' entries are column/row norms of the error buffer, so the
  format's ceiling of ~16 would be close for large gradients, while its floor (2^-67) is ~50 binades below any
  gradient; dividing by 256 moves the ceiling to ~4096 at no cost.
* **eps.** The paper adds eps = 1e-6 to an O(1)-scaled P. Gradients here are not rescaled to O(1) (loss units), so eps
  is taken relative to max |P| (absolute 1e-6 when P is zero): the same regularization for any gradient magnitude.
* **Averages.** P and Q' are averaged in the 1-6-9 all-reduce (an average of values below the ceiling stays below
  it, so a local overflow flag is exact); Q' is multiplied back by the number of machines in fp32.
* **Per-GPU rank** = total rank per machine / local size (paper B.2: 896 per machine, 112 per GPU), capped by the
  shard's shape (at the cap the compression is lossless up to 1-6-9 rounding).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..ops import fp169
from .collectives import all_gather_flat, all_reduce_anywhere_, reduce_scatter_flat
from .fp169_allreduce import CommCounter, all_reduce_fp169_
from .orthogonalize import add_eps_identity, get_orthogonalizer
from .topology import Topology

__all__ = ["PowerSGDSettings", "HierarchicalPowerSGD", "ReduceReport", "fp32_ring_bytes"]

FP169_MAX = fp169.MAX
ERROR_DTYPES = ("fp169", "fp32")
"""Error-buffer storage: the paper's 1-6-9 codes, or fp32 values (an ablation)."""


def fp32_ring_bytes(numel: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` fp32 values over ``world`` ranks."""
    return 2 * (world - 1) * math.ceil(numel / world) * 4 if world > 1 else 0


def shard_geometry(shape: Sequence[int], local_size: int, rank_per_gpu: int):
    """How a gradient of ``shape`` is compressed on each of ``local_size`` ranks of a machine: (transposed, rows, cols,
    shard_rows, k) -- the matrix viewed with its longer side as rows, this rank's row block of it and the rank of its
    factors -- or None when it is not compressed (not a matrix, or its longer side does not split evenly)."""
    if len(shape) != 2:
        return None
    a, b = int(shape[0]), int(shape[1])
    transposed = b > a
    rows, cols = (b, a) if transposed else (a, b)
    if rows % local_size:
        return None
    shard_rows = rows // local_size
    return transposed, rows, cols, shard_rows, min(rank_per_gpu, shard_rows, cols)


def state_bytes_per_gpu(shapes: Sequence[Sequence[int]], local_size: int, rank_per_gpu: int,
                        error_dtype: str = "fp169") -> int:
    """Bytes of reducer state one GPU holds for these gradient shapes (those not compressed count nothing): the
    error buffer of its shard (2 bytes an element in 1-6-9, 4 in fp32) and the fixed Q, [cols, k] in 1-6-9. What
    :meth:`HierarchicalPowerSGD.register` allocates; the transient fp32 buffers of a reduction are not counted."""
    total = 0
    for shape in shapes:
        geo = shard_geometry(shape, local_size, rank_per_gpu)
        if geo is not None:
            _, _, cols, shard_rows, k = geo
            total += shard_rows * cols * (4 if error_dtype == "fp32" else 2) + cols * k * 2
    return total


def zero3_chunk(numel: int, world: int) -> int:
    """The size of DeepSpeed ZeRO-3's partition of a tensor: ceil(numel / world) elements
    (runtime/zero/partition_parameters.py)."""
    return -(-numel // world)


def _partition_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """The flat range of a tensor's elements that ``rank`` holds under DeepSpeed ZeRO-3: chunks of
    :func:`zero3_chunk` elements in rank order, the last ones short or empty."""
    c = zero3_chunk(numel, world)
    start = min(rank * c, numel)
    return start, min(start + c, numel)


@dataclass
class PowerSGDSettings:
    rank: int = 32
    """Total compression rank per machine; each GPU uses rank // local_size for its shards."""
    start_step: int = 0
    """Optimizer steps reduced uncompressed (fp32 all-reduce) before compression starts."""
    seed: int = 0
    p_scale: float = 2.0 ** -8
    q_scale: float = 2.0 ** -8
    eps: float = 1e-6
    orthogonalization: str = "qr"
    warm_start: bool = False
    """Not the paper: use last step's all-reduced Q' (columns normalized) as this step's Q, a power iteration across
    steps as in Vogels et al. (2019) and torch's powerSGD_hook, instead of the fixed Gaussian."""
    error_dtype: str = "fp169"
    """Storage of the error buffers: "fp169" (the paper, 2 bytes an element) or "fp32" (4 bytes; an ablation that
    measures what the 1-6-9 rounding costs)."""
    recenter_every: int = 0
    """Not the paper: every this many steps (0 = never), replace each machine's error buffer by the mean over
    machines (one 16-bit all-reduce of the buffers; fp32 with fp32 buffers). The sum over machines, all that error
    feedback needs, is unchanged up to one rounding, while the machine-specific part, which grows as a random walk of
    the gradient noise between machines and coarsens the buffer's 1-6-9 spacing, is reset to zero."""
    track_rounding: bool = False
    """Measure the rounding of the buffer updates (:meth:`HierarchicalPowerSGD.diagnostics`): one more decode of
    each buffer per step."""

    def per_gpu_rank(self, local_size: int) -> int:
        return max(1, self.rank // local_size)


@dataclass
class _Shard:
    """One compressed matrix: this rank's row block of the (possibly transposed) gradient and its state."""
    key: str
    shape: tuple[int, int]
    transposed: bool
    rows: int
    cols: int
    shard_rows: int
    k: int
    q: torch.Tensor       # int16 1-6-9 codes [cols, k], fixed
    err: torch.Tensor     # [shard_rows, cols]: int16 1-6-9 codes, or fp32 values with error_dtype="fp32"

    @property
    def fp32(self) -> bool:
        return self.err.dtype == torch.float32

    def err_add_(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """E += x / scale unless ``x`` has a nonfinite value (then E is left alone); returns whether x was finite as a
        0-dim bool tensor on E's device, without waiting for the device (fp32 buffers: the sum is formed and then
        kept or dropped by ``torch.where``, the same bits as an in-place add that a host-side test would guard)."""
        if not self.fp32:
            return fp169.error_add_async_(self.err, x, scale=scale)
        finite = torch.isfinite(x).all()
        self.err.copy_(torch.where(finite, torch.add(self.err, x, alpha=1.0 / scale), self.err))
        return finite

    def err_value(self) -> torch.Tensor:
        """The error buffer in fp32 (a new tensor)."""
        return self.err.clone() if self.fp32 else fp169.decode(self.err)

    def err_set_(self, e: torch.Tensor) -> None:
        self.err.copy_(e if self.fp32 else fp169.encode(e))

    def err_finite(self) -> torch.Tensor:
        """0-dim bool tensor on E's device: no Inf/NaN in the buffer."""
        return torch.isfinite(self.err).all() if self.fp32 else fp169.all_finite(self.err)


@dataclass
class ReduceReport:
    """What one :meth:`HierarchicalPowerSGD.reduce_` call did (this rank's view)."""
    compressed: bool = False
    skip: bool = False
    """Some rank saw a nonfinite gradient, P or Q': the optimizer step must be skipped."""
    sq_norm: float = 0.0
    """Global squared norm of the reduced gradient (sum ||Q'||^2 + ||uncompressed||^2); inf when skipping."""
    shard_elements: int = 0
    factor_elements: int = 0
    """P + Q' elements sent across machines for this rank's shards (the paper's compression accounting)."""
    uncompressed_elements: int = 0
    bytes_intra: int = 0
    bytes_inter: int = 0
    bytes_uncompressed: int = 0
    bytes_baseline: int = 0
    """What a plain fp32 ring all-reduce of the same gradients over the world would send from this rank."""
    nonfinite_grads: int = 0
    zeroed_buffers: int = 0
    recentered_elements: int = 0
    """Error-buffer elements averaged over machines (``recenter_every``); their bytes are in ``bytes_inter``."""
    counts: torch.Tensor | None = None
    """On the device, without a host read: [skip (0/1), nonfinite_grads, zeroed_buffers] (float64); None for a ZeRO-3
    warm-up call (uncompressed partitions: DeepSpeed's own check sees them)."""
    pending: torch.Tensor | None = None
    """Until :meth:`resolve`: the call's device results [per matrix: shard nonfinite, P overflow, Q' overflow;
    uncompressed nonfinite; sum ||Q'||^2; ||uncompressed||^2; zeroed buffers] (float64)."""

    def resolve(self) -> "ReduceReport":
        """Fill ``skip``, ``sq_norm``, ``nonfinite_grads`` and ``zeroed_buffers`` from the device (one host read; a
        no-op once done). The reducer's own calls resolve unless asked not to (``resolve=False``): inside DeepSpeed's
        gradient hooks a read would make the host wait for the bucket's collectives."""
        if self.pending is None:
            return self
        host, self.pending = self.pending.tolist(), None
        nf = len(host) - 2
        flags, unc_sq, zeroed = host[:nf], host[nf], host[nf + 1]
        n = (nf - 2) // 3
        self.zeroed_buffers += int(zeroed)
        self.nonfinite_grads = sum(v > 0 for v in flags[0:3 * n:3]) + int(flags[-2] > 0)
        self.skip = any(v > 0 for v in flags[:-1])
        self.sq_norm = math.inf if self.skip else flags[-1] + unc_sq
        return self


class HierarchicalPowerSGD:
    """The reducer. Create it on every rank with the same settings, :meth:`register` the compressible matrices in the
    same order everywhere, then call :meth:`reduce_` with every rank's gradients in the same order."""

    def __init__(self, topology: Topology, settings: PowerSGDSettings, device: torch.device | str = "cpu"):
        self.topo, self.s = topology, settings
        self.device = torch.device(device)
        self.orthogonalize = get_orthogonalizer(settings.orthogonalization)
        self.shards: dict[str, _Shard] = {}
        self.counter = CommCounter()
        self.grad_scale: Callable[[str], float] = lambda key: 1.0
        """Per-resblock gradient scale of a parameter (step 2 divides by it); 1 without per-resblock scaling."""
        self.sent_sq: dict[str, torch.Tensor] = {}
        """Per matrix, ||P Q'^T||^2 = ||Q'||^2 of its latest compressed step (this ordinal's shard, machines summed;
        a float64 device scalar, read by :meth:`diagnostics`)."""
        self._recentered_at: dict[str, int] = {}
        self._spread_removed_sq: torch.Tensor | None = None
        """This rank's ||E_i - mean E||^2 removed by the latest re-centering step (a float64 device scalar, read by
        :meth:`diagnostics`; None before the first)."""
        self._spread_removed_step = -1
        self._rounding = [0.0, 0.0, 0.0, 0.0]
        """Since the last :meth:`diagnostics`: sum of squared rounding of all buffer updates, squared norm of the
        gradients added, count of nonzero gradient elements that left the buffer unchanged, count of nonzero ones."""
        if settings.error_dtype not in ERROR_DTYPES:
            raise ValueError(f"error_dtype must be one of {ERROR_DTYPES}, not {settings.error_dtype!r}")

    # -- set-up -------------------------------------------------------------------------------------------------
    def _q_seed(self, key: str) -> int:
        digest = hashlib.sha256(f"{self.s.seed}:{key}:{self.topo.local_rank}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def register(self, key: str, shape: Sequence[int]) -> bool:
        """Register a parameter for compression; returns False (it stays uncompressed) unless it is a matrix whose
        longer side splits evenly over the machine's ranks (:func:`shard_geometry`)."""
        geo = shard_geometry(shape, self.topo.local_size, self.s.per_gpu_rank(self.topo.local_size))
        if geo is None:
            return False
        transposed, rows, cols, shard_rows, k = geo
        a, b = int(shape[0]), int(shape[1])
        gen = torch.Generator().manual_seed(self._q_seed(key))
        q = torch.randn(cols, k, generator=gen) / math.sqrt(cols)
        self.shards[key] = _Shard(key=key, shape=(a, b), transposed=transposed, rows=rows, cols=cols,
                                  shard_rows=shard_rows, k=k,
                                  q=fp169.encode(q.to(self.device), saturate=True),
                                  err=torch.zeros(shard_rows, cols, device=self.device,
                                                  dtype=torch.float32 if self.s.error_dtype == "fp32" else torch.int16))
        return True

    def is_compressed(self, key: str) -> bool:
        return key in self.shards

    # -- the reduction ------------------------------------------------------------------------------------------
    def reduce_(self, grads: Sequence[tuple[str, torch.Tensor]], step: int, resolve: bool = True) -> ReduceReport:
        """Replace each gradient by the all-rank average (compressed ones by their PowerSGD estimate).

        Called from DeepSpeed's gradient hooks (ZeRO-1/2/3: once a bucket, during the backward), so the flags and
        norms stay device tensors: a skipped step is signalled by an Inf written on the device (``torch.where``), and
        the report's host fields are read in one host read at the end (``resolve``; ``resolve=False`` leaves it to
        :meth:`ReduceReport.resolve` and keeps the call free of host reads, so that on a GPU the host goes on
        queueing the backward while the bucket's collectives run). ``track_rounding`` (diagnostics) reads more."""
        return self._reduce(grads, step, partitions=False, resolve=resolve)[0]

    def reduce_partitions_(self, grads: Sequence[tuple[str, torch.Tensor]], step: int,
                           resolve: bool = True) -> tuple[ReduceReport, list[torch.Tensor]]:
        """DeepSpeed ZeRO-3's contract: the same reduction as :meth:`reduce_`, but what is returned is this rank's
        partition of each averaged gradient -- the flat elements ``[r c, min((r + 1) c, numel))`` of the gradient
        in its storage order, r the world rank and c = ceil(numel / world) -- as new fp32 tensors, in ``grads``
        order; the gradients themselves are not written back. Compressed ones: instead of step 10's all-gather of
        whole shards, the machine's ranks exchange only the pieces of their estimated shards that fall in each
        other's partitions (one all-to-all, ~numel / local size elements received per rank in all instead of
        ~numel). Uncompressed ones go in one fp32 reduce-scatter over the world instead of step 9's all-reduce (half
        the bytes; the sum may round in another order). On a skipped step the first non-empty partition of every
        rank holds an Inf."""
        return self._reduce(grads, step, partitions=True, resolve=resolve)

    def _reduce(self, grads, step: int, partitions: bool,
                resolve: bool = True) -> tuple[ReduceReport, list[torch.Tensor]]:
        rep = ReduceReport()
        W = self.topo.world_size
        total = sum(g.numel() for _, g in grads)
        rep.bytes_baseline = fp32_ring_bytes(total, W)
        if step < self.s.start_step:
            if partitions:  # ZeRO-3: the optimizer's global-norm check sees a nonfinite partition itself
                return rep, self._plain_reduce_scatter([g for _, g in grads], rep)[0]
            # The flag must reach the caller as on a compressed step: under ZeRO-0 no DeepSpeed check would see it
            # (the extension's optimizer wrapper skips on rep.counts), and the warm-up reports skips too.
            plain = [g for _, g in grads]
            nonfinite = self._plain_all_reduce(plain, rep)
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            sq = sum((g.double().pow(2).sum() for g in plain), zero)
            rep.counts = torch.stack([nonfinite, nonfinite, zero])
            rep.pending = torch.stack([nonfinite, zero, sq, zero])  # no matrices: [unc nonfinite, 0, ||unc||^2, 0]
            if resolve:
                rep.resolve()
            return rep, []
        comp = [(self.shards[k], g) for k, g in grads if k in self.shards]
        unc = [g for k, g in grads if k not in self.shards]
        rep.compressed = bool(comp)
        sent_before = self.counter.bytes_sent
        n_mach = self.topo.machines
        dev = self.device
        # per matrix: [gradient shard nonfinite, P overflow, Q' overflow]; then uncompressed nonfinite, sum ||Q'||^2
        flags = torch.zeros(3 * len(comp) + 2, dtype=torch.float64, device=dev)
        if unc:
            if partitions:  # ZeRO-3 needs only this rank's partitions: a reduce-scatter, half the all-reduce's bytes
                unc_parts, flags[-2], unc_part_sq = self._plain_reduce_scatter(unc, rep)
            else:
                flags[-2] = self._plain_all_reduce(unc, rep)
        estimates, sent = [], []
        if comp:
            shard_vals = self._reduce_scatter(comp, rep)
            p_codes, errs = [], []
            for i, ((sh, _), s) in enumerate(zip(comp, shard_vals)):
                scale = self.grad_scale(sh.key)
                before = sh.err_value() if self.s.track_rounding else None
                finite = sh.err_add_(s, scale=scale)
                flags[3 * i] = ~finite
                e = sh.err_value()
                if before is not None and bool(finite):
                    self._track_add(before, s / scale, e)
                errs.append(e)
                p = e @ fp169.decode(sh.q)
                flags[3 * i + 1] = self._overflow(p, self.s.p_scale)
                p_codes.append(fp169.encode(p, saturate=True, scale=self.s.p_scale))
            all_reduce_fp169_(p_codes, self.topo.global_group, average=True, counter=self.counter)
            q_codes, ps = [], []
            for i, ((sh, _), e, pc) in enumerate(zip(comp, errs, p_codes)):
                p = fp169.decode(pc, scale=self.s.p_scale)
                # eps relative to max |P| (absolute when P is 0 or not a number), in float64 as Python's float would be
                maxabs = p.abs().amax().double()
                eps = torch.where(maxabs > 0, maxabs * self.s.eps, self.s.eps)
                p_hat = fp169.decode(fp169.encode(self.orthogonalize(add_eps_identity(p, eps)), saturate=True))
                ps.append(p_hat)
                qp = e.t() @ p_hat
                flags[3 * i + 2] = self._overflow(qp, self.s.q_scale)
                q_codes.append(fp169.encode(qp, saturate=True, scale=self.s.q_scale))
                rep.shard_elements += sh.shard_rows * sh.cols
                rep.factor_elements += (sh.shard_rows + sh.cols) * sh.k
            all_reduce_fp169_(q_codes, self.topo.global_group, average=True, counter=self.counter)
            sq = torch.zeros((), dtype=torch.float64, device=dev)
            for (sh, _), p_hat, qc in zip(comp, ps, q_codes):
                q_sum = fp169.decode(qc, scale=self.s.q_scale) * n_mach
                sent.append(q_sum.double().pow(2).sum())
                sq = sq + sent[-1]  # in matrix order, as a Python sum of the floats would add them
                estimates.append(p_hat @ q_sum.t())
                if self.s.warm_start:
                    self._warm_start(sh, q_sum)
            flags[-1] = sq / n_mach  # every machine holds the same Q': count it once over the world
        if unc and partitions:
            flags[-1] += unc_part_sq  # each rank's share of ||uncompressed||^2, summed over the world below
        if W > 1:
            all_reduce_anywhere_(flags, self.topo.world_group)  # step 10: flags and the norm in one call
        unc_sq = torch.zeros((), dtype=torch.float64, device=dev)
        for g in ([] if partitions else unc):  # partitions: already in flags[-1]
            unc_sq = unc_sq + g.double().pow(2).sum()
        zeroed = torch.zeros((), dtype=torch.float64, device=dev)
        for i, ((sh, _), est) in enumerate(zip(comp, estimates)):
            pq_ok = (flags[3 * i + 1] == 0) & (flags[3 * i + 2] == 0)
            if self.s.track_rounding:
                if bool(pq_ok):
                    before = sh.err_value()
                    sh.err_add_(est, scale=-float(n_mach))
                    self._track_add(before, est / -float(n_mach), sh.err_value(), gradient=False)
            else:  # a NaN estimate leaves the buffer alone, as a skipped add would
                sh.err_add_(torch.where(pq_ok, est, math.nan), scale=-float(n_mach))
            bad = ~sh.err_finite()  # step 12: zero a buffer only when it is itself nonfinite
            sh.err.masked_fill_(bad, 0)
            zeroed = zeroed + bad
        if comp and self.s.recenter_every and n_mach > 1 and (step + 1) % self.s.recenter_every == 0:
            self._recenter([sh for sh, _ in comp], step, rep)
        parts: dict[str, torch.Tensor] = {}
        if comp and partitions:
            parts = self._exchange_partitions(comp, estimates, rep)
        elif comp:
            self._all_gather(comp, estimates, rep)
        rep.bytes_inter = self.counter.bytes_sent - sent_before
        for (sh, _), v in zip(comp, sent):
            self.sent_sq[sh.key] = v
        skip = (flags[:-1] > 0).any()
        nonfinite = (flags[0:3 * len(comp):3] > 0).sum().double() + (flags[-2] > 0).double()
        rep.counts = torch.stack([skip.double(), nonfinite, zeroed])
        rep.pending = torch.cat([flags, unc_sq.view(1), zeroed.view(1)])
        if partitions:
            unc_iter = iter(unc_parts if unc else [])
            out = [parts[k] if k in parts else next(unc_iter) for k, _ in grads]
        else:
            out = []
        # make the optimizer's own overflow check (ZeRO-3: its global norm) skip the step: an Inf, written on the device
        first = next((t for t in out if t.numel()), None) if partitions else (grads[0][1] if grads else None)
        if first is not None:
            head = first.view(-1)[:1]
            head.copy_(torch.where(skip, torch.full_like(head, math.inf), head))
        if resolve:
            rep.resolve()
        return rep, out

    def _plain_reduce_scatter(self, grads: list[torch.Tensor],
                              rep: ReduceReport) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """ZeRO-3's uncompressed gradients: one fp32 reduce-scatter over the world leaves this rank the average of its
        partition of each (chunks of ceil(numel / world) in rank order, zero-padded, laid out as DeepSpeed's
        ``reduce_scatter_coalesced`` does). Returns the partitions (new fp32 tensors), 1.0 if this rank's share is
        nonfinite, and its squared norm (float64 device scalars: the world sums them with the other flags)."""
        W, r = self.topo.world_size, self.topo.rank
        chunks = [zero3_chunk(g.numel(), W) for g in grads]
        total = sum(chunks)
        send = torch.zeros(W, total, dtype=torch.float32, device=self.device)
        off = 0
        for g, c in zip(grads, chunks):
            n = g.numel()
            full, rest = divmod(n, c) if c else (0, 0)
            rows = send[:, off:off + c]
            rows[:full].copy_(g.reshape(-1)[:full * c].view(full, c))
            if rest:
                rows[full, :rest].copy_(g.reshape(-1)[full * c:])
            off += c
        if W > 1:
            mine = torch.empty(total, dtype=torch.float32, device=self.device)
            reduce_scatter_flat(mine, send.view(-1), self.topo.world_group)
        else:
            mine = send[0]
        mine /= W
        parts, off = [], 0
        for g, c in zip(grads, chunks):
            start, end = _partition_range(g.numel(), r, W)
            parts.append(mine[off:off + end - start].clone())
            off += c
        rep.uncompressed_elements += sum(g.numel() for g in grads)
        rep.bytes_uncompressed += (W - 1) * total * 4  # a ring reduce-scatter: half of the all-reduce
        return parts, (~torch.isfinite(mine).all()).double(), mine.double().pow(2).sum()

    def _exchange_pieces(self, sh: _Shard, numel: int, j: int, peer: int) -> tuple[int, int, int, int]:
        """What local rank ``j``'s estimated shard of ``sh`` holds of local rank ``peer``'s partition (both on this
        machine), as (start, end, first storage row, end storage row). Untransposed, a shard is a block of storage
        rows, i.e. a flat range, and the piece is the flat range [start, end) of the shard (rows unused). Transposed
        (a shard is a block of storage columns) the piece is the shard's columns of the storage rows that cover the
        partition, [row0, row1); the receiver lays the pieces side by side and cuts its range out of those rows."""
        s, e = _partition_range(numel, self.topo.machine * self.topo.local_size + peer, self.topo.world_size)
        if not sh.transposed:
            size = sh.shard_rows * sh.cols
            lo, hi = max(s, j * size), min(e, (j + 1) * size)
            return (lo - j * size, hi - j * size, 0, 0) if hi > lo else (0, 0, 0, 0)
        width = sh.shape[1]  # storage row length
        row0, row1 = s // width, -(-e // width) if e > s else s // width
        return (0, 0, row0, row1)

    def _exchange_partitions(self, comp, estimates: list[torch.Tensor], rep: ReduceReport) -> dict[str, torch.Tensor]:
        """Step 10 for ZeRO-3: one all-to-all on the machine's group gives every rank its partition of each
        compressed gradient, assembled from the local ranks' estimated shards (:meth:`_exchange_pieces`)."""
        m, me = self.topo.local_size, self.topo.local_rank
        send, send_sizes = [], [0] * m
        incoming: list[list[int]] = [[] for _ in range(m)]  # per source local rank, its piece sizes in matrix order
        for peer in range(m):
            for (sh, g), est in zip(comp, estimates):
                lo, hi, r0, r1 = self._exchange_pieces(sh, g.numel(), me, peer)
                piece = est.t()[r0:r1] if sh.transposed else est.reshape(-1)[lo:hi]
                send.append(piece.reshape(-1))
                send_sizes[peer] += piece.numel()
                lo, hi, r0, r1 = self._exchange_pieces(sh, g.numel(), peer, me)
                incoming[peer].append((r1 - r0) * sh.shard_rows if sh.transposed else hi - lo)
        recv_sizes = [sum(sizes) for sizes in incoming]
        flat = torch.cat(send) if send else torch.zeros(0, device=self.device)
        if m > 1:
            recv = torch.empty(sum(recv_sizes), dtype=flat.dtype, device=flat.device)
            dist.all_to_all_single(recv, flat, recv_sizes, send_sizes, group=self.topo.local_group)
            rep.bytes_intra += (sum(send_sizes) - send_sizes[me]) * 4
        else:
            recv = flat
        by_source = [chunk.split(sizes) for chunk, sizes in zip(recv.split(recv_sizes), incoming)]
        out = {}
        for i, (sh, g) in enumerate(comp):
            start, end = _partition_range(g.numel(), self.topo.rank, self.topo.world_size)
            pieces = [from_src[i] for from_src in by_source]
            if sh.transposed:
                r0 = start // sh.shape[1]
                rows = torch.cat([p.view(-1, sh.shard_rows) for p in pieces], dim=1)  # storage rows r0.. in full
                out[sh.key] = rows.reshape(-1)[start - r0 * sh.shape[1]:end - r0 * sh.shape[1]].clone()
            else:
                out[sh.key] = torch.cat(pieces)
        return out

    def _recenter(self, shards: list[_Shard], step: int, rep: ReduceReport) -> None:
        """Each machine's buffer <- the mean over machines (``recenter_every``), once per step for a shard (ZeRO-2
        with gradient accumulation reduces a shard at every micro-batch)."""
        todo = [sh for sh in shards if self._recentered_at.get(sh.key) != step]
        if not todo:
            return
        n = self.topo.machines
        before = [sh.err_value() for sh in todo]
        if todo[0].fp32:
            flat = torch.cat([sh.err.reshape(-1) for sh in todo])
            dist.all_reduce(flat, group=self.topo.global_group)
            flat /= n
            off = 0
            for sh in todo:
                sh.err.view(-1).copy_(flat[off:off + sh.err.numel()])
                off += sh.err.numel()
            nbytes = fp32_ring_bytes(flat.numel(), n)
            self.counter.add(nbytes, nbytes, flat.numel(), flat.numel())
        else:
            all_reduce_fp169_([sh.err for sh in todo], self.topo.global_group, average=True, counter=self.counter)
        if self._spread_removed_step != step:  # ZeRO-1/2 re-center bucket by bucket: sum over the step's buckets
            self._spread_removed_sq = torch.zeros((), dtype=torch.float64, device=self.device)
            self._spread_removed_step = step
        for sh, e in zip(todo, before):
            self._recentered_at[sh.key] = step
            self._spread_removed_sq = self._spread_removed_sq + (e.double() - sh.err_value().double()).pow(2).sum()
        rep.recentered_elements += sum(sh.err.numel() for sh in todo)

    def _track_add(self, before: torch.Tensor, added: torch.Tensor, after: torch.Tensor, gradient: bool = True):
        """Accumulate the rounding of one buffer update ``after ~ before + added`` for :meth:`diagnostics`."""
        r = self._rounding
        r[0] += float((after.double() - before.double() - added.double()).pow(2).sum())
        if gradient:
            r[1] += float(added.double().pow(2).sum())
            nz = added != 0
            r[2] += float((nz & (after == before)).sum())
            r[3] += float(nz.sum())

    @staticmethod
    def _warm_start(sh: _Shard, q_sum: torch.Tensor) -> None:
        """Next step's Q: this step's Q' with unit columns (a column that is zero or nonfinite keeps its old value).
        Q' is the same on every machine (decoded from the same all-reduced codes), so Q stays consistent."""
        norms = torch.linalg.vector_norm(q_sum, dim=0)
        ok = torch.isfinite(norms) & (norms > 0)
        new = torch.where(ok, q_sum / torch.where(ok, norms, torch.ones_like(norms)), fp169.decode(sh.q))
        sh.q.copy_(fp169.encode(new, saturate=True))

    @staticmethod
    def _overflow(x: torch.Tensor, scale: float) -> torch.Tensor:
        """1.0 (a float64 scalar on x's device, not read back) if ``x * scale`` holds a nonfinite value or one beyond
        the 1-6-9 maximum (which encoding would clamp); the product is taken in float64, as Python floats would."""
        ok = torch.isfinite(x).all() & (x.abs().amax().double() * scale <= FP169_MAX)
        return (~ok).double()

    def _plain_all_reduce(self, grads: list[torch.Tensor], rep: ReduceReport) -> torch.Tensor:
        """Average ``grads`` over the world in one fp32 all-reduce; returns 1.0 (a float64 device scalar) if the
        result is nonfinite."""
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        W = self.topo.world_size
        if W > 1:
            dist.all_reduce(flat, group=self.topo.world_group)
        flat /= W
        off = 0
        for g in grads:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        rep.uncompressed_elements += flat.numel()
        rep.bytes_uncompressed += fp32_ring_bytes(flat.numel(), W)
        return (~torch.isfinite(flat).all()).double()

    @staticmethod
    def _matrix(sh: _Shard, g: torch.Tensor) -> torch.Tensor:
        g = g.view(sh.shape)
        return g.t() if sh.transposed else g

    @staticmethod
    def _wire_dtype(grads) -> torch.dtype:
        """What the intra-machine steps send: the gradients' own dtype when they are all bf16 (or all fp16), whose
        values fp32 holds exactly, so sending them widened would double the bytes and add nothing; else fp32."""
        dtypes = {g.dtype for _, g in grads}
        return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else torch.float32

    def _reduce_scatter(self, comp, rep: ReduceReport) -> list[torch.Tensor]:
        """Step 1: the machine-sum of this rank's row block of every matrix, in fp32, divided by the world size.
        The gradients travel in their own 16-bit dtype when they have one and are summed in fp32 on arrival: the
        same bits as sending them widened to fp32, in half the bytes."""
        m = self.topo.local_size
        sizes = [sh.shard_rows * sh.cols for sh, _ in comp]
        send = torch.empty(m, sum(sizes), dtype=self._wire_dtype(comp), device=self.device)
        off = 0
        for (sh, g), n in zip(comp, sizes):
            send[:, off:off + n].copy_(self._matrix(sh, g).reshape(m, n))
            off += n
        if m > 1:
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.topo.local_group)
            rep.bytes_intra += (m - 1) * send.shape[1] * send.element_size()
        else:
            recv = send
        total = recv.float().sum(dim=0) / self.topo.world_size
        out, off = [], 0
        for (sh, _), n in zip(comp, sizes):
            out.append(total[off:off + n].view(sh.shard_rows, sh.cols))
            off += n
        return out

    def _all_gather(self, comp, estimates: list[torch.Tensor], rep: ReduceReport) -> None:
        """Step 10 (ZeRO 0-2): every rank's estimated shards into the full gradients. 16-bit gradients receive the
        estimates rounded to their dtype before the trip instead of after it: the same bits, half the bytes."""
        m = self.topo.local_size
        mine = torch.cat([e.reshape(-1) for e in estimates]).to(self._wire_dtype(comp))
        if m > 1:
            full = torch.empty(m, mine.numel(), dtype=mine.dtype, device=mine.device)
            all_gather_flat(full.view(-1), mine, self.topo.local_group)
            rep.bytes_intra += (m - 1) * mine.numel() * mine.element_size()
        else:
            full = mine.view(1, -1)
        off = 0
        for (sh, g), e in zip(comp, estimates):
            n = e.numel()
            block = full[:, off:off + n].reshape(sh.rows, sh.cols)
            self._matrix(sh, g).copy_(block)
            off += n

    # -- checkpoints --------------------------------------------------------------------------------------------
    def error_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's error buffers decoded to fp32, all at once (for tests and checks; :meth:`error_sq_norm`
        decodes one at a time)."""
        return {k: sh.err_value() for k, sh in self.shards.items()}

    def error_sq_norm(self) -> float:
        """Sum of ||E||^2 over this rank's error buffers, in float64. Decodes one buffer at a time (decoding them all,
        as :meth:`error_buffers` does, would hold an fp32 copy of every buffer at once: ~6 GB per rank at the 12B
        scale, on the first log step) and sums on the buffers' device, with one host sync at the end. The value is a
        running float sum of ``float(e.double().pow(2).sum())`` over ``error_buffers()``, bit for bit: the same
        per-buffer float64 sums, added in the same order (Python 3.12's ``sum()`` compensates, so it may differ)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for sh in self.shards.values():
            total += sh.err_value().double().pow_(2).sum()
        return float(total)

    def diagnostics(self) -> dict[str, float]:
        """Whole-model figures, the same on every rank (a collective over the world):

        * ``delayed_norm``: ||sum over machines of E||, the part of the averaged gradient not yet applied;
        * ``spread_norm``: sqrt(sum over machines of ||E_i - mean E||^2), the machine-specific part, which cancels in
          the sum and is never sent (every machine subtracts the same estimate), so it follows the gradient noise
          between machines as a random walk (until ``recenter_every`` resets it); only its rounding reaches the model;
        * ``sent_fraction``: of the delayed gradient before the latest step, the share of squared norm that step
          sent: sum ||Q'||^2 / (sum ||Q'||^2 + delayed_norm^2) (P orthonormal, so the two parts are orthogonal);
        * with ``recenter_every``: ``spread_recentered``, the spread norm the latest re-centering removed (the
          machine-specific part grown over the N steps before it; up to the rounding of the mean);
        * with ``track_rounding``, over the steps since the previous call: ``rounding_ratio``, the norm of the rounding
          of every buffer update (adding the gradient, subtracting the estimate) relative to the norm of the gradients
          added, and ``swamped_fraction``, the share of nonzero gradient elements whose add left the buffer unchanged
          (below half the 1-6-9 spacing of the value already there: lost to this machine's sum until it grows)."""
        n, t = self.topo.machines, torch.zeros(4, dtype=torch.float64)
        t[3] = float(self._spread_removed_sq) if self._spread_removed_sq is not None else 0.0
        for k, sh in self.shards.items():
            e = sh.err_value()
            total = e.clone()
            if n > 1:
                dist.all_reduce(total, group=self.topo.global_group)
            t[0] += float(total.double().pow(2).sum()) / n  # every machine holds the same sum: count it once
            t[1] += float((e - total / n).double().pow(2).sum())
            t[2] += float(self.sent_sq.get(k, 0.0)) / n
        if self.topo.world_size > 1:
            all_reduce_anywhere_(t, self.topo.world_group)
        delayed_sq, spread_sq, sent_sq, removed_sq = (float(v) for v in t)
        out = {"delayed_norm": delayed_sq ** 0.5, "spread_norm": spread_sq ** 0.5}
        if self._spread_removed_sq is not None:
            out["spread_recentered"] = removed_sq ** 0.5
        if sent_sq + delayed_sq > 0:
            out["sent_fraction"] = sent_sq / (sent_sq + delayed_sq)
        if self.s.track_rounding:
            r = torch.tensor(self._rounding, dtype=torch.float64)
            self._rounding = [0.0, 0.0, 0.0, 0.0]
            if self.topo.world_size > 1:
                all_reduce_anywhere_(r, self.topo.world_group)
            round_sq, in_sq, swamped, nonzero = (float(v) for v in r)
            if in_sq > 0:
                out["rounding_ratio"] = (round_sq / in_sq) ** 0.5
            if nonzero > 0:
                out["swamped_fraction"] = swamped / nonzero
        return out

    def state_dict(self, mode: str = "sum") -> dict:
        """``mode="sum"`` (the paper): the sum of the error buffers over machines for this local ordinal, held by the
        rank on machine 0 (others store none) -- a collective over the ordinal's group. ``"per_rank"``: this rank's
        own 1-6-9 codes, for a bit-exact resume on the same topology."""
        meta = {"machines": self.topo.machines, "local_size": self.topo.local_size, "mode": mode,
                "settings": dict(vars(self.s)), "keys": list(self.shards)}
        if self.s.warm_start:  # Q evolves: it is state (identical across machines for an ordinal)
            meta["q_codes"] = ({k: sh.q.clone().cpu() for k, sh in self.shards.items()}
                               if mode == "per_rank" or self.topo.machine == 0 else None)
        if mode == "per_rank":
            return {**meta, "err_codes": {k: sh.err.clone().cpu() for k, sh in self.shards.items()}}
        if mode != "sum":
            raise ValueError(f"unknown error-buffer checkpoint mode {mode!r} (sum or per_rank)")
        sums = {}
        dst = self.topo.global_rank_of(0)
        for k, sh in self.shards.items():
            e = sh.err_value()
            if self.topo.machines > 1:
                dist.reduce(e, dst=dst, group=self.topo.global_group)
            sums[k] = e.cpu()
        return {**meta, "err_sum": sums if self.topo.machine == 0 else None}

    def _load_q(self, state: dict) -> None:
        src = self.topo.global_rank_of(0)
        for k, sh in self.shards.items():
            if state["mode"] == "per_rank" or self.topo.machine == 0:
                sh.q.copy_(state["q_codes"][k].to(sh.q.device))
            if state["mode"] == "sum" and self.topo.machines > 1:
                dist.broadcast(sh.q.view(torch.uint8), src=src, group=self.topo.global_group)  # bytes: any backend

    def load_state_dict(self, state: dict) -> None:
        if state["machines"] != self.topo.machines or state["local_size"] != self.topo.local_size:
            raise ValueError(f"PowerSGD error buffers were saved with {state['machines']} machine(s) x "
                             f"{state['local_size']} rank(s) but this job has {self.topo.machines} x "
                             f"{self.topo.local_size}; resume on the same topology")
        if list(state["keys"]) != list(self.shards):
            raise ValueError("PowerSGD error buffers were saved for a different set of compressed parameters")
        if bool(state["settings"].get("warm_start")) != self.s.warm_start:
            raise ValueError("PowerSGD state was saved with warm_start="
                             f"{state['settings'].get('warm_start')}; this run has {self.s.warm_start}")
        if self.s.warm_start:
            self._load_q(state)
        if state["mode"] == "per_rank":
            for k, sh in self.shards.items():
                saved = state["err_codes"][k]
                if saved.dtype != sh.err.dtype:
                    raise ValueError(f"PowerSGD error buffers were saved as {saved.dtype} (per_rank) but this run "
                                     f"stores them as {sh.err.dtype} (powersgd.error_dtype={self.s.error_dtype!r})")
                sh.err.copy_(saved.to(sh.err.device))
            return
        src = self.topo.global_rank_of(0)
        for k, sh in self.shards.items():
            if self.topo.machine == 0:
                e = state["err_sum"][k].to(self.device).float() / self.topo.machines
            else:
                e = torch.empty(sh.shard_rows, sh.cols, dtype=torch.float32, device=self.device)
            if self.topo.machines > 1:
                dist.broadcast(e, src=src, group=self.topo.global_group)
            sh.err_set_(e)
