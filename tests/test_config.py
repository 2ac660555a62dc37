import dataclasses
import json

import pytest

from dalle_ds.config import (DALLE_PRESETS, DALLE_RUN_PRESETS, DVAE_PRESETS, DVAE_RUN_PRESETS, ConfigError,
                             DVAEConfig, DVAETrainConfig, apply_overrides, build_run_config, parse_set_args)


def test_presets_are_valid_and_paper_shape(tmp_path):
    for name, cfg in DVAE_RUN_PRESETS.items():
        if name == "paper":  # needs the user's data
            with pytest.raises(ConfigError, match="needs a path"):
                cfg.validate()
            with pytest.raises(ConfigError, match="no image files"):
                apply_overrides(cfg, {"data.path": str(tmp_path)}).validate()
            (tmp_path / "sub").mkdir(exist_ok=True)
            (tmp_path / "sub" / "a.PNG").write_bytes(b"")  # found in a subfolder, by extension, any case
            cfg = apply_overrides(cfg, {"data.path": str(tmp_path)})
        cfg.validate()
    assert (DVAE_RUN_PRESETS["paper"].data.augment, DVAE_RUN_PRESETS["paper"].data.max_aspect_ratio) == ("paper", 2.0)
    paper = DVAE_PRESETS["paper"]
    assert (paper.image_size, paper.grid_size, paper.vocab_size) == (256, 32, 8192)
    prior = DALLE_RUN_PRESETS["paper"]
    assert (prior.model.n_layers, prior.model.d_model, prior.model.n_heads) == (64, 3968, 62)
    assert prior.model.activation_checkpointing and prior.steps == 430_000  # paper §2.4, App. B.2
    assert DVAE_PRESETS["tiny"].grid_size == 16 and DVAE_PRESETS["tiny8"].grid_size == 8


def test_dotted_and_nested_overrides_with_types():
    cfg = DVAE_RUN_PRESETS["demo"]
    out = apply_overrides(cfg, {"steps": "12", "data.name": "fashion_mnist", "model": {"vocab_size": 128},
                                "kl_weight": "0.5"})
    assert out.steps == 12 and out.data.name == "fashion_mnist" and out.model.vocab_size == 128
    assert out.kl_weight == 0.5
    assert cfg.steps != 12 and cfg.model.vocab_size == 512  # the preset itself is untouched


def test_a_model_preset_by_name_then_its_fields():
    """``--set model=350M`` picks the prior's preset, dotted keys then change it, in either order; the dVAE too."""
    from dalle_ds.config import DALLE_PRESETS, DALLE_RUN_PRESETS

    for order in (["model=350M", "model.n_layers=2"], ["model.n_layers=2", "model=350M"]):
        out = apply_overrides(DALLE_RUN_PRESETS["demo"], parse_set_args(order))
        assert (out.model.d_model, out.model.n_heads, out.model.n_layers) == (1024, 16, 2), order
    assert DALLE_PRESETS["350M"].n_layers == 24  # the preset table itself is untouched
    assert apply_overrides(DVAE_RUN_PRESETS["demo"], {"model": "paper"}).model == DVAE_PRESETS["paper"]
    with pytest.raises(ConfigError, match=r"--set.model: unknown preset '350m'; choose from .*350M"):
        apply_overrides(DALLE_RUN_PRESETS["demo"], parse_set_args(["model=350m"]), where="--set")
    with pytest.raises(ConfigError, match="expected a mapping"):  # no presets for the data block
        apply_overrides(DALLE_RUN_PRESETS["demo"], {"data": "shapes"})


@pytest.mark.parametrize("overrides, needle", [
    ({"stepz": 3}, "did you mean 'steps'"),
    ({"data.nmae": "x"}, "did you mean 'name'"),
    ({"steps": "ten"}, "expected int"),
    ({"steps": 2.5}, "expected int"),
    ({"steps.x": 1}, r"config.steps: is a value, not a section: 'steps.x' names nothing"),
    ({"model.image_size.foo": 1}, r"config.model.image_size: is a value, not a section"),
    ({"kl_weight": "nan"}, r"config.kl_weight: expected a finite number, got 'nan'"),
    ({"model.code_embedding_std": "inf"}, "expected a finite number"),
])
def test_bad_keys_and_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(DVAE_RUN_PRESETS["demo"], overrides)


