"""A shard directory as plain functions (no Prefect, no renderer): plan which shards a
config asks for, decide which are already done, commit each finished one, and keep
``manifest.json`` up to date. Rendering a shard is ``generation.render.supervisor``'s.

Shard ``i`` holds scenes ``i*M .. min((i+1)*M, N) - 1``; scene ``j``'s seed is derived
from ``(seed, j)`` so adding scenes never changes existing ones. A shard is kept on a
rerun when the manifest lists it with the same spec hash and seeds and the file's size
and mtime still match the record (no shard byte is read; a changed mtime alone costs
one sha256); anything else renders again. Commits append to the manifest's journal
(O(1) each), which ``prepare`` and ``compact`` fold into ``manifest.json``.

Everything a run writes besides shards and the manifest carries a name of its own
(``.shard-NNNNNN.tar.PID.NS.partial``, ``.shard-NNNNNN.tar.PID.NS.job.json``, the
worker's Blender scratch directory ``.shard-NNNNNN.tar.PID.NS.scratch/``,
``.manifest.json.PID.tmp``, ``logs/shard-NNNNNN.attempt-K.log``), so a later run removes
exactly what a killed one left and nothing a user put in the directory.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from generation.dataset import spec_change
from generation.dataset.manifest import (  # noqa: F401 - SHARD_*: the names of a plan's shards
    MANIFEST_NAME,
    SHARD_PATTERN,
    SHARD_RE,
    append_journal,
    journal_exists,
    location,
    new_manifest,
    read_manifest,
    remove_journal,
    sha256_object,
    write_manifest,
)
from generation.dataset.manifest import compact as compact_manifest
from generation.dataset.storage import Location, Meta

if TYPE_CHECKING:   # the stage's config; the store reads its fields and never imports it
    from generation.config import GenerationConfig

# Temporary files of a run (see the module docstring); a killed run leaves them behind.
LEFTOVER_RE = re.compile(r"\.shard-\d{6}\.tar\.\d+\.\d+\.(partial|job\.json|scratch)"
                         r"|\." + re.escape(MANIFEST_NAME) + r"\.\d+\.tmp")
# Fields of a shard record that prepare, the flow's summary and verify read.
RECORD_FIELDS = {"name": str, "sha256": str, "samples": int, "seeds": list, "keys": list,
                 "bytes": int}

# Plain logging (this module has no Prefect); in a flow run it reaches the console
# through Prefect's root handler, as "WARNING | generation.dataset.plan - ...".
log = logging.getLogger(__name__)


@dataclass
class ShardJob:
    index: int
    name: str
    seeds: list[int]
    keys: list[str]
    spec_hash: str
    scene: dict = field(default_factory=dict)   # SceneConfig.spec(): assets by content
    # where the submitting machine has the asset set (a hint for the render machine,
    # which checks its bytes; not part of the spec: generation.dataset.asset_store)
    assets: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} (scene seeds {self.seeds})"


def scene_seed(seed: int, index: int) -> int:
    """Independent 31-bit seed for scene ``index`` of a dataset seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def plan(cfg: GenerationConfig) -> list[ShardJob]:
    spec = cfg.scene.spec()
    spec_hash = cfg.scene.digest()
    jobs = []
    for index, start in enumerate(range(0, cfg.scenes, cfg.scenes_per_shard)):
        scene_ids = range(start, min(start + cfg.scenes_per_shard, cfg.scenes))
        jobs.append(ShardJob(index=index, name=SHARD_PATTERN.format(index),
                             seeds=[scene_seed(cfg.seed, j) for j in scene_ids],
                             keys=[f"scene{j:07d}" for j in scene_ids],
                             spec_hash=spec_hash, scene=spec,
                             assets=str(Path(cfg.scene.asset_manifest).resolve())))
    return jobs


