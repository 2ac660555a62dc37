"""dalle_ds.eval.fidelity (the paper's FID-against-blur evaluation, §3.2) and launch/evaluate.py.

The Fréchet distances torchmetrics computes through the meter are checked against a float64 computation with
scipy's matrix square root on the same features of the same blurred images; the feature network runs once per batch
and radius however many sets share it. The CLI runs on untrained tiny models (nothing here is trained, so only the
plumbing and the relations that hold for any model are checked: the dVAE set, the counts, the files)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from dalle_ds.eval import fidelity
from dalle_ds.eval.fidelity import FidelityMeter, FidelityUnavailable, gaussian_blur


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_gaussian_blur_radius_is_the_standard_deviation():
    edge = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    edge[..., 32:] = 255  # a vertical step: blurred, each row is the Gaussian's CDF
    assert gaussian_blur(edge, 0) is edge
    for radius in (1, 2, 4):
        out = gaussian_blur(edge, radius)
        assert out.dtype == torch.uint8 and out.shape == edge.shape
        row = out[0, 0, 32].double().numpy() / 255
        xs = np.arange(64)
        sigma = (np.interp(0.841345, row, xs) - np.interp(0.158655, row, xs)) / 2  # the CDF's ±1σ points
        assert sigma == pytest.approx(radius, rel=0.1), (radius, sigma)
        assert torch.equal(out[0, 0], out[0, 2]) and torch.equal(out[0, 0, 0], out[0, 0, 63])
    with pytest.raises(ValueError, match="≥ 0"):
        gaussian_blur(edge, -1)
    with pytest.raises(ValueError, match="uint8"):
        gaussian_blur(edge.float(), 1)


class _StubClip:
    """A 'CLIP' whose image embedding is a fixed random projection of the 4×4-pooled image (and counts its calls)."""

    def __init__(self):
        self.model = SimpleNamespace(config=SimpleNamespace(projection_dim=6))
        self.proj = torch.randn(48, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        self.calls = 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images.double() / 255, 4).flatten(1)
        return pooled @ self.proj

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.features(images).float()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_meter_fd_equals_a_float64_frechet_distance_per_set_and_radius():
    clip = _StubClip()
    radii = [0, 2]
    meter = FidelityMeter("clip", ["near", "far"], radii, clip=clip)
    real = [_images(24, s) for s in (0, 1)]
    near = [(r.int() + 20).clamp(0, 255).to(torch.uint8) for r in real]  # the same scenes, a little brighter
    far = [_images(24, s) // 3 for s in (5, 6)]  # other images, darker
    for batch in range(2):
        meter.update(real[batch], "real")
        meter.update(near[batch], "near")
        meter.update(far[batch], "far")
    # one network call per batch and radius and set fed: the two sets share the real images' features
    assert clip.calls == 2 * len(radii) * 3
    got = meter.compute()
    assert got["inception_score"] == {} and meter.global_counts() == {"real": 48, "near": 48, "far": 48}
    for r in radii:
        f_real = np.concatenate([clip.features(gaussian_blur(x, r)).numpy() for x in real])
        for name, sets in (("near", near), ("far", far)):
            f = np.concatenate([clip.features(gaussian_blur(x, r)).numpy() for x in sets])
            assert got["fd"][name][r] == pytest.approx(_frechet(f_real, f), rel=2e-3, abs=1e-6), (name, r)
        assert got["fd"]["near"][r] < got["fd"]["far"][r]


def _feed_share(meter: FidelityMeter, rank: int, world: int) -> None:
    """Batches 0..4 of real and sample images (sizes 7, 5, 9, 4, 6), every world-th one from ``rank``: uneven."""
    for b, n in enumerate((7, 5, 9, 4, 6)):
        if b % world == rank:
            meter.update(_images(n, b), "real")
            meter.update(_images(n, 100 + b) // 2, "s")


def _rank_fd(rank: int, world: int) -> tuple[dict, dict]:
    meter = FidelityMeter("clip", ["s"], [0, 1], clip=_StubClip())
    _feed_share(meter, rank, world)
    got = meter.compute()  # a collective: every rank
    return got["fd"], meter.global_counts()


def test_meter_gathers_its_statistics_over_ranks():
    """Two gloo ranks, each fed its share of the batches (uneven), give the one-process meter's distances."""
    from dalle_ds.dist.local_ranks import run_local_ranks

    fd, counts = run_local_ranks(_rank_fd, 2, timeout=120)
    alone = FidelityMeter("clip", ["s"], [0, 1], clip=_StubClip())
    _feed_share(alone, 0, 1)
    assert counts == alone.global_counts() == {"real": 31, "s": 31}
    for r in (0, 1):
        assert fd["s"][r] == pytest.approx(alone.compute()["fd"]["s"][r], rel=1e-6), r