@pytest.mark.parametrize("overrides, needle", [
    ({"head_init": "kmeanz"}, "head_init"),
    ({"head_init_images": 0}, "head_init_images"),
    ({"model.likelihood": "bernoulli"}, "model.likelihood"),
    ({"model.code_embedding_std": -1.0}, "code_embedding_std"),
    ({"model.channels": 1}, r"model.channels: the data loaders deliver RGB images \(3 channels\), got 1"),
])
def test_dvae_init_and_likelihood_options_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(DVAE_RUN_PRESETS["demo"], overrides).validate()


@pytest.mark.parametrize("overrides, needle", [
    ({"powersgd.error_dtype": "fp16"}, "powersgd.error_dtype"),
    ({"powersgd.checkpoint_buffers": "all"}, "powersgd.checkpoint_buffers"),
    ({"powersgd.rank": 0}, "powersgd.rank"),
    ({"powersgd.recenter_every": -1}, "powersgd.recenter_every"),
])
def test_powersgd_options_are_validated(overrides, needle):
    from dalle_ds.config import DALLE_RUN_PRESETS
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(DALLE_RUN_PRESETS["demo"], overrides).powersgd.validate()


def test_validation_catches_shape_path_and_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        DVAEConfig(image_size=62, groups=3).validate()
    with pytest.raises(ConfigError, match="no such directory"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo",
                         sets=["data.name=imagefolder", f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="unknown dataset 'shape'.*did you mean 'shapes'"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo", sets=["data.name=shape"])
    with pytest.raises(ConfigError, match="64 or 128"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo", sets=["model.image_size=256"])
    with pytest.raises(ConfigError, match="tau_end"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo", sets=["tau_end=2"])
    # the prior's dropout and init std: refused here, where torch failed at model build
    with pytest.raises(ConfigError, match=r"model.dropout: must be in \[0, 1\), got 2.0"):
        dataclasses.replace(DALLE_PRESETS["tiny"], dropout=2.0).validate()
    with pytest.raises(ConfigError, match=r"model.init_std: must be > 0"):
        dataclasses.replace(DALLE_PRESETS["tiny"], init_std=-1.0).validate()


def test_json_file_then_set_precedence(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"steps": 50, "data": {"eval_samples": 8}}))
    cfg = build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo", str(f), ["steps=60"])
    assert cfg.steps == 60 and cfg.data.eval_samples == 8
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "demo", str(bad))
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        build_run_config(DVAETrainConfig, DVAE_RUN_PRESETS, "nope")


def test_parse_set_args_rejects_missing_equals():
    assert parse_set_args(["a.b=1", "c= x "]) == {"a.b": "1", "c": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["steps"])


def test_clip_negatives_need_the_shapes_data(tmp_path):
    """The demo CLIP preset's negatives come from shapes scenes: on other data the config says what to turn off."""
    from dalle_ds.config import CLIP_RUN_PRESETS

    (tmp_path / "a.jpg").write_bytes(b"")
    cfg = apply_overrides(CLIP_RUN_PRESETS["demo"], {"data.name": "imagefolder", "data.path": str(tmp_path)})
    with pytest.raises(ConfigError, match="data.name is 'imagefolder': set hard_negatives=0, binding_negatives=false"):
        cfg.validate()
    apply_overrides(cfg, {"hard_negatives": 0, "binding_negatives": False}).validate()


@pytest.mark.parametrize("overrides, needle", [
    ({"hard_negatives": 10}, "hard_negatives: must be 0..4"),
    ({"save_every": -1}, "save_every: must be ≥ 0"),
    ({"keep_checkpoints": -2}, "keep_checkpoints: must be ≥ 0"),
    ({"model.text_len": 2}, "model.text_len: needs ≥ 3 positions"),
])
def test_clip_run_counts_are_validated(overrides, needle):
    from dalle_ds.config import CLIP_RUN_PRESETS

    with pytest.raises(ConfigError, match=needle):
        apply_overrides(CLIP_RUN_PRESETS["test"], overrides).validate()


def test_webdataset_path_must_match_a_shard(tmp_path):
    base = DVAE_RUN_PRESETS["demo"]
    with pytest.raises(ConfigError, match=r"data.path: no WebDataset shard matches .*shard-\*\.tar"):
        apply_overrides(base, {"data.name": "webdataset", "data.path": str(tmp_path / "shard-*.tar")}).validate()
    (tmp_path / "shard-0.tar").write_bytes(b"")
    apply_overrides(base, {"data.name": "webdataset", "data.path": str(tmp_path / "shard-*.tar")}).validate()


def test_prior_data_checks_token_rows_and_tokenizer_size(tmp_path):
    from dalle_ds.config import DalleDataConfig

    (tmp_path / "meta.json").write_text(json.dumps({"format": 1, "num_samples": 0, "grid_size": 8, "vocab_size": 16,
                                                   "shards": []}))
    with pytest.raises(ConfigError, match="holds 0 token rows"):
        DalleDataConfig(train_tokens=str(tmp_path)).validate()
    (tmp_path / "meta.json").write_text(json.dumps({"format": 1, "num_samples": 5, "grid_size": 8, "vocab_size": 16,
                                                   "shards": ["part-0-00000"]}))
    DalleDataConfig(train_tokens=str(tmp_path)).validate()
    for damaged, needle in (("{", "meta.json: not valid JSON"), ("[1, 2]", "meta.json: the top level must be a JSON"),
                            ('{"format": 1}', "meta.json: lacks grid_size, vocab_size, shards")):
        (tmp_path / "meta.json").write_text(damaged)
        with pytest.raises(ConfigError, match=needle):
            DalleDataConfig(train_tokens=str(tmp_path)).validate()
    (tmp_path / "meta.json").write_text(json.dumps({"format": 1, "num_samples": 5, "grid_size": 8, "vocab_size": 16,
                                                   "shards": ["part-0-00000"]}))
    for bad in (0, 259, 16385):
        with pytest.raises(ConfigError, match="tokenizer_vocab_size: must be in 260..16384"):
            DalleDataConfig(train_tokens=str(tmp_path), tokenizer_vocab_size=bad).validate()


def test_data_image_and_caption_keys_reach_the_loaders(tmp_path):
    from dalle_ds.config import DataConfig

    (tmp_path / "a.png").write_bytes(b"")  # validate only looks for an image file name
    folder = DataConfig(name="imagefolder", path=str(tmp_path), caption_key="alt").validate(64)
    assert folder.dataset_kwargs("train", 64)["caption_column"] == "alt"
    (tmp_path / "s-0.tar").write_bytes(b"")
    shards = DataConfig(name="webdataset", path=str(tmp_path / "s-0.tar"), image_key="webp",
                        caption_key="json.text").validate(64)
    kw = shards.dataset_kwargs("train", 64)
    assert (kw["image_key"], kw["caption_key"], kw["validate"]) == ("webp", "json.text", True)
    unchecked = DataConfig(name="webdataset", path=str(tmp_path / "s-0.tar"), check_images=False).validate(64)
    assert unchecked.dataset_kwargs("train", 64)["validate"] is False
    with pytest.raises(ConfigError, match="data.check_images: applies to imagefolder and webdataset"):
        DataConfig(name="shapes", check_images=False).validate(64)
    with pytest.raises(ConfigError, match="data.image_key: names a WebDataset member; imagefolder has none"):
        DataConfig(name="imagefolder", path=str(tmp_path), image_key="webp").validate(64)
    with pytest.raises(ConfigError, match="data.caption_key: applies to imagefolder and webdataset"):
        DataConfig(name="shapes", caption_key="text").validate(64)


def test_prior_data_refuses_the_image_configs_own_worker_count(tmp_path):
    """data.images is a whole DataConfig, but the prior's loader reads data.num_workers: the nested key would be
    silently ignored."""
    from dalle_ds.config import DALLE_RUN_PRESETS

    (tmp_path / "dvae.pt").write_bytes(b"")
    on_the_fly = {"data.train_tokens": None, "data.dvae": str(tmp_path / "dvae.pt")}
    with pytest.raises(ConfigError, match=r"data.images.num_workers: is not read .* data.num_workers"):
        apply_overrides(DALLE_RUN_PRESETS["demo"], {**on_the_fly, "data.images.num_workers": 8}).data.validate()
    apply_overrides(DALLE_RUN_PRESETS["demo"], {**on_the_fly, "data.num_workers": 8}).data.validate()
