"""The whole DAG on a tiny experiment: real renders, real training, real Prefect runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect_api import artifacts_of, subflow_runs_of, task_runs_of, top_level_runs
from pvit_cli import pvit

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.blender]

TINY = dict(model="pvit_test", num_frames=2, img_size=32, label_size=16, pose_slots=4,
            num_workers=0, log_every=1, batch_size=2, epochs=1, lr=1e-3)


def experiment(tmp_path: Path, **changes) -> Path:
    data = {
        "generation": {"out": str(tmp_path / "shards"), "scenes": 2, "scenes_per_shard": 1,
                       "workers": 2, "retries": 0,
                       "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3,
                                 "max_objects": 4}},
        "toy_actions": {"out": str(tmp_path / "toy"), "clips_per_class": 3, "val_per_class": 1,
                        "size": 32, "frames": 8},
        "pretrain": dict(TINY, out=str(tmp_path / "pre")),
        "finetune": dict(TINY, out=str(tmp_path / "fine"), frame_stride=3),
        "evaluate": {"spatial_crops": 3, "temporal_clips": 2, "batch_size": 4, "num_workers": 0},
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def pipeline(config: Path, *flags, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", str(config), *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def on_a_laptop() -> dict:
    """The environment of a laptop with no Prefect setup: ``pvit`` starts Prefect's
    temporary server (on the suite's database, so the runs stay readable here)."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """The tiny experiment's dataset, rendered once for the tests that are not about
    rendering: each copies it to its own ``shards`` (its generate stage is then Cached)."""
    root = tmp_path_factory.mktemp("rendered")
    result = pvit("generate", experiment(root))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "shards"


def with_shards(rendered: Path, tmp_path: Path) -> None:
    shutil.copytree(rendered, tmp_path / "shards")


def records(tmp_path: Path) -> dict:
    """mtime of each stage's record: changes exactly when the stage ran."""
    paths = {"toy": tmp_path / "toy", "pre": tmp_path / "pre", "fine": tmp_path / "fine",
             "eval": tmp_path / "fine" / "checkpoints" / "evaluate"}
    out = {name: (p / ".stage.json").stat().st_mtime_ns for name, p in paths.items()}
    out["shards"] = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}
    return out


def check_prefect_view(tmp_path: Path, outcome: str) -> None:
    """The last pipeline run as the UI shows it: named runs and tasks, the stages linked
    generate -> pretrain -> finetune -> evaluate, and a summary on the pipeline's own run
    (a cached one included); ``outcome`` is its final state's name."""
    from flows.run_view import artifact_key

    run = top_level_runs("pipeline", tmp_path / "shards")[-1]
    assert run.name == "pipeline-shards" and run.state.name == outcome
    subflows = subflow_runs_of(run.id)
    assert sorted(subflows) == ["evaluate-fine", "finetune-fine", "generate-shards-2",
                                "pretrain-pre"]
    assert {name: r.state.name for name, (r, _) in subflows.items()} == dict.fromkeys(
        subflows, outcome)

    def upstream(name: str) -> set:
        waits = subflows[name][1].task_inputs.get("wait_for", [])
        return {n for n, (_, parent) in subflows.items() if parent.id in {w.id for w in waits}}
    assert upstream("pretrain-pre") == {"generate-shards-2"}
    assert upstream("finetune-fine") == {"generate-shards-2", "pretrain-pre"}
    assert upstream("evaluate-fine") == {"finetune-fine"}
    if outcome == "Completed":      # a reused stage runs no task
        assert [t.name for t in task_runs_of(subflows["pretrain-pre"][0].id)] == ["pretrain"]
    summary = artifacts_of(run.id)[artifact_key("pipeline-summary", tmp_path / "shards")]
    stages = {row["stage"]: row["outcome"] for row in json.loads(summary.data)}
    assert "evaluate top1" in stages and stages["finetune checkpoint"].endswith("final.pt")
    assert stages["evaluate metrics"].endswith("eval_validation.json")
    assert stages["pretrain"].startswith("reused" if outcome == "Cached" else "computed")


