"""What a Prefect user sees of a run, read back through Prefect's API after real
``pvit`` runs: the run's own task runs, its artifacts (the contact sheet embedded as a
PNG data URI), its final state's message, a cached rerun saying what it reused; and a
contact sheet that cannot be written costing a warning, not the dataset.

The ``pvit`` subprocesses inherit the suite's ``PREFECT_HOME`` (tests/conftest.py), so
their runs are in the database this process's client reads.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from prefect_api import artifacts_of, task_runs_of, top_level_runs

from flows.run_view import artifact_key
from generation.dataset.manifest import location

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.blender]

GENERATION = {"scenes": 1, "scenes_per_shard": 1, "workers": 1, "retries": 0,
              "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3,
                        "max_objects": 3}}


def pvit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One tiny shard rendered by ``pvit generate`` while the contact sheet cannot be
    written (a directory is in the way, as a full disk would fail it)."""
    root = tmp_path_factory.mktemp("visibility")
    out = root / "ds"
    (out / "contact_sheet.png").mkdir(parents=True)
    (out / "contact_sheet.png" / "keep.txt").write_text("not ours")
    cfg = root / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"generation": {"out": str(out), **GENERATION}}))
    return {"root": root, "out": out, "config": cfg, "first": pvit("generate", cfg)}


def test_unwritable_contact_sheet_warns_and_keeps_the_dataset(dataset):
    first, out = dataset["first"], dataset["out"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "contact sheet not written" in first.stderr
    assert "1 rendered, 0 kept" in first.stderr
    assert pvit("verify", out).returncode == 0
    assert (out / "contact_sheet.png" / "keep.txt").read_text() == "not ours"
    assert not list(out.glob(".contact_sheet.*.tmp.png"))


def test_the_run_started_shows_its_renders_artifacts_and_summary(dataset):
    assert dataset["first"].returncode == 0, dataset["first"].stderr[-3000:]
    (run,) = top_level_runs("generate_dataset", dataset["out"])[:1]
    assert run.state.is_completed() and run.state.name == "Completed"
    assert run.name == "generate-ds-1"                       # dataset name, clips
    assert run.state.message.startswith("0 shards kept, 1 rendered")
    assert run.state.result()["rendered_shards"] == 1        # persisted: readable later
    assert [t.name for t in task_runs_of(run.id)] == ["render-shard-000000.tar"]

    # each dataset has its own cards: the keys name the location
    url = location(dataset["out"]).url
    progress, table, sheet = (artifact_key(kind, url) for kind in (
        "generate-progress", "synthetic-dataset", "synthetic-contact-sheet"))
    assert re.fullmatch(r"generate-progress-ds-[0-9a-f]{8}", progress)
    artifacts = artifacts_of(run.id)
    assert {progress, table, sheet} <= set(artifacts)
    assert artifacts[progress].data == 100
    markdown = artifacts[sheet].data
    assert "file://" not in markdown
    encoded = re.search(r"!\[contact sheet\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)",
                        markdown).group(1)
    png = base64.b64decode(encoded)
    assert len(png) < 200_000
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] > image.shape[0] > 100   # 5 columns of tiles


