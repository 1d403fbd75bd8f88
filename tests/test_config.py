from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from aigc import config
from aigc.errors import ConfigError


@dataclass
class Opt:
    lr: float = 1e-3
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.95)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    max_time: float | None = None
    compile: bool = False


@dataclass
class Model:
    n_layer: int = 2
    name: str = "gpt"


@dataclass
class Run:
    model: Model = field(default_factory=Model)
    train: Opt = field(default_factory=Opt)


def test_defaults_and_overrides():
    cfg = config.resolve(
        Run, overrides=["train.lr=3e-4", "--model.n_layer=4", "train.max_time=90", "train.compile=true"]
    )
    assert cfg.train.lr == 3e-4 and cfg.model.n_layer == 4
    assert cfg.train.max_time == 90.0 and isinstance(cfg.train.max_time, float)
    assert cfg.train.compile is True
    assert cfg.train.betas == (0.9, 0.95)


def test_tuple_and_literal_overrides():
    cfg = config.resolve(
        Run, overrides=["train.betas=[0.8, 0.99]", "train.precision=fp32", "model.name=lstm"]
    )
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.train.precision == "fp32"
    assert cfg.model.name == "lstm"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key train\.lrr.*valid keys in train: .*lr"):
        config.resolve(Run, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="valid keys: model, train"):
        config.resolve(Run, overrides=["optim.lr=1"])


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        config.resolve(Run, overrides=["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
        config.resolve(Run, overrides=["train.steps=1.5"])
    with pytest.raises(ConfigError, match="expected one of 'auto' | 'bf16' | 'fp32'"):
        config.resolve(Run, overrides=["train.precision=fp16"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        config.resolve(Run, overrides=["train.lr"])


def test_round_trip_and_diff(tmp_path):
    cfg = config.resolve(Run, overrides=["train.lr=0.01"])
    path = config.save_config(cfg, tmp_path / "config.json")
    again = config.load_config(Run, path)
    assert again == cfg
    other = config.resolve(Run, overrides=["model.n_layer=3"])
    assert config.diff(cfg, other) == ["model.n_layer: 2 -> 3", "train.lr: 0.01 -> 0.001"]
    assert "train.lr" in config.valid_keys(Run)


def test_preset_from_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[train]\nlr = 0.5\n[model]\nn_layer = 6\n")
    cfg = config.resolve(Run, family="gpt", preset=str(p), overrides=["train.lr=0.25"])
    assert cfg.model.n_layer == 6 and cfg.train.lr == 0.25


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        config.resolve(Run, family="gpt", preset="huge")


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_every_shipped_preset_parses(family):
    names = config.list_presets(family)
    assert {"tiny", "small", "base"} <= set(names)
    for name in names:
        assert isinstance(config.load_preset(family, name), dict)
