"""The typed config: defaults, YAML, `--set`, validation messages and the JSON wire form."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medfed.common.config import STRATEGIES, Config, FederationConfig, ModelConfig
from medfed.common.config_checks import parse_freeze, validate
from medfed.common.config_loading import load_yaml, parse_assignment, set_value
from medfed.common.errors import MedfedError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "simulations" / "configs"


def _apply(text: str) -> Config:
    config = Config()
    set_value(config, *parse_assignment(text))
    return config


# --- defaults and YAML -------------------------------------------------------------------------

def test_defaults_validate():
    config = Config()
    assert validate(config) is config
    assert config.federation.strategy in STRATEGIES
    # Head only (on cached frozen features), 20 steps a round: docs/BENCHMARKS.md, issue 11.
    assert parse_freeze(config.model.freeze) is None
    assert config.train.local_steps == 20 and config.data.image_size is None


def test_yaml_nested_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 7\n"
        "data:\n  dataset: breastmnist\n  resolution: 64\n  augment: false\n"
        "partition:\n  scheme: quantity\n  sites: 3\n  alpha: 2\n"
        "model:\n  backbone: test_resnet\n  freeze: all\n  bn: local\n"
        "train:\n  lr: 0.001\n  batch_size: 16\n"
        "federation:\n  strategy: fedprox\n  rounds: 4\n  mu: 0.1\n"
    )
    config = validate(load_yaml(path))
    assert config.seed == 7
    assert config.data.dataset == "breastmnist"
    assert config.data.resolution == 64
    assert config.data.augment is False
    assert config.partition.scheme == "quantity" and config.partition.sites == 3
    # An int in YAML for a float field becomes a float.
    assert config.partition.alpha == 2.0 and isinstance(config.partition.alpha, float)
    assert config.model.freeze == "all" and config.model.bn == "local"
    assert config.train.lr == pytest.approx(0.001) and config.train.batch_size == 16
    assert config.federation.strategy == "fedprox" and config.federation.rounds == 4
    # Untouched keys keep their defaults.
    assert config.train.optimizer == Config().train.optimizer
    assert config.federation.patience == Config().federation.patience


def test_yaml_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == Config()


def test_yaml_missing_file(tmp_path):
    with pytest.raises(MedfedError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_invalid_syntax(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(MedfedError, match="not valid YAML") as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("federation:\n  roundz: 3\n")
    with pytest.raises(MedfedError) as info:
        load_yaml(path)
    message = str(info.value)
    assert str(path) in message
    assert "federation.roundz" in message
    assert "federation.rounds" in message


def test_yaml_section_must_be_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("train: 3\n")
    with pytest.raises(MedfedError, match="'train' must be a mapping"):
        load_yaml(path)


def test_yaml_exponent_float_without_dot(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  lr: 1e-4\n")
    assert load_yaml(path).train.lr == pytest.approx(1e-4)


# --- --set parsing -----------------------------------------------------------------------------

def test_parse_assignment_reads_yaml_scalars():
    assert parse_assignment("federation.rounds=20") == ("federation.rounds", 20)
    assert parse_assignment(" model.freeze = all") == ("model.freeze", "all")
    assert parse_assignment("data.augment=false") == ("data.augment", False)
    assert parse_assignment("data.data_dir=") == ("data.data_dir", None)
    assert parse_assignment("data.data_dir=null") == ("data.data_dir", None)
    # Only the first '=' separates key and value.
    assert parse_assignment("out=a=b") == ("out", "a=b")


@pytest.mark.parametrize("text", ["federation.rounds", "=3", "  =3"])
def test_parse_assignment_requires_key_and_equals(text):
    with pytest.raises(MedfedError, match="key=value"):
        parse_assignment(text)


def test_parse_assignment_bad_yaml_value():
    with pytest.raises(MedfedError, match="cannot read value"):
        parse_assignment("out=[1, 2")


@pytest.mark.parametrize("text, section, key, expected, kind", [
    ("federation.rounds=20", "federation", "rounds", 20, int),
    ("model.freeze=3", "model", "freeze", "3", str),
    ("model.freeze=all", "model", "freeze", "all", str),
    ("train.lr=0.001", "train", "lr", 0.001, float),
    ("train.lr=1.0e-3", "train", "lr", 0.001, float),
    ("train.lr=2", "train", "lr", 2.0, float),
    ("data.augment=false", "data", "augment", False, bool),
    ("data.data_dir=/tmp/x", "data", "data_dir", "/tmp/x", str),
    ("data.data_dir=null", "data", "data_dir", None, type(None)),
])
def test_set_value_coerces_types(text, section, key, expected, kind):
    value = getattr(getattr(_apply(text), section), key)
    assert type(value) is kind
    assert value == (pytest.approx(expected) if kind is float else expected)


def test_set_value_top_level_keys():
    assert _apply("seed=5").seed == 5
    assert _apply("out=runs/x").out == "runs/x"


def test_set_value_exponent_float_without_dot():
    config = _apply("train.lr=1e-3")
    assert config.train.lr == pytest.approx(1e-3)


def test_unknown_top_level_key_lists_allowed():
    with pytest.raises(MedfedError) as info:
        set_value(Config(), "federashun.rounds", 3)
    message = str(info.value)
    assert "federashun.rounds" in message
    for section in ("data", "partition", "model", "train", "federation", "simulation", "seed"):
        assert section in message


def test_unknown_key_inside_section_lists_section_keys():
    with pytest.raises(MedfedError) as info:
        set_value(Config(), "train.learning_rate", 0.1)
    message = str(info.value)
    assert "train.learning_rate" in message
    for field in dataclasses.fields(Config().train):
        assert f"train.{field.name}" in message


@pytest.mark.parametrize("dotted", ["train", "train.lr.extra", "seed.x"])
def test_wrong_depth_is_unknown(dotted):
    with pytest.raises(MedfedError, match="unknown key"):
        set_value(Config(), dotted, 1)


@pytest.mark.parametrize("dotted, value, expected", [
    ("federation.rounds", "ten", "int"),
    ("federation.rounds", 2.5, "int"),
    ("federation.rounds", True, "int"),
    ("train.lr", "fast", "float"),
    ("train.lr", True, "float"),
    ("data.augment", 1, "bool"),
    ("model.freeze", [1, 2], "str"),
    ("model.weights", None, "str"),
    ("data.data_dir", 3.5j, "str or null"),
])
def test_wrong_type_names_key_and_value(dotted, value, expected):
    with pytest.raises(MedfedError) as info:
        set_value(Config(), dotted, value)
    message = str(info.value)
    assert f"'{dotted}'" in message
    assert repr(value) in message
    assert f"expected {expected}" in message


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("dotted, value, allowed_fragment", [
    ("partition.alpha", 0.0, "> 0"),
    ("partition.alpha", -1.0, "> 0"),
    ("federation.strategy", "fedsgd", "fedavg"),
    ("data.dataset", "chestmnist", "multi-label"),
    ("data.dataset", "mnist", "pneumoniamnist"),
    ("data.image_size", 28, "at least 32"),
    ("partition.sites", 1, "2 or more"),
    ("model.freeze", "-1", "'all'"),
    ("model.freeze", "two", "'all'"),
    ("model.freeze", "", "'all'"),
    ("model.bn", "fedbn", "avg, local"),
    ("data.resolution", 32, "28, 64, 128, 224"),
    ("partition.scheme", "shards", "iid, dirichlet"),
    ("train.lr", 0.0, "> 0"),
    ("federation.lr_factor", 1.0, "0 < value < 1"),
    ("federation.trim_fraction", 0.5, "0 <= value < 0.5"),
])
def test_validate_rejects_with_key_value_and_allowed(dotted, value, allowed_fragment):
    config = Config()
    section, key = dotted.split(".")
    setattr(getattr(config, section), key, value)
    with pytest.raises(MedfedError) as info:
        validate(config)
    message = str(info.value)
    assert f"'{dotted}'" in message
    assert repr(value) in message
    assert "allowed:" in message
    assert allowed_fragment in message.split("allowed:", 1)[1]


def test_validate_chestmnist_not_offered_as_allowed():
    config = Config()
    config.data.dataset = "chestmnist"
    with pytest.raises(MedfedError) as info:
        validate(config)
    allowed = str(info.value).split("allowed:", 1)[1].split("(")[0]
    assert "chestmnist" not in allowed
    assert "breastmnist" in allowed


@pytest.mark.parametrize("dotted, value", [
    ("model.freeze", "all"), ("model.freeze", "0"), ("model.freeze", "5"),
    ("data.image_size", 32), ("partition.sites", 2), ("partition.alpha", 1e-3),
    ("federation.patience", 0), ("federation.strategy", "fedyogi"),
])
def test_validate_accepts_boundaries(dotted, value):
    config = Config()
    section, key = dotted.split(".")
    setattr(getattr(config, section), key, value)
    assert validate(config) is config


def test_parse_freeze():
    assert parse_freeze("all") is None
    assert parse_freeze("0") == 0
    assert parse_freeze("4") == 4


# --- JSON wire form ----------------------------------------------------------------------------

def test_json_round_trip_defaults():
    config = Config()
    assert Config.from_json(config.to_json()) == config


def test_json_round_trip_changed_values():
    config = Config(
        model=ModelConfig(backbone="test_resnet", weights="none", freeze="all", bn="local"),
        federation=FederationConfig(strategy="fedadam", rounds=3, server_lr=0.05, patience=0),
        seed=11, out="runs/here",
    )
    config.data.data_dir = "/data/medmnist"
    config.train.lr = 3e-4
    again = Config.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()
    assert isinstance(again.federation.server_lr, float)
    assert again.model.freeze == "all"


# --- shipped configs ---------------------------------------------------------------------------

_SHIPPED = sorted(CONFIG_DIR.glob("*.yaml")) + sorted(CONFIG_DIR.glob("*.yml"))


@pytest.mark.skipif(not _SHIPPED, reason=f"no YAML configs under {CONFIG_DIR} yet")
@pytest.mark.parametrize("path", _SHIPPED, ids=[p.name for p in _SHIPPED])
def test_shipped_configs_load_and_validate(path):
    config = validate(load_yaml(path))
    assert isinstance(config, Config)
