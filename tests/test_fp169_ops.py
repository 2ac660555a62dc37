"""The C++ (CPU) and CUDA fp169 ops against the pure-torch reference, bit for bit; the JIT builder; dispatch.

The CPU op is JIT-built on first use (cached per machine). Without a compiler or ninja the CPU-op tests skip with the
reason; a build that fails on a machine that has them fails the tests. CUDA tests are marked ``gpu`` and skip without
a device.
"""
import json
import math

import pytest
import torch

from dalle_ds.ops import fp169
from dalle_ds.ops.builder import OpBuilder, OpUnavailable
from dalle_ds.ops.fp169 import FP169, FP0610, _ext
from dalle_ds.ops.fp169 import reference as ref

FORMATS = [FP169, FP0610]
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_CODES = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
POISON_CODE = 0x5A5A
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="requires a CUDA device")


@pytest.fixture(scope="module")
def cpu_op():
    st = _ext.load()
    if not st["cpu"]:
        if _ext.CPU_BUILDER.incompatibility():
            pytest.skip(f"fp169 C++ op cannot be built here: {st['cpu_reason']}")
        pytest.fail(f"fp169 C++ op failed to build: {st['cpu_reason']}")
    return "cpp"


@pytest.fixture(scope="module")
def cuda_op():
    st = _ext.load()
    if not st["cuda"]:
        pytest.fail(f"fp169 CUDA op unavailable on a CUDA machine: {st['cuda_reason']}")
    return "cuda"


@pytest.fixture
def gen():
    g = torch.Generator()
    g.seed()
    print("generator seed:", g.initial_seed())
    return g


