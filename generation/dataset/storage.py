"""A dataset location: a local directory or an object-store prefix, behind one small API.

Everything that reads or writes a dataset (manifest, journal, lock, shards, stage
records) goes through a ``Location``, so the same code serves ``data/synthetic``,
``file:///data/synthetic``, ``s3://bucket/ds`` and ``gs://bucket/ds``. Object stores are
reached through fsspec (``s3fs``/``gcsfs``, optional extras); credentials and endpoints
come from the usual places: ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for a non-AWS
server), ``FSSPEC_S3_*``/``FSSPEC_GS_*`` variables and fsspec's config files.

What "atomic" means here:
- local: written and fsynced under a temporary name (``.NAME.PID.tmp``), then renamed;
- object store: one PUT (or a multipart upload, which the store shows only once it is
  completed), so a reader sees the old object or the new one, never part of one. No
  temporary objects are needed, and none are left by a killed run.

Cheap metadata (``Meta``): size plus the local file's ``mtime_ns`` or the object's ETag;
a listing of the location gives both for every object in one request per 1,000 objects,
which is what lets a rerun decide what is kept without reading shard bytes.

Transient faults: every object-store call of a ``Location`` (and ``open_file``) goes
through ``retrying``: a connection refused or reset, a timeout, or an HTTP 5xx/429
answer is retried with exponential backoff (0.5 s doubling to 15 s between tries) for up
to ``PVIT_STORE_RETRY_S`` seconds in all (default ``RETRY_SECONDS``, 120), so a store
that restarts or a network that drops for a minute costs a run that minute, not the run.
A missing object (404), a denied one (403) or a refused conditional write (412) is an
answer, never retried. What still fails after the bound is ``StoreUnreachable``, one line.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

# fsspec stays inside filesystem(): 0.03 s (python -X importtime after flows.cli), a tenth
# of `pvit --help` (0.33 s), which imports this module; a local dataset never needs it.

OBJECT_STORES = ("s3", "gs")
# the package (and the project's extra) that provides each store's fsspec implementation
EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}


log = logging.getLogger(__name__)

# How long an object-store call keeps retrying a transient fault, in seconds, all tries
# together; the environment's PVIT_STORE_RETRY_S overrides it (0: no retries).
RETRY_SECONDS = 120.0
RETRY_ENV = "PVIT_STORE_RETRY_S"
_FIRST_WAIT_S, _MAX_WAIT_S = 0.5, 15.0


class LocationError(ValueError):
    """A dataset location the project cannot (or must not) open; one line."""


class WriteError(OSError):
    """A file could not be written (full disk, quota, read-only, no such bucket):
    ``str()`` is one line naming the file and the cause, e.g. ``cannot write
    D/manifest.json: No space left on device``. An ``OSError``, so callers that catch
    those still do."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class StoreUnreachable(WriteError):
    """An object-store call that kept failing with transient faults (connection refused,
    timeouts, 5xx) for the whole retry budget; ``str()`` is one line naming the
    location, the last cause and the time spent. A ``WriteError``, whether the call read
    or wrote, so that every caller that turns those into one line does so for it too."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


@dataclass(frozen=True)
class Meta:
    """Cheap metadata of one file or object: its size and a version that changes
    whenever its bytes are replaced (``mtime_ns`` locally, the ETag on object stores)."""

    size: int
    mtime_ns: Optional[int] = None
    etag: Optional[str] = None


def parse(location: str | os.PathLike) -> tuple[str, str]:
    """``(scheme, path)`` of a location: ``("", local path)`` for local directories and
    file: URLs, ``("s3", "bucket/prefix")`` for object stores. Raises ``LocationError``
    for anything else (``pipe:``, ``https:``...): webdataset's ``gopen`` would run a
    ``pipe:`` location as a shell command."""
    if not isinstance(location, (str, os.PathLike)):
        raise LocationError(f"expected a directory path or URL, got {location!r}")
    text = os.fspath(location)
    url = urlparse(text)
    if not url.scheme:
        return "", text
    # typer's Path options (and pathlib) collapse file:///x to file:/x and s3://b/p to
    # s3:/b/p; both spellings name the same place
    if url.scheme == "file":
        if url.netloc in ("", "localhost") and url.path.startswith("/"):
            return "", url2pathname(url.path)
        raise LocationError(f"{text!r}: a file: URL must name an absolute local path "
                            "(file:///data/shards)")
    if url.scheme in OBJECT_STORES:
        if url.query or url.fragment or url.params:
            raise LocationError(f"{text!r}: an object-store URL takes no ?query or #fragment")
        path = f"{url.netloc}/{url.path.lstrip('/')}" if url.netloc else url.path.lstrip("/")
        path = path.rstrip("/")
        if not path or path.startswith("/") or "//" in path:
            raise LocationError(f"{text!r}: an object-store URL names a bucket and a prefix "
                                f"({url.scheme}://bucket/datasets/name)")
        return url.scheme, path
    raise LocationError(f"{text!r} is not a dataset location: scheme '{url.scheme}:' is not "
                        "supported (use a local path, a file:///absolute/path URL, "
                        "s3://bucket/prefix or gs://bucket/prefix)")


def is_remote(location: str | os.PathLike) -> bool:
    return parse(location)[0] != ""


def canonical(location: str | os.PathLike) -> Path | str:
    """A local ``Path``, or the canonical URL (``s3://bucket/prefix``) of an object store."""
    scheme, path = parse(location)
    return Path(path) if not scheme else f"{scheme}://{path}"


_filesystems: dict[tuple[str, int], object] = {}


def filesystem(scheme: str):
    """The fsspec filesystem of ``scheme``, without a listings cache: another process
    (a render worker, a second run) changes the bucket, so a cached listing would lie."""
    key = (scheme, os.getpid())   # a forked DataLoader worker needs its own event loop
    if key not in _filesystems:
        import fsspec
        try:
            _filesystems[key] = fsspec.filesystem(scheme, use_listings_cache=False)
        except ImportError:
            package, extra = EXTRAS[scheme]
            raise LocationError(f"{scheme}:// needs the {package} package (pip install "
                                f"{package}, or the project's '{extra}' extra)") from None
    return _filesystems[key]


def retry_budget() -> float:
    """Seconds a store call may spend retrying transient faults (``PVIT_STORE_RETRY_S``,
    else ``RETRY_SECONDS``)."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return RETRY_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise LocationError(f"{RETRY_ENV}={text!r}: expected a number of seconds >= 0")
    return value


# Answers of the store, whatever wraps them: never retried.
_ANSWERS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
            NotADirectoryError)
# HTTP error codes S3/GCS send with a status that may be a gateway's, not the store's
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
                    "TooManyRequests"}


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is an outage worth waiting out: a connection
    refused, reset or closed, a timeout, or an HTTP 5xx/429 answer. A 404, 403 or 412
    (and any other answer) is not: a missing object is an answer, not an outage."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _ANSWERS):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):   # socket.timeout too
            return True
        status = _http_status(exc)
        if status is not None:
            return status >= 500 or status == 429
        module = type(exc).__module__ or ""
        name = type(exc).__name__
        if module.startswith("botocore") and name in _BOTOCORE_TRANSIENT:
            return True
        if module.startswith("aiohttp") and ("Connect" in name or "Disconnected" in name
                                             or "Timeout" in name or "Payload" in name):
            return True
        if name == "FSTimeoutError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# botocore's connection-level failures (no answer from the store at all)
_BOTOCORE_TRANSIENT = {"EndpointConnectionError", "ConnectionClosedError",
                       "ReadTimeoutError", "ConnectTimeoutError", "ConnectionError",
                       "HTTPClientError", "IncompleteReadError", "ResponseStreamingError",
                       "ProxyConnectionError"}


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a store's error answer (botocore's ``ClientError``, gcsfs's
    ``HttpError``), else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = response["Error"].get("Code")
        if code in _TRANSIENT_CODES:
            return 503
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if isinstance(status, int) else None
    code = getattr(exc, "code", None)
    if type(exc).__module__.startswith("gcsfs") and isinstance(code, int):
        return code
    return None


def retrying(call, where: str, *args, **kwargs):
    """``call(*args, **kwargs)``, retried on transient faults (``transient``) with
    exponential backoff for up to ``retry_budget()`` seconds; then ``StoreUnreachable``
    naming ``where``. Anything else is raised as it is, at once."""
    budget, wait, deadline = retry_budget(), _FIRST_WAIT_S, None
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted by transient()
            if not transient(exc):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + budget
                if budget > 0:
                    log.warning("%s: %s; retrying for up to %.0f s", where,
                                _first_line(exc), budget)
            if now >= deadline:
                raise StoreUnreachable(errno.EIO, f"cannot reach the store: "
                                       f"{_first_line(exc)} (retried for {budget:.0f} s, "
                                       f"{RETRY_ENV})", where) from None
            time.sleep(min(wait, deadline - now))
            wait = min(2 * wait, _MAX_WAIT_S)


class _Retrying:
    """An fsspec filesystem whose every method call goes through ``retrying``: what
    ``Location.fs`` hands out, so no store call of the project goes without it."""

    def __init__(self, fs, where: str):
        self._fs, self._where = fs, where

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr
        return functools.partial(retrying, attr, self._where)


def _store_error(exc: Exception, where: str) -> OSError:
    """A store's failure (no credentials, endpoint down, access denied) as an ``OSError``
    with one line naming the location: botocore's exceptions are not ``OSError``s."""
    if isinstance(exc, OSError):
        return exc
    return OSError(errno.EIO, f"{where}: {_first_line(exc)}")


def _os_error(exc: Exception, name: str) -> WriteError:
    code = getattr(exc, "errno", None) or errno.EIO
    return WriteError(code, getattr(exc, "strerror", None) or _first_line(exc), name)


class Location:
    """One dataset directory or object prefix. Names passed to its methods are relative
    (``manifest.json``, ``.render-records/x.json``) and use ``/``."""

    def __init__(self, location: str | os.PathLike):
        self.scheme, self.root = parse(location)
        self.remote = bool(self.scheme)
        self.local: Optional[Path] = None if self.remote else Path(self.root)

    # --- names -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The location as a user would write it (a path, or ``s3://bucket/prefix``)."""
        return f"{self.scheme}://{self.root}" if self.remote else str(self.local)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def join(self, name: str) -> str:
        """Path (local) or URL (object store) of ``name`` here."""
        return f"{self.url}/{name}" if self.remote else str(self.local / name)

    def child(self, name: str) -> "Location":
        return Location(self.join(name))

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def fs(self):
        """The store's filesystem, every call retried on transient faults (``retrying``)."""
        return _Retrying(filesystem(self.scheme), self.url)

    # --- reading -----------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        if not self.remote:
            return (self.local / name).exists() if name else self.local.exists()
        try:
            return self.fs.exists(self._key(name) if name else self.root)
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.join(name) if name else self.url) from None

    def is_file(self, name: str) -> bool:
        if not self.remote:
            return (self.local / name).is_file()
        try:
            return self.fs.isfile(self._key(name))
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.join(name)) from None

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``; ``FileNotFoundError`` when there is none."""
        if not self.remote:
            return (self.local / name).read_bytes()
        try:
            return self.fs.cat_file(self._key(name))
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.join(name)) from None

    def open(self, name: str, mode: str = "rb") -> IO[bytes]:
        """A binary file object for reading (seekable; object stores read in blocks)."""
        if not self.remote:
            return open(self.local / name, mode)
        return self.fs.open(self._key(name), mode)

    def meta(self, name: str) -> Optional[Meta]:
        """Size and version of the regular file ``name``, or None when there is none."""
        if not self.remote:
            try:
                st = (self.local / name).stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            return Meta(st.st_size, mtime_ns=st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None
        try:
            info = self.fs.info(self._key(name))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.join(name)) from None
        return _meta(info) if info.get("type") == "file" else None

    def listing(self, prefix: str = "") -> dict[str, Meta]:
        """Regular files directly under ``prefix`` (a sub-directory name, or the location
        itself): name -> ``Meta``. One request per 1,000 objects on object stores."""
        if not self.remote:
            directory = self.local / prefix if prefix else self.local
            found = {}
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return {}
            for entry in entries:
                try:
                    if entry.is_file():     # a symlink to a file counts, as os.stat sees it
                        st = entry.stat()
                        found[entry.name] = Meta(st.st_size, mtime_ns=st.st_mtime_ns)
                except OSError:             # removed meanwhile, or a dangling link
                    continue
            return found
        base = self._key(prefix) if prefix else self.root
        try:
            entries = self.fs.ls(base, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.url) from None
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: _meta(entry)
                for entry in entries if entry.get("type") == "file"}

    # --- writing -----------------------------------------------------------------------
    def makedirs(self) -> None:
        """Create the directory (locally); on object stores, check that the bucket exists
        (prefixes need no creating)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        # info, not exists: s3fs's exists answers False for an endpoint that refuses
        # connections or credentials it denies, which read as "no such bucket"
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise WriteError(errno.ENOENT, f"no such bucket '{bucket}'", self.url) from None
        except PermissionError as exc:
            raise WriteError(errno.EACCES, f"access denied to bucket '{bucket}' (check the "
                             f"credentials): {_first_line(exc)}", self.url) from None
        except StoreUnreachable as exc:
            raise WriteError(errno.EIO, exc.strerror, self.url) from None
        except Exception as exc:  # noqa: BLE001 - endpoint down, bad config: one line
            raise WriteError(errno.EIO, f"cannot reach the store: {_first_line(exc)}",
                             self.url) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` atomically (see the module docstring); on failure
        nothing is left under a temporary name and ``WriteError`` names the file."""
        if not self.remote:
            write_atomic(self.local / name, data)
            return
        try:
            self.fs.pipe_file(self._key(name), data)
        except Exception as exc:  # noqa: BLE001 - any store error: one line naming it
            raise _os_error(exc, self.join(name)) from None

    def create_bytes(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` only if it does not exist; False when it does.
        On object stores a conditional PUT (``If-None-Match: *``): the store decides,
        so two writers can never both succeed."""
        if self.local is not None:
            raise NotImplementedError("local exclusive creation is dataset_lock's (hard link)")
        try:
            self.fs.pipe_file(self._key(name), data, mode="create")
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in str(exc) or \
                    "412" in str(exc) or "Precondition" in str(exc):
                return False
            raise _os_error(exc, self.join(name)) from None
        return True

    def replace_bytes(self, name: str, data: bytes, etag: str) -> Optional[str]:
        """Replace the object ``name`` with ``data`` only if it still has ETag ``etag``
        (S3's ``If-Match``: the store decides, so of two writers holding the same ETag
        only one succeeds); returns the new ETag, or None when the object changed or is
        gone. Object stores only (the dataset lock's lease). Stores without a
        conditional replace (gcsfs here) compare first and then write: not atomic."""
        if self.local is not None:
            raise NotImplementedError("local conditional replace: dataset_lock uses flock")
        key = self._key(name)
        try:
            if self.scheme == "s3":
                self.fs.pipe_file(key, data, IfMatch=f'"{etag.strip(chr(34))}"')
            else:
                current = self.meta(name)
                if current is None or current.etag != etag:
                    return None
                self.fs.pipe_file(key, data)
        except (FileNotFoundError, FileExistsError):
            return None
        except OSError as exc:
            if "PreconditionFailed" in str(exc) or "pre-conditions" in str(exc) or \
                    _http_status(exc.__cause__) == 412:
                return None
            raise _os_error(exc, self.join(name)) from None
        except Exception as exc:  # noqa: BLE001 - any store error: one line naming it
            if _http_status(exc) == 412:
                return None
            raise _os_error(exc, self.join(name)) from None
        meta = self.meta(name)
        return meta.etag if meta is not None else None

    def modified(self, name: str) -> Optional[float]:
        """When the object ``name`` was last written, by the store's clock (seconds since
        the epoch), or None when there is none or the store does not say."""
        if self.local is not None:
            meta = self.meta(name)
            return meta.mtime_ns / 1e9 if meta is not None else None
        try:
            info = self.fs.info(self._key(name))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - see _store_error
            raise _store_error(exc, self.join(name)) from None
        stamp = info.get("LastModified") or info.get("updated") or info.get("mtime")
        if hasattr(stamp, "timestamp"):
            return stamp.timestamp()
        if isinstance(stamp, str):
            from datetime import datetime
            try:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
        return None

    def upload(self, local_path: Path, name: str) -> Meta:
        """Put the locally written file ``local_path`` at ``name``; returns its metadata.
        Locally a rename (same filesystem: the caller writes next to the target)."""
        if not self.remote:
            target = self.local / name
            os.replace(local_path, target)
            return self.meta(name)
        try:
            self.fs.put_file(str(local_path), self._key(name))
        except Exception as exc:  # noqa: BLE001 - any store error: one line naming it
            raise _os_error(exc, self.join(name)) from None
        meta = self.meta(name)
        if meta is None:
            raise WriteError(errno.EIO, "the upload left no object", self.join(name))
        return meta

    def delete(self, name: str) -> None:
        """Remove ``name``; nothing when it is not there."""
        if not self.remote:
            (self.local / name).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self._key(name))
        except FileNotFoundError:
            pass

    def move(self, name: str, new_name: str) -> None:
        """Rename (local) or copy then delete (object stores: each step is atomic)."""
        if not self.remote:
            os.replace(self.local / name, self.local / new_name)
            return
        self.fs.copy(self._key(name), self._key(new_name))
        self.delete(name)

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (a sub-directory)."""
        if not self.remote:
            shutil.rmtree(self.local / prefix, ignore_errors=True)
            return
        try:
            self.fs.rm(self._key(prefix), recursive=True)
        except FileNotFoundError:
            pass


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """Open a local path or an object URL (``s3://bucket/ds/shard-000000.tar``) for
    reading. A ``Path`` object is always a local file (whatever its name holds); a
    string is parsed, and any scheme but file:, s3: and gs: is a ``LocationError``
    (never a shell, see ``parse``)."""
    if isinstance(path, os.PathLike):
        return open(path, mode)
    scheme, where = parse(path)
    if not scheme:
        return open(where, mode)
    return retrying(filesystem(scheme).open, os.fspath(path), where, mode)


