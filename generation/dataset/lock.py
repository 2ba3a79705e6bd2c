"""One writer per dataset: ``DIR/.pvit.lock``.

A run that writes a dataset (``pvit generate``, the pipeline's generate stage, a
deployment's ``generate_dataset`` run) holds the lock for as long as it writes. The
lock file is JSON (``owner``, ``host``, ``pid``, ``started``), written in full under a
temporary name and then hard-linked to ``.pvit.lock``: the link is the atomic
create-if-absent (as ``O_CREAT|O_EXCL``, and also on NFS), so nobody ever reads a lock
without its content. The holder also keeps an ``fcntl.flock`` on the file's inode,
which the kernel drops when the process dies (``kill -9`` included): a later run on the
same host that can take that flock knows the holder is gone, removes the stale lock
with a warning and proceeds. Where flock is unavailable the holder's pid is checked
instead. A lock from another host cannot be checked from here: the run refuses, naming
the holder, and ``--break-lock`` removes it.

Who holds it (issue 25): a process is named by host, boot id
(``/proc/sys/kernel/random/boot_id``), pid namespace (``/proc/self/ns/pid``), pid and
the process's start time (``/proc/PID/stat`` field 22), so a lock survives PID
namespaces (containers with ``--network host``, Kubernetes ``hostNetwork``: the same
host name, other pids). A holder is dead only when, on the same host and boot and in the
same pid namespace, no process with that pid and start time runs; a holder in another
pid namespace of this host cannot be seen from here and counts as alive. Locally the
flock stays the first check: it works across pid namespaces on one filesystem, so a
free flock tells a dead holder even there.

On an object store (``s3://``, ``gs://``) the lock is the object ``PREFIX/.pvit.lock``
with the same JSON, created with a conditional PUT (``If-None-Match: *``, s3fs's
``mode="create"``): the store itself refuses the second creator. There is no flock, so
the lock is a lease: it names its length (``lease_s``, ``LEASE_S`` = 60 s, or
``PVIT_LOCK_LEASE_S``), and a background thread of the holder rewrites it every third
of that with a conditional write on its own ETag (``If-Match``). A second writer is
refused while the lease is fresh (the store's last-modified time plus ``lease_s`` is
still ahead); a lease that expired (its holder died or lost the store) or whose holder
is dead by the identity above is taken over with a warning, by a conditional write on
the ETag it read, so of two runs taking over only one succeeds and a holder that
renews meanwhile keeps it. ``--break-lock`` removes another host's fresh lease. The
holder removes the object at the end only if it still holds its own ``token``.

Crash bookkeeping (issue 25): the flow that writes adds its Prefect flow run id to the
lock it holds (``note_run``; this module knows nothing of Prefect), and the holders of
stale locks this process removed or took over are kept for the caller (``recovered``),
so that the next run on a dataset can end a killed run's flow run as Crashed instead of
leaving it RUNNING forever.

Within one process the lock is re-entrant (the CLI takes it before Prefect starts, so a
second writer fails fast with one line; the flow then takes it again for deployments
and ``pvit serve``, which do not pass through the CLI).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from generation.dataset.holder import holder_state, identity, pid_alive  # noqa: F401
from generation.dataset.manifest import WriteError
from generation.dataset.storage import Location, is_remote

LOCK_NAME = ".pvit.lock"

log = logging.getLogger(__name__)

# How long an object-store lock stays fresh without renewal (its holder renews it every
# third of that); PVIT_LOCK_LEASE_S overrides it.
LEASE_S = 60.0
LEASE_ENV = "PVIT_LOCK_LEASE_S"

_held: dict[str, list] = {}          # lock path or URL -> [count, fd or _Lease]
_held_guard = threading.Lock()
# lock path or URL -> what the stale locks this process removed there said (``recovered``)
_recovered: dict[str, list[dict]] = {}


class LockError(RuntimeError):
    """Another run writes this dataset; ``str()`` is one line naming it."""


def _describe(info: dict) -> str:
    if not info:
        return "an unknown run (its lock file is unreadable)"
    return (f"{info.get('owner', '?')} (pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')}, started {info.get('started', '?')})")


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _try_flock(fd: int) -> Optional[bool]:
    """True when the flock was taken, False when someone holds it, None when this
    filesystem does not support it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


