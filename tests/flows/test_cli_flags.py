"""Flags that alias experiment-file keys (``flows.cli_common.ConfigFlags``): one table
per command gives the option (type and help from the field) and the override."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import GENERATE_FLAGS, app
from flows.cli_common import ConfigFlags
from flows.commands import EVALUATE_FLAGS, FINETUNE_FLAGS, PRETRAIN_FLAGS


def _options(command: str) -> list[str]:
    """The options of ``command``, in the order --help lists them."""
    params = typer.main.get_command(app).commands[command].params
    return [p.opts[0] for p in params if p.param_type_name == "option"]


@pytest.mark.parametrize("command, flags, own", [
    ("generate", GENERATE_FLAGS, ["--break-lock", "--set"]),
    ("pretrain", PRETRAIN_FLAGS, ["--set"]),
    ("finetune", FINETUNE_FLAGS, ["--set"]),
    ("evaluate", EVALUATE_FLAGS, ["--config", "--set"]),
])
def test_the_table_is_the_command_line(command, flags, own):
    table = ["--" + name.replace("_", "-") for name in flags.keys]
    assert _options(command) == table + own


def test_type_help_and_override_come_from_the_field():
    flags = ConfigFlags({"frames": "generation.scene.frames", "out": "generation.out",
                         "device": "generation.device", "overwrite": "generation.overwrite",
                         "init": ("pretrain.init", Path)})
    params = {p.name: p for p in flags.parameters}
    assert params["device"].default.help.endswith("(auto | cpu | cuda | optix)")
    assert params["frames"].default.help.startswith("frames per clip")
    assert params["overwrite"].annotation is bool            # a flag, not --overwrite VALUE
    # a path is parsed as the text given (a Path would collapse file://HOST/p), shown as PATH
    assert params["init"].annotation == Optional[str]
    assert params["init"].default.metavar == "PATH"
    given = flags.overrides({"frames": 3, "out": Path("d"), "device": None, "overwrite": False,
                             "init": Path("w.pt")})
    assert given == {"generation.scene.frames": 3, "generation.out": "d",
                     "pretrain.init": "w.pt"}
    assert flags.overrides({"frames": None, "out": None, "device": "cpu", "overwrite": True,
                            "init": None}) == {"generation.device": "cpu",
                                               "generation.overwrite": True}


@pytest.mark.parametrize("table, message", [
    ({"nope": "generation.nope"}, "generation.nope: not a key"),
    ({"fps": "generation.scene.fps"}, "no Field(description=...)"),
])
def test_a_bad_table_fails_at_import(table, message):
    with pytest.raises((KeyError, ValueError), match=re.escape(message)):
        ConfigFlags(table)


def test_a_bad_choice_is_one_line_naming_the_key(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("generation: {}\n")
    result = CliRunner().invoke(app, ["generate", str(config), "--device", "metal"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "generation.device" in lines[0]
