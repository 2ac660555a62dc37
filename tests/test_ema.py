"""The fp32 weight average (dalle_ds/train/ema.py): what an evaluation model built without initialization gets."""
import pytest
import torch

from dalle_ds.config import DalleConfig
from dalle_ds.models.dalle import DALLE
from dalle_ds.train import ema as ema_module
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


def _reference_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float, first: bool) -> None:
    """The update as it was (one fp32 copy of every parameter, then one foreach over all of them)."""
    cur = [p.detach().float() for p in params]
    if first:
        torch._foreach_copy_(shadow, cur)
    else:
        torch._foreach_lerp_(shadow, cur, 1.0 - decay)


def _mixed_params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(3)
    shapes_dtypes = [((64, 33), torch.float32), ((17,), torch.bfloat16), ((8, 3, 5, 5), torch.float32),
                     ((), torch.float32), ((40, 7), torch.float16), ((1000,), torch.bfloat16), ((3, 3), torch.float32)]
    out = []
    for shape, dtype in shapes_dtypes:
        t = torch.randn(shape, generator=g).to(dtype)
        if len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 4096, ema_module.UPDATE_CHUNK_BYTES])
def test_update_per_group_is_bit_identical_to_the_whole_model_update(monkeypatch, chunk_bytes):
    """fp32, bf16 and fp16 parameters (channels_last and 0-dim among them), whatever the group size: the shadow after
    several updates equals, bit for bit, the shadow of the former all-at-once update."""
    monkeypatch.setattr(ema_module, "UPDATE_CHUNK_BYTES", chunk_bytes)
    params = _mixed_params()
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    ema = EMA(module, decay=0.9)
    want = [p.detach().float().clone() for p in params]
    g = torch.Generator().manual_seed(4)
    for step in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        ema.update(module.parameters())
        _reference_update(want, params, 0.9, first=step == 0)
        for got, ref in zip(ema.shadow, want):
            assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert ema.updates == 5


def test_update_copies_low_precision_parameters_a_group_at_a_time(monkeypatch):
    """bf16 weights: the fp32 copies the lerp reads exist for one group (UPDATE_CHUNK_BYTES, plus the tensor that
    crosses it) at a time, not for the whole model."""
    chunk = 4096
    monkeypatch.setattr(ema_module, "UPDATE_CHUNK_BYTES", chunk)
    module = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)]).to(torch.bfloat16)
    ema = EMA(module, decay=0.9)
    ema.update(module.parameters())  # the first update copies
    calls = []
    lerp = torch._foreach_lerp_

    def recording_lerp(shadows, currents, weight):
        calls.append(sum(c.numel() * c.element_size() for c in currents))
        return lerp(shadows, currents, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", recording_lerp)
    ema.update(module.parameters())
    largest = max(p.numel() * 4 for p in module.parameters())
    total = sum(p.numel() * 4 for p in module.parameters())
    assert len(calls) > 1 and max(calls) <= chunk + largest < total and sum(calls) == total


def test_update_refuses_a_different_parameter_list():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.5)
    with pytest.raises(ValueError):
        ema.update([torch.nn.Parameter(torch.zeros(2, 2))])


