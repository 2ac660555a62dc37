"""The tensor-position decode step behind the sampler's CUDA graph (dalle_ds/sample/cuda_graph.py).

On CPU: the step that takes its position from a device tensor gives the int-position step's logits, for every mask
kind and precision route, with the cache past the position holding NaN; the sampler refuses a graph where it cannot
run. On a GPU: captured sampling equals eager sampling bit for bit, and captures are reused or redone as they must.
"""
import dataclasses

import pytest
import torch

from dalle_ds.config import DalleConfig
from dalle_ds.models.dalle import DALLE, prepare_text
from dalle_ds.sample import cuda_graph
from dalle_ds.sample.cuda_graph import DecodeStepGraph, graphed_decode_step
from dalle_ds.sample.generate import sample_image_tokens

CFG = DalleConfig(text_vocab_size=50, text_len=6, image_vocab_size=20, image_grid=4, d_model=32, n_layers=6,
                  n_heads=2, conv_kernel=3, attn_backend="dense")  # row, column, row, row, row, conv


def _text(B, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 50, (B, 8), generator=g)
    return prepare_text(ids, torch.tensor([0, 3, 8, 5][:B]), CFG).to(device)


def test_capture_registry_frees_before_it_captures(monkeypatch):
    """Captures are reused per batch size, at most KEEP per model, least recently used dropped first; a dropped
    capture (its KV cache and memory pool) is freed before the next one allocates, not after (a CPU stand-in for
    the graph counts the captures alive when each is built)."""
    import weakref

    alive, built = weakref.WeakSet(), []

    class Capture:
        def __init__(self, model, batch):
            built.append((batch, len(alive)))
            self.fingerprint = cuda_graph._fingerprint(model, batch)
            alive.add(self)

    monkeypatch.setattr(cuda_graph, "DecodeStepGraph", Capture)
    model = DALLE(CFG)
    a = graphed_decode_step(model, 4)
    assert graphed_decode_step(model, 4) is a and graphed_decode_step(model, 3) is not a
    assert graphed_decode_step(model, 4) is a  # both kept; 4 is now the most recently used
    del a
    graphed_decode_step(model, 2)  # a third batch size: 3 is dropped, and freed, before 2 is built
    assert list(cuda_graph._captures[model]) == [4, 2] and built[-1] == (2, 1)
    model.double()  # new parameter tensors: every capture of the old ones goes before the new one is built
    graphed_decode_step(model, 2)
    assert list(cuda_graph._captures[model]) == [2] and built[-1] == (2, 0)
    assert built == [(4, 0), (3, 1), (2, 1), (2, 0)]
    cuda_graph.release(model)
    assert model not in cuda_graph._captures and len(alive) == 0


@pytest.mark.parametrize("resblock_dtype", ["float32", "bfloat16"])
def test_tensor_position_step_matches_int_position_step(resblock_dtype):
    torch.manual_seed(0)
    model = DALLE(dataclasses.replace(CFG, resblock_dtype=resblock_dtype)).eval()
    B, n = 3, CFG.image_len
    text = _text(B)
    codes = torch.randint(0, CFG.image_vocab_size, (B, n), generator=torch.Generator().manual_seed(1))
    step = DecodeStepGraph(model, B, capture=False)
    for c in step.cache:  # not yet written: a step must not read past its position
        c["k"].fill_(float("nan"))
        c["v"].fill_(float("nan"))
    cache = model.new_cache(B)
    with torch.no_grad():
        torch.testing.assert_close(model.prefill(text, step.cache), model.prefill(text, cache), rtol=0, atol=0)
        for i in range(n - 1):
            want = model.decode_step(codes[:, i], i, cache)
            got = step(codes[:, i], i)
            assert not got.isnan().any(), f"image position {i}: NaN from the unwritten cache"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"image position {i}")
    # the cache rows written so far are the same (index_copy_ at a tensor position == slice assignment); the first
    # layer's bit for bit (from the embeddings alone), later ones up to the attention's summation order
    written = CFG.text_len + n - 1
    for layer, (a, b) in enumerate(zip(step.cache, cache)):
        tol = 0 if layer == 0 else 1e-5
        for name in ("k", "v"):
            torch.testing.assert_close(a[name][:, :, :written], b[name][:, :, :written], rtol=tol, atol=tol)


