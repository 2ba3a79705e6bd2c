"""Render workers started before their jobs exist, so that their imports overlap the
command's own start instead of following it.

A render worker spends its first seconds importing torch (webdataset's), bpy and
Kubric; ``pvit generate`` spends its first seconds waiting for Prefect's temporary
server, a process that uses one core while the CLI waits. ``prewarm`` starts
``python -m generation.render.worker --wait`` processes at that point; each does its
imports and then blocks reading one line from stdin. ``generation.render.supervisor.render_shard``
asks ``take`` for one started with the environment it would give a new worker (the GPU
pin included) and hands it the job file and the shard's log path on that line; with
none left (more shards than warm workers, another task runner's process, a warm worker
that died) it starts a new one as before. Nothing else differs: the worker renders the
same bytes, reports on the same stdout, and its log starts with what its imports wrote.

Warm workers nobody takes are stopped by ``close`` (at exit); if this process is
killed, the kernel closes their stdin and they read end-of-file and exit, so none
outlives the command.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from generation.render.worker import WAIT_FLAG


@dataclass
class WarmWorker:
    process: subprocess.Popen
    env: dict[str, str]
    # Its stderr until it is handed a job (what its imports wrote): an unnamed temporary
    # file, so nothing is left behind however this process ends.
    early_log: BinaryIO

    def hand(self, job_path: Path, log_path: Path, log: TextIO) -> subprocess.Popen:
        """Give it ``job_path``; its stderr moves to ``log_path`` (open here as ``log``),
        after what it wrote there so far. Returns its process, as ``Popen`` would."""
        fd = self.early_log.fileno()
        log.write(os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace"))
        log.flush()
        self.early_log.close()
        # Killed since ``take`` looked: the caller then sees its exit code, as with a
        # new worker killed at its start.
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(json.dumps({"job": str(job_path),
                                                 "log": str(log_path)}) + "\n")
            self.process.stdin.close()
        return self.process

    def discard(self) -> None:
        """Stop it: it has no job, so there is nothing of anyone's to lose."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()       # (what it would read, had it time to)
        self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.early_log.close()


_lock = threading.Lock()
_warm: list[WarmWorker] = []


def environment(pin: dict[str, str]) -> dict[str, str]:
    """The environment a render worker gets: this process's (without OpenCV's loader
    path, see ``_loader_path``: so it is also the same before and after this process
    imported cv2), Blender quiet about TensorFlow, and ``pin``
    (``generation.render.devices.worker_env``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **pin}
    loader_path = _loader_path(env.pop("LD_LIBRARY_PATH", None))
    if loader_path is not None:
        env["LD_LIBRARY_PATH"] = loader_path
    return env


def prewarm(pins: list[dict[str, str]]) -> None:
    """Start one waiting render worker per entry of ``pins`` (each the GPU pin the
    worker of the shard with that index will get)."""
    if not _warm:
        atexit.register(close)
    for pin in pins:
        env = environment(pin)
        early = tempfile.TemporaryFile()
        process = subprocess.Popen([sys.executable, "-m", "generation.render.worker",
                                    WAIT_FLAG], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=early, text=True, env=env)
        with _lock:
            _warm.append(WarmWorker(process, _comparable(env), early))


def take(env: dict[str, str]) -> WarmWorker | None:
    """A live warm worker started with ``env`` (PREFECT_* aside: the flow points
    PREFECT_API_URL at its server after the workers were started, and the worker does
    not use Prefect), or None."""
    wanted = _comparable(env)
    with _lock:
        for warm in list(_warm):
            if warm.process.poll() is not None:   # died waiting: a new one will say why
                _warm.remove(warm)
                warm.discard()
                continue
            if warm.env == wanted:
                _warm.remove(warm)
                return warm
    return None


def waiting() -> list[int]:
    """The process ids of the warm workers waiting for a job."""
    with _lock:
        return [warm.process.pid for warm in _warm]


def close() -> None:
    """Stop every warm worker nobody took."""
    with _lock:
        left, _warm[:] = list(_warm), []
    for warm in left:
        warm.discard()


def _comparable(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("PREFECT_")}


def _loader_path(value: str | None) -> str | None:
    """``LD_LIBRARY_PATH`` without what importing cv2 in this process added to it:
    OpenCV's wheel prepends ``.../cv2/../../lib64:``, whose empty entry would make the
    dynamic loader search a worker's working directory for libraries. The worker's own
    cv2 import adds it back inside the worker, where it no longer affects loading."""
    if value is None:
        return None
    kept = [p for p in value.split(os.pathsep) if p and "cv2" not in Path(p).parts]
    return os.pathsep.join(kept) or None