def test_a_cached_rerun_says_what_it_reused(dataset):
    again = pvit("generate", dataset["config"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "kept 1 shards (up to date), rendered none" in again.stdout + again.stderr
    run = top_level_runs("generate_dataset", dataset["out"])[-1]
    assert run.state.is_completed() and run.state.name == "Cached"   # its own badge
    assert run.state.message.startswith("1 shards kept, 0 rendered")
    assert task_runs_of(run.id) == []
    table = artifacts_of(run.id)[artifact_key("synthetic-dataset", location(dataset["out"]).url)]
    assert table.description.startswith("1 shards kept, 0 rendered")


def test_pipeline_state_message_names_reused_stages(dataset):
    root = dataset["root"]
    cfg = root / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "generation": {"out": str(dataset["out"]), **GENERATION},
        "toy_actions": {"out": str(root / "toy"), "clips_per_class": 2, "val_per_class": 1,
                        "size": 16, "frames": 4}}))
    first = pvit("pipeline", cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    again = pvit("pipeline", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = top_level_runs("pipeline", dataset["out"])
    assert "toy_actions: computed" in runs[-2].state.message
    message = runs[-1].state.message
    assert "generate: 1 shards kept, 0 rendered" in message
    assert f"toy_actions: reused {root / 'toy'}" in message
    assert artifact_key("toy-actions-reused", root / "toy") in artifacts_of(runs[-1].id)
    assert [r.state.name for r in runs[-2:]] == ["Completed", "Cached"]
    assert runs[-1].name == "pipeline-ds"


def test_a_cached_training_stage_says_so(dataset, tmp_path):
    from flows import stage_cache
    from flows.train import dataset_key, pretrain
    from training.config import PretrainConfig

    cfg = PretrainConfig(model="pvit_test", synthetic=str(dataset["out"]),
                         out=str(tmp_path / "pre"))
    key = stage_cache.stage_key("pretrain", cfg.model_dump(mode="json"),
                                {"synthetic": dataset_key(cfg.synthetic)},
                                stage_cache.code_version("training"))
    # a finished stage with this key: content-keyed, so the flow must not train again
    stage_cache.begin(Path(cfg.out), key)
    (Path(cfg.out) / "checkpoints").mkdir()
    (Path(cfg.out) / "checkpoints" / "final.pt").write_text("stands for a checkpoint")
    (Path(cfg.out) / "summary.json").write_text("{}")
    stage_cache.finish(Path(cfg.out), key, {"steps": 7}, ["checkpoints/final.pt",
                                                          "summary.json"])
    state = pretrain(cfg, return_state=True)
    assert state.is_completed() and state.name == "Cached"
    assert state.result() == {"steps": 7}
    assert state.message == f"reused {cfg.out} (up to date), nothing recomputed"
    assert artifact_key("pretrain-reused", cfg.out) in artifacts_of(state.state_details.flow_run_id)


def test_show_refuses_a_directory_as_out_and_leaves_no_temporary_file(dataset, tmp_path):
    assert dataset["first"].returncode == 0
    target = tmp_path / "sheets"
    target.mkdir()
    shown = pvit("show", dataset["out"], "--out", target)
    assert shown.returncode == 2
    assert shown.stderr.strip().startswith("error:") and len(shown.stderr.strip().splitlines()) == 1
    assert "is a directory" in shown.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sheets"]
    assert list(target.iterdir()) == []

    blocker = tmp_path / "file"
    blocker.write_text("x")
    under_file = pvit("show", dataset["out"], "--out", blocker / "sheet.png")
    assert under_file.returncode == 2 and len(under_file.stderr.strip().splitlines()) == 1
    assert under_file.stderr.startswith("error:") and blocker.read_text() == "x"


def test_loss_curve_artifact_embeds_the_image(tmp_path):
    from prefect import flow

    from flows.train import _metrics_artifact

    curve = np.zeros((300, 400, 3), np.uint8)
    curve[100:200, :, 1] = 255
    cv2.imwrite(str(tmp_path / "loss_curve.png"), curve)

    @flow(name="metrics-artifact-check")
    def publish():
        _metrics_artifact("pretrain", {"run_dir": str(tmp_path), "steps": 3})

    state = publish(return_state=True)
    artifacts = artifacts_of(state.state_details.flow_run_id)
    markdown = artifacts[artifact_key("pretrain-loss-curve", str(tmp_path))].data
    assert "file://" not in markdown
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    image = cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (300, 400, 3) and image[150, 10, 1] == 255


def test_prefect_calls_outlast_a_two_minute_outage_unless_the_user_says_otherwise():
    """Prefect's client retries a lost connection with 2**n s backoff: the flows set 6
    retries (126 s in all), in this process and in every `pvit` it starts; a user's
    own PREFECT_CLIENT_MAX_RETRIES is kept."""
    import os

    code = ("import flows.cli; from prefect.settings import get_current_settings; "
            "print(get_current_settings().client.max_retries)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_CLIENT_MAX_RETRIES"}
    ours = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert ours.stdout.strip() == "6" and sum(2 ** n for n in range(1, 7)) >= 120
    theirs = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**env, "PREFECT_CLIENT_MAX_RETRIES": "2"})
    assert theirs.stdout.strip() == "2"
