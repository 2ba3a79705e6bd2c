"""Dataset locations: the one check every shard directory named by a user passes.

webdataset opens a string through ``gopen``, which dispatches on the URL scheme, and
``pipe:CMD`` runs CMD in a shell. A location is a config value or a flag (deployments
take the config as a run parameter), so a location with a scheme the project does not
handle must be refused before anything opens it, and shards are opened as files (see
``shard_url``) so that no path reaches ``gopen`` as a raw string.

Accepted: a plain path (``data/shards``, ``/data/shards``) and ``file:`` URLs of
absolute paths (``file:///data/shards``). A relative path that starts like a scheme
(``pipe:x``) is refused, because webdataset would read it as one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

# Reserved for object storage; refused until the readers and writers can use it.
OBJECT_STORES = ("s3", "gs")


class LocationError(ValueError):
    """A dataset location the project cannot (or must not) open; one line."""


def dataset_path(location: str | os.PathLike) -> Path:
    """The local directory named by ``location``; raises ``LocationError`` otherwise."""
    if not isinstance(location, (str, os.PathLike)):
        raise LocationError(f"expected a directory path, got {location!r}")
    text = os.fspath(location)
    # urlparse is what gopen uses to pick a handler, so this sees the scheme it would
    url = urlparse(text)
    if not url.scheme:
        return Path(text)
    # typer's Path options collapse file:///x to file:/x; both name the same file
    if url.scheme == "file":
        if url.netloc in ("", "localhost") and url.path.startswith("/"):
            return Path(url2pathname(url.path))
        raise LocationError(f"{text!r}: a file: URL must name an absolute local path "
                            "(file:///data/shards)")
    if url.scheme in OBJECT_STORES:
        raise LocationError(f"{text!r}: object storage ({url.scheme}://) is not supported yet; "
                            "use a local directory")
    raise LocationError(f"{text!r} is not a dataset location: scheme '{url.scheme}:' is not "
                        "supported (use a local path or a file:///absolute/path URL)")


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