def interesting_fp32(gen: torch.Generator, n: int = 100_000) -> torch.Tensor:
    """Random bit patterns (every exponent, Inf/NaN, subnormals), random values around the format's range, ties,
    and hand-picked edges; length deliberately not a multiple of 8."""
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64, generator=gen)
    bits = bits.to(torch.int32).view(torch.float32)
    mags = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-75, 6, (n,), generator=gen).float()
    # Exact midpoints between neighbouring codes (ties) of both formats, built from random codes; the first ones are
    # subnormal codes (the subnormal rounding is a separate code path).
    ties = []
    for fmt in (FP169, FP0610):
        codes = torch.randint(0, fmt.max_code, (n // 8,), generator=gen)
        codes[: n // 64] = torch.randint(0, 1 << fmt.man_bits, (n // 64,), generator=gen)
        codes = ref.int_to_codes(codes)
        lo, hi = ref.decode(codes, fmt=fmt).double(), ref.decode(ref.int_to_codes(ref.codes_to_int(codes) + 1), fmt=fmt)
        ties.append(((lo + hi.double()) / 2).float())
    ties = torch.cat(ties)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 15.984375, 15.9921875, 16.0, -15.9921875,
                          2.0**-58, 2.0**-67, 2.0**-68, 3 * 2.0**-68, 2.0**-69, 7.99609375, 7.998046875, 1e-45, 3.4e38])
    return torch.cat([bits, mags, ties, -ties, edges])


def assert_codes_equal(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor | None = None) -> None:
    assert got.dtype == torch.int16 and got.shape == want.shape
    bad = (got != want).nonzero().reshape(-1)
    if len(bad):
        i = bad[:8].tolist()
        detail = [(float(x.reshape(-1)[j]) if x is not None else None, hex(int(want.reshape(-1)[j]) & 0xFFFF),
                   hex(int(got.reshape(-1)[j]) & 0xFFFF)) for j in i]
        pytest.fail(f"{len(bad)} codes differ; (input, expected, got): {detail}")


def assert_values_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical, NaNs included (a NaN code decodes to one NaN pattern, docs/fp169.md)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    ibits = torch.int32 if got.dtype == torch.float32 else torch.int16
    same = got.view(ibits) == want.view(ibits)
    assert bool(same.all()), f"{int((~same).sum())} values differ, e.g. {got[~same][:5]} vs {want[~same][:5]}"


# ---- CPU op vs reference ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1024.0, 0.1])
def test_cpu_encode_matches_reference(cpu_op, fmt, saturate, scale, gen):
    x = interesting_fp32(gen)
    out = torch.full(x.shape, POISON_CODE, dtype=torch.int16)
    got = fp169.encode(x, saturate, scale, fmt=fmt.name, backend=cpu_op, out=out)
    assert got is out
    assert_codes_equal(got, ref.encode(x, saturate=saturate, scale=scale, fmt=fmt), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cpu_encode_other_input_dtypes(cpu_op, dtype, gen):
    x = interesting_fp32(gen, 20_000).to(dtype)
    for fmt in FORMATS:
        assert_codes_equal(fp169.encode(x, fmt=fmt, backend=cpu_op), ref.encode(x, fmt=fmt))
        assert_codes_equal(fp169.encode(x, True, 3.0, fmt=fmt, backend=cpu_op), ref.encode(x, True, 3.0, fmt=fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.3, 2.0**40])
def test_cpu_decode_all_codes_matches_reference(cpu_op, fmt, dtype, scale):
    out = torch.full(ALL_CODES.shape, 123.0, dtype=dtype)
    got = fp169.decode(ALL_CODES, scale, dtype, fmt=fmt, backend=cpu_op, out=out)
    assert got is out
    assert_values_equal(got, ref.decode(ALL_CODES, scale=scale, dtype=dtype, fmt=fmt))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cpu_decode_encode_identity_all_codes(cpu_op, fmt):
    d = fp169.decode(ALL_CODES, fmt=fmt, backend=cpu_op)
    keep = ~torch.isnan(d)
    assert int(keep.sum()) == 65536 - ((1 << fmt.man_bits) - 1) * (2 if fmt.signed else 1)
    assert_codes_equal(fp169.encode(d[keep], fmt=fmt, backend=cpu_op), ALL_CODES[keep])


def test_cpu_shapes_views_and_empty(cpu_op, gen):
    x = torch.randn(37, 41, generator=gen) * 1e-5
    xt = x.t()  # non-contiguous
    assert_codes_equal(fp169.encode(xt, backend=cpu_op), ref.encode(xt))
    assert fp169.encode(xt, backend=cpu_op).shape == (41, 37)
    for n in (0, 1, 7, 9, 1001):
        v = torch.randn(n, generator=gen)
        assert_codes_equal(fp169.encode(v, backend=cpu_op), ref.encode(v))
        c = ref.encode(v)
        assert_values_equal(fp169.decode(c, backend=cpu_op), ref.decode(c))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gdtype", VALUE_DTYPES)
@pytest.mark.parametrize("scale,saturate", [(1.0, False), (8192.0, False), (3.0, True)])
def test_cpu_error_add_matches_reference(cpu_op, fmt, gdtype, scale, saturate, gen):
    n = 50_003
    err = ref.encode(torch.randn(n, generator=gen) * 10.0 ** torch.randint(-19, 1, (n,), generator=gen), fmt=fmt)
    grad = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-12, 2, (n,), generator=gen)).to(gdtype)
    grad[:10] = torch.tensor([0.0, -0.0, 1e-30, 100.0, -100.0, 15.0, 1e-8, -1e-8, 65000.0, 3.0]).to(gdtype)
    want = err.clone()
    assert ref.error_add_(want, grad, scale=scale, saturate=saturate, fmt=fmt)
    got = err.clone()
    assert fp169.error_add_(got, grad, scale, saturate=saturate, fmt=fmt.name, backend=cpu_op) is True
    assert_codes_equal(got, want)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("gdtype", VALUE_DTYPES)
