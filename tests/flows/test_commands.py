"""The training commands through the real ``pvit`` typer app."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()

TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, log_every=1, batch_size=3, epochs=1, lr=1e-3)


@pytest.fixture
def experiment(tmp_path, shard_dir, toy_set):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "pretrain": dict(TINY, out=str(tmp_path / "pre"), synthetic=str(shard_dir)),
        "finetune": dict(TINY, out=str(tmp_path / "fine"), synthetic=str(shard_dir),
                         data_root=toy_set["list_root"], frame_stride=3,
                         init=str(tmp_path / "pre" / "checkpoints" / "final.pt")),
    }))
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_pretrain_finetune_evaluate_from_one_experiment_file(tmp_path, experiment, toy_set):
    result = invoke("pretrain", experiment, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pre" / "summary.json").is_file()
    result = invoke("finetune", experiment)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "fine" / "summary.json").read_text())
    assert "top1" in summary and "top5" in summary
    ckpt = tmp_path / "fine" / "checkpoints" / "final.pt"
    # the same set in the SSv2 layout (webm) evaluates the list-trained model
    result = invoke("evaluate", ckpt, "--data-format", "ssv2", "--data-root",
                    toy_set["ssv2_root"], "--temporal-clips", 2, "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["multi_view"]["views_per_clip"] == 6 and scores["single_view"]["clips"] == 6


@pytest.mark.parametrize("args, message", [
    (["pretrain", "{exp}", "--synthetic", "{tmp}/nowhere"], "no such shard directory"),
    (["pretrain", "{exp}", "--variant", "vit"], "variant"),
    (["pretrain", "{tmp}/missing.yaml"], "not found"),
    (["finetune", "{exp}", "--data-root", "{tmp}"], "list file"),
    (["finetune", "{exp}", "--init", "{tmp}/none.pt"], "init"),
    (["finetune", "{exp}", "--data-format", "kinetics"], "data_format"),
    (["evaluate", "{tmp}/none.pt", "--data-root", "{tmp}"], "no such file"),
    (["evaluate", "{tmp}/none.pt"], "data_root"),
])
def test_bad_input_exits_2_with_one_line_before_training(tmp_path, experiment, args, message):
    result = invoke(*[a.format(exp=experiment, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "pre" / "metrics.jsonl").exists()


def test_a_checkpoint_of_another_size_is_refused_before_training(tmp_path, experiment, shard_dir):
    assert invoke("pretrain", experiment).exit_code == 0
    # the same run dir with a wider model: resume would hit a shape error; it is named
    result = invoke("pretrain", experiment, "--model", "pvit_tiny")
    assert result.exit_code == 2
    assert "pvit_test" in result.output and "pvit_tiny" in result.output


def test_rerunning_into_a_run_dir_with_another_config_is_refused(tmp_path, experiment):
    assert invoke("pretrain", experiment).exit_code == 0
    result = invoke("pretrain", experiment, "--epochs", 3)
    assert result.exit_code == 2 and "epochs=1" in result.output and "new --out" in result.output


def test_an_out_holding_someone_elses_files_is_refused_and_kept(tmp_path, experiment):
    # issue 24: training wrote config.yaml, summary.json and metrics.jsonl over the
    # user's own files (exit 0); the pipeline already refused such a directory
    out = tmp_path / "pre"
    (out / "my_plots").mkdir(parents=True)
    (out / "config.yaml").write_text("mine\n")
    (out / "NOTES.txt").write_text("notes\n")
    result = invoke("pretrain", experiment)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pretrain.out:" in lines[0] and "not a pvit run" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.txt", "config.yaml", "my_plots"]
    assert (out / "config.yaml").read_text() == "mine\n"


def test_a_run_directory_is_marked_and_resumes(tmp_path, experiment):
    assert invoke("pretrain", experiment).exit_code == 0
    assert (tmp_path / "pre" / ".pvit-run").is_file()
    # its own run: accepted again (done, same config: a resume that has nothing to do)
    result = invoke("pretrain", experiment)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage, message", [
    (lambda state: state.pop("scheduler"), "'scheduler' is missing"),
    (lambda state: state.update(rng=[{"torch": state["rng"][0]["torch"]}]), "'rng' lacks"),
])
def test_a_damaged_last_checkpoint_is_one_line_not_a_keyerror(tmp_path, experiment, damage,
                                                               message):
    import torch
    assert invoke("pretrain", experiment, "--set", "pretrain.epochs=2",
                  "--set", "pretrain.checkpoint_every=1").exit_code == 0
    last = tmp_path / "pre" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    damage(state)
    torch.save(state, last)
    result = invoke("pretrain", experiment, "--set", "pretrain.epochs=2",
                    "--set", "pretrain.checkpoint_every=1")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is damaged" in lines[0] and message in lines[0], lines


def test_a_loss_that_becomes_non_finite_stops_the_run_with_one_line(tmp_path, experiment):
    # issue 24: a diverging run trained on with a nan loss and exited 0
    result = invoke("pretrain", experiment, "--set", "pretrain.lr=1e30",
                    "--set", "pretrain.warmup_epochs=0", "--set", "pretrain.epochs=3")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines()
             if line.strip() and line.startswith("error")]
    assert len(lines) == 1 and "the loss is not finite at step" in lines[0], result.output
    assert not (tmp_path / "pre" / "checkpoints" / "final.pt").exists()
