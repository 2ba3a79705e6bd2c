"""One home for evaluation results: ``pvit evaluate`` without ``--out`` writes where the
pipeline's evaluate stage does (``training.run_layout.evaluation_file``), through the
same stage record, so each finds the other's result and neither refuses the other's
directory. (tests/flows/test_pipeline.py runs it with the real pipeline.)"""

import json

import pytest
import yaml
from typer.testing import CliRunner

from flows import stage_cache
from flows.cli import app
from flows.evaluation_home import evaluation_key
from flows.experiment import load_experiment
from flows.pipeline import wire
from training.config import FinetuneConfig
from training.run_layout import RunLayout, evaluation_dir, evaluation_file
from training.train import run_finetune

runner = CliRunner()

TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, log_every=1, batch_size=3, epochs=1, lr=1e-3)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, toy_set):
    """A finished fine-tuning run and an experiment file naming it."""
    tmp = tmp_path_factory.mktemp("home")
    cfg = FinetuneConfig(**dict(TINY, out=str(tmp / "fine"), synthetic=None,
                                synthetic_ratio=0.0, variant="vit",
                                data_root=toy_set["list_root"], frame_stride=3, val_split=""))
    run_finetune(cfg)
    exp = tmp / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "finetune": dict(TINY, out=cfg.out, synthetic=None, synthetic_ratio=0.0, variant="vit",
                         data_root=toy_set["list_root"], frame_stride=3, val_split=""),
        "evaluate": {"data_root": toy_set["list_root"], "temporal_clips": 1,
                     "spatial_crops": 1, "num_workers": 0}}))
    return RunLayout(cfg.out), exp


def test_run_layout_names_the_files_of_a_run(tmp_path):
    layout = RunLayout(str(tmp_path / "r"))
    assert layout.last_checkpoint == tmp_path / "r" / "checkpoints" / "last.pt"
    assert layout.relative(layout.final_checkpoint) == "checkpoints/final.pt"
    assert evaluation_file(layout.final_checkpoint, "val") == \
        tmp_path / "r" / "checkpoints" / "evaluate" / "eval_val.json"
    # another checkpoint of the run gets its own file, beside
    assert evaluation_file(layout.last_checkpoint, "val").name == "eval_last_val.json"


def test_pvit_evaluate_writes_where_the_pipeline_looks_and_records_it(finetuned):
    layout, exp = finetuned
    home = evaluation_dir(layout.final_checkpoint)
    result = runner.invoke(app, ["evaluate", str(layout.final_checkpoint), "--config", str(exp)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["out"] == str(evaluation_file(layout.final_checkpoint, "validation"))
    assert json.loads((home / "eval_validation.json").read_text())["top1"] == printed["top1"]

    # the pipeline's evaluate stage, wired as `pvit pipeline` wires it, finds it done
    wired = wire(load_experiment(exp, {}, None))
    assert evaluation_dir(wired.evaluate.checkpoint) == home
    assert stage_cache.state(home, evaluation_key(wired.evaluate)) == "done"

    # another split lands beside it: nothing is cleared, and the directory stays one a
    # later pipeline run accepts (it evaluates its split again, into the same file)
    other = runner.invoke(app, ["evaluate", str(layout.final_checkpoint), "--config", str(exp),
                                "--split", "train"])
    assert other.exit_code == 0, other.output
    assert {p.name for p in home.glob("eval_*.json")} == {"eval_validation.json",
                                                          "eval_train.json"}
    assert stage_cache.foreign(home) is None
    assert stage_cache.state(home, evaluation_key(wired.evaluate)) == "stale"


def test_a_foreign_directory_in_the_evaluation_home_is_refused(tmp_path, finetuned):
    layout, exp = finetuned
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(layout.root / "checkpoints", run / "checkpoints",
                    ignore=shutil.ignore_patterns("evaluate"))
    home = run / "checkpoints" / "evaluate"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["evaluate", str(run / "checkpoints" / "final.pt"),
                                 "--config", str(exp)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: evaluate.out: "), lines
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    # with --out the result goes where it is told, and the foreign directory is not read
    told = runner.invoke(app, ["evaluate", str(run / "checkpoints" / "final.pt"),
                               "--config", str(exp), "--out", str(tmp_path / "e.json")])
    assert told.exit_code == 0, told.output
    assert (tmp_path / "e.json").is_file()