def test_embed_image_takes_a_tensor_start():
    model = DALLE(CFG)
    codes = torch.tensor([[3, 7]])
    torch.testing.assert_close(model.embed_image(codes, start=5), model.embed_image(codes, start=torch.tensor(5)),
                               rtol=0, atol=0)


def test_sampler_refuses_a_graph_it_cannot_run():
    model = DALLE(CFG).eval()
    with pytest.raises(ValueError, match="CUDA"):
        sample_image_tokens(model, _text(2), cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache"):
        sample_image_tokens(model, _text(2), use_cache=False, cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeStepGraph(model, 2)


def test_uncaptured_step_refuses_a_released_model():
    model = DALLE(CFG).eval()
    step = DecodeStepGraph(model, 1, capture=False)
    del model
    with pytest.raises(RuntimeError, match="no longer exists"):
        step(torch.zeros(1, dtype=torch.long), 0)


# ---- GPU -----------------------------------------------------------------------------------------------------------
ON_GPU = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_graphed_sampling_equals_eager_sampling(dtype):
    """Triton decode: the kernel reads the position from memory instead of an argument, nothing else changes, so the
    logits are equal bit for bit (the dense backend's tensor route sums over the whole cache: equal to rounding)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, attn_backend="triton", d_model=64, n_heads=2)
    model = DALLE(cfg).to("cuda", dtype).eval()
    text = _text(4, "cuda")

    def run(graph):
        g = torch.Generator(device="cuda").manual_seed(5)
        return sample_image_tokens(model, text, generator=g, return_logits=True, cuda_graph=graph)

    tok_e, logits_e = run(False)
    tok_g, logits_g = run(True)
    assert torch.equal(tok_g, tok_e)
    assert torch.equal(logits_g, logits_e), (logits_g - logits_e).abs().max()
    first = cuda_graph._captures[model][4]
    run(True)
    assert cuda_graph._captures[model][4] is first  # same batch, same parameters: the capture is reused
    sample_image_tokens(model, text[:2], cuda_graph=True)
    assert list(cuda_graph._captures[model]) == [4, 2] and cuda_graph._captures[model][4] is first  # KEEP = 2
    assert torch.equal(sample_image_tokens(model, text[:2], generator=torch.Generator(device="cuda").manual_seed(5),
                                           cuda_graph=True),
                       sample_image_tokens(model, text[:2], generator=torch.Generator(device="cuda").manual_seed(5)))
    model.float()  # new parameter tensors: a capture of the old ones must not run
    assert graphed_decode_step(model, 2).fingerprint != first.fingerprint
    assert list(cuda_graph._captures[model]) == [2]  # the old parameters' captures are gone
    cuda_graph.release(model)
    assert model not in cuda_graph._captures


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_sampling_from_an_image_prompt():
    """An image prompt on the GPU: the prefill runs the prompt codes with the text (SDPA under each layer's mask),
    the Triton decode then reads them from the cache; graphed and eager sampling agree bit for bit, the prompt comes
    back unchanged, and the drawn codes' logits are one full forward pass's (Triton training kernels; fp32, whose
    tl.dot may round through TF32, hence the tolerance: a wrong mask moves logits by far more on this model)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, attn_backend="triton", d_model=64, n_heads=2)
    model = DALLE(cfg).to("cuda").eval()
    text = _text(4, "cuda")
    prefix = torch.randint(0, cfg.image_vocab_size, (4, 7), device="cuda")

    def run(graph):
        g = torch.Generator(device="cuda").manual_seed(5)
        return sample_image_tokens(model, text, generator=g, return_logits=True, cuda_graph=graph,
                                   image_prefix=prefix)

    tok_e, logits_e = run(False)
    tok_g, logits_g = run(True)
    assert torch.equal(tok_g, tok_e) and torch.equal(logits_g, logits_e)
    assert torch.equal(tok_e[:, :7], prefix) and logits_e.shape == (4, 9, cfg.image_vocab_size)
    with torch.no_grad():
        full = model(text, tok_e, return_logits=True).image_logits[:, 7:]
    torch.testing.assert_close(logits_e, full, rtol=2e-3, atol=2e-3)
    cuda_graph.release(model)