def prepare(cfg: GenerationConfig) -> tuple[dict, list[ShardJob], list[ShardJob]]:
    """Open (or start) the manifest of ``cfg.out``; returns (manifest, jobs to render,
    jobs already done), and writes the manifest so that it only lists shards that are
    valid for this spec.

    Shard files the config no longer asks for (fewer scenes) are removed only once
    every planned shard is in the manifest: here when nothing is left to render, else
    by the ``commit`` of the last one, so a failed run never costs the old shards. Both
    that and shards about to be rendered over are logged as warnings naming them."""
    out = location(cfg.out)
    out.makedirs()
    jobs = plan(cfg)
    old = read_manifest(out)
    dataset = {"scenes": cfg.scenes, "scenes_per_shard": cfg.scenes_per_shard, "seed": cfg.seed}
    manifest = new_manifest(jobs[0].scene, jobs[0].spec_hash, _classes(cfg, old, jobs[0]),
                            dataset)
    manifest.update(cfg.scene.actor_names())   # action_names, joint_names: recipes with people
    replacing = _replacing(cfg, old)   # raises SpecChanged unless cfg.overwrite
    same_spec = old is not None and old.get("spec_hash") == manifest["spec_hash"]
    old_records = _records_by_name(old) if same_spec else {}
    done, todo = [], []
    replaced: dict[str, list[str]] = {}   # reason -> existing shard files to render over
    rehashed = False                      # a kept record got a new mtime_ns / etag
    files = out.listing()                 # size and mtime/ETag of each: one listing
    for job in jobs:
        record = old_records.get(job.name)
        version = _version(record) if record is not None else None
        reason = _why_not_done(record, job, files.get(job.name), out)
        if reason is None:
            rehashed |= _version(record) != version
            # jobs come in name order: appending keeps ``shards`` sorted, O(1) each
            manifest["shards"].append(record)
            done.append(job)
            continue
        todo.append(job)
        if job.name in files:
            if old is None:
                reason = "no readable manifest"
            elif not same_spec:
                reason = "the scene spec or renderer changed"
            replaced.setdefault(reason, []).append(job.name)
    if out.local is not None:   # an object store has no temporary objects to leave
        _remove_leftovers(out.local, todo)
    if replacing is not None and todo:
        # Shards of the old spec still on disk, until each is rendered over (then it is in
        # ``shards``) or, beyond the plan, removed at the end (docs/dataset-format.md).
        manifest["replacing"] = replacing
    for reason, names in replaced.items():
        log.warning("%s: %s will be rendered again and replaced (%s)", out,
                    _name_list(names), reason)
    # The journal (a killed run's commits) was folded in by read_manifest; compact it
    # into manifest.json, then drop it. Nothing to write when nothing changed.
    if rehashed or manifest != old or journal_exists(out):
        write_manifest(out, manifest)
    remove_journal(out)
    stale = _stale_shards(out, {job.name for job in jobs}, files)
    if stale and todo:
        log.warning("%s: %s beyond the %d planned will be removed once those are rendered",
                    out, _name_list(stale), len(jobs))
    elif stale:
        _remove_stale(out, stale, len(jobs))
    return manifest, todo, done


def unlisted_jobs(cfg: GenerationConfig) -> list[ShardJob]:
    """The planned shards the manifest of ``cfg.out`` does not list for this spec, in
    order: read-only, without the file checks ``prepare`` adds (a shard deleted by hand
    still counts as listed). The CLI starts render workers for the first of them before
    the flow decides (``generation.render.warm_workers``)."""
    jobs = plan(cfg)
    old = read_manifest(location(cfg.out))
    if old is None or old.get("spec_hash") != jobs[0].spec_hash:
        return jobs
    listed = _records_by_name(old)
    return [job for job in jobs if job.name not in listed]


def _replacing(cfg: GenerationConfig, old: dict | None) -> dict | None:
    """What an overwrite replaces: the old spec and the names of its shards on disk.
    Refuses (``SpecChanged``, before anything is touched) a spec change without
    ``cfg.overwrite``; a resumed overwrite (the manifest already has the new spec and
    a ``replacing`` record) carries the record over."""
    spec_change.check(cfg)
    if old is None:
        return None
    if spec_change.changes(old, cfg):
        return {"spec": old.get("spec"), "spec_hash": old.get("spec_hash"),
                "renderer": old.get("renderer"), "dataset": old.get("dataset"),
                "shards": spec_change.existing_shards(Path(cfg.out))}
    previous = old.get("replacing")
    return previous if isinstance(previous, dict) else None


def _classes(cfg: GenerationConfig, old: dict | None, job: ShardJob) -> list[str]:
    """The class list; an unchanged spec's comes from its manifest. The spec hash covers
    the asset manifest's bytes and the code that makes the list
    (``shard_format.class_list``), so it is the same list, and a rerun does not import the
    renderer's modules (webdataset and torch: seconds on a cold process) to learn it."""
    if old is not None and old.get("spec_hash") == job.spec_hash:
        classes = old.get("classes")
        if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
            return classes
    return cfg.scene.classes()


def _records_by_name(manifest: dict | None) -> dict[str, dict]:
    shards = manifest.get("shards") if manifest else None
    if not isinstance(shards, list):
        return {}
    return {s["name"]: s for s in shards if isinstance(s, dict) and isinstance(s.get("name"), str)}


def _version(record: dict):
    return record.get("mtime_ns"), record.get("etag")


