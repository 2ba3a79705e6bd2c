"""The supervisor of render processes: one shard rendered in a fresh worker process
(``generation.render.worker``), its progress read from the worker's stdout, its log kept
per attempt, and the finished file renamed into place (or uploaded whole to an object
store). Runs in the flow's process, never in Blender's; the dataset store
(``generation.dataset``) decides which shards to render and records them.

Everything an attempt writes besides the shard carries a name of its own
(``.shard-NNNNNN.tar.PID.NS.partial``, ``.job.json``, ``.scratch/``,
``logs/shard-NNNNNN.attempt-K.log``), which ``generation.dataset.plan`` recognises and
removes after a killed run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from generation.dataset import asset_store
from generation.dataset.manifest import location, sha256_file
from generation.dataset.plan import ShardJob
from generation.dataset.storage import Location, scratch_dir
from generation.render import warm_workers
from generation.render.devices import worker_env  # one GPU per worker process
from generation.render.object_assets import ASSET_SETS


class RenderError(RuntimeError):
    """A render worker failed; the message names the shard and its scene seeds.

    ``records``: the manifest records of shards finished before the failure was raised
    (a render task that renders several shards goes on past a failed one and raises at
    the end with those, for the flow to commit). They survive pickling (``__reduce__``):
    a failed task's exception reaches the flow from a Dask worker or a process pool."""

    def __init__(self, message: str = "", records: list[dict] | tuple = ()):
        super().__init__(message)
        self.records = list(records)

    def __reduce__(self):
        return type(self), (str(self), self.records)


def worker_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def render_shard(job: ShardJob, out_dir: Path, *, threads: int = 0,
                 log_dir: Path | None = None, on_scene=None, device: str = "auto",
                 workers_per_gpu: int = 1) -> dict:
    """Render one shard in a fresh worker process and rename it into place.

    Returns the shard's manifest record. Raises ``RenderError`` naming the seeds if the
    worker dies or fails; no partial shard is ever left under the final name. For an
    object-store ``out_dir`` the shard is rendered on local scratch and uploaded (see
    ``_render_and_upload``)."""
    where = location(out_dir)
    job = with_local_assets(job, where)
    if where.remote:
        return _render_and_upload(job, where, threads=threads, log_dir=log_dir,
                                  on_scene=on_scene, device=device,
                                  workers_per_gpu=workers_per_gpu)
    out_dir = Path(out_dir)
    final = out_dir / job.name
    stamp = f".{job.name}.{os.getpid()}.{time.monotonic_ns()}"
    tmp = out_dir / f"{stamp}.partial"
    # Next to the partial, not in the system temp dir: a killed run's job file is then
    # found and removed by the next run's prepare (LEFTOVER_RE).
    job_path = out_dir / f"{stamp}.job.json"
    # Blender's scratch files too (kubric's .blend and assets; render_clip removes its
    # own subdirectory, but not when the worker is killed).
    scratch = out_dir / f"{stamp}.scratch"
    log_dir = Path(log_dir) if log_dir else out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done_event = None
    try:
        scratch.mkdir()
        job_path.write_text(json.dumps({"scene": job.scene, "seeds": job.seeds,
                                        "keys": job.keys, "out": str(tmp), "threads": threads,
                                        "scratch": str(scratch), "device": device}))
        env = warm_workers.environment(worker_env(device, job.index, workers_per_gpu))
        log_path, log = _open_attempt_log(log_dir, Path(job.name).stem)
        with log:
            warm = warm_workers.take(env)
            if warm is not None:   # started while Prefect's server started, imports done
                proc = warm.hand(job_path, log_path, log)
            else:
                proc = subprocess.Popen([sys.executable, "-m", "generation.render.worker",
                                         job_path], stdout=subprocess.PIPE, stderr=log,
                                        text=True, env=env)
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event.get("event") == "scene" and on_scene is not None:
                    on_scene(event)
                elif event.get("event") == "done":
                    done_event = event
            code = proc.wait()
        if code != 0 or done_event is None or not tmp.is_file():
            cause = error_line(log_path.read_text(errors="replace"))
            raise RenderError(f"render worker for {job.label} exited with code {code}"
                              + (f": {cause}" if cause else "") + f" (log: {log_path})")
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        job_path.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)   # this attempt's own, named by stamp
    return {"name": job.name, "sha256": digest, "samples": len(job.seeds), "seeds": job.seeds,
            "keys": job.keys, "bytes": size,
            "worker_seconds": round(time.perf_counter() - t0, 3),
            "render_seconds": round(done_event["scenes_s"], 3),
            "device": done_event.get("device", "cpu")}   # the worker's resolved device


