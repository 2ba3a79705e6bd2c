"""Bad experiment files and values: one ``error:`` line, exit 2, nothing run (issue 24)."""

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.experiment import MAX_ERROR_CHARS, ConfigError, load_experiment

runner = CliRunner()


def one_error_line(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"\xff\xfe\x00binary\x00", "not UTF-8 text"),
    (b"generation: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
])
def test_a_bad_file_is_one_line_on_every_command(tmp_path, content, message):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    for command in ("generate", "pipeline", "pretrain"):
        assert message in one_error_line(command, path)
    assert not (tmp_path / "data").exists()


def test_a_huge_file_is_refused_unread_and_errors_quote_little(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"generation:\n  seed: 1\n" + b"# padding\n" * 200_000)
    assert "more than 1 MiB" in one_error_line("generate", path)
    path.write_text("generation:\n  out: " + "x" * 900_000 + "\n  scenes: oops\n")
    line = one_error_line("generate", path)
    assert "scenes" in line or "out" in line
    assert len(line) <= len("error: ") + MAX_ERROR_CHARS


@pytest.mark.parametrize("setting, field", [
    ("pretrain.lr=.inf", "pretrain.lr"),
    ("pretrain.min_lr=.nan", "pretrain.min_lr"),
    ("pretrain.loss_weights.depth=.inf", "depth"),
    ("pretrain.seed=-5", "pretrain.seed"),
    (f"pretrain.seed={2**63}", "pretrain.seed"),
    ("pretrain.img_size=1000000", "pretrain.img_size"),
    ("generation.scenes=.inf", "generation.scenes"),
])
def test_non_finite_and_out_of_range_values_are_refused(setting, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(None, None, [setting, "pretrain.synthetic=null"]).require("pretrain")