def _meta(info: dict) -> Meta:
    etag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash")
    return Meta(int(info.get("size") or 0), etag=str(etag).strip('"') if etag else None)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """The project's one atomic write: replace the file ``path`` (a local path, or an
    object URL ``s3://bucket/key``) with ``data``, so readers (and a crash) see the old
    file or the new one, never part of one. Locally: written and fsynced under
    ``.NAME.PID.tmp`` next to it, then renamed (a rename that outlives the data would
    leave 0 bytes); on an object store: one PUT. On failure the temporary file is
    removed and ``WriteError`` raised naming ``path``."""
    name = os.fspath(path)
    if urlparse(name).scheme in OBJECT_STORES:   # anything else is a local file name
        Location(name.rsplit("/", 1)[0]).write_bytes(name.rsplit("/", 1)[1], data)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


# The file in each scratch directory that names the process that made it (JSON of
# ``holder.identity()``), for ``generation.render.scratch.sweep`` after a kill.
SCRATCH_OWNER = ".pvit-owner.json"
SCRATCH_CLAIM = ".pvit-claim-"


def scratch_base() -> Path:
    """Where scratch directories go: ``PVIT_SCRATCH`` if set (a node's fast local disk),
    else the system's temp dir."""
    base = os.environ.get("PVIT_SCRATCH")
    return Path(base) if base else Path(tempfile.gettempdir())


