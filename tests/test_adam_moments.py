"""AdamW with 16-bit moments (paper App. B.2: running mean in 1-6-9, running variance in 0-6-10 clipped at 5)."""
import io
import logging

import pytest
import torch

from dalle_ds.ops.fp169 import reference
from dalle_ds.precision.adam_moments import AdamW16

HP = dict(lr=3e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045)  # the paper's transformer betas and decay


def _params(seed=0, shapes=((17, 5), (40,), (3, 4, 6))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _grads(params, step, scale=1e-3):
    g = torch.Generator().manual_seed(1000 + step)
    # magnitudes spread over many binades, as gradients are (some far below fp16's range)
    return [torch.randn(p.shape, generator=g) * scale * torch.exp(torch.randn(p.shape, generator=g) * 4) for p in params]


def _run(opt, params, steps, scale=1e-3):
    for t in range(steps):
        for p, g in zip(params, _grads(params, t, scale)):
            p.grad = g.clone()
        opt.step()


def test_fp32_moments_are_torch_adamw():
    a, b = _params(), _params()
    _run(AdamW16(a, moments="fp32", **HP), a, 20)
    _run(torch.optim.AdamW(b, foreach=False, **HP), b, 20)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_16bit_moments_are_fp32_adamw_with_moments_rounded_to_their_formats(device):
    """Bit for bit against an emulation written with the pure-torch codec (a different implementation from the
    fused C++ / CUDA op the optimizer uses): fp32 AdamW whose moments are rounded to 1-6-9 / 0-6-10 after every
    update, one fp32 rounding per operation as csrc/fp169/adamw16.h states (the square root correctly rounded: in
    float64, then rounded to fp32, since torch's fp32 sqrt on CPU is not)."""
    params = [p.detach().to(device).requires_grad_() for p in _params()]
    emulated = [p.detach().clone() for p in params]
    opt = AdamW16(params, chunk=37, **HP)  # chunks that cut through tensors
    lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    ms = [torch.zeros_like(p) for p in emulated]
    vs = [torch.zeros_like(p) for p in emulated]
    with torch.no_grad():
        for t in range(1, 31):
            grads = [g.to(device) for g in _grads(params, t - 1)]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for i, (x, g) in enumerate(zip(emulated, grads)):
                m = ms[i] * b1 + g * (1 - b1)
                v = (vs[i] * b2 + (g * g) * (1 - b2)).clamp_(max=5.0)
                ms[i] = reference.decode(reference.encode(m, saturate=True, fmt="1-6-9"), fmt="1-6-9")
                vs[i] = reference.decode(reference.encode(v, saturate=True, fmt="0-6-10"), fmt="0-6-10")
                x.mul_(1 - lr * wd)
                root = vs[i].double().sqrt().float()
                denom = root * (1 / (1 - b2 ** t) ** 0.5) + eps
                x.sub_((ms[i] / denom) * (lr / (1 - b1 ** t)))
    for p, x, m, v in zip(params, emulated, ms, vs):
        assert torch.equal(p, x)
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.int16 and st["exp_avg_sq"].dtype == torch.int16
        assert torch.equal(reference.decode(st["exp_avg"], fmt="1-6-9"), m)
        assert torch.equal(reference.decode(st["exp_avg_sq"], fmt="0-6-10"), v)
    # 4 bytes of state per element instead of fp32 AdamW's 8
    assert opt.state_bytes() == 4 * sum(p.numel() for p in params)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_fused_op_equals_the_torch_ops_bit_for_bit(device):
    """The fused step (C++ on CPU, CUDA on a GPU) against the same arithmetic in torch ops (the "reference" backend
    of fp169.adamw16_step_): every parameter, gradient and storage dtype, fresh random data over many binades, the
    edge cases (saturating mean, clipped variance, zero and nonfinite gradients), and lengths that leave vector
    tails and misaligned views."""
    from dalle_ds.ops import fp169

    seed = int(torch.randint(0, 2**31, (1,)))  # fresh each run; printed on failure
    g = torch.Generator().manual_seed(seed)
    n = 4099
    for pdt in (torch.float32, torch.bfloat16, torch.float16):
        for gdt in (torch.float32, torch.bfloat16, torch.float16):
            for offset in (0, 3):  # 3: the views start off the 16-byte alignment the CUDA vector loop needs
                p = (torch.randn(n + offset, generator=g) * 2)[offset:].to(pdt)
                grad = torch.randn(n, generator=g) * 1e-3 * torch.exp(torch.randn(n, generator=g) * 5)
                grad[:6] = torch.tensor([0.0, -0.0, 1e4, -1e4, float("inf"), float("nan")])
                grad = grad.to(gdt)
                m = reference.encode(torch.randn(n + offset, generator=g) * 3, saturate=True)[offset:]
                v = reference.encode(torch.rand(n + offset, generator=g) * 6, saturate=True, fmt="0-6-10")[offset:]
                scalars = [0.9, 0.1, 0.96, 0.04, 5.0, 1 - 3e-3 * 0.045, 1 / (1 - 0.96 ** 7) ** 0.5, 1e-8,
                           3e-3 / (1 - 0.9 ** 7)]
                fused = [t.clone().to(device) for t in (p, m, v)]
                torch_ops = [t.clone() for t in (p, m, v)]
                fp169.adamw16_step_(*fused[:1], grad.to(device), *fused[1:], scalars, backend="auto")
                fp169.adamw16_step_(*torch_ops[:1], grad, *torch_ops[1:], scalars, backend="reference", chunk=999)
                for name, a, b in zip(("p", "m", "v"), fused, torch_ops):
                    a = a.cpu()
                    same = (a == b) | (a.float().isnan() & b.float().isnan()) if name == "p" else a == b
                    assert bool(same.all()), (seed, pdt, gdt, offset, name, int((~same).sum()))
                assert not torch.equal(fused[0].cpu(), p) and not torch.equal(fused[1].cpu(), m)


def test_fused_op_arguments_are_checked():
    from dalle_ds.ops import fp169

    p, g = torch.zeros(8), torch.zeros(8)
    m, v = torch.zeros(8, dtype=torch.int16), torch.zeros(8, dtype=torch.int16)
    sc = [0.9, 0.1, 0.96, 0.04, 5.0, 1.0, 1.0, 1e-8, 1e-3]
    with pytest.raises(ValueError, match="scalars"):
        fp169.adamw16_step_(p, g, m, v, sc[:-1])
    with pytest.raises(ValueError, match="grad must have"):
        fp169.adamw16_step_(p, torch.zeros(9), m, v, sc)
    with pytest.raises(TypeError, match="int16"):
        fp169.adamw16_step_(p, g, m.float(), v, sc)
    with pytest.raises(ValueError, match="contiguous"):
        fp169.adamw16_step_(torch.zeros(4, 2).t(), g, m, v, sc)
    with pytest.raises(ValueError, match="contiguous"):
        fp169.adamw16_step_(p, g, torch.zeros(16, dtype=torch.int16)[::2], v, sc)
    with pytest.raises(ValueError, match="m_codes and v_codes are the same buffer"):  # ran without complaint
        fp169.adamw16_step_(p, g, m, m, sc)
    with pytest.raises(TypeError, match="grad must be a floating-point tensor, got torch.int64"):
        fp169.adamw16_step_(p, g.long(), m, v, sc, backend="reference")  # the reference took it
    # an nn.Parameter is stepped in place by both backends (the reference raised autograd's leaf error)
    params = [torch.nn.Parameter(torch.ones(8)) for _ in range(2)]
    for param, backend in zip(params, ("reference", "auto")):
        fp169.adamw16_step_(param, torch.full((8,), 0.5), torch.zeros(8, dtype=torch.int16),
                            torch.zeros(8, dtype=torch.int16), sc, backend=backend)
    assert torch.equal(params[0].detach(), params[1].detach()) and not torch.equal(params[0].detach(), torch.ones(8))
    with pytest.raises(TypeError, match="scalars must be a list of 9 numbers"):  # a dict's keys were the values
        fp169.adamw16_step_(p, g, m, v, {k: 0.0 for k in fp169.ADAMW16_SCALARS})
    # the C++ front end checks too (called directly)
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.dalle_ds_fp169.adamw16_step_(p, g, m, v[:4], sc)
    with pytest.raises(RuntimeError, match="scalars"):
        torch.ops.dalle_ds_fp169.adamw16_step_(p, g, m, v, sc[:3])
    with pytest.raises(RuntimeError, match="int16"):
        torch.ops.dalle_ds_fp169.adamw16_step_(p, g, m.int(), v, sc)
    with pytest.raises(ValueError, match="backend"):
        AdamW16([torch.nn.Parameter(p)], backend="triton")


def test_variance_clipped_at_5_and_mean_saturates():
    (p,) = _params(shapes=((4,),))
    opt = AdamW16([p], lr=1e-3, betas=(0.9, 0.96))
    p.grad = torch.tensor([1e3, -1e3, 30.0, 1e-12])
    opt.step()
    m = reference.decode(opt.state[p]["exp_avg"], fmt="1-6-9")
    v = reference.decode(opt.state[p]["exp_avg_sq"], fmt="0-6-10")
    assert m[:2].tolist() == [15.984375, -15.984375]  # 0.1 * 1e3 = 100, saturated at the 1-6-9 maximum
    assert m[2].item() == pytest.approx(3.0, rel=2 ** -9) and m[3].item() == pytest.approx(1e-13, rel=2 ** -9)
    assert v[:3].tolist() == [5.0, 5.0, 5.0]  # 0.04 * 1e6, 0.04 * 900 = 36: clipped by value to 5
    assert v[3].item() == 0.0  # 0.04 * 1e-24 lies below the smallest 0-6-10 subnormal (1.7e-21): zero
    assert torch.isfinite(p).all()


def test_trains_like_fp32_adamw():
    """A least-squares fit: 16-bit moments reach the loss fp32 AdamW reaches, within a few percent."""
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(256, 32, generator=g), torch.randn(256, 1, generator=g)
    losses = {}
    for moments in ("fp32", "16bit"):
        w = torch.zeros(32, 1, requires_grad=True)
        opt = AdamW16([w], lr=1e-2, betas=(0.9, 0.96), moments=moments)
        for _ in range(300):
            opt.zero_grad()
            loss = ((a @ w - y) ** 2).mean()
            loss.backward()
            opt.step()
        losses[moments] = loss.item()
    assert losses["16bit"] == pytest.approx(losses["fp32"], rel=0.02), losses


def test_state_dict_round_trip_keeps_the_codes():
    """torch's load_state_dict casts a floating-point parameter's state to its dtype (a code would become its
    integer value); the codes come back as int16, and training continues exactly."""
    a, b = _params(), _params()
    opt_a = AdamW16(a, **HP)
    _run(opt_a, a, 5)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    opt_b = AdamW16(b, **HP)
    opt_b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for x, y in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_b.state[y][key].dtype == torch.int16
            assert torch.equal(opt_b.state[y][key], opt_a.state[x][key])
        assert opt_b.state[y]["step"] == 5
    for t in range(5, 10):
        for x, y, g in zip(a, b, _grads(a, t)):
            x.grad, y.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_groups_choose_their_moments_and_bad_arguments_are_refused(caplog):
    a, b = _params(shapes=((8,),)), _params(shapes=((8,),))
    opt = AdamW16([{"params": a}, {"params": b, "moments": "fp32"}], **HP)
    _run(opt, a + b, 2)
    assert opt.state[a[0]]["exp_avg"].dtype == torch.int16 and opt.state[b[0]]["exp_avg"].dtype == torch.float32
    with pytest.raises(ValueError, match="moments must be one of"):
        AdamW16(a, moments="fp16")
    with pytest.raises(ValueError, match="variance_clip"):
        AdamW16(a, variance_clip=10.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW16(a, betas=(0.9, 1.0))
    with caplog.at_level(logging.WARNING, logger="dalle_ds.precision.adam_moments"):
        AdamW16(a, betas=(0.9, 0.999))
    assert "rounded away" in caplog.text


def test_the_variance_format_resolves_b2_096_updates_not_b2_0999_ones():
    """Why the warning: at a steady state (unit Gaussian gradients, v = 1) a 0-6-10 variance keeps nearly every
    b2 = 0.96 update but rounds away a large share of the b2 = 0.999 ones, whose relative change (1 - b2)(g²/v - 1)
    is mostly below half the format's spacing."""
    g = torch.Generator().manual_seed(0)
    lost = {}
    for b2 in (0.96, 0.999):
        codes = reference.encode(torch.ones(20_000), fmt="0-6-10")
        unchanged = 0.0
        for _ in range(50):
            grad = torch.randn(20_000, generator=g)
            new = reference.encode(reference.decode(codes, fmt="0-6-10") * b2 + (1 - b2) * grad * grad,
                                   saturate=True, fmt="0-6-10")
            unchanged += (new == codes).float().mean().item() / 50
            codes = new
        lost[b2] = unchanged
    assert lost[0.96] < 0.01 and lost[0.999] > 0.1, lost


def test_16bit_parameters_non_contiguous_ones_and_their_state_after_a_resume():
    """fp16 parameters take the step computed in fp32 (in fp16, eps = 1e-8 is 0 and a zero gradient gave 0/0);
    a non-contiguous parameter is updated like its contiguous copy; the fp32 moments of a bf16 parameter stay fp32
    through state_dict / load_state_dict (torch would cast them to bf16)."""
    p16 = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p16.grad = torch.tensor([0.0, 1e-3, 1e-6, 1.0], dtype=torch.float16)
    AdamW16([p16], lr=1e-3, moments="fp32").step()
    assert torch.isfinite(p16).all() and p16[0].item() == 1.0 and p16[3].item() < 1.0

    base = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    pt = torch.nn.Parameter(base.clone().t())  # (4, 5), not contiguous
    pc = torch.nn.Parameter(base.t().contiguous())
    for p in (pt, pc):
        p.grad = torch.full(p.shape, 0.5)
        AdamW16([p], **HP).step()
    assert not pt.is_contiguous() and torch.equal(pt, pc)

    pb = torch.nn.Parameter(torch.randn(6).to(torch.bfloat16))
    opt = AdamW16([{"params": [pb], "moments": "fp32"}], **HP)
    pb.grad = torch.randn(6).to(torch.bfloat16)
    opt.step()
    again = AdamW16([{"params": [pb], "moments": "fp32"}], **HP)
    again.load_state_dict(opt.state_dict())
    assert again.state[pb]["exp_avg"].dtype == torch.float32
    assert torch.equal(again.state[pb]["exp_avg_sq"], opt.state[pb]["exp_avg_sq"])


def test_the_deepspeed_extension_reads_the_config_and_refuses_what_it_cannot_run():
    from dalle_ds.config import DALLE_PRESETS, ConfigError
    from dalle_ds.models.dalle import DALLE
    from dalle_ds.train.adam16 import Adam16Extension

    model = DALLE(DALLE_PRESETS["test"])

    def prepared(optimizer, **extra):
        ext, cfg = Adam16Extension(), {"optimizer": optimizer, **extra}
        ext.before_initialize(model, cfg)
        return ext, cfg

    # the defaults of the optimizer DeepSpeed would build: torch's AdamW decays by 0.01, FusedAdam by 0
    ext, cfg = prepared({"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}})
    assert ext.hyper == {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert cfg["zero_allow_untested_optimizer"] is True
    ext, _ = prepared({"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.96]}})
    assert ext.hyper["weight_decay"] == 0.0 and ext.hyper["betas"] == (0.9, 0.96)
    groups, factory = ext.client_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["moments"] for g in groups] == ["16bit", "fp32"]
    assert {names[id(p)] for p in groups[0]["params"]} == set(model.resblock_matmul_weight_names())
    assert isinstance(factory(groups), AdamW16)
    for optimizer, extra, needle in [
            ({"type": "SGD", "params": {"lr": 1}}, {}, "needs an Adam or AdamW"),
            ({"type": "Adam", "params": {"adam_w_mode": False}}, {}, "decoupled weight decay"),
            ({"type": "AdamW", "params": {}}, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
             "optimizer offload")]:
        with pytest.raises(ConfigError, match=needle):
            prepared(optimizer, **extra)
