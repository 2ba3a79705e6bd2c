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

On an object store (``s3://``, ``gs://``) the lock is the object ``PREFIX/.pvit.lock``
with the same JSON, created with a conditional PUT (``If-None-Match: *``, s3fs's
``mode="create"``): the store itself refuses the second creator, so two runs cannot
both take it. There is no flock: a lock of this host whose pid is gone is stale and is
removed (a run on another host that took the lock in the instant between that check and
the delete would lose it: the one race left, and only after a writer died), and
``--break-lock`` removes another host's. The holder removes the object at the end only
if it still holds its own content (its ``token``).

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
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from generation.dataset.manifest import WriteError
from generation.dataset.storage import Location, is_remote

LOCK_NAME = ".pvit.lock"

log = logging.getLogger(__name__)

_held: dict[str, list] = {}          # resolved lock path -> [count, fd]
_held_guard = threading.Lock()


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


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True            # unknown: assume alive, never remove on a guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _remove_if_stale(path: Path, info: dict, host: str) -> Optional[str]:
    """Remove a lock that nobody holds; returns why it was stale ("dead": its process
    on this host is gone; "unreadable": garbage nobody holds; "gone": removed
    meanwhile), "unheld" for a lock of a live process of this host that holds no flock
    on it (kept: a holder on a filesystem without flock, or a hand-made lock), or None
    (the lock is live, or not checkable from here)."""
    if info and info.get("host") != host:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "gone"
    try:
        taken = _try_flock(fd)
        if taken is False:
            return None
        if not info and not taken:
            return None          # unreadable, and no flock to tell: not ours to remove
        if info and pid_alive(info.get("pid")):
            # the flock was free (or cannot be had) but the named process runs: never
            # remove a lock on a guess (pid reuse is rarer than a holder without flock)
            return "unheld" if taken else None
        # Still the same file (not replaced by a new holder meanwhile)?
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return "gone"
        except FileNotFoundError:
            return "gone"
        path.unlink()
        return "dead" if info else "unreadable"
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
    host = socket.gethostname()
    info = {"owner": owner, "host": host, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        fd = _create(path, info)
        if fd is not None:
            with _held_guard:
                _held[key] = [1, fd]
            return
        holder = _read(path)
        if holder is None:
            continue            # released meanwhile: try again
        why = _remove_if_stale(path, holder, host)
        if why == "dead":
            warn(f"{out}: removed the stale lock of {_describe(holder)}: that process is "
                 "no longer running")
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


def _acquire_object(out: Location, *, owner: str, break_lock: bool,
                    warn: Callable[[str], None]) -> None:
    """``acquire`` on an object store: see the module docstring."""
    key = out.join(LOCK_NAME)
    with _held_guard:
        if key in _held:
            _held[key][0] += 1
            return
    out.makedirs()                     # the bucket exists and answers: else one line
    host = socket.gethostname()
    info = {"owner": owner, "host": host, "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": f"{host}-{os.getpid()}-{time.time_ns()}"}
    for _ in range(5):
        if out.create_bytes(LOCK_NAME, (json.dumps(info) + "\n").encode()):
            with _held_guard:
                _held[key] = [1, info["token"]]
            return
        try:
            holder = json.loads(out.read_bytes(LOCK_NAME))
            holder = holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            continue                    # released meanwhile: try again
        except (OSError, ValueError, RecursionError):
            holder = {}
        if holder.get("host") == host and not pid_alive(holder.get("pid")):
            out.delete(LOCK_NAME)
            warn(f"{out}: removed the stale lock of {_describe(holder)}: that process is "
                 "no longer running")
            continue
        if break_lock and holder.get("host") != host:
            out.delete(LOCK_NAME)
            warn(f"{out}: --break-lock removed the lock of {_describe(holder)}")
            continue
        raise LockError(f"{out} is being written by {_describe(holder)} (lock {key}): "
                        f"{_hint(holder, host, key)}")
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
    try:
        holder = json.loads(out.read_bytes(LOCK_NAME))
    except (OSError, ValueError, RecursionError):
        return
    # Only our own lock: a --break-lock elsewhere may have replaced it.
    if isinstance(holder, dict) and holder.get("token") == entry[1]:
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


@contextmanager
def dataset_lock(out: Path, **kwargs):
    """``acquire`` for the block, ``release`` after it (also on failure)."""
    acquire(out, **kwargs)
    try:
        yield
    finally:
        release(out)