def scratch_dir(prefix: str) -> Path:
    """A fresh local directory for files on their way to an object store (a shard before
    its upload), under ``scratch_base()``, named ``PREFIX...`` only once it holds its
    owner file (``SCRATCH_OWNER``): a sweep never sees one of ours without it."""
    from generation.dataset.holder import identity
    base = scratch_base()
    base.mkdir(parents=True, exist_ok=True)
    claim = Path(tempfile.mkdtemp(prefix=SCRATCH_CLAIM, dir=base))
    (claim / SCRATCH_OWNER).write_text(json.dumps(identity()))
    final = base / (prefix + claim.name[len(SCRATCH_CLAIM):])
    os.rename(claim, final)
    return final


# Dataset locations: the one check every shard directory named by a user passes.
#
# webdataset opens a string through ``gopen``, which dispatches on the URL scheme, and
# ``pipe:CMD`` runs CMD in a shell. A location is a config value or a flag (deployments
# take the config as a run parameter), so a location with a scheme the project does not
# handle must be refused before anything opens it, and shards are opened as files (see
# ``shard_url``) so that no path reaches ``gopen`` as a raw string.
#
# Accepted: a plain path (``data/shards``, ``/data/shards``), ``file:`` URLs of
# absolute paths (``file:///data/shards``) and object-store prefixes (``s3://bucket/ds``,
# ``gs://bucket/ds``, opened through fsspec, see ``Location`` above). A relative path
# that starts like another scheme (``pipe:x``) is refused, because webdataset would read
# it as one.


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
