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

On an object store (``s3://``, ``gs://``; see ``generation.dataset.storage``) nothing can be
appended to, so each committed shard is one object of its own,
``manifest.journal/NNNNNNNNNNNNNNNNNNNN-PID-NAME.json`` (a nanosecond stamp first, so a
listing is in commit order): one PUT per commit, O(1) as locally, folded and removed
the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from importlib import metadata
from pathlib import Path

from generation.dataset.storage import (  # noqa: F401 - WriteError: re-exported for callers
    OBJECT_STORES,
    Location,
    StoreUnreachable,
    WriteError,
    write_atomic,
)

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "manifest.journal.jsonl"
JOURNAL_PREFIX = "manifest.journal"      # its object-store form: one object per record
FORMAT_VERSION = 2  # the shard format: generation.dataset.shard_format.FORMAT_VERSION


def versions() -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"
    return {"project": version("pvit-synth"), "kubric": version("kubric-nightly"),
            "bpy": version("bpy"), "format": FORMAT_VERSION}


# Clips one dataset (one ``out``) may plan: planning, the keep check and the manifest are
# O(scenes) in memory (about 0.1 KB and 10 us per clip), so 10 M clips is ~1 GB and
# minutes of planning before any render; a larger request (or a manifest claiming one)
# is refused at once.
MAX_SCENES = 10_000_000

# A shard's name: a plan's shard i is SHARD_PATTERN.format(i); anything else in the
# directory (``shard-old.tar``) is a user's and never touched.
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"shard-\d{6}\.tar")

# The code that decides pixels and labels, relative to the ``generation`` package: editing
# any of it renders datasets again. The store hashes these files; it never imports them.
RENDER_CODE = ("render/scene.py", "render/labels.py", "render/kubric_compat.py",
               "render/actors.py", "render/actor_labels.py", "dataset/actor_format.py",
               "render/physics.py", "render/asset_cache.py", "render/recipes",
               "dataset/shard_format.py")
GENERATION_ROOT = Path(__file__).resolve().parents[1]


def source_digest(root: Path, names) -> str:
    """sha256 (16 hex digits) of the ``.py`` files named by ``names`` (files or
    directories, relative to ``root``): each file's path relative to ``root`` and its
    bytes, in sorted order. The one code fingerprint: the renderer's here, a training
    stage's in ``flows.stage_cache``."""
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def renderer_fingerprint() -> dict:
    """Versions of the renderer and of the code that makes the clips (part of the
    spec hash, so a new Blender/Kubric or a changed recipe renders again)."""
    v = versions()
    return {"bpy": v["bpy"], "kubric": v["kubric"],
            "code": source_digest(GENERATION_ROOT, RENDER_CODE)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def location(directory) -> Location:
    """``directory`` (a path, a URL or a ``Location``) as a ``Location``."""
    return directory if isinstance(directory, Location) else Location(directory)


def write_json_atomic(path, data: dict) -> None:
    """Replace ``path`` (a local path, or an object URL) with ``data`` as JSON, through
    ``storage.write_atomic``."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def name_problem(name) -> str | None:
    """Why ``name`` (a shard record's ``name``) cannot be a file of the dataset, or None.
    A manifest is data: its names are plain file names directly in the dataset's
    directory (no directory part, not ``.`` or ``..``), so no reader is sent outside it."""
    if not isinstance(name, str) or not name:
        return "has no name"
    if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        return f"names {name!r}, which is not a file of the dataset's directory"
    return None


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, or None when there is none (or it is unreadable,
    in which case every shard is treated as unknown and rendered again)."""
    where = location(directory)
    try:
        manifest = json.loads(where.read_bytes(MANIFEST_NAME))
    except StoreUnreachable:
        raise        # an outage is not "no manifest": that would render everything again
    except (OSError, ValueError, RecursionError):   # none, a directory, not JSON, too deep
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
    where = location(directory)
    line = (json.dumps({"spec_hash": spec_hash, "shard": record}, sort_keys=True,
                       separators=(",", ":")) + "\n").encode()
    if where.remote:
        name = f"{time.time_ns():020d}-{os.getpid()}-{record.get('name')}.json"
        where.write_bytes(f"{JOURNAL_PREFIX}/{name}", line)
        return len(line)
    path = where.local / JOURNAL_NAME
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
    where = location(directory)
    try:
        if where.remote:
            data = b"".join(where.read_bytes(f"{JOURNAL_PREFIX}/{name}")
                            for name in sorted(where.listing(JOURNAL_PREFIX)))
        else:
            data = (where.local / JOURNAL_NAME).read_bytes()
    except OSError:   # none (the usual case), or unreadable: nothing journaled is known
        return []
    records = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):   # a torn or crafted line: not a record
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


def journal_exists(directory) -> bool:
    where = location(directory)
    if where.remote:
        return bool(where.listing(JOURNAL_PREFIX))
    return (where.local / JOURNAL_NAME).exists()


def remove_journal(directory) -> None:
    where = location(directory)
    if where.remote:
        where.delete_prefix(JOURNAL_PREFIX)
    else:
        (where.local / JOURNAL_NAME).unlink(missing_ok=True)


def compact(directory: Path, manifest: dict) -> dict:
    """Fold the journal into ``manifest`` and write it as ``manifest.json`` (atomic
    replace), then remove the journal; returns the manifest. A crash between the two
    leaves a journal whose records are already in the manifest: folding them again is
    a no-op."""
    fold_journal(manifest, read_journal(directory, manifest.get("spec_hash")))
    write_manifest(directory, manifest)
    remove_journal(directory)
    return manifest


def write_manifest(directory, manifest: dict) -> None:
    """``DIR/manifest.json`` replaced atomically (see ``write_json_atomic``)."""
    where = location(directory)
    where.write_bytes(MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True)
                                      + "\n").encode())


def sha256_object(directory, name: str, chunk: int = 1 << 20) -> str:
    """sha256 of ``name`` in ``directory`` (a path or an object store), streamed."""
    where = location(directory)
    if not where.remote:
        return sha256_file(where.local / name, chunk)
    digest = hashlib.sha256()
    with where.open(name) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(spec: dict, spec_hash: str, classes: list[str], dataset: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": spec, "spec_hash": spec_hash,
            "versions": versions(), "renderer": renderer_fingerprint(), "classes": classes,
            "dataset": dataset, "shards": []}
