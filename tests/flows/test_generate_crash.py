"""A standalone `pvit generate` killed with -9 mid-render: the next generate on the same
dataset recovers the dead holder's lock and ends the killed run's flow run and render
task runs as Crashed (issue 25 item 4), instead of leaving them RUNNING forever.

The ``pvit`` subprocesses inherit the suite's ``PREFECT_HOME`` (tests/conftest.py), so
their runs are in the database this process's client reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from prefect_api import task_runs_of

from generation.dataset.lock import LOCK_NAME, LockError, acquire, note_run, recovered, release

REPO = Path(__file__).resolve().parents[2]

# two scenes in one shard: a render task that runs for a few seconds, long enough to be
# seen running and killed
GENERATION = {"scenes": 2, "scenes_per_shard": 2, "workers": 1, "retries": 0,
              "scene": {"resolution": 32, "frames": 2, "spp": 1, "min_objects": 3,
                        "max_objects": 3}}


def _lock_run_id(lock: Path) -> str | None:
    try:
        return json.loads(lock.read_text()).get("flow_run_id")
    except (OSError, ValueError):
        return None


def _rendering(pid: int) -> bool:
    """Whether a render worker process runs under ``pid``."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if "generation.render.worker" in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


@pytest.mark.slow
@pytest.mark.blender
def test_killed_generate_run_is_marked_crashed_by_the_next_run(tmp_path):
    out = tmp_path / "ds"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"generation": {"out": str(out), **GENERATION}}))
    command = [sys.executable, "-m", "flows.cli", "generate", str(cfg)]
    task_runs_of(uuid.uuid4())       # this process's client started before the run
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    lock = out / LOCK_NAME
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not (
                _lock_run_id(lock) and _rendering(proc.pid)):
            time.sleep(0.1)
        run_id = _lock_run_id(lock)
        assert run_id and _rendering(proc.pid), "the run never named itself and rendered"
        # the task run reaches the server through Prefect's events, a moment later
        while time.monotonic() < deadline and proc.poll() is None and not any(
                t.state is not None and t.state.type.value == "RUNNING"
                for t in task_runs_of(run_id)):
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed mid-render"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)            # mid-render, as kill -9 would
        proc.wait()
    assert _lock_run_id(lock) == run_id                # the dead holder's lock stays

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removed the stale lock of pvit generate" in rerun.stderr
    assert "marked the runs of a killed writer Crashed: generate-ds-2" in rerun.stderr
    assert not lock.exists()

    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        killed = client.read_flow_run(run_id)
    assert killed.state.type.value == "CRASHED", killed.state
    assert "died" in killed.state.message and str(out) in killed.state.message
    tasks = task_runs_of(run_id)
    assert [t.name for t in tasks] == ["render-shard-000000.tar"]
    assert tasks[0].state.type.value == "CRASHED", tasks[0].state


NOTED = """
import sys
from generation.dataset.lock import acquire, note_run
acquire(sys.argv[1], owner="test holder")
assert note_run(sys.argv[1], flow_run_id="run-1")
print("noted", flush=True)
if sys.argv[2] == "die":
    import os; os._exit(0)          # as after kill -9: the lock file stays, the flock goes
sys.stdin.read()
"""


def _holder(out: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", NOTED, str(out), mode], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "noted"
    return proc


def test_a_noted_lock_stays_held_and_its_run_is_handed_to_whoever_recovers_it(tmp_path):
    """``note_run`` rewrites the lock without ever letting it go; a recovered dead
    holder's record, flow run id included, is handed out once (``recovered``)."""
    live = _holder(tmp_path / "live", "hold")
    try:
        with pytest.raises(LockError, match="test holder"):
            acquire(tmp_path / "live")
    finally:
        live.communicate("")
    assert not note_run(tmp_path / "live", flow_run_id="x")    # not held here

    _holder(tmp_path / "dead", "die").wait()
    assert json.loads((tmp_path / "dead" / LOCK_NAME).read_text())["flow_run_id"] == "run-1"
    acquire(tmp_path / "dead", warn=lambda _: None)
    try:
        (found,) = recovered(tmp_path / "dead")
        assert found["flow_run_id"] == "run-1" and found["owner"] == "test holder"
        assert recovered(tmp_path / "dead") == []
    finally:
        release(tmp_path / "dead")


def test_pvit_flows_run_without_heartbeats_unless_the_user_asks(monkeypatch):
    """Prefect's heartbeat thread made every flow run end up to 1 s late (a cached
    rerun: 0.96 of 1.07 s); a user's own interval is kept."""
    from prefect.settings import get_current_settings

    from flows.run_view import HEARTBEAT_ENV, without_heartbeats

    for name in HEARTBEAT_ENV:
        monkeypatch.delenv(name, raising=False)
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    with without_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
        with without_heartbeats():              # the copy is reused, nesting is fine
            assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    with without_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == default


def test_on_an_object_store_the_noted_run_survives_in_the_lease_and_is_recovered(
        monkeypatch):
    """``note_run`` on an ``s3://`` lock is a lease renewal; a taker of the expired
    lease gets the run it named (moto's S3 server on 127.0.0.1)."""
    from moto.server import ThreadedMotoServer

    from generation.dataset import lock as dataset_lock
    from generation.dataset import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(storage, "_filesystems", {})
        storage.filesystem("s3").clear_instance_cache()
        storage._filesystems.clear()
        storage.filesystem("s3").mkdir("crash")
        prefix = "s3://crash/ds"
        monkeypatch.setenv(dataset_lock.LEASE_ENV, "1")
        acquire(prefix, owner="killed run")
        assert note_run(prefix, flow_run_id="run-s3")
        where = storage.Location(prefix)
        assert json.loads(where.read_bytes(LOCK_NAME))["flow_run_id"] == "run-s3"
        # as if killed: the lease stops being renewed, the lock object stays
        entry = dataset_lock._held.pop(where.join(LOCK_NAME))
        entry[1].end()
        time.sleep(2.2)             # the store's last-modified time has 1 s resolution
        acquire(prefix, warn=lambda _: None)
        try:
            (found,) = recovered(prefix)
            assert found["flow_run_id"] == "run-s3" and found["owner"] == "killed run"
        finally:
            release(prefix)
    finally:
        server.stop()