def test_pipeline_runs_caches_and_reruns_only_what_changed(tmp_path):
    cfg = experiment(tmp_path)
    # as `make run` and its rerun on a laptop, with Prefect's temporary server
    first = pipeline(cfg, env=on_a_laptop())
    assert first.returncode == 0, first.stderr[-3000:]
    evaluation = json.loads((tmp_path / "fine" / "checkpoints" / "evaluate" /
                             "eval_validation.json").read_text())
    assert 0 <= evaluation["top1"] <= 100 and evaluation["multi_view"]["views_per_clip"] == 6
    assert str(tmp_path / "fine") in first.stdout + first.stderr   # the final summary
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert summary  # pretrain ran on the rendered shards
    before = records(tmp_path)
    check_prefect_view(tmp_path, "Completed")

    # Nothing changed: nothing renders, nothing trains.
    again = pipeline(cfg, env=on_a_laptop())
    assert again.returncode == 0, again.stderr[-3000:]
    assert records(tmp_path) == before
    assert "up to date" in again.stdout + again.stderr
    check_prefect_view(tmp_path, "Cached")

    # A deployment run's tags reach every stage's run (Prefect gives a subflow only the
    # tags in its context, and a worker runs a deployment's run with none): a run
    # created with tags and run as a worker runs it, by the flow engine.
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.experiment import load_experiment
    from flows.pipeline import pipeline as pipeline_flow
    from flows.run_view import without_heartbeats
    params = {"config": load_experiment(cfg)}
    with get_client(sync_client=True) as client:
        created = client.create_flow_run(pipeline_flow, parameters=params, tags=["nightly"])
    with without_heartbeats():
        run_flow(pipeline_flow, flow_run=created, parameters=params)
    run = top_level_runs("pipeline", tmp_path / "shards")[-1]
    stages = subflow_runs_of(run.id)
    assert "nightly" in run.tags and len(stages) == 4
    assert {name: "nightly" in r.tags for name, (r, _) in stages.items()} == dict.fromkeys(
        stages, True)
    assert records(tmp_path) == before

    # Only the fine-tuning rate changed: finetune and evaluate rerun, nothing else.
    lr = experiment(tmp_path, finetune__lr=5e-4)
    changed = pipeline(lr)
    assert changed.returncode == 0, changed.stderr[-3000:]
    after = records(tmp_path)
    for same in ("toy", "pre", "shards"):
        assert after[same] == before[same], same
    for rerun in ("fine", "eval"):
        assert after[rerun] != before[rerun], rerun

    # More scenes: only the new shard renders, then pretraining (and what follows) reruns.
    more = experiment(tmp_path, finetune__lr=5e-4, generation__scenes=3)
    grown = pipeline(more)
    assert grown.returncode == 0, grown.stderr[-3000:]
    final = records(tmp_path)
    assert {k: final["shards"][k] for k in after["shards"]} == after["shards"]
    assert len(final["shards"]) == 3
    assert final["pre"] != after["pre"] and final["toy"] == after["toy"]

    # --force recomputes one stage (and what depends on it changes only if its output does)
    forced = pipeline(more, "--force", "toy_actions")
    assert forced.returncode == 0
    assert records(tmp_path)["toy"] != final["toy"]
    assert records(tmp_path)["shards"] == final["shards"]


def test_pvit_evaluate_and_the_pipeline_share_one_evaluation_home(tmp_path, rendered):
    """`pvit evaluate` without --out writes where the pipeline's evaluate stage does, with
    the same stage record: a later pipeline run reuses it, and after another split was
    evaluated there the pipeline is not refused and both results stay."""
    with_shards(rendered, tmp_path)
    cfg = experiment(tmp_path)
    first = pipeline(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    home = tmp_path / "fine" / "checkpoints" / "evaluate"
    # the printed metrics path (rich may fold a long path over lines)
    assert str(home / "eval_validation.json") in (first.stdout + first.stderr).replace("\n", "")
    checkpoint = tmp_path / "fine" / "checkpoints" / "final.pt"

    def evaluate(*flags):
        return subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", str(checkpoint),
                               "--config", str(cfg), *flags], cwd=REPO, capture_output=True,
                              text=True, timeout=600)

    again = evaluate()                      # the pipeline's own settings, recomputed
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["out"] == str(home / "eval_validation.json")
    record = (home / ".stage.json").stat().st_mtime_ns
    reused = pipeline(cfg)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert (home / ".stage.json").stat().st_mtime_ns == record   # found it up to date

    other = evaluate("--split", "train")
    assert other.returncode == 0, other.stderr[-3000:]
    after = pipeline(cfg)                   # evaluates its split again, beside train's
    assert after.returncode == 0, after.stderr[-3000:]
    assert {p.name for p in home.glob("eval_*.json")} == {"eval_validation.json",
                                                          "eval_train.json"}
    assert json.loads((home / ".stage.json").read_text())["outputs"] == ["eval_validation.json"]


