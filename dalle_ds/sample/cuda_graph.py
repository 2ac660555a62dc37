"""The sampler's decode step captured once in a CUDA graph and replayed for every image position.

Why: a KV-cached decode step does little GPU work per kernel but launches many. One token per caption: at batch 8 a
layer of the 350M preset reads ~25 MB of bf16 weights, ~8 µs at an H100's 3.35 TB/s, while the eager step launches
~15 kernels per layer (norms, four matmuls, two cache writes, the attention, GELU, casts, residual adds), each with
several µs of host time in PyTorch's eager path, so the step is bound by the host, not the GPU (an estimate from
these counts, to be measured by ``benchmarks/bench_sample.py``). A graph replays the whole step (every layer and the
image head) with one host call, the approach of gpt-fast and of vLLM's decode.

How: with a tensor position :meth:`DALLE.decode_step` reads the position only on the device (the row / column
embedding lookup, the cache writes by ``index_copy_``, the attention kernel's visit table), so one capture serves all
W² − 1 positions. Each replay first copies the codes and the position into the graph's static input buffers; the
logits come back in a static buffer that the next replay overwrites. The KV cache belongs to the captured step:
``prefill`` writes into it eagerly, the replays extend it.

Limits: CUDA only; one capture per batch size (the two latest per model are kept, each with its KV cache: a
``generate`` call with rows left over uses a full batch and a smaller last one; release them with :func:`release`);
the decode backend must accept tensor positions (triton and dense do); the attention tuner runs
in the warm-up steps before the capture. Sampling draws (softmax, top-k/p, the uniform numbers) stay outside the graph.
"""
from __future__ import annotations

import weakref

import torch

from dalle_ds.models.dalle import DALLE
from dalle_ds.ops.attention.layouts import decode_table

_captures: "weakref.WeakKeyDictionary[DALLE, dict[int, DecodeStepGraph]]" = weakref.WeakKeyDictionary()
KEEP = 2  # captures kept per model, most recent first out: a full batch and the last, smaller one


def _fingerprint(model: DALLE, batch: int) -> tuple:
    """What a capture depends on: the batch and the parameters' storage (a graph reads them by address; ``.to()`` or
    a reload makes new tensors, and a stale graph must not run)."""
    return (batch, *((p.data_ptr(), p.dtype) for p in model.parameters()))


class DecodeStepGraph:
    """``step(codes [B], image_pos: int) -> logits [B, K]``, :meth:`DALLE.decode_step` on the step's own KV cache
    (``self.cache``), with the position passed through a device tensor.

    ``capture=True`` (CUDA) records the step in a CUDA graph after ``warmup`` eager steps on a side stream (as torch
    requires; they also let the attention tuner time its candidates and build its tables); ``capture=False`` runs the
    same tensor-position step eagerly on any device (the route tests compare against the int-position sampler)."""

    def __init__(self, model: DALLE, batch: int, capture: bool = True, warmup: int = 2):
        device = model.text_emb.weight.device
        if capture and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the prior on a CUDA device; it is on {device}")
        self.fingerprint = _fingerprint(model, batch)
        self.cache = model.new_cache(batch)
        self.codes = torch.zeros(batch, dtype=torch.long, device=device)
        self.image_pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        self._model = weakref.ref(model)  # not a strong reference: the per-model registry is keyed weakly by it
        self.device = device
        if capture:
            with torch.cuda.device(device):  # the prior's GPU, whichever is current (streams and capture are per GPU)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(warmup):
                        model.decode_step(self.codes, self.image_pos, self.cache)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # stream=side: without it torch captures on one class-wide stream made on whichever GPU was current
                # at its first use, which is the wrong one for a second prior on another GPU
                with torch.no_grad(), torch.cuda.graph(self.graph, stream=side):
                    self.logits = model.decode_step(self.codes, self.image_pos, self.cache)
            # The graph reads the attention's decode tables by address; they live in an LRU cache that may drop
            # them after other shapes are used: hold them as long as the graph.
            self._tables = [decode_table(spec, device) for spec in {layer.attn.fn.spec for layer in model.layers}
                            if spec.kind != "causal"]

    def __call__(self, codes: torch.Tensor, image_pos: int) -> torch.Tensor:
        """Logits [B, K] for the code after ``codes`` at raster image position ``image_pos``. With a graph, the
        returned tensor is the static output buffer: read (or clone) it before the next call."""
        self.codes.copy_(codes)
        self.image_pos.fill_(image_pos)
        if self.graph is None:
            model = self._model()
            if model is None:
                raise RuntimeError("the prior this decode step was built for no longer exists")
            return model.decode_step(self.codes, self.image_pos, self.cache)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits


def graphed_decode_step(model: DALLE, batch: int) -> DecodeStepGraph:
    """The captured decode step for ``model`` at ``batch`` rows: an earlier capture when one still matches (same
    batch, same parameter tensors), otherwise a new one. Before a new capture, the captures of other parameter
    tensors are dropped, and the least recently used ones beyond ``KEEP - 1``, so that their KV caches and memory
    pools are free before the new ones are allocated."""
    fingerprint = _fingerprint(model, batch)
    held = _captures.setdefault(model, {})
    step = held.pop(batch, None)
    if step is not None and step.fingerprint == fingerprint:
        held[batch] = step  # re-inserted: most recently used last
        return step
    step = None  # no reference to a dropped capture may remain while the new one allocates
    for b in [b for b, s in held.items() if s.fingerprint[1:] != fingerprint[1:]]:
        del held[b]
    while len(held) >= KEEP:
        del held[next(iter(held))]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    step = held[batch] = DecodeStepGraph(model, batch)
    return step


def release(model: DALLE) -> None:
    """Free the captured decode steps of ``model`` (their graphs' memory pools and KV caches)."""
    if _captures.pop(model, None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
