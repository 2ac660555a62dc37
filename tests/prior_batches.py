"""Helpers shared by the prior's model-level tests: a random (text, image-code) batch, an injected overflow."""
import torch

from dalle_ds.models.dalle import prepare_text


def random_batch(cfg, B: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption lengths 0, 3, 8, 5 (cut to the batch): empty, short, longer than the text context, in between."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.text_vocab_size, (B, 8), generator=g)
    text = prepare_text(ids, torch.tensor([0, 3, 8, 5][:B]), cfg)
    return text, torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)


def inject_inf_gradient(module: torch.nn.Module):
    """Make the gradient at ``module``'s output contain an Inf (an overflow inside the resblock holding it); returns
    the hook handle."""
    def fwd_hook(_mod, _inp, out):
        def grad_hook(g):
            g = g.clone()
            g.view(-1)[0] = float("inf")
            return g
        out.register_hook(grad_hook)
    return module.register_forward_hook(fwd_hook)