def test_meter_refuses_bad_sets_and_images():
    clip = _StubClip()
    for sets in ([], ["real"], ["a", "a"]):
        with pytest.raises(ValueError, match="sets"):
            FidelityMeter("clip", sets, clip=clip)
    with pytest.raises(ValueError, match="radii"):
        FidelityMeter("clip", ["a"], [1, 1], clip=clip)
    with pytest.raises(ValueError, match="need a CLIP"):
        FidelityMeter("clip", ["a"])
    with pytest.raises(ValueError, match="features"):
        FidelityMeter("fid", ["a"], clip=clip)
    meter = FidelityMeter("clip", ["a"], clip=clip)
    with pytest.raises(ValueError, match="unknown set 'b'"):
        meter.update(_images(2, 0), "b")
    with pytest.raises(ValueError, match="uint8"):
        meter.update(_images(2, 0).float(), "a")


def test_inception_features_say_what_to_install(monkeypatch):
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(FidelityUnavailable, match=r'pip install "dalle_ds\[fid\]"'):
        FidelityMeter("inception", ["a"])


class _StubInception(torch.nn.Module):
    """Stands in for torch-fidelity's Inception-v3 (not installable beside a CPU-only torch: it imports torchvision):
    a fixed random projection of the pooled image, as wide as fidelity.INCEPTION_WIDTHS says (narrowed here)."""

    built: list = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        (feature,) = features_list
        _StubInception.built.append((feature, feature_extractor_weights_path))
        width = fidelity.INCEPTION_WIDTHS[feature]
        self.register_buffer("proj", torch.randn(48, width, generator=torch.Generator().manual_seed(4)))

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images.float() / 255, 4).flatten(1) @ self.proj


