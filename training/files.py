"""One file of a run named by a local path or an object URL (``s3://bucket/key``,
``gs://...``): how checkpoints, metrics, summaries, evaluation results and downstream
video sets are read and written wherever a stage's ``out`` points.

Everything goes through ``generation.dataset.storage``, the datasets' module, so a run on
a bucket has the same retries, atomic writes (one PUT) and one-line errors as a dataset.
Names are kept as the user wrote them except for a ``Path`` that collapsed ``s3://b/p``
to ``s3:/b/p`` (typer and pathlib do that): ``location`` gives the canonical form.

    location(p)        a local ``Path``, or the canonical URL (a ``str``)
    join/parent/name   path arithmetic that never turns a URL into a ``Path``
    is_file/read_bytes/write_bytes/copy/sha256
    local_copy(p)      a local file for readers that need one (OpenCV, safetensors)
    mirror(url)        a local copy of a prefix (a downstream video set), kept in sync
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path

from generation.dataset.storage import (
    Location,
    LocationError,
    WriteError,
    canonical,
    check_writable_dir,
    filesystem,
    is_remote,
    open_file,
    scratch_base,
    write_atomic,
)

PathOrUrl = Path | str
MIRROR_PREFIX = "pvit-mirror-"      # scratch_base()/pvit-mirror-<hash>/: a bucket's files
MIRROR_INDEX = ".pvit-mirror.json"  # name -> ETag of what the mirror holds
_CHUNK = 8 << 20


def location(path: str | os.PathLike) -> PathOrUrl:
    """``path`` as a local ``Path`` or a canonical object URL (``LocationError`` for any
    other scheme)."""
    return canonical(os.fspath(path))


def remote(path: str | os.PathLike) -> bool:
    return is_remote(os.fspath(path))


def join(root: str | os.PathLike, *names: str) -> PathOrUrl:
    where = location(root)
    if isinstance(where, Path):
        return where.joinpath(*names)
    return posixpath.join(where, *names)


def parent(path: str | os.PathLike) -> PathOrUrl:
    where = location(path)
    return where.parent if isinstance(where, Path) else where.rsplit("/", 1)[0]


def name(path: str | os.PathLike) -> str:
    where = location(path)
    return where.name if isinstance(where, Path) else where.rsplit("/", 1)[1]


def _split(path: str | os.PathLike) -> tuple[Location, str]:
    return Location(parent(path)), name(path)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise ``LocationError`` ("<what>: ...", one line) unless ``path`` can become a
    directory this process writes in: locally a probe file; on an object store, its
    bucket answers and exists (``Location.makedirs``)."""
    where = location(path)
    if isinstance(where, Path):
        check_writable_dir(where, what)
        return
    try:
        filesystem(Location(where).scheme)  # no fsspec package for it: say so, first
        Location(where).makedirs()
    except (LocationError, WriteError) as exc:
        raise LocationError(f"{what}: {exc}") from None


def is_file(path: str | os.PathLike) -> bool:
    where, key = _split(path)
    return where.is_file(key)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; ``FileNotFoundError`` when there is none."""
    where, key = _split(path)
    return where.read_bytes(key)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file atomically (``storage.write_atomic``); a local parent directory
    is created first."""
    where = location(path)
    if isinstance(where, Path):
        where.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(where, bytes(data))


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` becomes a copy of ``source`` (within one store, the store copies it)."""
    src, dst = location(source), location(target)
    if isinstance(src, str) and isinstance(dst, str) and src.split(":")[0] == dst.split(":")[0]:
        where, key = _split(dst)
        Location(parent(src)).fs.copy(src.split("://", 1)[1], f"{where.root}/{key}")
        return
    write_bytes(dst, read_bytes(src))


def sha256(path: str | os.PathLike) -> str:
    """The file's sha256, read in chunks (a checkpoint is read once, never held)."""
    digest = hashlib.sha256()
    where = location(path)
    with open_file(where if isinstance(where, Path) else str(where)) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(path: str | os.PathLike) -> Path:
    """A local file holding ``path``'s bytes: the file itself, or for an object its copy
    in this node's scratch (``mirror`` of its directory, so it is fetched once)."""
    where = location(path)
    if isinstance(where, Path):
        return where
    return _sync(str(parent(where)), only=name(where)) / name(where)


def mirror(root: str | os.PathLike) -> Path:
    """A local directory with every file under ``root``: ``root`` itself when local, else
    its copy in ``scratch_base()`` (``PVIT_SCRATCH``), fetched once per node and kept in
    step with the bucket by ETag (a replaced object is fetched again, a removed one is
    removed). Readers that need real files (OpenCV decodes videos by path) read a
    downstream set on a bucket through it."""
    where = location(root)
    return where if isinstance(where, Path) else _sync(where)


def _sync(url: str, only: str | None = None) -> Path:
    """Bring ``url``'s objects (or its object ``only``) into its mirror directory."""
    where = Location(url)
    local = scratch_base() / (MIRROR_PREFIX + hashlib.sha256(url.encode()).hexdigest()[:16])
    local.mkdir(parents=True, exist_ok=True)
    index_path = local / MIRROR_INDEX
    try:
        held = json.loads(index_path.read_text())
    except (OSError, ValueError):
        held = {}
    wanted = _objects(where, only)
    for key, etag in sorted(wanted.items()):
        target = local / key
        if held.get(key) == etag and target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, where.read_bytes(key))
        held[key] = etag
    if only is None:        # what the bucket no longer has is gone here too
        for key in sorted(set(held) - set(wanted)):
            (local / key).unlink(missing_ok=True)
            del held[key]
    write_atomic(index_path, json.dumps(held, sort_keys=True).encode())
    return local


def _objects(where: Location, only: str | None) -> dict[str, str]:
    """Name (relative, ``/``) -> ETag of the objects under ``where`` (or just ``only``)."""
    if only is not None:
        meta = where.meta(only)
        if meta is None:
            raise FileNotFoundError(f"no such object {where.join(only)}")
        return {only: meta.etag or str(meta.size)}
    found = where.fs.find(where.root, detail=True)
    return {key[len(where.root) + 1:]: str(info.get("ETag") or info.get("size")).strip('"')
            for key, info in found.items() if info.get("type", "file") == "file"}


def upload_tree(local: Path, root: str | os.PathLike) -> None:
    """Put every file under the local directory ``local`` at the same names under
    ``root`` (an object prefix); then remove ``local``."""
    where = Location(location(root))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        where.upload(path, path.relative_to(local).as_posix())
    shutil.rmtree(local, ignore_errors=True)
