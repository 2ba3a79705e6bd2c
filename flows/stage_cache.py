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
  changed config never resumes an old run.
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


def begin(out_dir: Path, key: str, clear_files: bool = True) -> None:
    """Mark ``out_dir`` as being computed for ``key``; a stale directory is cleared
    first (``clear_files=False`` keeps its files, for stages that reuse them, such as
    the shard directory whose own manifest decides what to keep)."""
    out_dir = Path(out_dir)
    if state(out_dir, key) == "stale" and clear_files and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / RECORD, {"key": key, "status": "running"})


def finish(out_dir: Path, key: str, summary: dict, outputs: list[str]) -> None:
    write_json_atomic(Path(out_dir) / RECORD, {"key": key, "status": "done", "summary": summary,
                                               "outputs": outputs})