def test_inception_features_give_fid_and_an_inception_score_per_sample_set(monkeypatch):
    import torchmetrics.image.fid as tm_fid
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", _StubInception)
    monkeypatch.setattr(fidelity, "INCEPTION_WIDTHS", {"2048": 24, "logits_unbiased": 10})  # 2048²: seconds each
    _StubInception.built.clear()
    meter = FidelityMeter("inception", ["a", "b"], [0, 2], inception_weights="w.pth")
    assert _StubInception.built == [("2048", "w.pth"), ("logits_unbiased", "w.pth")]  # one network each, shared
    for seed in range(2):
        meter.update(_images(20, seed), "real")
        meter.update(_images(20, 10 + seed), "a")
        meter.update(_images(20, 20 + seed) // 2, "b")
    got = meter.compute(seed=1)
    assert set(got["inception_score"]) == {"a", "b"} and set(got["inception_score"]["a"]) == {0, 2}
    for by_r in got["inception_score"].values():
        for mean, std in by_r.values():
            assert mean >= 1.0 and std >= 0.0  # exp(KL) of a split is at least 1
    assert got["inception_score"] == meter.compute(seed=1)["inception_score"]  # the splits follow the seed
    assert all(got["fd"][s][r] > 0 for s in ("a", "b") for r in (0, 2))


# ---------------------------------------------------------------------------------------------------------------
# launch/evaluate.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from dalle_ds.data.shapes import ShapesDataset
    from tiny_artifacts import export_tiny_clip, export_tiny_text_to_image

    d = tmp_path_factory.mktemp("eval_art")
    captions = [ShapesDataset("train", num_samples=16, image_size=64).scene(i)["caption"] for i in range(16)]
    prior = export_tiny_text_to_image(d, captions, image_size=64, text_len=12)
    export_tiny_clip(d / "clip", prior.parent / "tokenizer", image_size=64)
    return d


def _module():
    from launch_utils import load_script

    return load_script("launch/evaluate.py", "evaluate_cli")


def _run(args):
    return _module().main(args)


def test_evaluate_cli_on_shapes_with_clip_features(art, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "eval"
    rc = _run(["--prior", str(art / "prior" / "dalle.pt"), "--clip", str(art / "clip"), "--num_captions", "6",
               "--num_candidates", "3", "--batch_size", "6", "--features", "clip", "--blur", "0,1",
               "--rerank_pools", "2", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"] == {"real": 6, "dvae": 6, "first": 6, "reranked@2": 6, "reranked": 6} and m["blur"] == [0, 1]
    for s in ("dvae", "first", "reranked@2", "reranked"):
        assert all(np.isfinite(v) and v >= -1e-6 for v in m["fd"][s].values()), m["fd"]
    assert set(m["fd"]["dvae"]) == {"0", "1"}
    report = (out / "report.md").read_text()
    assert "| reranked |" in report and "not comparable with FID" in report
    assert (out / "fd_vs_blur.svg").read_text().startswith("<svg")
    assert (out / "fd_vs_pool.svg").read_text().count("<polyline") == 2  # one line per radius
    assert (out / "examples_r0.png").is_file() and (out / "examples_r1.png").is_file()


def test_pool_top1_is_the_reranker_best_among_the_first_k_drawn():
    evaluate = _module()
    images = torch.arange(4).view(4, 1, 1, 1).to(torch.uint8)  # image j = the j-th best
    result = SimpleNamespace(order=[3, 0, 2, 1], images=images)  # the best was drawn 4th, the second best 1st
    assert [int(evaluate.pool_top1(result, k)) for k in (1, 2, 3, 4)] == [1, 1, 1, 0]
    assert int(evaluate.pool_top1(SimpleNamespace(order=[1, 2, 0], images=images[:3]), 2)) == 0


@pytest.mark.parametrize("extra, message", [
    (["--features", "clip"], "give --clip or --feature_clip"),
    (["--blur", "1,-2"], "radii ≥ 0"),
    (["--blur", "0,inf"], "want distinct finite radii ≥ 0"),  # was an OverflowError traceback
    (["--blur", "nan"], "want distinct finite radii ≥ 0"),
    (["--num_captions", "1"], "--num_captions must be ≥ 2"),
    (["--clip", "CLIP", "--num_candidates", "4", "--rerank_pools", "2,4"], "must stay below --num_candidates"),
    (["--rerank_pools", "2"], "give --clip"),
    (["--rerank_pools", "1"], "pool sizes ≥ 2"),
    pytest.param(["--cuda_graph"], "needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["--inception_weights", "nowhere.pth"], "file not found"),
    (["--features", "clip", "--clip", "CLIP", "--inception_weights", "x"], "goes with --features inception"),
])
def test_evaluate_cli_refuses_bad_arguments(art, tmp_path, capsys, extra, message):
    args = ["--prior", str(art / "prior" / "dalle.pt"), "--out", str(tmp_path / "o"), *extra]
    args = [str(art / "clip") if a == "CLIP" else a for a in args]
    with pytest.raises(SystemExit) as e:
        _run(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_cli_refuses_inception_features_without_torch_fidelity_first(art, tmp_path, capsys, monkeypatch):
    """A missing package is said before the data is read (which has its own complaints): not one problem a run."""
    import torchmetrics.utilities.imports as tm_imports

    monkeypatch.setattr(tm_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    rc = _run(["--prior", str(art / "prior" / "dalle.pt"), "--data", "imagefolder", "--path", str(tmp_path / "none"),
               "--features", "inception", "--out", str(tmp_path / "o")])
    assert rc == 2 and 'need torch-fidelity: pip install "dalle_ds[fid]"' in capsys.readouterr().err


def test_evaluate_cli_says_when_the_data_is_too_small(art, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,a red circle\n" for i in range(3)))
    rc = _run(["--prior", str(art / "prior" / "dalle.pt"), "--data", "imagefolder", "--path", str(folder),
               "--num_captions", "5", "--features", "clip", "--clip", str(art / "clip"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "has only 3 samples" in capsys.readouterr().err


def test_evaluate_cli_rerun_replaces_the_earlier_outputs(art, tmp_path, monkeypatch, capsys):
    """A second evaluation into the same --out without --rerank_pools and with another largest radius left the
    first one's fd_vs_pool.svg and examples_r4.png beside its metrics.json."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "eval"
    common = ["--prior", str(art / "prior" / "dalle.pt"), "--clip", str(art / "clip"), "--num_captions", "2",
              "--num_candidates", "3", "--features", "clip", "--out", str(out)]
    assert _run([*common, "--blur", "0,4", "--rerank_pools", "2"]) == 0
    assert (out / "fd_vs_pool.svg").is_file() and (out / "examples_r4.png").is_file()
    capsys.readouterr()
    assert _run([*common, "--blur", "0,1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["examples_r0.png", "examples_r1.png", "fd_vs_blur.svg",
                                                      "metrics.json", "report.md"]
    assert "held an earlier evaluation" in capsys.readouterr().err