def test_cpu_error_add_nonfinite_leaves_buffer(cpu_op, bad, gdtype, gen):
    n = 4099
    err = ref.encode(torch.randn(n, generator=gen))
    before = err.clone()
    grad = torch.randn(n, generator=gen).to(gdtype)
    grad[int(torch.randint(0, n, (1,), generator=gen))] = bad
    flag = fp169.error_add_async_(err, grad, 2.0, backend=cpu_op)
    assert flag.dtype == torch.bool and flag.shape == () and not bool(flag)
    assert torch.equal(err, before)
    assert fp169.error_add_(err, grad, backend=cpu_op) is False
    assert torch.equal(err, before)
    # A finite input after a rejected one still works.
    grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
    assert fp169.error_add_(err, grad, backend=cpu_op) is True
    assert not torch.equal(err, before)


def test_cpu_error_add_overflow_behaviour(cpu_op):
    err = ref.encode(torch.tensor([15.0, -15.0, 1.0]))
    grad = torch.tensor([1.0, -1.0, 1.0])
    e1 = err.clone()
    assert fp169.error_add_(e1, grad, backend=cpu_op)
    assert [int(c) & 0xFFFF for c in e1] == [0x7E00, 0xFE00, 0x7800]  # +-Inf, 2.0
    assert not bool(fp169.all_finite(e1))
    e2 = err.clone()
    assert fp169.error_add_(e2, grad, saturate=True, backend=cpu_op)
    assert [int(c) & 0xFFFF for c in e2] == [0x7DFF, 0xFDFF, 0x7800]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("rows,n", [(1, 1000), (2, 4097), (3, 8), (5, 12_345)])
@pytest.mark.parametrize("divisor,saturate", [(1.0, True), (4.0, True), (1.0, False)])
def test_cpu_reduce_rows_matches_reference(cpu_op, fmt, rows, n, divisor, saturate, gen):
    vals = torch.randn(rows, n, generator=gen) * 10.0 ** torch.randint(-20, 2, (rows, n), generator=gen).float()
    if fmt.signed is False:
        vals = vals.abs()
    vals.view(-1)[:6] = torch.tensor([math.inf, -math.inf, math.nan, 15.0, 9.0, 1e-21])[: vals.numel()]
    codes = ref.encode(vals, fmt=fmt)
    out = torch.full((n,), POISON_CODE, dtype=torch.int16)
    got = fp169.reduce_rows(codes, divisor, saturate=saturate, fmt=fmt, backend=cpu_op, out=out)
    assert got is out
    assert_codes_equal(got, ref.reduce_rows(codes, divisor=divisor, saturate=saturate, fmt=fmt))


