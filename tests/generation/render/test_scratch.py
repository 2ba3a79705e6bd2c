"""Render scratch on a node (issue 25, item 6): a real render worker, when it starts,
removes the scratch of render processes that are gone and nothing else, and leaves no
temporary directory of its own (Kubric's pybullet module makes one at import, Blender its
session directory, which only a clean exit removed)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pvit_cli import REPO

from generation.dataset.storage import SCRATCH_OWNER, scratch_dir
from generation.render.scratch import sweep

# A render process's scratch as storage.scratch_dir makes it, with Blender's files in it;
# then the process dies (as kill -9 would: nothing cleaned) or lives on.
MAKE = """
import os, sys, time
from generation.dataset.storage import scratch_dir
d = scratch_dir(sys.argv[1])
(d / ".shard-000003.tar.1.2.scratch" / "render_0_x" / "exr").mkdir(parents=True)
(d / ".shard-000003.tar.1.2.scratch" / "render_0_x" / "exr" / "frame_0001.exr").write_bytes(b"x")
print(d, flush=True)
if sys.argv[2] == "die":
    os._exit(9)
time.sleep(120)
"""


def _make(env, prefix, mode):
    proc = subprocess.Popen([sys.executable, "-c", MAKE, prefix, mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    return proc, path


@pytest.mark.blender
def test_a_worker_start_removes_dead_processes_scratch_and_leaves_no_temp_dir(tmp_path):
    scratch, tmp = tmp_path / "scratch", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PVIT_SCRATCH": str(scratch), "TMPDIR": str(tmp)}
    killed = _killed_after_blender_started(env, scratch)       # (its start sweeps too)
    dead, dead_dir = _make(env, "pvit-shard-000003-", "die")
    dead.wait()
    live, live_dir = _make(env, "pvit-shard-000004-", "live")
    try:
        not_ours = scratch / "pvit-shard-000005-handmade"        # no owner file
        not_ours.mkdir()
        logs = scratch / "pvit-logs" / "bucket_ds"                 # the worker logs
        logs.mkdir(parents=True)
        elsewhere = scratch / "pvit-shard-000006-abcd"             # another node's (NFS)
        elsewhere.mkdir()
        (elsewhere / SCRATCH_OWNER).write_text(json.dumps(
            {"host": "render-node-7", "pid": dead.pid, "boot_id": "b", "pid_ns": "p",
             "start_time": 1}))
        assert os.path.isdir(dead_dir) and os.path.isdir(live_dir)

        t0 = time.monotonic()
        worker = subprocess.run([sys.executable, "-m", "generation.render.worker", "--wait"],
                                cwd=REPO, env=env, input="", capture_output=True, text=True,
                                timeout=300)       # imports, then no job: exits 0
        seconds = time.monotonic() - t0
        assert worker.returncode == 0, worker.stderr[-2000:]
        assert not os.path.exists(dead_dir)
        assert f"removed the scratch {dead_dir} of pid {dead.pid}" in worker.stderr
        assert not killed.exists()      # the killed worker's temp dir, Blender's inside it
        assert os.path.isfile(os.path.join(live_dir, SCRATCH_OWNER))   # a live process's
        assert not_ours.is_dir() and logs.is_dir() and elsewhere.is_dir()
        assert sorted(p.name for p in tmp.iterdir()) == [], seconds   # nothing left
    finally:
        live.kill()
        live.wait()
    # the live one's owner is gone now: the next sweep takes it
    assert sweep(scratch) == [scratch / os.path.basename(live_dir)]


def _killed_after_blender_started(env, scratch):
    """A render worker killed (-9) once Blender made its session directory: returns the
    directory its temp files went to (its own scratch, not the node's TMPDIR)."""
    proc = subprocess.Popen([sys.executable, "-m", "generation.render.worker", "--wait"],
                            cwd=REPO, env=env, stdin=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(scratch.glob("pvit-worker-*/blender_*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [own] = scratch.glob("pvit-worker-*")
    assert not list(Path(env["TMPDIR"]).iterdir())   # nothing in the node's temp dir
    return own


def test_scratch_is_named_only_once_it_names_its_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("PVIT_SCRATCH", str(tmp_path))
    made = scratch_dir("pvit-shard-000001-")
    owner = json.loads((made / SCRATCH_OWNER).read_text())
    assert owner["pid"] == os.getpid() and owner["pid_ns"] == os.readlink("/proc/self/ns/pid")
    assert made.name.startswith("pvit-shard-000001-") and made.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [made.name]      # no claim dir left
    assert sweep(tmp_path) == [] and made.is_dir()                  # ours, alive
