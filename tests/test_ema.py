"""The fp32 weight average (dalle_ds/train/ema.py): what an evaluation model built without initialization gets."""
import torch

from dalle_ds.config import DalleConfig
from dalle_ds.models.dalle import DALLE
from dalle_ds.train.ema import EMA

CFG = DalleConfig(text_vocab_size=20, text_len=4, image_vocab_size=8, image_grid=2, d_model=16, n_layers=2,
                  n_heads=2, conv_kernel=1, attn_backend="dense", resblock_grad_scaling=True)


def test_copy_to_fills_every_parameter_of_an_uninitialized_model():
    """The prior trainer evaluates the average in a model made on the meta device and ``to_empty`` (no init: each
    weight is overwritten next), so copy_to must write every parameter; NaN-filled, none may be left."""
    torch.manual_seed(0)
    model = DALLE(CFG)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.parameters())  # first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    ema.update(model.parameters())  # then average: the old weights + 2
    with torch.device("meta"):
        target = DALLE(CFG)
    target.to_empty(device="cpu")
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(float("nan"))
    ema.copy_to(target)
    got = dict(target.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach() - 1.0, rtol=0, atol=1e-6, msg=name)
    assert not any(t.isnan().any() for t in target.state_dict().values())
