"""A shard directory as plain functions (no Prefect): plan which shards a config
asks for, decide which are already done, render one shard in a worker process,
commit it atomically, and keep ``manifest.json`` up to date.

Shard ``i`` holds scenes ``i*M .. min((i+1)*M, N) - 1``; scene ``j``'s seed is derived
from ``(seed, j)`` so adding scenes never changes existing ones. A shard is kept on a
rerun when the manifest lists it with the same spec hash and seeds and the file's
sha256 still matches; anything else renders again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from generation.assets import load_manifest
from generation.config import GenerationConfig
from generation.manifest import (
    MANIFEST_NAME,
    new_manifest,
    read_manifest,
    sha256_file,
    upsert_shard,
    write_json_atomic,
)

SHARD_PATTERN = "shard-{:06d}.tar"


class RenderError(RuntimeError):
    """A render worker failed; the message names the shard and its scene seeds."""


@dataclass
class ShardJob:
    index: int
    name: str
    seeds: list[int]
    keys: list[str]
    spec_hash: str
    scene: dict = field(default_factory=dict)   # SceneConfig as JSON

    @property
    def label(self) -> str:
        return f"{self.name} (scene seeds {self.seeds})"


def scene_seed(seed: int, index: int) -> int:
    """Independent 31-bit seed for scene ``index`` of a dataset seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def plan(cfg: GenerationConfig) -> list[ShardJob]:
    spec = cfg.scene.model_dump(mode="json")
    spec_hash = cfg.scene.digest()
    jobs = []
    for index, start in enumerate(range(0, cfg.scenes, cfg.scenes_per_shard)):
        scene_ids = range(start, min(start + cfg.scenes_per_shard, cfg.scenes))
        jobs.append(ShardJob(index=index, name=SHARD_PATTERN.format(index),
                             seeds=[scene_seed(cfg.seed, j) for j in scene_ids],
                             keys=[f"scene{j:07d}" for j in scene_ids],
                             spec_hash=spec_hash, scene=spec))
    return jobs


def classes_for(cfg: GenerationConfig) -> list[str]:
    from generation.render_scene import class_list
    return class_list(load_manifest(cfg.scene.asset_manifest))


def prepare(cfg: GenerationConfig) -> tuple[dict, list[ShardJob], list[ShardJob]]:
    """Open (or start) the manifest of ``cfg.out``; returns (manifest, jobs to render,
    jobs already done). Drops records and files of shards the config no longer asks for,
    and writes the manifest so that it only lists shards that are valid for this spec."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(cfg)
    old = read_manifest(out)
    dataset = {"scenes": cfg.scenes, "scenes_per_shard": cfg.scenes_per_shard, "seed": cfg.seed}
    manifest = new_manifest(jobs[0].scene, jobs[0].spec_hash, classes_for(cfg), dataset)
    done, todo = [], []
    old_records = {}
    if old is not None and old.get("spec_hash") == manifest["spec_hash"]:
        old_records = {s["name"]: s for s in old["shards"]}
    for job in jobs:
        record = old_records.get(job.name)
        path = out / job.name
        if (record is not None and record["seeds"] == job.seeds and path.is_file()
                and sha256_file(path) == record["sha256"]):
            upsert_shard(manifest, record)
            done.append(job)
        else:
            todo.append(job)
    wanted = {job.name for job in jobs}
    for partial in out.glob(".shard-*.partial"):
        partial.unlink()  # left by a killed run; never under a final name
    for stale in out.glob("shard-*.tar"):
        if stale.name not in wanted:
            stale.unlink()
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest, todo, done


def worker_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def render_shard(job: ShardJob, out_dir: Path, *, threads: int = 0,
                 log_dir: Path | None = None, on_scene=None) -> dict:
    """Render one shard in a fresh worker process and rename it into place.

    Returns the shard's manifest record. Raises ``RenderError`` naming the seeds if the
    worker dies or fails; no partial shard is ever left under the final name."""
    out_dir = Path(out_dir)
    final = out_dir / job.name
    tmp = out_dir / f".{job.name}.{os.getpid()}.{time.monotonic_ns()}.partial"
    log_dir = Path(log_dir) if log_dir else out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{job.name}.log"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"scene": job.scene, "seeds": job.seeds, "keys": job.keys, "out": str(tmp),
                   "threads": threads}, f)
        job_path = f.name
    t0 = time.perf_counter()
    done_event = None
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "generation.render_worker", job_path],
                                    stdout=subprocess.PIPE, stderr=log, text=True,
                                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
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
            tail = log_path.read_text()[-400:].strip().splitlines()[-1:] if log_path.exists() else []
            raise RenderError(f"render worker for {job.label} exited with code {code}"
                              + (f": {tail[0]}" if tail else "") + f" (log: {log_path})")
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        os.unlink(job_path)
    return {"name": job.name, "sha256": digest, "samples": len(job.seeds), "seeds": job.seeds,
            "keys": job.keys, "bytes": size,
            "worker_seconds": round(time.perf_counter() - t0, 3),
            "render_seconds": round(done_event["scenes_s"], 3)}


def commit(out_dir: Path, manifest: dict, record: dict) -> None:
    """Record a finished shard in the manifest (atomic replace)."""
    upsert_shard(manifest, record)
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)


def job_from_dict(data: dict) -> ShardJob:
    return ShardJob(**data)


def job_to_dict(job: ShardJob) -> dict:
    return asdict(job)
