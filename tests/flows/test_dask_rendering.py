"""Render fan-out through Dask: a LocalCluster of 2 worker processes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def pvit(*args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)

pytestmark = [pytest.mark.slow, pytest.mark.blender]


def test_dask_local_cluster_renders_the_same_shards_as_threads(tmp_path):
    dask_out, thread_out = tmp_path / "dask", tmp_path / "threads"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"generation": {
        "out": str(dask_out), "scenes": 4, "scenes_per_shard": 2, "workers": 2, "retries": 0,
        # One task renders both shards: its records reach the flow from a Dask worker
        # process (tests/flows/test_bounded_fanout.py compares with one task per shard).
        "max_tasks_per_flow": 1,
        "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3, "max_objects": 4}}}))
    result = pvit("generate", cfg, "--task-runner", "dask")
    assert result.returncode == 0, result.stderr[-2000:]
    assert pvit("verify", dask_out).returncode == 0
    threads = pvit("generate", cfg, "--out", thread_out)
    assert threads.returncode == 0
    for shard in sorted(thread_out.glob("shard-*.tar")):
        assert (dask_out / shard.name).read_bytes() == shard.read_bytes()
    assert len(list(dask_out.glob("shard-*.tar"))) == 2
