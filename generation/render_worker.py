"""Render worker: one process renders every scene of one shard and writes the shard.

Run as ``python -m generation.render_worker JOB.json``. A fresh process per shard
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

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m generation.render_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    t_start = time.perf_counter()

    from generation.config import SceneConfig
    from generation.render_scene import render_clip
    from generation.shard_format import write_shard

    cfg = SceneConfig.model_validate(job["scene"])
    import bpy  # noqa: F401  (import cost is part of the worker's start-up)
    threads = int(job.get("threads", 0))
    # The parent's per-shard scratch directory (removed by the next run if this one is
    # killed); None = the system temp dir.
    scratch = Path(job["scratch"]) if job.get("scratch") else None
    t_ready = time.perf_counter()
    crash_seed = os.environ.get("PVIT_CRASH_ON_SEED")
    raise_seed = os.environ.get("PVIT_RAISE_ON_SEED")

    clips, render_s = [], 0.0
    for seed, key in zip(job["seeds"], job["keys"], strict=True):
        if crash_seed is not None and int(crash_seed) == seed:
            os._exit(3)
        if raise_seed is not None and int(raise_seed) == seed:
            raise RuntimeError(f"injected failure on seed {seed}")
        clip, timings = render_clip(cfg, seed, key, labels_on=job.get("labels", True),
                                    threads=threads, scratch_root=scratch)
        render_s += timings["build_s"] + timings["render_s"]
        clips.append(clip)
        print(json.dumps({"event": "scene", "seed": seed, "key": key, **timings}), flush=True)

    if job.get("labels", True):
        write_shard(Path(job["out"]), clips)
    print(json.dumps({"event": "done", "startup_s": t_ready - t_start, "scenes_s": render_s,
                      "total_s": time.perf_counter() - t_start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
