"""``DIR/manifest.json``: what a shard directory holds and how it was made.

It records the full scene spec and its hash, the versions that made the pixels
(project, kubric, bpy), and per shard its name, sha256, sample count, keys and
scene seeds. It is always replaced atomically (temporary name, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

MANIFEST_NAME = "manifest.json"
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
    return manifest if isinstance(manifest, dict) and "shards" in manifest else None


def new_manifest(spec: dict, spec_hash: str, classes: list[str], dataset: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": spec, "spec_hash": spec_hash,
            "versions": versions(), "renderer": renderer_fingerprint(), "classes": classes,
            "dataset": dataset, "shards": []}


def upsert_shard(manifest: dict, record: dict) -> None:
    """Add or replace one shard record, keeping shards sorted by name."""
    shards = [s for s in manifest["shards"] if s["name"] != record["name"]]
    shards.append(record)
    manifest["shards"] = sorted(shards, key=lambda s: s["name"])
