"""Who a process is, in a way another process can check: host, boot, pid namespace,
pid and start time (issue 25). The dataset lock names its holder so, and so does
render scratch (``storage.scratch_dir``'s owner file), so that "is it still running?"
survives pid reuse, reboots and pid namespaces (containers sharing a host name)."""

from __future__ import annotations

import os
import socket
from typing import Optional


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


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid) -> Optional[int]:
    """Field 22 of ``/proc/PID/stat``: when the process started, in clock ticks since
    boot (with the pid, it names one process for the whole boot)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()   # the name in (...) may hold spaces
    try:
        return int(fields[19])                  # fields 3.. follow the name: 22 - 3
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def identity() -> dict:
    """This process as a lock names its holder: host, boot, pid namespace, pid, start."""
    return {"host": socket.gethostname(),
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_ns": _pid_namespace(), "pid": os.getpid(),
            "start_time": _start_time(os.getpid())}


def holder_state(info: dict, me: dict) -> str:
    """"dead", "alive", "elsewhere" (another pid namespace of this host: cannot be seen,
    counts as alive) or "unknown" (another host, or a lock without a host)."""
    if not info or info.get("host") != me["host"]:
        return "unknown"
    if info.get("boot_id") and me["boot_id"] and info["boot_id"] != me["boot_id"]:
        return "dead"                           # this host rebooted since
    if info.get("pid_ns") and me["pid_ns"] and info["pid_ns"] != me["pid_ns"]:
        return "elsewhere"
    pid = info.get("pid")
    if not pid_alive(pid):
        return "dead"
    started = info.get("start_time")
    if isinstance(started, int) and _start_time(pid) not in (None, started):
        return "dead"                           # the pid now names another process
    return "alive"