def test_argument_errors(cpu_op):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="scale"):
        fp169.encode(x, scale=0.0, backend=cpu_op)
    with pytest.raises(ValueError, match="scale"):
        fp169.encode(x, scale=1e39, backend=cpu_op)  # infinite in fp32
    with pytest.raises(TypeError, match="scale must be a number, got 'x'"):
        fp169.encode(x, scale="x", backend=cpu_op)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got float32"):  # a numpy array
        fp169.encode(x.numpy(), backend=cpu_op)
    with pytest.raises(TypeError):
        fp169.decode(torch.zeros(3, dtype=torch.int32), backend=cpu_op)
    with pytest.raises(TypeError):
        fp169.encode(torch.zeros(3, dtype=torch.int64), backend=cpu_op)
    with pytest.raises(ValueError, match="elements"):
        fp169.error_add_(torch.zeros(3, dtype=torch.int16), torch.zeros(4), backend=cpu_op)
    with pytest.raises(ValueError, match="out"):
        fp169.encode(x, backend=cpu_op, out=torch.empty(9, dtype=torch.int16))
    with pytest.raises(ValueError, match="backend"):
        fp169.encode(x, backend="triton")
    with pytest.raises(RuntimeError, match="cuda"):
        fp169.encode(x, backend="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        fp169.error_add_(torch.zeros(4, 4, dtype=torch.int16).t(), torch.zeros(16), backend=cpu_op)
    # The C++ front end checks too (called directly, bypassing the Python wrapper).
    with pytest.raises(RuntimeError, match="int16"):
        torch.ops.dalle_ds_fp169.encode_out(x, torch.empty(10, dtype=torch.int32), 1.0, False, 0)
    with pytest.raises(RuntimeError, match="fmt"):
        torch.ops.dalle_ds_fp169.encode_out(x, torch.empty(10, dtype=torch.int16), 1.0, False, 7)


def test_auto_backend_and_op_status(cpu_op):
    assert fp169.resolve_backend(torch.device("cpu")) == "cpp"
    rows = {r["name"]: r for r in fp169.op_status()}
    assert set(rows) == {"fp169_cpu", "fp169_cuda"}
    assert rows["fp169_cpu"]["available"] is True
    assert isinstance(rows["fp169_cuda"]["reason"], str) and rows["fp169_cuda"]["reason"]
    if not torch.cuda.is_available():
        assert rows["fp169_cuda"]["available"] is False
    assert torch.ops.dalle_ds_fp169.build_info().startswith("fp169 abi=")


# ---- builder ------------------------------------------------------------------------------------------------------
def test_builder_reports_compiler_errors(tmp_path, monkeypatch):
    """A broken source gives OpUnavailable with the compiler's message, recorded in failed.json for info."""
    src = tmp_path / "csrc" / "broken"
    src.mkdir(parents=True)
    (src / "broken.cpp").write_text("int main( { this is not C++ }\n")
    monkeypatch.setenv("DALLE_DS_CSRC", str(tmp_path / "csrc"))
    monkeypatch.setenv("DALLE_DS_OPS_CACHE", str(tmp_path / "cache"))
    b = OpBuilder(name="broken_test", sources=("broken/broken.cpp",))
    if b.incompatibility():
        pytest.skip(b.incompatibility())
    with pytest.raises(OpUnavailable, match="build failed"):
        b.load()
    record = json.loads((b.build_directory() / "failed.json").read_text())
    assert "broken.cpp" in record["reason"] and "error" in record["reason"]
    st = b.status(build=True)  # the same process does not retry
    assert st["available"] is False and "build failed" in st["reason"]
    fresh = OpBuilder(name="broken_test", sources=("broken/broken.cpp",))
    st = fresh.status(build=False)
    assert st["available"] is False and "last build failed" in st["reason"]


def test_builder_missing_sources_and_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_DS_CSRC", str(tmp_path))
    b = OpBuilder(name="nothing", sources=("nope/nope.cpp",))
    assert "sources not found" in b.incompatibility()
    (tmp_path / "a.cpp").write_text("int f() { return 1; }\n")
    b = OpBuilder(name="a", sources=("a.cpp",))
    k1 = b.cache_key()
    (tmp_path / "a.cpp").write_text("int f() { return 2; }\n")
    assert b.cache_key() != k1  # any source change rebuilds
    assert OpBuilder(name="a", sources=("a.cpp",), extra_cflags=("-O1",)).cache_key() != b.cache_key()


def test_builder_cached_build_is_reported(cpu_op):
    if _ext.CPU_BUILDER.loaded:
        st = _ext.CPU_BUILDER.status(build=False)
        assert st["available"] and "loaded" in st["reason"]
        assert _ext.CPU_BUILDER.build_directory().joinpath("ok.json").is_file() or "prebuilt" in st["reason"]


# ---- CUDA op vs reference (GPU machines only) ----------------------------------------------------------------------
@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1024.0, 0.1])
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_cuda_encode_matches_reference(cuda_op, fmt, saturate, scale, dtype, gen):
    x = interesting_fp32(gen, 300_000).to(dtype)
    x_gpu = x.cuda()
    # (input offset, output offset) in elements: nonzero offsets break 16-byte alignment (the scalar path).
    for xo, oo in ((0, 0), (1, 1), (3, 0), (0, 3)):
        n = x.numel() - max(xo, oo)
        want = ref.encode(x[xo:xo + n], saturate=saturate, scale=scale, fmt=fmt)
        out = torch.full((n + oo,), POISON_CODE, dtype=torch.int16, device="cuda")[oo:]
        got = fp169.encode(x_gpu[xo:xo + n], saturate, scale, fmt=fmt, backend=cuda_op, out=out)
        assert_codes_equal(got.cpu(), want, x[xo:xo + n].float())


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_cuda_decode_matches_reference(cuda_op, fmt, dtype, scale):
    codes_gpu = ALL_CODES.cuda()
    for co, oo in ((0, 0), (5, 5), (0, 1)):
        n = ALL_CODES.numel() - max(co, oo)
        out = torch.full((n + oo,), 123.0, dtype=dtype, device="cuda")[oo:]
        got = fp169.decode(codes_gpu[co:co + n], scale, dtype, fmt=fmt, backend=cuda_op, out=out)
        assert_values_equal(got.cpu(), ref.decode(ALL_CODES[co:co + n], scale=scale, dtype=dtype, fmt=fmt))


