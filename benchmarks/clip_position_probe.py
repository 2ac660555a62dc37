"""Can the reranker's vision tower see where an object is? (docs/dvae_cpu_trials.md, "Reranker or prior?")

Trains the demo CLIP's vision tower (``ClipModelConfig`` defaults: 64 px, patch 8, width 128, 2 layers) with a linear
head to classify the 9 named positions of one-object shapes scenes, supervised, and prints held-out accuracy. The
contrastive CLIP of the same size stayed at chance on position after 300-1,000 updates when its position embeddings
started from transformers' N(0, 0.02²); this told capacity apart from the training signal (the fix was the start:
``ClipModelConfig.vision_position_init``). The tower here keeps transformers' start. Diagnostic only.
    python benchmarks/clip_position_probe.py --steps 300
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scenes", type=int, default=6000, help="train scenes drawn (about 30%% have one object)")
    p.add_argument("--every", type=int, default=50, help="print held-out accuracy every N updates")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dalle_ds.config import ClipModelConfig
    from dalle_ds.data.shapes import POSITIONS, render_scene_tensor, sample_scene

    args = parse_args(argv)
    torch.manual_seed(0)
    m = ClipModelConfig()
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=m.image_size, patch_size=m.patch_size, hidden_size=m.width,
                                             intermediate_size=4 * m.width, num_hidden_layers=m.layers,
                                             num_attention_heads=m.heads, num_channels=3))
    head = torch.nn.Linear(m.width, len(POSITIONS))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=args.lr)
    scenes = [s for s in (sample_scene(0, "train", i) for i in range(args.scenes)) if s["position"]]
    x = torch.stack([render_scene_tensor(s) for s in scenes]).float() / 127.5 - 1
    y = torch.tensor([POSITIONS.index(s["position"]) for s in scenes])
    held = min(256, len(y) // 4)
    n = len(y) - held
    history = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n, (args.batch,))
        loss = F.cross_entropy(head(tower(pixel_values=x[idx]).pooler_output), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                acc = (head(tower(pixel_values=x[n:]).pooler_output).argmax(-1) == y[n:]).float().mean().item()
            history.append({"step": step, "loss": loss.item(), "held_out_accuracy": acc})
            print(f"update {step}: loss {loss.item():.3f}, held-out position accuracy {acc:.3f} ({held} scenes)")
    return {"history": history}


if __name__ == "__main__":
    main()
    sys.exit(0)
