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


# --- every command that reads the experiment file takes --set --------------------------
COMMANDS = {
    # command line (without --set)       a good --set whose effect shows in the error
    "generate": (["generate", str(DEMO)], "generation.scene.resolution=0",
                 "generation.scene.resolution"),
    "pipeline": (["pipeline", str(DEMO)], "pretrain.model=no_such_model",
                 "model: unknown 'no_such_model'"),
    "pretrain": (["pretrain", str(DEMO)], "pretrain.synthetic=/no/such/dataset",
                 "/no/such/dataset"),
    "finetune": (["finetune", str(DEMO)], "finetune.data_root=/no/such/videos",
                 "/no/such/videos"),
    # without the --set, evaluate stops at "data_root: evaluation needs a downstream data
    # set"; with it, the next check (the checkpoint) speaks
    "evaluate": (["evaluate", "/no/such/ckpt.pt"], "evaluate.data_root=/no/such/videos",
                 "ckpt.pt"),
    "serve": (["serve", str(DEMO)], "finetune.lr=-1", "finetune.lr"),
}


def _cli(args):
    from typer.testing import CliRunner

    from flows.cli import app
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_set(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo's relative outputs (data/, runs/) land here
    args, good, shown = COMMANDS[command]
    result = _cli(args + ["--set", good])
    assert result.exit_code == 2, result.output
    assert shown in result.output  # the value given by --set is the one checked
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    section = good.split(".")[0]
    unknown = _cli(args + ["--set", f"{section}.no_such_key=1"])
    assert unknown.exit_code == 2, unknown.output
    assert f"{section}.no_such_key: unknown key" in unknown.output