def _create(path: Path, info: dict) -> Optional[int]:
    """Create the lock with ``info`` in it; returns its fd (flocked), or None when a
    lock already exists. A lock that cannot be written (full disk, read-only directory)
    is a ``WriteError``: one line naming the lock file, and no temporary file left."""
    try:
        return _create_unchecked(path, info)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror, str(path)) from None


def _create_unchecked(path: Path, info: dict) -> Optional[int]:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _try_flock(fd)          # ours alone: nobody else knows the name yet
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # No hard links here (some FUSE and SMB mounts): plain O_EXCL instead.
            os.close(fd)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            _try_flock(fd)
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
        return fd
    except OSError:
        try:
            os.close(fd)            # not handed out: the write failed
        except OSError:
            pass
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_stale(path: Path, info: dict, me: dict) -> Optional[str]:
    """Remove a lock that nobody holds; returns why it was stale ("dead": its process
    on this host is gone; "elsewhere": its holder in another pid namespace no longer
    holds the flock; "unreadable": garbage nobody holds; "gone": removed meanwhile),
    "unheld" for a lock of a live process of this host that holds no flock on it (kept:
    a holder on a filesystem without flock, or a hand-made lock), or None (the lock is
    live, or not checkable from here)."""
    state = holder_state(info, me) if info else None
    if state == "unknown":
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "gone"
    try:
        taken = _try_flock(fd)
        if taken is False:
            return None
        if not taken and (not info or state != "dead"):
            return None          # no flock to tell, and no proof of death: keep it
        if state == "alive":
            # the flock was free but the named process runs: never remove a lock on a
            # guess (pid reuse is rarer than a holder without flock)
            return "unheld"
        # Still the same file (not replaced by a new holder meanwhile)?
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return "gone"
        except FileNotFoundError:
            return "gone"
        path.unlink()
        return state if info else "unreadable"
    finally:
        os.close(fd)


def acquire(out: Path, *, owner: str = "pvit generate", break_lock: bool = False,
            warn: Callable[[str], None] | None = None) -> None:
    """Take the lock of dataset directory ``out`` (creating the directory), or raise
    ``LockError`` naming the holder. See the module docstring."""
    warn = warn or log.warning
    if is_remote(out):
        return _acquire_object(Location(out), owner=owner, break_lock=break_lock, warn=warn)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    key = str(path.resolve())
    with _held_guard:
        if key in _held:
            _held[key][0] += 1
            return
    me = identity()
    host = me["host"]
    info = {"owner": owner, **me, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        fd = _create(path, info)
        if fd is not None:
            with _held_guard:
                _held[key] = [1, fd]
            return
        holder = _read(path)
        if holder is None:
            continue            # released meanwhile: try again
        why = _remove_if_stale(path, holder, me)
        if why in ("dead", "elsewhere"):
            _remember(key, holder)
        if why == "dead":
            warn(f"{out}: removed the stale lock of {_describe(holder)}: that process is "
                 "no longer running")
            continue
        if why == "elsewhere":
            warn(f"{out}: removed the stale lock of {_describe(holder)}: that process (in "
                 "another pid namespace of this host) no longer holds it")
            continue
        if why == "unreadable":
            warn(f"{out}: removed an unreadable lock file that no process holds")
            continue
        if why == "gone":
            continue
        if why == "unheld":
            raise LockError(f"{out} has a lock naming {_describe(holder)}, a process that "
                            f"is running but does not hold it (lock {path}): if it is not "
                            f"a pvit run writing here, remove {path}")
        if break_lock and holder.get("host") != host:
            path.unlink(missing_ok=True)
            _remember(key, holder)
            warn(f"{out}: --break-lock removed the lock of {_describe(holder)}")
            continue
        if holder.get("host") == host:
            hint = "wait for it to finish or stop it"
        elif holder:
            hint = ("wait for it to finish; if it is no longer running, rerun with "
                    "--break-lock")
        else:
            hint = f"the lock file is unreadable; if no run writes here, remove {path}"
        raise LockError(f"{out} is being written by {_describe(holder)} (lock {path}): "
                        f"{hint}")
    raise LockError(f"{out}: could not take the lock {path} (it kept changing hands)")


def _hint(holder: dict, host: str, where: str) -> str:
    if holder.get("host") == host:
        return "wait for it to finish or stop it"
    if holder:
        return "wait for it to finish; if it is no longer running, rerun with --break-lock"
    return f"the lock file is unreadable; if no run writes here, remove {where}"


def lease_seconds() -> float:
    """The lease an object-store lock taken now gets (``PVIT_LOCK_LEASE_S``, else
    ``LEASE_S``)."""
    text = os.environ.get(LEASE_ENV, "").strip()
    try:
        value = float(text) if text else LEASE_S
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise LockError(f"{LEASE_ENV}={text!r}: expected a number of seconds > 0")
    return value


class _Lease:
    """The holder's side of an object-store lock: a daemon thread that rewrites the
    lock every ``lease_s / 3`` seconds with a conditional write on the ETag it wrote
    last, so the lease stays fresh while this process lives and reaches the store."""

    def __init__(self, out: Location, info: dict, etag: str):
        self.out, self.info, self.etag = out, info, etag
        self.writing = threading.Lock()     # the renewals and ``update``: one ETag chain
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pvit-lock-lease",
                                       daemon=True)
        self.thread.start()

    @property
    def token(self) -> str:
        return self.info["token"]

    def _run(self) -> None:
        while not self.stop.wait(self.info["lease_s"] / 3):
            if not self.renew():
                log.error("%s: lost the dataset lock (its lease expired and another run "
                          "took it over)", self.out)
                return

    def renew(self, **fields) -> bool:
        """Rewrite the lock (with ``fields`` added); False once another run holds it.
        The store being away (after retries) is a warning and True: the next renewal
        tries again."""
        with self.writing:
            self.info.update(fields)
            # new bytes every time (renewed): the same bytes would keep the same ETag,
            # and a taker's conditional write on the old one would still succeed
            self.info["renewed"] = time.time_ns()
            try:
                etag = self.out.replace_bytes(LOCK_NAME, _encode(self.info), self.etag)
                if etag is None:
                    # a retried write that did land reads as refused: still ours?
                    holder, meta = _read_object(self.out)
                    etag = meta.etag if holder.get("token") == self.token and meta else None
            except OSError as exc:
                log.warning("%s: could not renew the lock's lease: %s", self.out, exc)
                return True
            if etag is None:
                return False
            self.etag = etag
            return True

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _encode(info: dict) -> bytes:
    return (json.dumps(info) + "\n").encode()


