"""Dataset locations: the one check every shard directory named by a user passes.

webdataset opens a string through ``gopen``, which dispatches on the URL scheme, and
``pipe:CMD`` runs CMD in a shell. A location is a config value or a flag (deployments
take the config as a run parameter), so a location with a scheme the project does not
handle must be refused before anything opens it, and shards are opened as files (see
``shard_url``) so that no path reaches ``gopen`` as a raw string.

Accepted: a plain path (``data/shards``, ``/data/shards``), ``file:`` URLs of
absolute paths (``file:///data/shards``) and object-store prefixes (``s3://bucket/ds``,
``gs://bucket/ds``, opened through fsspec, see ``generation.storage``). A relative path
that starts like another scheme (``pipe:x``) is refused, because webdataset would read
it as one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# One parser for every location (generation/storage.py); re-exported for the callers
from generation.storage import OBJECT_STORES, LocationError, canonical, parse  # noqa: F401


def dataset_path(location: str | os.PathLike) -> Path | str:
    """The dataset named by ``location``: a local ``Path``, or the canonical URL
    (``s3://bucket/prefix``, ``gs://...``) of an object-store prefix; raises
    ``LocationError`` for any other scheme (``pipe:``, ``https:``...)."""
    return canonical(location)


def shard_url(path: str | os.PathLike) -> str:
    """A ``file:`` URL of a local shard for webdataset: built from the resolved absolute
    path and percent-encoded, so gopen opens the file itself whatever its name holds
    (``pipe:``, ``#``, ``?``), never a shell."""
    return Path(path).resolve().as_uri()


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise ``LocationError`` ("<what>: ...") unless ``path`` is, or can be made, a directory
    this process can write in. It creates and removes a file in the nearest existing
    ancestor: permission bits say nothing for root, nor for read-only mounts or /proc."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        if probe == path:
            raise LocationError(f"{what}: {path} is a file, not a directory")
        raise LocationError(f"{what}: {path} cannot be created: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=probe)
    except OSError as exc:
        raise LocationError(f"{what}: {path} is not writable (creating a file in {probe}: "
                            f"{exc.strerror})") from None
    os.close(fd)
    os.unlink(name)
