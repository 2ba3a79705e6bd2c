"""Render workers started before their jobs (generation/render/warm_workers.py): the shard a
warm worker renders is the one a fresh worker renders, its log is whole, and a warm
worker nobody takes never outlives the process that started it."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from generation.render import warm_workers
from generation.render.devices import worker_env

CPU_PIN = worker_env("cpu", 0)


def _tiny(tmp_path, name):
    from generation.config import GenerationConfig
    from generation.dataset.plan import plan
    out = tmp_path / name
    out.mkdir()
    cfg = GenerationConfig.model_validate({
        "out": str(out), "scenes": 2, "scenes_per_shard": 2, "device": "cpu",
        "scene": {"resolution": 32, "frames": 2, "spp": 2, "min_objects": 3,
                  "max_objects": 3}})
    return out, plan(cfg)[0]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.blender
def test_warm_worker_renders_the_bytes_a_fresh_worker_renders(tmp_path):
    from generation.render.supervisor import render_shard

    cold_out, job = _tiny(tmp_path, "cold")
    cold = render_shard(job, cold_out, threads=1, device="cpu")
    assert warm_workers.waiting() == []

    warm_out, job = _tiny(tmp_path, "warm")
    warm_workers.prewarm([CPU_PIN])
    time.sleep(1.0)    # let it get into its imports: it writes its stderr to a temp file
    assert len(warm_workers.waiting()) == 1
    record = render_shard(job, warm_out, threads=1, device="cpu")
    assert warm_workers.waiting() == []          # taken, not a new process beside it

    digest = {name: hashlib.sha256((out / job.name).read_bytes()).hexdigest()
              for name, out in (("cold", cold_out), ("warm", warm_out))}
    assert digest["warm"] == digest["cold"] == record["sha256"] == cold["sha256"]
    (log,) = (warm_out / "logs").glob("*.log")
    text = log.read_text()
    assert "render device: cpu (requested cpu; CUDA_VISIBLE_DEVICES=)" in text
    timings = json.loads(next(line for line in text.splitlines()
                              if line.startswith("timings "))[len("timings "):])
    assert timings["waited_s"] >= 0 and len(timings["scenes"]) == 2


def test_a_warm_worker_is_only_taken_for_its_own_environment():
    warm_workers.prewarm([worker_env("cuda", 0, 1, gpus=["GPU-a"])])
    try:
        assert warm_workers.take(warm_workers.environment(CPU_PIN)) is None
        assert len(warm_workers.waiting()) == 1
    finally:
        (pid,) = warm_workers.waiting()
        warm_workers.close()
    assert warm_workers.waiting() == [] and _gone(pid, within_s=5)


def test_a_warm_worker_is_still_taken_after_opencv_changed_the_environment(monkeypatch):
    # Importing cv2 after the workers started (the flow module's contact sheet) prepends
    # OpenCV's lib64 to LD_LIBRARY_PATH; the worker does the same when it imports cv2.
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    warm_workers.prewarm([CPU_PIN])
    try:
        monkeypatch.setenv("LD_LIBRARY_PATH", "/site-packages/cv2/../../lib64:")
        env = warm_workers.environment(CPU_PIN)
        # nor does a worker inherit OpenCV's path (its empty entry: the working directory)
        assert "LD_LIBRARY_PATH" not in env
        monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/cuda/lib64:/site-packages/cv2/../../lib64:")
        assert warm_workers.environment(CPU_PIN)["LD_LIBRARY_PATH"] == "/opt/cuda/lib64"
        warm = warm_workers.take(env)
        assert warm is not None
        warm.discard()
        # ...while a difference the worker would see is still a different worker
        warm_workers.prewarm([CPU_PIN])
        monkeypatch.setenv("PVIT_SCRATCH", "/elsewhere")
        assert warm_workers.take(warm_workers.environment(CPU_PIN)) is None
    finally:
        warm_workers.close()


@pytest.mark.slow
def test_warm_workers_do_not_outlive_a_killed_parent(tmp_path):
    """kill -9 of the process that started them: no atexit runs, yet each warm worker
    reads end-of-file on its stdin once its imports are done, and exits."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from generation.render import warm_workers\n"
         "warm_workers.prewarm([{'CUDA_VISIBLE_DEVICES': ''}] * 2)\n"
         "print(*warm_workers.waiting(), flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert all(_gone(pid, within_s=60) for pid in pids)
