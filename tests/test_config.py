import pytest
import yaml

from tether.config import SFTConfig, config_keys, load_config, parse_override, save_config
from tether.errors import TetherError


def test_defaults_and_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.001\n  batch_size: 3\nmodel:\n  name: builtin:tiny\n")
    cfg = load_config(SFTConfig, recipe, {"train.batch_size": 5, "train.seed": None}, ["train.batch_size=7", "train.warmup_steps=2"])
    assert cfg.train.lr == 0.001          # from YAML
    assert cfg.train.batch_size == 7      # --set beats flags beats YAML
    assert cfg.train.seed == 0            # a flag left unset (None) keeps the default
    assert cfg.train.warmup_steps == 2
    assert cfg.model.name == "builtin:tiny"
    assert cfg.data.max_length == 512     # default


def test_unknown_key_in_yaml_names_key_file_and_nearest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batchsize: 3\n")
    with pytest.raises(TetherError, match=r"unknown config key 'train.batchsize' in .*r.yaml; did you mean 'train.batch_size'"):
        load_config(SFTConfig, recipe)


def test_unknown_key_from_set_and_unknown_section():
    with pytest.raises(TetherError, match=r"'train.lrr'.*did you mean 'train.lr'"):
        load_config(SFTConfig, None, {}, ["train.lrr=1e-4"])
    with pytest.raises(TetherError, match=r"unknown config key 'modle.name'.*did you mean 'model.name'"):
        load_config(SFTConfig, None, {}, ["modle.name=x"])


def test_wrong_type_and_choices():
    with pytest.raises(TetherError, match=r"'train.batch_size' expects int, got 'big'"):
        load_config(SFTConfig, None, {}, ["train.batch_size=big"])
    with pytest.raises(TetherError, match=r"'model.dtype' must be one of auto, fp32, bf16; got 'fp8'"):
        load_config(SFTConfig, None, {}, ["model.dtype=fp8"])
    with pytest.raises(TetherError, match=r"expects bool"):
        load_config(SFTConfig, None, {}, ["data.packing=maybe"])


def test_int_promotes_to_float_and_null_for_optional():
    cfg = load_config(SFTConfig, None, {}, ["train.lr=1", "data.eval_path=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.eval_path is None


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-5 as the string '3e-5'; a float field takes it as the number
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 3e-5\n")
    assert load_config(SFTConfig, recipe).train.lr == 3e-5
    assert load_config(SFTConfig, None, {}, ["train.lr=1E-4"]).train.lr == 1e-4
    assert load_config(SFTConfig, None, {}, ["train.lr=-2e+3"]).train.lr == -2000.0
    assert load_config(SFTConfig, None, {}, ["model.name=1e-4"]).model.name == "1e-4"  # a str field keeps the text
    with pytest.raises(TetherError, match=r"'train.lr' expects float, got '1e-4x'"):
        load_config(SFTConfig, None, {}, ["train.lr=1e-4x"])
    with pytest.raises(TetherError, match=r"'train.batch_size' expects int, got '1e3'"):
        load_config(SFTConfig, None, {}, ["train.batch_size=1e3"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(TetherError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(TetherError, match="invalid YAML"):
        load_config(SFTConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, {"train.lr": 0.5}, ["model.lora_r=8"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg
    assert set(config_keys(SFTConfig)) >= {"model.name", "train.lr", "data.packing"}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["lora_r"] == 8


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    assert parse_override("a.b=none") == ("a.b", None)
    with pytest.raises(TetherError, match="key=value"):
        parse_override("nonsense")


def test_set_none_selects_the_choice_named_none():
    """`--set train.report_to=none` (YAML reads a bare none as null) selects the choice "none"; a str key without
    such a choice still refuses null."""
    assert load_config(SFTConfig, None, {}, ["train.report_to=none"]).train.report_to == "none"
    assert load_config(SFTConfig, None, {}, ["train.report_to=None"]).train.report_to == "none"
    with pytest.raises(TetherError, match="config key 'model.name' expects str"):
        load_config(SFTConfig, None, {}, ["model.name=none"])