def _sharded_module(rank: int, world: int, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose parameters look like ZeRO-3's: empty, with this rank's flat partition in ``ds_tensor``."""
    m = torch.nn.Module()
    for name, t in full.items():
        per = -(-t.numel() // world)
        flat = torch.nn.functional.pad(t.flatten(), (0, per * world - t.numel()))
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_tensor, p.ds_shape = flat[rank * per:(rank + 1) * per].clone(), t.shape
        m.register_parameter(name, p)
    return m


def _gather_to_rank0(rank, world):
    full = {"w": torch.arange(15.0).view(5, 3), "b": torch.arange(4.0), "s": torch.tensor(2.5)}
    sharded = EMA(_sharded_module(rank, world, full), decay=0.5)
    assert sharded.sharded
    everywhere = sharded.model_state_dict()
    only0 = sharded.model_state_dict(dst=0)  # every rank still joins the gathers; only rank 0 keeps the result
    plain = EMA(torch.nn.Linear(3, 2), decay=0.5)
    plain_only0 = plain.model_state_dict(dst=0)
    for name, t in full.items():
        assert torch.equal(everywhere[name], t)
    if rank == 0:
        assert all(torch.equal(only0[n], t) for n, t in full.items())
        assert set(plain_only0) == {"weight", "bias"}
    else:
        assert only0 == {} and plain_only0 == {}
    return True


def test_model_state_dict_for_rank0_only():
    from dalle_ds.dist.local_ranks import run_local_ranks

    assert run_local_ranks(_gather_to_rank0, 2)


def _mixed_module():
    params = _mixed_params()
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"p{i}", p)
    return module, params


def _perturb(params, g):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def test_every_k_steps_averages_only_at_multiples_of_k():
    """``step(global_step)`` with every=3 over steps 1..10 is the plain average of the weights at steps 3, 6, 9."""
    module, params = _mixed_module()
    ema = EMA(module, decay=0.9, every=3)
    want = [p.detach().float().clone() for p in params]
    g = torch.Generator().manual_seed(5)
    done = []
    for step in range(1, 11):
        _perturb(params, g)
        if ema.step(step, module.parameters()):
            done.append(step)
            _reference_update(want, params, 0.9, first=len(done) == 1)
    assert done == [3, 6, 9] and ema.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, want))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="every"):
            EMA(module, decay=0.9, every=bad)


def test_host_average_equals_the_device_average_and_resumes():
    """``host=True`` folds copies of the weights (taken at the step) into a CPU shadow in a worker thread: the shadow,
    the state and the exported weights equal the synchronous average's bit for bit, also when the weights change
    right after the step, before the fold has run; and a state saved mid-run resumes to the same values."""
    module, params = _mixed_module()
    sync = EMA(module, decay=0.9, every=2)
    host = EMA(module, decay=0.9, every=2, host=True)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in host.shadow)
    g = torch.Generator().manual_seed(6)

    def run(emas, steps):
        for step in steps:
            _perturb(params, g)
            for e in emas:
                e.step(step, module.parameters())
            _perturb(params, g)  # the next step's work starts before the fold has read anything

    run([sync, host], range(1, 5))
    saved = host.state_dict()
    saved = {**saved, "shadow": {k: v.clone() for k, v in saved["shadow"].items()}}
    resumed = EMA(module, decay=0.9, every=2, host=True)
    resumed.load_state_dict(saved)
    run([sync, host, resumed], range(5, 9))
    sync_state = sync.state_dict()
    for other in (host, resumed):
        state = other.state_dict()
        assert state["updates"] == sync_state["updates"] == 4
        for name in sync_state["shadow"]:
            assert torch.equal(state["shadow"][name], sync_state["shadow"][name]), name
    for name, w in sync.model_state_dict().items():
        assert torch.equal(host.model_state_dict()[name], w), name


def test_host_fold_errors_surface_at_the_next_read():
    """A fold that fails in the worker thread raises where the shadow is next read, not never."""
    module = torch.nn.Linear(3, 3)
    ema = EMA(module, decay=0.5, host=True)

    def broken(done, first):
        raise RuntimeError("fold failed")

    ema._fold = broken
    ema.step(1, module.parameters())
    with pytest.raises(RuntimeError, match="fold failed"):
        ema.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_average_on_gpu_equals_the_device_average():
    """On a GPU the copies go to pinned buffers without a host wait and the worker waits on an event: the weights
    changed on the stream right after the step must not reach the shadow."""
    module = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]).cuda().to(torch.bfloat16)
    sync = EMA(module, decay=0.9)
    host = EMA(module, decay=0.9, host=True)
    assert all(b.is_pinned() for b in host._staging)
    for step in range(1, 6):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        sync.step(step, module.parameters())
        host.step(step, module.parameters())
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(3.0)  # queued after the copies on the same stream
    for a, b in zip(sync.state_dict()["shadow"].values(), host.state_dict()["shadow"].values()):
        torch.testing.assert_close(b, a.cpu(), rtol=0, atol=0)


def test_a_loaded_state_keeps_this_runs_decay():
    """A resume with another ema_decay (warned about as a changed config) averages with the new decay: the
    checkpoint brings the average and the update count, not the old decay."""
    old = EMA(torch.nn.Linear(2, 2), decay=0.9)
    old.updates = 7
    new = EMA(torch.nn.Linear(2, 2), decay=0.5)
    new.load_state_dict(old.state_dict())
    assert new.decay == 0.5 and new.updates == 7
