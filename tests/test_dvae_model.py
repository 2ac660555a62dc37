import math

import pytest
import torch
import torch.nn.functional as F

from dalle_ds.config import DVAE_PRESETS, DVAEConfig
from dalle_ds.models.dvae import (GAUSSIAN_SIGMA, DiscreteVAE, gaussian_nll, kmeans_init_head, logit_laplace_nll,
                                  map_pixels, unmap_pixels)

CFG = DVAEConfig(image_size=32, vocab_size=16, hidden=8, blocks_per_group=1, groups=3, decoder_init=8)


def test_shapes_and_architecture_facts():
    m = DiscreteVAE(CFG)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = m(x, tau=1.0, kl_weight=1.0)
    assert out.logits.shape == (2, 16, 8, 8) and out.recon.shape == (2, 3, 32, 32)
    assert m.encode(x).shape == (2, 8, 8) and m.decode(m.encode(x)).shape == (2, 3, 32, 32)
    enc, dec = m.encoder.net, m.decoder
    assert enc[0].kernel_size == (7, 7)                          # 7×7 input conv
    assert enc[-1].kernel_size == (1, 1) and enc[-1].out_channels == 16   # 1×1 conv to K logits
    assert dec.input.kernel_size == (1, 1) and dec.input.in_channels == 16  # 1×1 conv first in the decoder
    assert dec.net[-1].out_channels == 6                         # μ and ln b per channel
    gains = {b.post_gain for b in m.modules() if hasattr(b, "post_gain")}
    assert gains == {1 / 9}                                      # 1 / n_layers², n_layers = 3 groups × 1 block


def test_bf16_weights_take_uint8_images():
    """DeepSpeed's bf16 mode casts the parameters, not the batch (ds_configs/dvae_paper.json): the forward, encode
    and decode run on bf16 weights (they raised a dtype mismatch in the first conv) and the loss stays close."""
    torch.manual_seed(0)
    m32 = DiscreteVAE(CFG)
    m16 = DiscreteVAE(CFG)
    m16.load_state_dict(m32.state_dict())
    m16.to(torch.bfloat16)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    l32, l16 = m32(x, 1.0, 1.0, generator=g[0]).loss, m16(x, 1.0, 1.0, generator=g[1]).loss
    assert l16.dtype == torch.float32 and torch.isfinite(l16) and abs(l16.item() - l32.item()) < 0.05 * abs(l32.item())
    assert m16.encode(x).shape == (2, 8, 8) and m16.decode(m16.encode(x)).dtype == torch.float32