def _read_object(out: Location):
    """The lock object's JSON (``{}`` when unreadable, None when there is none) and its
    ``Meta``, read after it so a takeover conditional on that ETag fails if it changed."""
    meta = out.meta(LOCK_NAME)
    if meta is None:
        return None, None
    try:
        holder = json.loads(out.read_bytes(LOCK_NAME))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError):
        holder = {}
    return (holder if isinstance(holder, dict) else {}), meta


def _expired(out: Location, holder: dict) -> Optional[float]:
    """Seconds since the holder's lease expired (by the store's last-modified time), or
    None while it is fresh or when the lock names no lease."""
    lease = holder.get("lease_s")
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or lease <= 0:
        return None
    modified = out.modified(LOCK_NAME)
    if modified is None:
        return None
    late = time.time() - (modified + lease)
    return late if late > 0 else None


def _acquire_object(out: Location, *, owner: str, break_lock: bool,
                    warn: Callable[[str], None]) -> None:
    """``acquire`` on an object store: see the module docstring."""
    key = out.join(LOCK_NAME)
    with _held_guard:
        if key in _held:
            _held[key][0] += 1
            return
    out.makedirs()                     # the bucket exists and answers: else one line
    me = identity()
    host = me["host"]
    info = {"owner": owner, **me, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": f"{host}-{os.getpid()}-{time.time_ns()}", "lease_s": lease_seconds(),
            "renewed": time.time_ns()}
    for _ in range(5):
        taken = out.create_bytes(LOCK_NAME, _encode(info))
        holder, meta = _read_object(out)
        if holder is None:
            continue                    # released meanwhile: try again
        if holder.get("token") == info["token"]:
            taken = True                # ours (a retried create that did land reads as 412)
        if taken:
            with _held_guard:
                _held[key] = [1, _Lease(out, info, meta.etag)]
            return
        state = holder_state(holder, me) if holder else "unknown"
        late = _expired(out, holder)
        why = None
        if state == "dead":
            why = "that process is no longer running"
        elif late is not None:
            why = (f"its lease expired {late:.0f} s ago (the holder stopped renewing it: "
                   "dead, or cut off from the store)")
        elif break_lock and state == "unknown":
            why = "--break-lock"
        if why is None:
            lease = (f", lease fresh: renewed every {holder['lease_s'] / 3:.0f} s"
                     if isinstance(holder.get("lease_s"), (int, float)) else "")
            raise LockError(f"{out} is being written by {_describe(holder)} (lock {key}"
                            f"{lease}): {_hint(holder, host, key)}")
        etag = out.replace_bytes(LOCK_NAME, _encode(info), meta.etag)
        if etag is None:
            continue                    # renewed or taken meanwhile: look again
        with _held_guard:
            _held[key] = [1, _Lease(out, info, etag)]
        _remember(key, holder)
        if why == "--break-lock":
            warn(f"{out}: --break-lock removed the lock of {_describe(holder)}")
        else:
            warn(f"{out}: took over the stale lock of {_describe(holder)}: {why}")
        return
    raise LockError(f"{out}: could not take the lock {key} (it kept changing hands)")


