"""Single-process probe of the dVAE bottleneck on 64x64 shapes (docs/dvae_cpu_trials.md, "Bottleneck probe").

Trains the tiny dVAE preset for --steps updates on a pool of 2048 train images with one of several objective
variants (paper Gumbel relaxation; no noise; plain autoencoder without the softmax; straight-through hard codes;
distance-based logits; batch code-usage entropy) and prints the shapes scorer on argmax reconstructions of 128
test_id images, plus the mean object colour of 8 originals vs reconstructions. Diagnostic only, not a trainer.

    python benchmarks/dvae_bottleneck_probe.py --steps 120 --nonoise --plain --mse
"""
import argparse
import dataclasses
import math
import time

import torch

from dalle_ds.config import DVAE_PRESETS
from dalle_ds.data.shapes import ShapesDataset
from dalle_ds.eval.dvae_eval import evaluate_reconstructions
from dalle_ds.models.dvae import DiscreteVAE, kmeans_init_head, logit_laplace_nll, map_pixels, unmap_pixels
from dalle_ds.train.dvae_trainer import shapes_score_fn

POOL, EVAL = 2048, 128  # train images trained on, test_id images scored
REPORTED = ("recon_psnr_db", "codebook_perplexity", "codes_used", "scorer_color", "scorer_shape", "scorer_exact",
            "scorer_size", "scorer_count")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bs", type=int, default=32, help="batch size")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    # the relaxation's schedules (cosine from the first value to the second over N updates)
    p.add_argument("--beta", type=float, default=0.0, help="KL weight reached after --beta_steps (from 0)")
    p.add_argument("--beta_steps", type=int, default=100)
    p.add_argument("--tau0", type=float, default=1.0)
    p.add_argument("--tau1", type=float, default=1.0)
    p.add_argument("--tau_steps", type=int, default=160)
    # the model
    p.add_argument("--K", type=int, default=512, help="codebook size")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--init", type=int, default=64, help="decoder_init channels")
    p.add_argument("--gain", type=float, default=None, help="every resblock's post_gain")
    p.add_argument("--oinit", action="store_true", help="every conv N(0, 1/fan_in), zero bias")
    p.add_argument("--emb_std", type=float, default=None, help="decoder code embeddings N(0, std)")
    p.add_argument("--logit_scale", type=float, default=None, help="encoder head weights times this")
    p.add_argument("--kmeans", type=float, default=0.0, help="k-means init of the encoder head at this scale")
    p.add_argument("--dist", type=int, default=0, help="distance-based logits through a D-dim projection")
    p.add_argument("--restart", type=int, default=0, help="with --dist: re-seed dead codes every N updates")
    # the objective variants
    p.add_argument("--nonoise", action="store_true", help="no Gumbel noise")
    p.add_argument("--plain", action="store_true", help="logits to the decoder, no softmax")
    p.add_argument("--mse", action="store_true", help="MSE instead of the logit-Laplace likelihood")
    p.add_argument("--hard", action="store_true", help="straight-through one-hot codes")
    p.add_argument("--usage", type=float, default=0.0, help="bonus weight on the batch code-usage entropy")
    return p.parse_args(argv)


def cosine(step: int, n: int, v0: float, v1: float) -> float:
    if n <= 0 or step >= n:
        return v1
    return v1 + (v0 - v1) * 0.5 * (1 + math.cos(math.pi * step / n))


