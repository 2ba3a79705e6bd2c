"""Render worker: one process renders every scene of one shard and writes the shard.

Run as ``python -m generation.render.worker JOB.json``, or started ahead of its job as
``... --wait`` (``generation.render.warm_workers``: its imports overlap Prefect's server start)
and handed the job on stdin. A fresh process per shard
means Blender's state and leaks die with it, while the TensorFlow/bpy import is paid
once per shard, not once per scene. The job file names the scene spec, the seeds and
keys, and the (temporary) path to write; the parent renames it into place.

Progress goes to stdout as JSON lines: ``{"event": "scene", ...}`` per scene and a
final ``{"event": "done", ...}``.

Fault injection for tests: if ``PVIT_CRASH_ON_SEED`` names a seed of this shard, the
process dies (``os._exit(3)``) before writing, as a crashed Blender would; if
``PVIT_RAISE_ON_SEED`` does, it raises ``RuntimeError("injected failure on seed N")``
instead, as a bug in the scene code would (the parent quotes that line of the log).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

from generation.config import SceneConfig
from generation.dataset import storage
from generation.dataset.shard_format import write_samples
from generation.render import devices
from generation.render import scratch as scratch_module
from generation.render.scene import render_clips

# webdataset (torch), bpy and kubric stay in main(), fsspec in
# use_gfile_without_tensorflow(): `pvit generate` imports this module before the flow
# starts (warm_workers, for WAIT_FLAG), where they would cost 1.0-1.6 s, 0.35 s, 2.8 s and
# 0.03 s (python -X importtime after flows.cli); main() imports them in the one order that
# works (webdataset before bpy, the TensorFlow stand-in before kubric: tests/conftest.py)
# and counts them as start-up. psutil stays in main()'s try: it is optional.

# ``python -m generation.render.worker --wait``: import everything, then wait for a job
# on stdin (see generation.render.warm_workers).
WAIT_FLAG = "--wait"


def use_gfile_without_tensorflow() -> None:
    """Kubric imports TensorFlow (5-8 s per worker, most of its start-up) only for
    ``tf.io.gfile.GFile`` and ``tf.io.gfile.copy`` (file_io, AssetSource, the renderer's
    and simulator's save_state). In the worker those two come from fsspec instead (the
    files are local; fsspec also reads remote URLs as gfile did). Only this process,
    which imports nothing else that wants TensorFlow, gets the stand-in; a process that
    already imported TensorFlow keeps it."""
    if "tensorflow" in sys.modules:
        return
    import fsspec

    def copy(src, dst, overwrite: bool = False) -> None:
        if not overwrite and fsspec.core.url_to_fs(str(dst))[0].exists(str(dst)):
            raise FileExistsError(str(dst))
        with fsspec.open(str(src), "rb") as fin, fsspec.open(str(dst), "wb") as fout:
            shutil.copyfileobj(fin, fout)

    gfile = types.SimpleNamespace(GFile=lambda name, mode="r": fsspec.open(str(name), mode),
                                  copy=copy)
    stand_in = types.ModuleType("tensorflow", "tf.io.gfile for Kubric, on fsspec")
    stand_in.io = types.SimpleNamespace(gfile=gfile)
    # etils (Kubric's paths) asks importlib whether TensorFlow exists; it then still uses
    # plain os calls for local paths
    stand_in.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    sys.modules["tensorflow"] = stand_in


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m generation.render.worker JOB.json | --wait", file=sys.stderr)
        return 2
    warm = argv[0] == WAIT_FLAG
    job = None if warm else json.loads(Path(argv[0]).read_text())
    t_start = time.perf_counter()
    try:  # the interpreter's own start, before main(), for the benchmark's breakdown
        import psutil  # (installed with dask[distributed])
        interpreter_s = time.time() - psutil.Process().create_time()
    except ImportError:
        interpreter_s = 0.0

    # What killed render processes of this node left (their shard scratch, EXRs and
    # PNGs): every worker sweeps it when it starts (generation.render.scratch).
    scratch_module.sweep(warn=lambda line: print(line, file=sys.stderr, flush=True))
    # Blender makes its session directory (blender_XXXXXX) in TMPDIR at import and removes
    # it only at a clean exit: a crashed or killed worker left one per process in the
    # node's temp dir. Everything this process puts in a temp dir goes into a scratch
    # directory of its own instead, removed when it returns, and by the next worker's
    # sweep when it dies.
    own_tmp = storage.scratch_dir("pvit-worker-")
    os.environ["TMPDIR"] = tempfile.tempdir = str(own_tmp)
    try:
        return _main(warm, job, t_start, interpreter_s)
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)


def _main(warm: bool, job: dict | None, t_start: float, interpreter_s: float) -> int:
    # write_samples's (lazily imported there), with torch: worker start-up, not shard write
    import webdataset  # noqa: F401, I001
    import bpy  # noqa: F401
    use_gfile_without_tensorflow()
    import kubric  # noqa: F401, I001
    # every scene simulates: imported with the rest (a warm worker has it ready), and
    # with it kubric.simulator.pybullet's import-time mkdtemp, removed at once (unused)
    import generation.render.physics  # noqa: F401
    scratch_module.drop_kubric_import_dir()

    waited_s = 0.0
    if warm:
        # Started before its job existed (generation.render.warm_workers): the imports above are
        # done; the parent now sends one line, {"job": JOB.json, "log": LOG}, or closes
        # stdin (no shard for this worker, or the parent died): exit quietly.
        t_wait = time.perf_counter()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        handed = json.loads(line)
        waited_s = time.perf_counter() - t_wait
        # From here on the shard's log is this process's stderr (the parent has copied
        # what the imports wrote there before).
        log = os.open(handed["log"], os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 2)
        os.close(log)
        job = json.loads(Path(handed["job"]).read_text())
    cfg = SceneConfig.model_validate(job["scene"])

    threads = int(job.get("threads", 0))
    requested = job.get("device", "auto")
    try:
        # asked once per worker; the parent pinned this process to its GPU
        device = devices.resolve(requested, devices.probe() if requested != "cpu" else {})
    except devices.DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "(all)")
    print(f"render device: {device} (requested {requested}; CUDA_VISIBLE_DEVICES={gpus})",
          file=sys.stderr, flush=True)
    # The parent's per-shard scratch directory (removed by the next run if this one is
    # killed); None = the system temp dir.
    scratch = Path(job["scratch"]) if job.get("scratch") else None
    t_ready = time.perf_counter()
    startup_s = t_ready - t_start - waited_s     # a warm worker's wait is not start-up
    crash_seed = os.environ.get("PVIT_CRASH_ON_SEED")
    raise_seed = os.environ.get("PVIT_RAISE_ON_SEED")

    labels_on = job.get("labels", True)

    def before_scene(seed: int) -> None:
        if crash_seed is not None and int(crash_seed) == seed:
            os._exit(3)
        if raise_seed is not None and int(raise_seed) == seed:
            raise RuntimeError(f"injected failure on seed {seed}")

    samples, render_s, scene_timings = [], 0.0, []
    for (seed, key), (sample, timings) in zip(
            zip(job["seeds"], job["keys"], strict=True),
            render_clips(cfg, job["seeds"], job["keys"], before_scene=before_scene,
                         labels_on=labels_on, threads=threads, scratch_root=scratch,
                         device=device), strict=True):
        render_s += timings["build_s"] + timings["render_s"]
        samples.append(sample)
        # the benchmark's clock: seconds since the worker was ready
        for mark in ("started_at", "rendered_at", "finished_at"):
            timings[mark + "_s"] = timings.pop(mark) - t_ready
        scene_timings.append({"seed": seed, **timings})
        print(json.dumps({"event": "scene", "seed": seed, "key": key, **timings}), flush=True)

    t_write = time.perf_counter()
    if labels_on:
        write_samples(Path(job["out"]), samples)
    write_s = time.perf_counter() - t_write
    # for benchmarks/render.py's breakdown (the shard's log keeps it)
    print("timings " + json.dumps({"interpreter_s": interpreter_s,
                                   "startup_s": startup_s, "waited_s": waited_s,
                                   "scenes": scene_timings,
                                   "write_s": write_s}), file=sys.stderr, flush=True)
    print(json.dumps({"event": "done", "startup_s": startup_s, "scenes_s": render_s,
                      "device": device,
                      "total_s": time.perf_counter() - t_start - waited_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
