"""``DIR/manifest.json``: what a shard directory holds and how it was made.

It records the full scene spec and its hash, the versions that made the pixels
(project, kubric, bpy), and per shard its name, sha256, sample count, keys and
scene seeds. It is always replaced atomically (temporary name, then rename).

During a run, each committed shard is one line appended (and fsynced) to
``DIR/manifest.journal.jsonl`` instead of a rewrite of the whole manifest, so a
commit costs O(1) whatever the dataset's size; ``prepare`` and the end of a run fold
the journal into ``manifest.json`` (atomic replace, then the journal is removed).
``read_manifest`` folds a journal it finds (a killed run's, or a running one's), so a
reader never sees less than what was committed. A journal line names the manifest's
``spec_hash``: lines of another spec (a journal left by a compaction that was killed
before removing it) are ignored, as is a torn last line of a killed run.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.journal.jsonl"
FORMAT_VERSION = 1


def versions() -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"
    return {"project": version("pvit-synth"), "kubric": version("kubric-nightly"),
            "bpy": version("bpy"), "format": FORMAT_VERSION}


# The modules whose code decides pixels and labels: editing one renders datasets again.
RENDER_CODE = ("render_scene.py", "labels.py", "kubric_compat.py", "shard_format.py",
               "recipes")


def renderer_fingerprint() -> dict:
    """Versions of the renderer and of the code that makes the clips (part of the
    spec hash, so a new Blender/Kubric or a changed recipe renders again)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in RENDER_CODE:
        paths = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]
        for path in paths:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    v = versions()
    return {"bpy": v["bpy"], "kubric": v["kubric"], "code": digest.hexdigest()[:16]}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class WriteError(OSError):
    """A file could not be written (full disk, quota, read-only): ``str()`` is one line
    naming the file and the cause, e.g. ``cannot write D/manifest.json: No space left on
    device``. An ``OSError``, so callers that catch those still do."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON: written and fsynced under a temporary name,
    then renamed, so readers (and a crash) see the old file or the new one, never part
    of one. On failure the temporary file is removed and ``WriteError`` raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())   # a rename that outlives the data would leave 0 bytes
        os.replace(tmp, path)
    except BaseException as exc:
        # A full disk fails the write (or the flush at close): never leave the empty or
        # truncated temporary behind.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, or None when there is none (or it is unreadable,
    in which case every shard is treated as unknown and rendered again)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or "shards" not in manifest:
        return None
    if isinstance(manifest["shards"], list):
        records = read_journal(directory, manifest.get("spec_hash"))
        if records:
            fold_journal(manifest, records)
    return manifest


def append_journal(directory: Path, spec_hash: str | None, record: dict) -> int:
    """Append one shard record to ``DIR/manifest.journal.jsonl`` as one line, fsynced
    before returning: O(1) whatever the manifest holds. Returns the bytes written. On
    failure (a full disk) the journal is cut back to what it held, so no torn line is
    left by this process, and ``WriteError`` is raised naming the journal."""
    path = Path(directory) / JOURNAL_NAME
    line = (json.dumps({"spec_hash": spec_hash, "shard": record}, sort_keys=True,
                       separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, size)
                if size == 0:
                    path.unlink(missing_ok=True)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise WriteError(exc.errno, exc.strerror or str(exc), str(path)) from exc
            raise
    finally:
        os.close(fd)
    return len(line)


def read_journal(directory: Path, spec_hash: str | None) -> list[dict]:
    """The shard records journaled for the manifest with ``spec_hash``, in commit
    order. Lines that do not decode (a killed run's torn last line) or that belong to
    another spec are skipped: such a shard is then just not known, and renders again."""
    path = Path(directory) / JOURNAL_NAME
    try:
        data = path.read_bytes()
    except OSError:   # none (the usual case), or unreadable: nothing journaled is known
        return []
    records = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        shard = entry.get("shard") if isinstance(entry, dict) else None
        if (isinstance(shard, dict) and entry.get("spec_hash") == spec_hash
                and isinstance(shard.get("name"), str)):
            records.append(shard)
    return records


def fold_journal(manifest: dict, records: list[dict]) -> dict:
    """``manifest`` with ``records`` upserted (a later record of a name wins), shards
    sorted by name: O(n log n), done once per compaction, never per commit. Records
    without a name (a hand-edited manifest) are kept, first, for verify to name."""
    by_name = {}
    for record in [*manifest["shards"], *records]:
        name = record.get("name") if isinstance(record, dict) else None
        by_name[name if isinstance(name, str) else f"\0{len(by_name)}"] = record
    manifest["shards"] = [by_name[name] for name in sorted(by_name)]
    return manifest


def journal_exists(directory: Path) -> bool:
    return (Path(directory) / JOURNAL_NAME).exists()


def remove_journal(directory: Path) -> None:
    (Path(directory) / JOURNAL_NAME).unlink(missing_ok=True)


def compact(directory: Path, manifest: dict) -> dict:
    """Fold the journal into ``manifest`` and write it as ``manifest.json`` (atomic
    replace), then remove the journal; returns the manifest. A crash between the two
    leaves a journal whose records are already in the manifest: folding them again is
    a no-op."""
    fold_journal(manifest, read_journal(directory, manifest.get("spec_hash")))
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest)
    remove_journal(directory)
    return manifest


def new_manifest(spec: dict, spec_hash: str, classes: list[str], dataset: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": spec, "spec_hash": spec_hash,
            "versions": versions(), "renderer": renderer_fingerprint(), "classes": classes,
            "dataset": dataset, "shards": []}


def upsert_shard(manifest: dict, record: dict) -> None:
    """Add or replace one shard record, keeping shards sorted by name."""
    shards = [s for s in manifest["shards"] if s["name"] != record["name"]]
    shards.append(record)
    manifest["shards"] = sorted(shards, key=lambda s: s["name"])