def _render_and_upload(job: ShardJob, out: Location, *, log_dir: Path | None,
                       **kwargs) -> dict:
    """An object store's shard: rendered into a local scratch directory (``PVIT_SCRATCH``
    or the system's temp dir), then uploaded under its final name in one PUT (or a
    multipart upload, visible only once complete), so a reader never sees part of it;
    the record carries the object's ETag for the next run's keep check. Worker logs stay
    on this machine (``log_dir``, default ``SCRATCH/pvit-logs/BUCKET_PREFIX``)."""
    scratch = scratch_dir(f"pvit-{Path(job.name).stem}-")
    if log_dir is None:
        base = Path(os.environ.get("PVIT_SCRATCH") or scratch.parent)
        log_dir = base / "pvit-logs" / out.root.replace("/", "_")
    try:
        record = render_shard(job, scratch, log_dir=log_dir, **kwargs)
        meta = out.upload(scratch / job.name, job.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if meta.size != record["bytes"]:
        raise RenderError(f"{job.label}: the upload to {out.join(job.name)} holds {meta.size} "
                          f"bytes, not {record['bytes']}")
    record["etag"] = meta.etag
    return record


def with_local_assets(job: ShardJob, dataset: Location) -> ShardJob:
    """``job`` with its spec's asset set (``sha256:<hex>``) replaced by this machine's
    copy of it (``asset_store.locate``: the submitter's path, this checkout's built-in
    sets, or the run's upload next to the dataset); ``RenderError`` (one line) when this
    machine has none, before any worker starts."""
    named = job.scene.get("asset_manifest", "")
    if not str(named).startswith(asset_store.PREFIX):
        return job                      # already a local path (an inner call)
    try:
        path = asset_store.locate(named, hint=job.assets or None, known=ASSET_SETS.values(),
                                  dataset=dataset)
    except asset_store.AssetSetMissing as exc:
        raise RenderError(f"{job.label}: {exc}") from None
    return dataclasses.replace(job, scene={**job.scene, "asset_manifest": str(path)})


def _open_attempt_log(log_dir: Path, stem: str):
    """``LOG_DIR/STEM.attempt-K.log`` for the first free K, created exclusively, so a
    retry (same process or another) never writes over the log of the attempt that failed."""
    for attempt in itertools.count(1):
        path = log_dir / f"{stem}.attempt-{attempt}.log"
        try:
            return path, open(path, "x")
        except FileExistsError:
            continue


_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w.]*)?(?:Error|Exception)\b.*"
                             r"|Fatal Python error\b.*|Segmentation fault\b.*")


def error_line(log_text: str) -> str | None:
    """The line of a worker's log that says why it failed: the exception line that ends
    its last Python traceback, else the last line that looks like an error, else the
    last non-empty line. Quoting the plain last line would often quote start-up noise
    (a TensorFlow banner) or shutdown chatter rather than the cause."""
    lines = [line.rstrip() for line in log_text.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        # The exception line is the first one after the traceback that is not indented
        # (frames and source lines are).
        for line in lines[starts[-1] + 1:]:
            if not line[0].isspace():
                return line.strip()
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else None