def _drop_hold(key: str) -> list | None:
    """One hold of ``key`` given back; its entry once the last hold is gone, else None."""
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            return None
        entry[0] -= 1
        if entry[0] > 0:
            return None
        del _held[key]
    return entry


def _release_object(out: Location) -> None:
    entry = _drop_hold(out.join(LOCK_NAME))
    if entry is None:
        return
    lease = entry[1]
    lease.end()
    try:
        holder = json.loads(out.read_bytes(LOCK_NAME))
    except (OSError, ValueError, RecursionError):
        return
    # Only our own lock: a --break-lock or a takeover elsewhere may have replaced it.
    if isinstance(holder, dict) and holder.get("token") == lease.token:
        out.delete(LOCK_NAME)


def release(out: Path) -> None:
    """Give back one hold of ``out``'s lock; the last one removes the lock file."""
    if is_remote(out):
        _release_object(Location(out))
        return
    path = Path(out) / LOCK_NAME
    entry = _drop_hold(str(path.resolve()))
    if entry is None:
        return
    fd = entry[1]
    try:
        # Only our own lock (the same inode): a --break-lock elsewhere may have replaced it.
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _remember(key: str, holder: dict) -> None:
    if holder:
        with _held_guard:
            _recovered.setdefault(key, []).append(holder)


def _key(out) -> str:
    if is_remote(out):
        return Location(out).join(LOCK_NAME)
    return str((Path(out) / LOCK_NAME).resolve())


def recovered(out) -> list[dict]:
    """The lock records of dead holders this process removed or took over on ``out``
    since the last call (each once): what their runs said of themselves, e.g. the flow
    run id ``note_run`` added."""
    with _held_guard:
        return _recovered.pop(_key(out), [])


def note_run(out, **fields) -> bool:
    """Add ``fields`` (JSON values, e.g. ``flow_run_id``) to the lock this process holds
    on ``out``, so that whoever recovers it after this process died knows which run
    it was. Returns False when this process holds no lock there or it could not be
    rewritten (a warning: bookkeeping never fails a run).

    Locally the new record goes to a new, flocked file renamed over the lock (readers
    never see half a record; the old inode's flock is let go only after the rename, so
    the lock is never free); on an object store it is a lease renewal."""
    key = _key(out)
    with _held_guard:
        entry = _held.get(key)
        if entry is None:
            return False
        if isinstance(entry[1], _Lease):
            lease = entry[1]
        else:
            return _rewrite_local(Path(key), entry, fields)
    return lease.renew(**fields)


def _rewrite_local(path: Path, entry: list, fields: dict) -> bool:
    """``note_run`` on a local lock held as ``entry`` (under ``_held_guard``)."""
    info = {**(_read(path) or {}), **fields}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        log.warning("%s: could not note the run in the lock: %s", path, exc)
        return False
    try:
        _try_flock(fd)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        os.replace(tmp, path)
    except OSError as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        log.warning("%s: could not note the run in the lock: %s", path, exc)
        return False
    old, entry[1] = entry[1], fd
    os.close(old)
    return True


@contextmanager
def dataset_lock(out: Path, **kwargs):
    """``acquire`` for the block, ``release`` after it (also on failure)."""
    acquire(out, **kwargs)
    try:
        yield
    finally:
        release(out)
