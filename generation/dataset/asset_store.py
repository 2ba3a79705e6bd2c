"""Asset sets by content: what a dataset's spec names, and where a render machine finds it.

A spec names its asset set as ``sha256:<hex>``: the hash of the Kubric manifest's bytes
and of every archive it lists (``<id>.tar.gz`` next to it), never a machine's path. So a
rerun from another checkout with the same asset bytes keeps every shard, and a render
machine whose checkout lives elsewhere (``/opt/pvit`` in the render image) renders the
same clips.

A render machine finds the set (``locate``) in this order: the path the submitting
machine used (the job's hint: a shared filesystem, or the same machine), any set it was
told of (its own built-in sets), then the copy the run uploaded once next to the
dataset (``DATASET/.assets/<hex>/``, ``publish``), fetched into a local cache
(``$XDG_CACHE_HOME/pvit/assets/<hex>``) the first time. Every candidate is checked
against the hash: a set with other bytes is never used under this name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from generation.dataset.storage import Location

PREFIX = "sha256:"
ASSETS_DIR = ".assets"


class AssetSetMissing(FileNotFoundError):
    """No copy of the spec's asset set on this machine or next to the dataset; one line."""


def _files(manifest: Path) -> list[Path]:
    """The manifest, then each archive it lists that exists, by asset id."""
    data = json.loads(manifest.read_bytes())
    archives = [manifest.parent / f"{asset_id}.tar.gz" for asset_id in sorted(data["assets"])]
    return [manifest, *(a for a in archives if a.is_file())]


@functools.lru_cache(maxsize=64)
def _digest(versions: tuple) -> str:
    total = hashlib.sha256()
    for path, _, _ in versions:
        total.update(Path(path).name.encode() + b"\0")
        total.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return total.hexdigest()


def digest(manifest) -> str:
    """``sha256:<hex>`` of an asset set (its manifest and archives). Cached per version
    of its files (path, size, mtime of each): a spec is hashed many times per run."""
    files = _files(Path(manifest).resolve())
    versions = tuple((str(f), st.st_size, st.st_mtime_ns) for f in files
                     for st in [f.stat()])
    return PREFIX + _digest(versions)


def _hex(name: str) -> str:
    if not name.startswith(PREFIX) or len(name) != len(PREFIX) + 64:
        raise ValueError(f"{name!r} is not an asset set's content name (sha256:<64 hex>)")
    return name[len(PREFIX):]


def publish(out, manifest) -> str:
    """Upload the set to ``OUT/.assets/<hex>/`` once (skipped when its manifest is
    already there; the manifest goes last, so a killed upload is completed next time);
    returns the set's content name."""
    name = digest(manifest)
    where = _location(out)
    prefix = f"{ASSETS_DIR}/{_hex(name)}"
    if where.exists(f"{prefix}/manifest.json"):
        return name
    files = _files(Path(manifest))
    if where.local is not None:
        (where.local / prefix).mkdir(parents=True, exist_ok=True)
    for file in files[1:] + files[:1]:
        where.write_bytes(f"{prefix}/{file.name}", file.read_bytes())
    return name


def _location(where) -> Location:
    return where if isinstance(where, Location) else Location(where)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pvit" / "assets"


def _fetch(where: Location, hex_: str) -> Path | None:
    """The uploaded copy of set ``hex_`` as a local manifest path (fetched into the cache
    under a temporary name, then renamed), or None when the dataset has none."""
    prefix = f"{ASSETS_DIR}/{hex_}"
    if not where.exists(f"{prefix}/manifest.json"):
        return None
    if where.local is not None:
        return where.local / prefix / "manifest.json"
    target = cache_root() / hex_
    if (target / "manifest.json").is_file():
        return target / "manifest.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{hex_[:12]}.", dir=target.parent))
    try:
        names = json.loads(where.read_bytes(f"{prefix}/manifest.json"))["assets"]
        (tmp / "manifest.json").write_bytes(where.read_bytes(f"{prefix}/manifest.json"))
        for asset_id in sorted(names):
            if where.exists(f"{prefix}/{asset_id}.tar.gz"):
                (tmp / f"{asset_id}.tar.gz").write_bytes(
                    where.read_bytes(f"{prefix}/{asset_id}.tar.gz"))
        try:
            tmp.rename(target)
        except OSError:          # another process fetched it first: use theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "manifest.json"


def locate(name: str, *, hint: str | None = None, known: Iterable = (),
           dataset=None) -> Path:
    """A local manifest path of the asset set called ``name`` (``sha256:<hex>``): the
    ``hint`` path, one of ``known``, or the copy uploaded next to ``dataset``; each only
    if its bytes hash to ``name``. Raises ``AssetSetMissing`` naming where it looked."""
    hex_ = _hex(name)
    looked = []
    for candidate in ([hint] if hint else []) + [str(k) for k in known]:
        path = Path(candidate)
        if path.is_file():
            if digest(path) == name:
                return path
            looked.append(f"{path} (other bytes)")
        elif candidate == hint:
            looked.append(f"{path} (missing)")
    if dataset is not None:
        where = _location(dataset)
        fetched = _fetch(where, hex_)
        if fetched is not None and digest(fetched) == name:
            return fetched
        looked.append(where.join(f"{ASSETS_DIR}/{hex_}/") + (" (other bytes)" if fetched
                                                             else " (not uploaded)"))
    raise AssetSetMissing(f"asset set {name[:19]}... is not on this machine: looked at "
                          + "; ".join(looked or ["nothing"]))