def test_bad_config_fails_before_any_task(tmp_path):
    cfg = experiment(tmp_path, finetune__lr=-1.0)
    result = pipeline(cfg)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "finetune.lr" in result.stderr
    assert not (tmp_path / "shards").exists()
    bad_force = pipeline(experiment(tmp_path), "--force", "everything")
    assert bad_force.returncode == 2 and "unknown stage" in bad_force.stderr


def test_inputs_no_stage_makes_are_refused_before_any_work_and_set_rewires(tmp_path):
    # a downstream set that does not exist and that no stage makes: refused at once
    missing = experiment(tmp_path, finetune__data_root=str(tmp_path / "nowhere"))
    result = pipeline(missing)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"finetune.data_root: {tmp_path / 'nowhere'} does not exist" in result.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "toy").exists()

    # `--set toy_actions.out=X` moves the set that finetune and evaluate read with it
    from flows.cli_common import load_or_exit
    cfg = load_or_exit(experiment(tmp_path), {}, [f"toy_actions.out={tmp_path / 'moved'}"])
    root = str(tmp_path / "moved" / "set" / "list")
    assert cfg.finetune.data_root == root and cfg.evaluate.data_root == root


def test_failed_stage_names_itself_and_keeps_upstream_outputs(tmp_path, rendered):
    # finetune on another model size than its pretrain checkpoint: a clear error
    with_shards(rendered, tmp_path)
    cfg = experiment(tmp_path, finetune__model="pvit_tiny")
    result = pipeline(cfg)
    assert result.returncode == 1
    assert "stage finetune failed" in result.stderr
    assert (tmp_path / "pre" / "checkpoints" / "final.pt").is_file()
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 2
    # fixing the config reuses the shards and the pretrain run
    pre = (tmp_path / "pre" / ".stage.json").stat().st_mtime_ns
    fixed = pipeline(experiment(tmp_path))
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (tmp_path / "pre" / ".stage.json").stat().st_mtime_ns == pre


def test_killed_pipeline_resumes_without_redoing_finished_stages(tmp_path, rendered):
    import signal
    import time

    with_shards(rendered, tmp_path)
    cfg = experiment(tmp_path, pretrain__epochs=3)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "pipeline", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    record = tmp_path / "pre" / ".stage.json"
    deadline = time.time() + 600
    while time.time() < deadline and not (record.exists() and (tmp_path / "pre" /
                                                               "metrics.jsonl").exists()):
        time.sleep(0.2)
    assert record.exists(), "pretraining never started"
    os.killpg(proc.pid, signal.SIGKILL)        # mid-pretraining
    proc.wait()
    assert json.loads(record.read_text())["status"] == "running"
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")}
    toy = (tmp_path / "toy" / ".stage.json").stat().st_mtime_ns

    killed = json.loads(record.read_text())["run"]["flow_run_id"]
    rerun = pipeline(cfg)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # the killed client's runs no longer show as running: the rerun marked them Crashed
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        stage = client.read_flow_run(killed)
        parent = client.read_flow_run(client.read_task_run(stage.parent_task_run_id).flow_run_id)
    assert stage.state.type.value == "CRASHED" and parent.state.type.value == "CRASHED"
    assert parent.name == "pipeline-shards" and "died" in stage.state.message
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.tar")} == shards
    assert (tmp_path / "toy" / ".stage.json").stat().st_mtime_ns == toy
    assert json.loads(record.read_text())["status"] == "done"
    assert (tmp_path / "fine" / "checkpoints" / "evaluate" / "eval_validation.json").is_file()


def test_out_holding_other_files_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep me")
    (mine / "sub" / "thesis.tex").write_text("\\begin{document}")
    result = pipeline(experiment(tmp_path, pretrain__out=str(mine)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrain.out:"), result.stderr
    assert (mine / "important.txt").read_text() == "keep me"
    assert (mine / "sub" / "thesis.tex").read_text() == "\\begin{document}"
    assert not (tmp_path / "shards").exists()          # refused before rendering

    # a stage directory around another stage's output would be cleared with it
    nested = pipeline(experiment(tmp_path, pretrain__out=str(tmp_path / "runs" / "pre"),
                                 finetune__out=str(tmp_path / "runs")))
    assert nested.returncode == 2 and "overlap" in nested.stderr
    assert len(nested.stderr.strip().splitlines()) == 1