@pytest.mark.gpu
@cuda_only
def test_cuda_large_grid_stride(cuda_op, gen):
    n = 50_000_003  # more elements than one pass of the grid
    x = torch.randn(n, device="cuda") * 1e-6
    got = fp169.encode(x, backend=cuda_op)
    assert_codes_equal(got.cpu(), fp169.encode(x.cpu(), backend="cpp" if _ext.load()["cpu"] else "reference"))
    assert_values_equal(fp169.decode(got, backend=cuda_op).cpu(), fp169.decode(got.cpu()))


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gdtype", VALUE_DTYPES)
def test_cuda_error_add_matches_reference(cuda_op, fmt, gdtype, gen):
    n = 100_003
    err = ref.encode(torch.randn(n, generator=gen) * 10.0 ** torch.randint(-19, 1, (n,), generator=gen), fmt=fmt)
    grad = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-12, 2, (n,), generator=gen)).to(gdtype)
    err_gpu, grad_gpu = err.cuda(), grad.cuda()
    for scale, saturate in [(1.0, False), (8192.0, False), (3.0, True)]:
        for offset in (0, 1):  # offset 1: misaligned, the scalar path
            want = err[offset:].clone()
            assert ref.error_add_(want, grad[offset:], scale=scale, saturate=saturate, fmt=fmt)
            got = err_gpu.clone()[offset:]
            flag = fp169.error_add_async_(got, grad_gpu[offset:], scale, saturate=saturate, fmt=fmt, backend=cuda_op)
            assert flag.is_cuda and bool(flag)
            assert_codes_equal(got.cpu(), want)
    for bad in (math.nan, math.inf, -math.inf):
        g = grad_gpu.clone()
        g[n // 2] = bad
        e = err_gpu.clone()
        assert fp169.error_add_(e, g, fmt=fmt, backend=cuda_op) is False
        assert torch.equal(e, err_gpu)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("rows,n", [(1, 1000), (2, 4096), (3, 4097), (8, 123_456)])
def test_cuda_reduce_rows_matches_reference(cuda_op, rows, n, gen):
    vals = torch.randn(rows, n, generator=gen) * 10.0 ** torch.randint(-20, 2, (rows, n), generator=gen).float()
    vals.view(-1)[:3] = torch.tensor([math.inf, math.nan, 15.0])
    codes = ref.encode(vals)
    for divisor in (1.0, float(rows)):
        out = torch.full((n + 1,), POISON_CODE, dtype=torch.int16, device="cuda")
        for o in (out[:n], out[1:]):  # aligned and misaligned output
            got = fp169.reduce_rows(codes.cuda(), divisor, backend=cuda_op, out=o)
            assert_codes_equal(got.cpu(), ref.reduce_rows(codes, divisor=divisor))
