"""Every training stage with its ``out`` on a bucket (issue 25, item 1), against a real S3
API server on 127.0.0.1 (moto, ``tests/moto_s3.py``): the run's files, its checkpoints
and its stage record all land there and nowhere else but scratch; a killed run resumes
from the bucket's ``last.pt`` exactly; fine-tuning starts from an ``s3://`` checkpoint on
an action set uploaded to the bucket; evaluation reads ``s3://`` and writes its result
there; the flow finds a finished stage on the bucket and reuses it (Cached); an ``out``
this installation cannot write is refused with one line before any stage runs.

Tiny runs only: ``pvit_test``, 32 px, drawn shards (``training.drawn_clips``)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from moto_s3 import keys, running_s3
from typer.testing import CliRunner

from flows.cli import app
from training import files
from training.checkpoint import load_checkpoint
from training.config import FinetuneConfig, PretrainConfig
from training.run_files import read_metrics
from training.train import run_finetune, run_pretrain

BUCKET = "pvit-runs"
RUN = f"s3://{BUCKET}/runs/pre"
TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, log_every=1, dropout=0.3, drop_path=0.2, head_dropout=0.2)
RUN_FILES = {".pvit-run", "config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png",
             "inference.safetensors", "checkpoints/last.pt", "checkpoints/final.pt"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("scratch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PVIT_SCRATCH", str(scratch))    # what may be written locally
        with running_s3(BUCKET) as env:
            yield {"env": env, "scratch": scratch}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """The working directory, empty: a bucket's run must write nothing here (a ``Path``
    of ``s3://b/p`` would make ``./s3:/b/p``)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def pretrain_cfg(out, shards, **kw) -> PretrainConfig:
    return PretrainConfig(**{**TINY, "out": str(out), "synthetic": str(shards), "epochs": 2,
                             "batch_size": 4, "lr": 2e-3, "warmup_epochs": 0.5,
                             "checkpoint_every": 1, **kw})