def _why_not_done(record: dict | None, job: ShardJob, meta: Meta | None,
                  out: Location) -> str | None:
    """None when ``record`` proves the file ``meta`` describes is ``job``'s shard; else
    why it renders again.
    A record missing a field (hand-edited, or written by other code) counts as not done:
    rendering it again repairs the dataset instead of crashing every run on it.

    Decided from metadata, without reading the shard: the file's size and mtime
    (one directory listing) must equal the record's ``bytes`` and ``mtime_ns`` (taken
    at ``commit``); on an object store, size and ETag (``etag``). A file whose size
    matches but whose mtime/ETag does not (touched, copied without its times, or a
    record from before these were kept) is hashed once: kept, with its new mtime/ETag
    recorded, if the sha256 still matches, since hashing costs far less than
    rendering. Damage that keeps size and mtime is ``pvit verify``'s to find
    (the full sha256 check)."""
    if record is None:
        return "not in the manifest"
    if any(not isinstance(record.get(k), t) for k, t in RECORD_FIELDS.items()):
        return "its manifest record is incomplete"
    if record["seeds"] != job.seeds or record["keys"] != job.keys:
        return "its scenes changed (seed or scenes_per_shard)"
    if meta is None:
        return "missing"
    if meta.size != record["bytes"]:
        return "its size does not match the manifest"
    field, version = ("etag", meta.etag) if out.remote else ("mtime_ns", meta.mtime_ns)
    if version is not None and record.get(field) == version:
        return None
    if sha256_object(out, job.name) != record["sha256"]:
        return "its sha256 does not match the manifest"
    record[field] = version
    return None


def _remove_leftovers(out: Path, todo: list[ShardJob]) -> None:
    """Remove what killed runs left: temporary shards, job files and manifests (never
    under a final name, see LEFTOVER_RE), and the logs of the shards about to render,
    whose attempts this run numbers from 1 again (as the old single log was rewritten)."""
    for path in out.iterdir():
        if not LEFTOVER_RE.fullmatch(path.name) or path.is_symlink():
            continue
        if path.name.endswith(".scratch") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)   # made by generation.render.supervisor
        elif path.is_file():
            path.unlink(missing_ok=True)
    logs = out / "logs"
    if not logs.is_dir():
        return
    stems = {Path(job.name).stem for job in todo}
    for path in logs.iterdir():
        match = re.fullmatch(r"(shard-\d{6})(?:\.attempt-\d+|\.tar)\.log", path.name)
        if match and match.group(1) in stems and path.is_file():
            path.unlink(missing_ok=True)


def _stale_shards(out: Location, wanted: set[str], files: dict | None = None) -> list[str]:
    """Shard files (our exact naming; ``shard-old.tar`` is a user's) not in ``wanted``."""
    files = out.listing() if files is None else files
    return sorted(name for name in files if SHARD_RE.fullmatch(name) and name not in wanted)


def _remove_stale(out: Location, names: list[str], planned: int) -> None:
    for name in names:
        out.delete(name)
    log.warning("%s: removed %s beyond the %d planned", out, _name_list(names), planned)


def _name_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} shard{'s' if len(names) != 1 else ''} ({shown}{more})"


def commit(out_dir: Path, manifest: dict, record: dict) -> int:
    """Record a finished shard: its record (with the file's ``mtime_ns``, which the next
    ``prepare`` compares instead of reading the shard) is one line appended to the
    manifest's journal and fsynced, and appended to ``manifest["shards"]`` in memory.
    O(1) whatever the dataset's size: ``manifest.json`` itself is rewritten only by
    ``prepare`` and ``compact`` (the end of a run), which also sort and de-duplicate
    ``shards``. Returns the bytes appended to the journal.

    Once the manifest holds every planned shard, shard files beyond the plan (a lowered
    scene count) are removed, with a warning naming them; see ``prepare``."""
    out_dir = location(out_dir)
    if out_dir.local is not None:
        try:
            record["mtime_ns"] = os.stat(out_dir.local / record["name"]).st_mtime_ns
        except FileNotFoundError:
            record.pop("mtime_ns", None)   # no file: the next prepare finds it missing
    # (on an object store the upload's ETag is in the record already: the supervisor put it)
    written = append_journal(out_dir, manifest.get("spec_hash"), record)
    shards = manifest["shards"]
    shards.append(record)
    dataset = manifest.get("dataset") or {}
    if "scenes" in dataset and "scenes_per_shard" in dataset:
        planned = -(-dataset["scenes"] // dataset["scenes_per_shard"])
        # O(1) until the last planned shard is in (prepare lists only planned shards)
        if len(shards) < planned:
            return written
        wanted = {SHARD_PATTERN.format(i) for i in range(planned)}
        if wanted <= {s["name"] for s in shards}:
            stale = _stale_shards(out_dir, wanted)
            if stale:
                _remove_stale(out_dir, stale, planned)
    return written


def compact(out_dir: Path, manifest: dict) -> dict:
    """The end of a run (failed or not): fold the journal into ``manifest.json``
    (atomic replace), remove the journal, and return the manifest with ``shards``
    sorted and de-duplicated. See ``generation.dataset.manifest.compact``."""
    return compact_manifest(location(out_dir), manifest)


def job_from_dict(data: dict) -> ShardJob:
    return ShardJob(**data)


def job_to_dict(job: ShardJob) -> dict:
    return asdict(job)