class DistanceHead(torch.nn.Module):
    """Logits = -squared distance between RMS-normalized projected features and K code vectors."""

    def __init__(self, cin: int, d: int, k: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(cin, d, 1)
        self.code = torch.nn.Parameter(torch.randn(k, d))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        f = self.proj(h)
        return f / (f.pow(2).mean(1, keepdim=True).sqrt() + 1e-6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = self.features(h)
        d2 = (f.pow(2).sum(1, keepdim=True) - 2 * torch.einsum("bdhw,kd->bkhw", f, self.code)
              + self.code.pow(2).sum(1)[None, :, None, None])
        return -d2 / 2


def build_model(a: argparse.Namespace):
    cfg = dataclasses.replace(DVAE_PRESETS["tiny"], vocab_size=a.K, hidden=a.hidden, decoder_init=a.init)
    m = DiscreteVAE(cfg)
    if a.gain is not None:
        for mod in m.modules():
            if hasattr(mod, "post_gain"):
                mod.post_gain = a.gain
    if a.oinit:
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.normal_(mod.weight, std=1 / math.sqrt(mod.weight[0].numel()))
                torch.nn.init.zeros_(mod.bias)
    if a.emb_std is not None:
        torch.nn.init.normal_(m.decoder.input.weight, std=a.emb_std)
        torch.nn.init.zeros_(m.decoder.input.bias)
    if a.logit_scale is not None:
        with torch.no_grad():
            m.encoder.net[-1].weight.mul_(a.logit_scale)
    return cfg, m


def variant_loss(m, cfg, a, x: torch.Tensor, tau: float, beta: float):
    """(loss, nll, kl) of one batch under the flags' objective variant."""
    x01 = x.float() / 255
    logits = m.encoder(map_pixels(x01))
    z = logits / tau
    if not a.nonoise:
        z = z - torch.empty_like(logits).exponential_().log() / tau
    z = z if a.plain else torch.softmax(z, 1)
    if a.hard:
        zh = torch.nn.functional.one_hot(z.argmax(1), a.K).permute(0, 3, 1, 2).float()
        z = zh + z - z.detach()
    st = m.decoder(z)
    mu, lb = st[:, :3], st[:, 3:]
    if a.mse:
        rec = (torch.sigmoid(mu) - map_pixels(x01)).pow(2).mean()
    else:
        rec = logit_laplace_nll(x01, mu, lb).mean()
    lq = torch.log_softmax(logits, 1)
    kl = ((lq.exp() * lq).sum(1) + math.log(a.K)).mean()
    per_pixel = cfg.num_tokens / x01[0].numel()
    loss = rec + beta * kl * per_pixel
    if a.usage:
        qbar = lq.exp().mean((0, 2, 3))
        loss = loss - a.usage * -(qbar * qbar.clamp_min(1e-12).log()).sum() * per_pixel
    return loss, rec, kl


def restart_dead_codes(m, a, x: torch.Tensor, step: int) -> None:
    """--dist --restart: codes no pixel of this batch picked are moved onto random batch features."""
    with torch.no_grad():
        head = m.encoder.net[-1]
        h = m.encoder.net[:-1](map_pixels(x.float() / 255))
        f = head.features(h)
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        use = torch.bincount(head(h).argmax(1).flatten(), minlength=a.K)
        dead = (use == 0).nonzero().flatten()
        pick = f[torch.randint(0, len(f), (len(dead),))]
        head.code[dead] = pick + 0.01 * torch.randn_like(pick)
        if step % 50 == 0:
            print("restarted", len(dead), flush=True)


def train(m, cfg, a, pool: torch.Tensor) -> None:
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=1e-4, eps=a.eps)
    t0 = time.time()
    for step in range(a.steps):
        x = pool[torch.randint(0, len(pool), (a.bs,))]
        tau = cosine(step, a.tau_steps, a.tau0, a.tau1)
        beta = cosine(step, a.beta_steps, 0.0, a.beta)
        if a.nonoise or a.mse or a.hard or a.usage:
            loss, nll, kl = variant_loss(m, cfg, a, x, tau, beta)
        else:  # the paper's relaxation, as the trainer runs it
            out = m(x, tau, beta)
            loss, nll, kl = out.loss, out.nll, out.kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if a.restart and step % a.restart == 0 and step < a.steps * 0.7:
            restart_dead_codes(m, a, x, step)
        if step % 25 == 0 or step == a.steps - 1:
            print(f"{step} loss {loss.item():.4f} nll {nll.item():.4f} kl {kl.item():.3f} tau {tau:.3f} "
                  f"beta {beta:.2f} {time.time() - t0:.0f}s", flush=True)


def report(m, a, ev: ShapesDataset) -> dict:
    if a.nonoise:  # the decoder fed the softmax (or the logits) with no noise: the "soft" scores
        from dalle_ds.eval.shapes_scorer import score_images

        xs = torch.stack([ev[i]["image"] for i in range(EVAL)])
        scenes = [ev[i]["scene"] for i in range(EVAL)]
        with torch.no_grad():
            z = m.encoder(map_pixels(xs.float() / 255))
            st = m.decoder(z if a.plain else torch.softmax(z, 1))
            rec = (unmap_pixels(torch.sigmoid(st[:, :3])) * 255).round().to(torch.uint8)
        sc = score_images(list(rec), scenes)
        print("SOFT", {k: round(v, 3) for k, v in sc.items() if isinstance(v, float)})
    met, ex = evaluate_reconstructions(m, ev, EVAL, score_fn=shapes_score_fn)
    for o, r in list(zip(ex["originals"], ex["recons"]))[:8]:
        mask = o.float().sum(0) > 200  # the objects' pixels (the background is black)
        print("orig", o.float()[:, mask].mean(1).round().tolist(), "recon", r.float()[:, mask].mean(1).round().tolist(),
              int(mask.sum()))
    shown = {k: round(v, 3) for k, v in met.items() if k in REPORTED}
    print(shown)
    return shown


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    cfg, m = build_model(a)
    ds = ShapesDataset("train", 4096, seed=0)
    t0 = time.time()
    pool = torch.stack([ds[i]["image"] for i in range(POOL)])
    print("render", time.time() - t0, flush=True)
    ev = ShapesDataset("test_id", EVAL, seed=0)
    if a.kmeans:  # data-dependent init of the encoder head (dalle_ds.models.dvae.kmeans_init_head)
        used = kmeans_init_head(m, pool[:256], scale=a.kmeans, generator=torch.Generator().manual_seed(a.seed))
        print("kmeans init: codes used", used, flush=True)
    if a.dist:
        m.encoder.net[-1] = DistanceHead(m.encoder.net[-1].in_channels, a.dist, a.K)
    train(m, cfg, a, pool)
    return report(m, a, ev)


if __name__ == "__main__":
    main()
