"""fp16 underflow in the resblocks: one global loss scale vs per-resblock gradient scaling (paper §2.4, Figure 4).

On a deep, narrow prior (default 16 layers = 32 resblocks, d_model 64), briefly trained in fp32 so the gradients are
not those of a random initialisation, one backward pass is run with every resblock branch computed in fp16
(autocast; the residual stream, gains, biases, embeddings and logits stay fp32) under these scalings:

* ``none``: scale 1 everywhere (plain fp16, no loss scaling);
* ``global 2^16``: one constant scale, torch.amp's GradScaler / DeepSpeed's ``initial_scale_power`` default;
* ``global settled``: the largest power of two with no Inf/NaN anywhere in the backward: the best a single dynamic
  loss scale can do (DeepSpeed's dynamic scaler oscillates between this and half of it);
* ``per-block init``: per-resblock scaling at its initial M·2^13 (M = 1);
* ``per-block settled``: each block's largest power of two in the paper's clamp range [2^7, 2^24] with no Inf/NaN in
  that block (the Inf/NaN filter keeps blocks independent, so each scale settles on its own; the running rules of
  Appendix D.1 move it toward this value at 2^(1/1000) per clean update and ÷√2 on overflow).

A global scale S applied to the loss puts S·g into every fp16 branch, exactly what per-block scaling does with all
scales equal to S (the identity path is fp32 either way), so the global modes use the per-block machinery with one
shared scale. For every resblock it records the fp16 gradients at the outputs of the branch's linear layers (qkv and
proj for attention, fc and proj for the MLP; proj's output gradient is the scaled gradient entering the branch) and
reports

* **zero %**: the fraction of those fp16 gradient elements that are exactly zero;
* **flushed %**: zero in fp16 although the fp32 reference (fp32 branches, no scaling) is nonzero: underflow.

    python benchmarks/bench_underflow.py --out benchmarks/results/underflow_cpu_<yyyymmdd>
    python benchmarks/bench_underflow.py --quick       # 3 narrow layers, seconds (tests the harness)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dalle_ds.config import DalleConfig  # noqa: E402
from dalle_ds.models.dalle import DALLE  # noqa: E402
from timing import emit, out_prefix, positive_int  # noqa: E402  (benchmarks/timing.py)

MIN_LOG2, MAX_LOG2 = 7, 24


def synthetic_batch(cfg: DalleConfig, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable pairs: random captions; the image codes are a fixed function of the caption and the position."""
    text = torch.randint(cfg.text_vocab_size // 2, cfg.text_vocab_size, (batch, cfg.text_len), generator=gen)
    text[:, 0] = cfg.bos_id
    pos = torch.arange(cfg.image_len)
    image = (text[:, 1 + pos % (cfg.text_len - 1)] * 7 + pos // cfg.image_grid) % cfg.image_vocab_size
    return text, image


class Probe:
    """Record the gradient at the outputs of every branch linear layer, per resblock."""

    def __init__(self, model: DALLE):
        self.grads: list[list[torch.Tensor]] = [[] for _ in model.resblocks]
        self.handles = []
        for k, block in enumerate(model.resblocks):
            for name, mod in block.fn.named_children():
                if isinstance(mod, torch.nn.Linear):
                    self.handles.append(mod.register_forward_hook(self._hook(k)))

    def _hook(self, k: int):
        def fwd(_mod, _inp, out):
            out.register_hook(lambda g: self.grads[k].append(g.detach().clone()))
        return fwd

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def backward_with(model: DALLE, batch, scales: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[bool]]:
    """One backward with the given per-block scales (fixed; no update rule). Returns (probed grads, block flags)."""
    model.zero_grad(set_to_none=True)
    sc = model.grad_scaler
    sc.scales = scales.to(torch.float64).clone()
    sc._device_scales.clear()
    probe = Probe(model)
    try:
        model(*batch).loss.backward()
    finally:
        probe.remove()
    model.unscale_grads_()
    flags, _ = sc.sync_flags()
    for f in sc._flags.values():
        f.zero_()
    sc._synced = None
    model.zero_grad(set_to_none=True)
    return probe.grads, flags


def stats(grads: list[list[torch.Tensor]], ref: list[list[torch.Tensor]]) -> list[dict]:
    out = []
    for gs, rs in zip(grads, ref):
        n = sum(g.numel() for g in gs)
        zero = sum(int((g == 0).sum()) for g in gs)
        flushed = sum(int(((g == 0) & (r != 0)).sum()) for g, r in zip(gs, rs))
        nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in gs)
        out.append({"zero": zero / n, "flushed": flushed / n, "nonfinite": nonfinite / n})
    return out


#: What ``--quick`` and a full run use for the sizes not given on the command line.
QUICK_SIZES = {"layers": 3, "d_model": 32, "batch": 4, "train_steps": 10, "measure_batches": 1}
FULL_SIZES = {"layers": 16, "d_model": 64, "batch": 8, "train_steps": 300, "measure_batches": 2}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; sizes not given come from ``--quick`` (QUICK_SIZES) or the full run (FULL_SIZES)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=positive_int, default=None,
                   help="transformer layers (2 resblocks each; default 16)")
    p.add_argument("--d-model", type=positive_int, default=None, help="default 64")
    p.add_argument("--batch", type=positive_int, default=None, help="default 8")
    p.add_argument("--train-steps", type=positive_int, default=None,
                   help="fp32 AdamW steps before measuring (default 300)")
    p.add_argument("--measure-batches", type=positive_int, default=None,
                   help="batches averaged in the measurement (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--quick", action="store_true", help="3 layers, width 32, 10 training steps, 1 batch of 4 "
                   "(for the sizes not given)")
    p.add_argument("--out", type=out_prefix, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    for name, value in (QUICK_SIZES if args.quick else FULL_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DalleConfig(text_vocab_size=64, text_len=16, image_vocab_size=64, image_grid=8, d_model=args.d_model,
                      n_layers=args.layers, n_heads=max(1, args.d_model // 32), conv_kernel=3, attn_backend="sdpa",
                      resblock_grad_scaling=True).validate()
    torch.manual_seed(args.seed)
    model = DALLE(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.96))
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.train_steps):  # fp32 branches, scales 2^13 (a no-op in fp32 up to rounding)
        loss = model(*synthetic_batch(cfg, args.batch, gen)).loss
        loss.backward()
        model.unscale_grads_()
        model.grad_scaler.update()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    print(f"trained {args.train_steps} fp32 steps in {time.perf_counter() - t0:.1f}s, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}", flush=True)

    fp16 = DALLE(dataclasses.replace(cfg, resblock_dtype="float16"))
    fp16.load_state_dict(model.state_dict())
    nb = len(model.resblocks)
    batches = [synthetic_batch(cfg, args.batch, gen) for _ in range(args.measure_batches)]

    # fp32 reference and per-block gradient magnitudes (RMS of the gradient entering each branch)
    refs = [backward_with(model, b, torch.ones(nb))[0] for b in batches]
    rms = [math.sqrt(sum(float(r[k][0].float().square().mean()) for r in refs) / len(refs)) for k in range(nb)]

    def flags_at(log2s: list[int]) -> list[bool]:
        bad = [False] * nb
        for b in batches:
            _, f = backward_with(fp16, b, torch.tensor([2.0 ** v for v in log2s]))
            bad = [x or y for x, y in zip(bad, f)]
        return bad

    def largest_finite(lo: int, hi: int, shared: bool) -> list[int | None]:
        """Per block (or one shared scale), the largest integer log2 in [lo, hi] without Inf/NaN: a bisection,
        all blocks at once (the filter makes blocks independent), assuming overflow is monotone in the scale."""
        n = 1 if shared else nb
        good: list[int | None] = [None] * n
        los, his = [lo] * n, [hi] * n
        while any(a <= c for a, c in zip(los, his)):
            mids = [(a + c) // 2 if a <= c else (good[i] if good[i] is not None else lo) for i, (a, c) in
                    enumerate(zip(los, his))]
            flags = flags_at(mids * nb if shared else mids)
            bad = [any(flags)] if shared else flags
            for i in range(n):
                if los[i] > his[i]:
                    continue
                if bad[i]:
                    his[i] = mids[i] - 1
                else:
                    good[i], los[i] = mids[i], mids[i] + 1
        return good

    global_max = largest_finite(0, 40, shared=True)[0]
    per_block_settled = [v if v is not None else MIN_LOG2 for v in largest_finite(MIN_LOG2, MAX_LOG2, False)]

    modes = {
        "none": [0.0] * nb,
        "global 2^16": [16.0] * nb,
        f"global settled (2^{global_max})": [float(global_max)] * nb,
        "per-block init (2^13)": [13.0] * nb,
        "per-block settled": [float(v) for v in per_block_settled],
    }
    results = {}
    for name, log2s in modes.items():
        acc = None
        for b, ref in zip(batches, refs):
            grads, _ = backward_with(fp16, b, torch.tensor([2.0 ** v for v in log2s]))
            s = stats(grads, ref)
            acc = s if acc is None else [{k: a[k] + x[k] for k in a} for a, x in zip(acc, s)]
        results[name] = [{k: v / len(batches) for k, v in a.items()} for a in acc]
        mean_zero = sum(r["zero"] for r in results[name]) / nb
        mean_fl = sum(r["flushed"] for r in results[name]) / nb
        print(f"{name:<28} mean zero {100 * mean_zero:6.2f}%  flushed {100 * mean_fl:6.2f}%", flush=True)
    ref_zero = [sum(stats(r, r)[k]["zero"] for r in refs) / len(refs) for k in range(nb)]

    result = {
        "bench": "underflow", "device": "cpu", "device_name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/bench_underflow.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "model": {"n_layers": cfg.n_layers, "resblocks": nb, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                  "seq_len": cfg.seq_len, "batch": args.batch},
        "train_steps": args.train_steps, "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None, "measure_batches": args.measure_batches,
        "global_settled_log2": global_max, "per_block_settled_log2": per_block_settled,
        "branch_grad_rms_fp32": rms, "fp32_reference_zero": ref_zero, "modes": modes, "results": results,
    }
    return emit(result, markdown(result), args.out)


def markdown(r: dict) -> str:
    m = r["model"]
    names = list(r["modes"])
    lines = [f"# bench_underflow: fp16 resblocks, global vs per-resblock gradient scaling ({r['device_name']})", "",
             f"{m['resblocks']} resblocks ({m['n_layers']} layers), d_model {m['d_model']}, {m['n_heads']} heads, "
             f"{m['seq_len']} tokens, batch {m['batch']}; trained {r['train_steps']} fp32 steps first (loss "
             f"{r['loss_first']:.3f} → {r['loss_last']:.3f}); {r['measure_batches']} measured batch(es); torch "
             f"{r['torch']}, {r['threads']} threads, {r['date']}.", "",
             f"Command: `{r['command']}`", "",
             "Per mode, averaged over resblocks: % of fp16 activation-gradient elements (outputs of the branch's "
             "linear layers) that are zero, and % flushed (zero in fp16, nonzero in the fp32 reference).", "",
             "| mode | mean zero % | mean flushed % | worst block flushed % | blocks with any Inf/NaN |",
             "| --- | ---: | ---: | ---: | ---: |"]
    nb = m["resblocks"]
    for name in names:
        rs = r["results"][name]
        lines.append(f"| {name} | {100 * sum(x['zero'] for x in rs) / nb:.3f} | "
                     f"{100 * sum(x['flushed'] for x in rs) / nb:.3f} | {100 * max(x['flushed'] for x in rs):.3f} | "
                     f"{sum(x['nonfinite'] > 0 for x in rs)} |")
    lines += ["", f"fp32 reference: {100 * sum(r['fp32_reference_zero']) / nb:.3f}% zero elements on average.", "",
              "Per resblock (block 2i is layer i's attention, 2i + 1 its MLP): RMS of the fp32 gradient entering "
              "the branch, settled per-block log2 scale, and flushed % per mode.", "",
              "| block | kind | grad RMS | settled log2 | " + " | ".join(names) + " |",
              "| ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for k in range(nb):
        lines.append(f"| {k} | {'attn' if k % 2 == 0 else 'mlp'} | {r['branch_grad_rms_fp32'][k]:.2e} | "
                     f"{r['per_block_settled_log2'][k]} | "
                     + " | ".join(f"{100 * r['results'][n][k]['flushed']:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
