"""``--set key=value``: the generic override every command takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.experiment import ConfigError, load_experiment, parse_set

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_values_are_read_as_yaml():
    assert parse_set(["a.b=null", "a.c=[depth, normals]", "a.d=3", "a.e=x=y"]) == [
        ("a.b", None), ("a.c", ["depth", "normals"]), ("a.d", 3), ("a.e", "x=y")]


def test_set_overrides_the_file_and_can_clear_a_value():
    cfg = load_experiment(DEMO, sets=["finetune.init=null", "finetune.lr=1e-4",
                                      "generation.scene.frames=3"])
    assert cfg.finetune.init is None
    assert cfg.finetune.lr == pytest.approx(1e-4)
    assert cfg.generation.scene.frames == 3
    base = load_experiment(DEMO)
    assert base.finetune.init is not None and base.finetune.lr != pytest.approx(1e-4)


def test_set_wins_over_a_flag():
    cfg = load_experiment(DEMO, {"pretrain.epochs": 7}, sets=["pretrain.epochs=2"])
    assert cfg.pretrain.epochs == 2


@pytest.mark.parametrize("item, message", [
    ("finetune.bogus=1", "finetune.bogus: unknown key"),
    ("nosuchsection.lr=1", "nosuchsection: unknown key"),
    ("finetune.lr=fast", "finetune.lr:"),
    ("finetune.lr", "expected section.key=value"),
    ("=3", "expected section.key=value"),
    ("finetune..lr=3", "expected section.key=value"),
    ("finetune.lr.x=3", "finetune.lr is a value, not a section"),
    ("finetune.lr=[1", "not valid YAML"),
])
def test_bad_set_is_one_line_naming_it(item, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(DEMO, sets=[item])
    assert message in str(err.value)
    assert "\n" not in str(err.value)