@pytest.fixture(scope="module")
def bucket_run(s3, shard_dir, tmp_path_factory):
    """A pretrain run on the bucket, killed after 3 of its 4 steps and started again, and
    the same run uninterrupted in a local directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        cfg = pretrain_cfg(RUN, shard_dir)
        run_pretrain(cfg, stop_after=3)
        killed = {"keys": keys(RUN), "step": load_checkpoint(f"{RUN}/checkpoints/last.pt")["step"]}
        resumed = run_pretrain(cfg)
        local_cwd = sorted(p.name for p in cwd.iterdir())
    full = run_pretrain(pretrain_cfg(tmp_path_factory.mktemp("local") / "pre", shard_dir))
    return {"killed": killed, "resumed": resumed, "full": full, "cwd": local_cwd}


def test_a_run_on_a_bucket_writes_only_there_and_resumes_from_its_last_checkpoint(bucket_run):
    killed, resumed, full = bucket_run["killed"], bucket_run["resumed"], bucket_run["full"]
    assert killed["step"] == 3 and "checkpoints/final.pt" not in killed["keys"]
    assert keys(RUN) == RUN_FILES
    assert bucket_run["cwd"] == []                       # nothing local but scratch
    assert resumed["checkpoint"] == f"{RUN}/checkpoints/final.pt"
    assert resumed["inference_weights"] == f"{RUN}/inference.safetensors"
    # resumed from the bucket's last.pt: step for step what the uninterrupted run did
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=0)
    assert resumed["losses"] == full["losses"]
    local = Path(full["checkpoint"]).parents[1]
    assert [r["step"] for r in read_metrics(f"{RUN}/metrics.jsonl")] == \
           [r["step"] for r in read_metrics(local / "metrics.jsonl")]
    assert json.loads(files.read_bytes(f"{RUN}/summary.json"))["steps"] == 4
    assert files.read_bytes(f"{RUN}/loss_curve.png").startswith(b"\x89PNG")


def test_finetune_from_an_s3_init_on_a_set_in_the_bucket_and_evaluate_there(
        bucket_run, s3, shard_dir, empty_cwd):
    from training.toy_actions import write_toy_actions

    toy = f"s3://{BUCKET}/sets/toy"
    summary = write_toy_actions(toy, clips_per_class=3, val_per_class=1, size=48, frames=16)
    assert summary["list_root"] == f"{toy}/list"
    held = keys(toy)
    assert {".toy_actions", "list/train.txt", "ssv2/labels/labels.json"} <= held
    assert sum(k.endswith(".mp4") for k in held) == sum(k.endswith(".webm") for k in held) == 18

    fine = f"s3://{BUCKET}/runs/fine"
    cfg = FinetuneConfig(**{**TINY, "out": fine, "synthetic": str(shard_dir), "epochs": 1,
                            "batch_size": 3, "lr": 2e-3, "frame_stride": 3,
                            "data_root": summary["list_root"],
                            "init": f"{RUN}/checkpoints/final.pt"})
    result = run_finetune(cfg)
    assert result["val_clips"] == 6 and 0 <= result["top1"] <= 100
    assert RUN_FILES <= keys(fine)
    # evaluate reads the checkpoint and the set from the bucket, writes its home there
    evaluated = CliRunner().invoke(app, ["evaluate", f"{fine}/checkpoints/final.pt",
                                         "--data-root", summary["ssv2_root"], "--data-format",
                                         "ssv2", "--spatial-crops", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    home = f"{fine}/checkpoints/evaluate"
    assert {"evaluate/.stage.json", "evaluate/eval_validation.json"} <= \
           {k.split("/", 1)[1] for k in keys(fine) if k.startswith("checkpoints/")}
    written = json.loads(files.read_bytes(f"{home}/eval_validation.json"))
    assert written["checkpoint"] == f"{fine}/checkpoints/final.pt"
    assert json.loads(evaluated.output)["out"] == f"{home}/eval_validation.json"
    assert written["single_view"]["clips"] == 6
    assert list(empty_cwd.iterdir()) == []
    # the set was read from this node's scratch copy, never from a local out
    assert any(p.name.startswith(files.MIRROR_PREFIX) for p in s3["scratch"].iterdir())


def test_a_rerun_of_a_stage_on_the_bucket_is_reused(s3, shard_dir, empty_cwd):
    from flows.train import pretrain

    out = f"s3://{BUCKET}/runs/cached"
    cfg = pretrain_cfg(out, shard_dir, epochs=1, checkpoint_every=0)
    first = pretrain(cfg, return_state=True)
    assert first.name == "Completed" and first.message == f"computed into {out}"
    record = json.loads(files.read_bytes(f"{out}/.stage.json"))
    assert record["status"] == "done" and record["outputs"] == ["checkpoints/final.pt",
                                                                "summary.json"]
    again = pretrain(cfg, return_state=True)
    assert again.name == "Cached" and "nothing recomputed" in again.message
    assert again.result() == record["summary"]
    assert list(empty_cwd.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("gs://pvit-runs/pre", "pretrain.out: gs:// needs the gcsfs package"),
    (f"s3://no-such-bucket-{BUCKET}/pre", "pretrain.out: cannot write s3://no-such-bucket"),
    ("https://example.com/runs/pre", "is not a dataset location"),
])
def test_an_out_the_stage_cannot_write_is_one_line_before_training(s3, shard_dir, empty_cwd,
                                                                    out, message):
    config = empty_cwd.parent / "exp.yaml"
    config.write_text(yaml.safe_dump({"pretrain": {**TINY, "synthetic": str(shard_dir)}}))
    result = CliRunner().invoke(app, ["pretrain", str(config), "--out", out])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert list(empty_cwd.iterdir()) == []


def test_the_pipeline_refuses_a_stage_out_it_cannot_write_before_any_stage(s3, tmp_path):
    shards = tmp_path / "shards"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "generation": {"out": str(shards), "scenes": 2},
        "toy_actions": {"out": f"s3://{BUCKET}/sets/pipeline-toy"},
        "pretrain": {**TINY, "out": "gs://pvit-runs/pre"}}))
    result = CliRunner().invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: pretrain.out: gs:// needs the gcsfs package (pip "
                                     "install gcsfs, or the project's 'gcs' extra)")
    assert not shards.exists() and keys(f"s3://{BUCKET}/sets/pipeline-toy") == set()


def test_the_pipeline_refuses_an_evaluate_out_it_cannot_write_before_any_stage(s3, tmp_path):
    # evaluate.out gets a copy of the result (flows.train.copy_result): checked up front
    shards = tmp_path / "shards"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "generation": {"out": str(shards), "scenes": 2},
        "toy_actions": {"out": f"s3://{BUCKET}/sets/pipeline-eval-toy"},
        "pretrain": {**TINY, "out": f"s3://{BUCKET}/runs/pipeline-pre"},
        "finetune": {**TINY, "out": f"s3://{BUCKET}/runs/pipeline-fine"},
        "evaluate": {"out": f"s3://no-such-bucket-{BUCKET}/eval.json"}}))
    result = CliRunner().invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: evaluate.out: cannot write s3://no-such-bucket-{BUCKET}"), lines
    assert not shards.exists() and keys(f"s3://{BUCKET}/sets/pipeline-eval-toy") == set()


def test_the_pipeline_refuses_a_bucket_input_that_is_not_there_before_any_stage(s3, tmp_path):
    # a downstream set of the finetune stage's own on the bucket, and no such prefix
    shards = tmp_path / "shards"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "generation": {"out": str(shards), "scenes": 2},
        "pretrain": {**TINY, "out": f"s3://{BUCKET}/runs/pipeline-in-pre"},
        "finetune": {**TINY, "out": f"s3://{BUCKET}/runs/pipeline-in-fine",
                     "data_root": f"s3://{BUCKET}/sets/nothing-here/list"}}))
    result = CliRunner().invoke(app, ["pipeline", str(config)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: finetune.data_root: s3://{BUCKET}/sets/nothing-"
                                     "here/list does not exist and no stage of this pipeline "
                                     "makes it")
    assert not shards.exists()
    assert not [k for k in keys(f"s3://{BUCKET}/runs") if k.startswith("pipeline-in-")]


def test_the_metrics_log_on_a_bucket_is_uploaded_in_batches(s3, monkeypatch):
    """An object cannot be appended to: a log that uploaded itself whole at every line cost
    a long run uploads growing with the square of its length. Step lines wait for the
    interval; an epoch line and flush() (before each checkpoint) upload them."""
    from training.run_files import MetricsLog
    url = f"s3://{BUCKET}/runs/metrics-batches/metrics.jsonl"
    monkeypatch.setattr(MetricsLog, "REMOTE_FLUSH_S", 3600.0)
    log = MetricsLog(url)
    for step in range(1, 51):
        log.write({"kind": "step", "step": step})
    assert read_metrics(url) == []
    log.flush()
    assert [r["step"] for r in read_metrics(url)] == list(range(1, 51))
    log.write({"kind": "epoch", "step": 50})
    assert read_metrics(url)[-1] == {"kind": "epoch", "step": 50}
    monkeypatch.setattr(MetricsLog, "REMOTE_FLUSH_S", 0.0)
    log.write({"kind": "step", "step": 51})       # the interval has passed: uploaded
    assert read_metrics(url)[-1]["step"] == 51
    # a resumed run keeps the lines up to its checkpoint's step
    assert [r["step"] for r in read_metrics(MetricsLog(url, resume_step=50).path)] == \
        list(range(1, 51)) + [50]
