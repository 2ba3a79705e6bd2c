"""Content-keyed stage records, kept next to each stage's outputs.

A stage's key hashes everything that determines its output: its own config section,
the keys of its upstream outputs, and the versions of the code and renderer that
compute it. The record lives in the output directory (``.stage.json``), so a shared
filesystem or bucket serves every machine, not only this one's ``~/.prefect``.

States of an output directory for a key:
- ``done``: a complete record with this key and the outputs it names still exist;
- ``resumable``: started with this key but not finished (a killed or failed run;
  training resumes from its last checkpoint);
- ``stale``: made with another key (or never): cleared before the stage runs, so a
  changed config never resumes an old run. Only a directory carrying a record is
  cleared; a non-empty one without it is someone else's and is refused.

Why not Prefect's ``cache_policy`` / ``cache_key_fn`` with ``key_storage``: Prefect
caches a task's *return value* under a key and answers "is there a result for this
key"; it has no notion of the files a stage writes. The records here answer what the
pipeline needs and Prefect's cache cannot: whether the outputs the record names still
exist (a deleted checkpoint makes the stage run again, a cached result would not); a
*resumable* state (a killed training run continues from its last checkpoint, a
cache only knows done or not); clearing what a stale run wrote and refusing a
directory the project did not write (``foreign``); and a record that travels with the
outputs, so whoever copies or mounts a run directory (another machine, no shared
``key_storage``) sees it done. Prefect still keeps what it is good at: the flow's
states, retries and artifacts.

An output "directory" may also be an object-store prefix (``s3://bucket/ds``; see
``generation.dataset.storage``): the record is then the object ``PREFIX/.stage.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from generation.dataset.manifest import source_digest, write_json_atomic
from generation.dataset.storage import Location
from training import files

RECORD = ".stage.json"
# Plain logging (no Prefect here); in a flow run it reaches the run's console.
log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def code_version(*packages: str) -> str:
    """Project version plus a hash of the named packages' sources: editing the code
    of a stage invalidates its cached outputs."""
    try:
        project = metadata.version("pvit-synth")
    except metadata.PackageNotFoundError:
        project = "unknown"
    return hashlib.sha256(f"{project}:{source_digest(REPO, packages)}".encode()).hexdigest()[:16]


def stage_key(stage: str, section: Any, upstream: dict[str, str], code: str) -> str:
    payload = {"stage": stage, "section": section, "upstream": upstream, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_key(path) -> str:
    """An input file's part of a stage key: its content's sha256 (not its path: two
    spellings of one file are one input), or "none" without a file."""
    if not path or not files.is_file(path):
        return "none"
    return files.sha256(path)          # a local file or an object (s3://, gs://)


def read_record(out_dir) -> dict | None:
    try:
        return json.loads(Location(out_dir).read_bytes(RECORD))
    except (OSError, ValueError, RecursionError):
        return None


def state(out_dir, key: str) -> str:
    record = read_record(out_dir)
    if record is None or record.get("key") != key:
        return "stale"
    where = Location(out_dir)
    if record.get("status") == "done" and all(
            where.exists(p) for p in record.get("outputs", [])):
        return "done"
    return "resumable"


class ForeignDirectory(ValueError):
    """A stage's ``out`` holds files this project did not write: never cleared."""


def is_stage_dir(out_dir: Path) -> bool:
    """Whether ``out_dir`` carries this project's stage record (and so may be cleared)."""
    record = read_record(out_dir)
    return isinstance(record, dict) and "key" in record


def foreign(out_dir: Path) -> str | None:
    """Why ``out_dir`` must not be used as a stage's output, or None: a missing or empty
    directory, or one with a stage record, is fine; anything else belongs to someone
    else, and clearing it for a stale stage would delete their files."""
    if Location(out_dir).remote:
        where = Location(out_dir)
        if is_stage_dir(out_dir) or not where.fs.find(where.root, maxdepth=None):
            return None
        return (f"{where} already holds objects that are not a pvit stage output (no "
                f"{RECORD}); choose a new or empty prefix")
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        return f"{out_dir} is not a directory"
    if is_stage_dir(out_dir) or not any(out_dir.iterdir()):
        return None
    return (f"{out_dir} already holds files that are not a pvit stage output (no {RECORD}); "
            "choose a new or empty directory")


