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
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from generation.manifest import write_json_atomic

RECORD = ".stage.json"
REPO = Path(__file__).resolve().parents[1]


def code_version(*packages: str) -> str:
    """Project version plus a hash of the named packages' sources: editing the code
    of a stage invalidates its cached outputs."""
    digest = hashlib.sha256()
    try:
        digest.update(metadata.version("pvit-synth").encode())
    except metadata.PackageNotFoundError:
        pass
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, section: Any, upstream: dict[str, str], code: str) -> str:
    payload = {"stage": stage, "section": section, "upstream": upstream, "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_record(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def state(out_dir: Path, key: str) -> str:
    record = read_record(out_dir)
    if record is None or record.get("key") != key:
        return "stale"
    if record.get("status") == "done" and all(
            (Path(out_dir) / p).exists() for p in record.get("outputs", [])):
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
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        return f"{out_dir} is not a directory"
    if is_stage_dir(out_dir) or not any(out_dir.iterdir()):
        return None
    return (f"{out_dir} already holds files that are not a pvit stage output (no {RECORD}); "
            "choose a new or empty directory")


def begin(out_dir: Path, key: str, clear_files: bool = True) -> None:
    """Mark ``out_dir`` as being computed for ``key``; a stale directory is cleared
    first (``clear_files=False`` keeps its files, for stages that reuse them, such as
    the shard directory whose own manifest decides what to keep). Only a directory with
    a stage record is ever cleared: any other non-empty one raises ``ForeignDirectory``
    (the CLI refuses it before any work; this is the check for every other caller)."""
    out_dir = Path(out_dir)
    if clear_files and (problem := foreign(out_dir)):
        raise ForeignDirectory(problem)
    if state(out_dir, key) == "stale" and clear_files and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RECORD, {"key": key, "status": "running"})


def invalidate(out_dir: Path) -> bool:
    """Make a stage's output stale (``--force``) without deleting anything here: its own
    ``begin`` clears the directory, with the same check as any stale one. Returns
    whether there was a stage record to invalidate."""
    out_dir = Path(out_dir)
    if not is_stage_dir(out_dir):
        return False
    write_json_atomic(out_dir / RECORD, {"key": None, "status": "forced"})
    return True


def finish(out_dir: Path, key: str, summary: dict, outputs: list[str]) -> None:
    write_json_atomic(Path(out_dir) / RECORD, {"key": key, "status": "done", "summary": summary,
                                               "outputs": outputs})