def test_fp32_inference_asks_for_ieee_convolutions():
    """``bf16_inference(False)`` is fp32 inference: on a GPU cuDNN would run fp32 convolutions in TF32 by default
    (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), so the context asks for IEEE, and puts the process's
    setting back after. It is entered once per batch by its callers (tokenize_images, the sampling pipeline), so it
    must be reusable; on a CPU the codes are those of a plain call."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    m = DiscreteVAE(CFG)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ctx = m.bf16_inference(False)
    for _ in range(2):
        with ctx:
            assert conv.fp32_precision == "ieee"
            with ctx:  # re-entered (nested): still IEEE, and the outer exit restores the original
                assert conv.fp32_precision == "ieee"
            codes = m.encode(x)
        assert conv.fp32_precision == before
    assert torch.equal(codes, m.encode(x))


def test_token_decoding_equals_one_hot_decoding():
    m = DiscreteVAE(CFG).eval()
    tokens = torch.randint(0, 16, (3, 8, 8))
    via_embedding = m.decoder.forward_tokens(tokens)
    via_one_hot = m.decoder(F.one_hot(tokens, 16).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(via_embedding, via_one_hot, rtol=1e-5, atol=1e-5)


def test_logit_laplace_is_a_normalised_density():
    # Integrate the density over y ∈ (0, 1) (change of variables from x) numerically: it must be 1.
    mu, log_b = torch.tensor(0.3), torch.tensor(-1.0)
    y = torch.linspace(1e-6, 1 - 1e-6, 400001, dtype=torch.float64)
    x = (y - 0.1) / 0.8  # inverse of map_pixels, so that logit_laplace_nll evaluates at y
    dens = torch.exp(-logit_laplace_nll(x, mu.double(), log_b.double()))
    assert abs(float(torch.trapezoid(dens, y)) - 1.0) < 1e-3
    u = torch.rand(100)
    torch.testing.assert_close(unmap_pixels(map_pixels(u)), u)


@torch.no_grad()  # values only (float() of a tensor that requires grad warns)
def test_loss_is_the_beta_elbo_per_pixel_value():
    torch.manual_seed(0)
    m = DiscreteVAE(CFG)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = m(x, tau=0.5, kl_weight=0.0, generator=g1)
    b = m(x, tau=0.5, kl_weight=2.0, generator=g2)
    n_cells, n_pix = 64, 3 * 32 * 32
    # Same noise → the loss difference is exactly β · KL summed over the grid / pixel values.
    expected = 2.0 * b.kl * n_cells / n_pix
    torch.testing.assert_close(b.loss - a.loss, expected, rtol=1e-4, atol=1e-6)
    assert 0 <= float(a.kl) <= math.log(16) + 1e-5


def test_gumbel_noise_follows_the_generator_and_gradients_flow():
    m = DiscreteVAE(CFG)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    l1 = m(x, 1.0, 1.0, torch.Generator().manual_seed(1)).loss
    l2 = m(x, 1.0, 1.0, torch.Generator().manual_seed(1)).loss
    l3 = m(x, 1.0, 1.0, torch.Generator().manual_seed(2)).loss
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    l1.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.encoder.net[0].weight.grad.abs().sum() > 0  # the relaxation carries gradient into the encoder


def test_small_model_learns_to_reconstruct():
    torch.manual_seed(0)
    m = DiscreteVAE(CFG)
    x = torch.randint(0, 256, (8, 3, 1, 1), dtype=torch.uint8).repeat(1, 1, 32, 32)  # flat colours
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = None
    for step in range(60):
        out = m(x, tau=1.0, kl_weight=0.0, generator=torch.Generator().manual_seed(step))
        first = first if first is not None else float(out.nll.detach())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.nll.detach()) < first - 0.25, (first, float(out.nll.detach()))  # nats per pixel value


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        DiscreteVAE(DVAEConfig(image_size=30, groups=3))


def test_gaussian_likelihood_is_the_scaled_squared_error_of_the_sigmoid_mean():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    mu = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s = GAUSSIAN_SIGMA
    ref = -torch.distributions.Normal(torch.sigmoid(mu), s).log_prob(map_pixels(x))
    torch.testing.assert_close(gaussian_nll(x, mu), ref)
    # The model uses it when asked, and only the μ half of the decoder output then gets gradient.
    m = DiscreteVAE(DVAEConfig(**{**CFG.__dict__, "likelihood": "gaussian"}))
    xu = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = m(xu, tau=1.0, kl_weight=0.0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    g = m.decoder.net[-1].weight.grad
    assert g[:3].abs().sum() > 0 and g[3:].abs().sum() == 0
    with pytest.raises(ValueError, match="likelihood"):
        DVAEConfig(likelihood="bernoulli").validate()


def test_code_embedding_init():
    torch.manual_seed(0)
    cfg = DVAEConfig(**{**CFG.__dict__, "vocab_size": 512, "decoder_init": 64, "code_embedding_std": 1.0})
    w = DiscreteVAE(cfg).decoder.input
    assert abs(float(w.weight.detach().std()) - 1.0) < 0.05 and float(w.bias.detach().abs().max()) == 0.0
    default = DiscreteVAE(DVAEConfig(**{**cfg.__dict__, "code_embedding_std": 0.0})).decoder.input
    assert float(default.weight.detach().abs().max()) <= 1 / math.sqrt(512) + 1e-6  # PyTorch's U(±1/√fan_in)


def _blob_images(n: int, seed: int) -> torch.Tensor:
    """Black 32×32 images with one flat-coloured square of a random colour at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, 20, (2,), generator=g).tolist()
        x[i, :, r:r + 12, c:c + 12] = torch.randint(40, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    return x


def test_kmeans_head_init_spreads_codes_and_is_deterministic():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    images = _blob_images(32, seed)
    torch.manual_seed(seed)
    cfg = DVAEConfig(**{**CFG.__dict__, "vocab_size": 32})
    m = DiscreteVAE(cfg)
    default_used = int(torch.unique(m.encode(images)).numel())
    m2 = DiscreteVAE(cfg)
    m2.load_state_dict(m.state_dict())
    used = kmeans_init_head(m, images, generator=torch.Generator().manual_seed(1))
    assert used == int(torch.unique(m.encode(images)).numel())
    assert used >= 24 and used > default_used, (used, default_used)  # of 32 codes
    kmeans_init_head(m2, images, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    # The rule it installs is nearest-centroid: W_k = s·μ_k and b_k = −s·|μ_k|²/2 with one s for all codes, so the
    # argmax code of each cell is the centroid closest to its features.
    head = m.encoder.net[-1]
    w, b = head.weight[:, :, 0, 0].double(), head.bias.double()
    s_k = -(w ** 2).sum(1) / (2 * b)
    torch.testing.assert_close(s_k, s_k.mean().expand_as(s_k), rtol=1e-4, atol=0)
    mu = w / s_k.mean()
    feats = m.encoder.net[:-1](m.preprocess(images)).permute(0, 2, 3, 1).reshape(-1, mu.shape[1]).double()
    d2 = torch.cdist(feats, mu) ** 2
    chosen = d2.gather(1, m.encode(images).flatten()[:, None].long())[:, 0]
    slack = (chosen - d2.min(1).values) * s_k.mean() / 2  # in logit units; identical centroids tie exactly
    slack = slack.detach()
    assert float(slack.max()) < 1e-3, float(slack.max())


def test_bad_images_and_codes_are_named_errors():
    """What encode/decode/forward used to take silently: an unbatched image (argmax over the wrong axis), 0..255
    floats (encoded as another, saturated image), another size, float codes (truncated), a zero temperature."""
    model = DiscreteVAE(DVAE_PRESETS["tiny"]).eval()
    img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.encode(img).shape == (2, 16, 16)
    assert torch.equal(model.encode(img.float() / 255), model.encode(img))
    for bad, error, needle in [
        (img[0], ValueError, r"images must be \[B ≥ 1, 3, 64, 64\] .*got shape \(3, 64, 64\)"),
        (img[:, :, :48, :48], ValueError, r"got shape \(2, 3, 48, 48\)"),
        (img.float(), ValueError, r"float images must lie in \[0, 1\] \(or pass uint8 0..255\), got 0..255"),
        (img.long(), TypeError, "images must be uint8 .* or float in \\[0, 1\\], got torch.int64"),
        (torch.full((1, 3, 64, 64), float("nan")), ValueError, "float images must lie in"),
    ]:
        with pytest.raises(error, match=needle):
            model.encode(bad)
    codes = model.encode(img)
    assert model.decode(codes.flatten(1)).shape == (2, 3, 64, 64)
    for bad, error, needle in [
        (codes.float(), TypeError, "tokens must be integer codes, got torch.float32"),
        (codes[:, :4], ValueError, r"tokens must be \[B ≥ 1, 16, 16\] or \[B ≥ 1, 256\] codes, got shape "
                                   r"\(2, 4, 16\)"),
        (codes.flatten(1)[:, :100], ValueError, r"got shape \(2, 100\)"),
        (codes + 512, ValueError, r"codes must lie in \[0, 512\)"),
    ]:
        with pytest.raises(error, match=needle):
            model.decode(bad)
    with pytest.raises(ValueError, match="tau .* must be > 0, got 0.0"):
        model(img, tau=0.0, kl_weight=1.0)