def begin(out_dir: Path, key: str, owned: Iterable[str] = (), clear_files: bool = True,
          keep: Iterable[str] = ()) -> None:
    """Mark ``out_dir`` as being computed for ``key``, owning ``owned`` (names relative
    to it that the stage writes: files or directories).

    A stale directory first loses what the stage owns: ``owned`` and whatever its
    previous record said it owned (a changed config may name other files). Anything
    else in it (a user's notes, plots) is kept and named in a warning. With
    ``clear_files=False`` nothing is removed, for stages that reuse their files, such as
    the shard directory whose own manifest decides what to keep. Only a directory with
    a stage record is ever touched: any other non-empty one raises ``ForeignDirectory``
    (the CLI refuses it before any work; this is the check for every other caller).
    ``keep`` names what the stage keeps on purpose across runs (a cache of its own),
    which is neither cleared nor warned about."""
    if clear_files and (problem := foreign(out_dir)):
        raise ForeignDirectory(problem)
    where = Location(out_dir)
    # what this stage, and every earlier run of it here, said it writes
    # run_view imports Prefect (0.7 s), and `pvit --help` imports this module
    from flows import run_view

    previous = read_record(out_dir) or {}
    if previous.get("status") == "running" and isinstance(previous.get("run"), dict):
        # a run that never finished here: if its process is gone, its runs are Crashed
        marked = run_view.mark_crashed(previous["run"], str(where))
        if marked:
            log.warning("%s: marked the runs of a killed process Crashed: %s", where,
                        ", ".join(marked))
    earlier = previous.get("owned") if isinstance(previous.get("owned"), list) else []
    owned = sorted({_owned_name(n) for n in [*owned, *earlier] if isinstance(n, str)})
    if clear_files and state(out_dir, key) == "stale" and where.exists():
        for name in owned:
            where.delete_prefix(name)      # a directory and what it holds,
            where.delete(name)             # or a file
        kept = sorted(set(_top_level(where)) - {RECORD, *keep})
        if kept:
            log.warning("%s: kept %s, not written by this stage", where, ", ".join(kept))
    where.makedirs()
    write_json_atomic(where.join(RECORD), {"key": key, "status": "running", "owned": owned,
                                           "run": run_view.run_owner()})


def _owned_name(name: str) -> str:
    """``name`` if it stays inside the stage directory (a record read back from disk
    could name ``../x``); else ``ValueError``."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"stage record: {name!r} is not a name inside the stage directory")
    return name


def _top_level(where: Location) -> list[str]:
    """The names directly in ``where`` (files and directories)."""
    if where.local is not None:
        return [entry.name for entry in where.local.iterdir()]
    return sorted({key.rstrip("/").rsplit("/", 1)[-1]
                   for key in where.fs.ls(where.root, detail=False)})


def invalidate(out_dir: Path) -> bool:
    """Make a stage's output stale (``--force``) without deleting anything here: its own
    ``begin`` clears the directory, with the same check as any stale one. Returns
    whether there was a stage record to invalidate."""
    if not is_stage_dir(out_dir):
        return False
    Location(out_dir).write_bytes(RECORD, json.dumps({"key": None, "status": "forced"}).encode())
    return True


def finish(out_dir: Path, key: str, summary: dict, outputs: list[str]) -> None:
    """Record the stage done for ``key``, with ``outputs`` (what must still exist for it
    to stay done) and what ``begin`` said it owns."""
    running = read_record(out_dir) or {}
    owned = running.get("owned") if isinstance(running.get("owned"), list) else []
    Location(out_dir).write_bytes(RECORD, (json.dumps(
        {"key": key, "status": "done", "summary": summary, "outputs": outputs,
         "owned": owned}, indent=2, sort_keys=True) + "\n").encode())
