"""Evaluating a dVAE the way stage 2 will use it: argmax codes → decoder → image.

The reconstruction through argmax codes (not the relaxed Gumbel sample) is what the transformer prior can at best
reproduce, so the shapes scorer's exact match on these reconstructions is the ceiling for stage 2.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from dalle_ds.data.images import collate_samples


def code_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity of the empirical code distribution (exp of its entropy, in codes) and the number of codes used."""
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"codebook_perplexity": math.exp(entropy), "codes_used": int((counts > 0).sum()),
            "codebook_size": vocab_size}


@torch.no_grad()
def evaluate_reconstructions(model, dataset: Dataset, num_samples: int, batch_size: int = 32,
                             device: torch.device | str = "cpu", score_fn=None) -> tuple[dict, dict]:
    """Encode (argmax) and decode ``num_samples`` images; return (metrics, examples).

    ``score_fn(recons_uint8_list, samples) -> dict`` adds dataset-specific scores (the shapes scorer).
    ``examples`` holds the first batch of originals and reconstructions for a picture.
    """
    model.eval()
    n = min(num_samples, len(dataset))
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                        collate_fn=collate_samples)
    all_tokens, sq_err, n_px = [], 0.0, 0
    recon_u8, scenes, originals = [], [], []
    for batch in loader:
        images = batch["image"].to(device)
        tokens = model.encode(images)
        recon = model.decode(tokens)
        target = images.float() / 255.0
        sq_err += float(((recon - target) ** 2).sum())
        n_px += target.numel()
        all_tokens.append(tokens.cpu())
        recon_u8 += list((recon * 255).round().to(torch.uint8).cpu())
        originals += list(batch["image"])
        scenes += batch.get("scene", [None] * len(images))
    tokens = torch.cat(all_tokens)
    metrics = {"num_images": n, "recon_mse": sq_err / max(n_px, 1),
               "recon_psnr_db": 10 * math.log10(1.0 / max(sq_err / max(n_px, 1), 1e-12)),
               **code_usage(tokens, model.cfg.vocab_size)}
    if score_fn is not None:
        metrics.update(score_fn(recon_u8, scenes))
    return metrics, {"originals": originals[:32], "recons": recon_u8[:32]}
