"""A dataset lock that knows its holder (issue 25, item 5), on a local directory: the
holder is named by host, boot id, pid namespace, pid and start time, and a second
writer in another pid namespace (``unshare -p``, where the machine allows it) is
refused while the holder lives; a killed holder's lock is recovered."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from pvit_cli import REPO

from generation.dataset.lock import LOCK_NAME, LockError, acquire, release

HOLD = """
import sys, time
from generation.dataset.lock import acquire
acquire(sys.argv[1], owner="holder")
print("held", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from generation.dataset.lock import LockError, acquire
try:
    acquire(sys.argv[1], owner="second")
except LockError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
print("taken", flush=True)
"""


def new_pid_namespace() -> list[str]:
    """The command prefix that runs a process in a new pid namespace (with its own
    /proc, killed with its unshare), or a skip where the machine does not allow it."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here")
    prefix = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -p is not allowed here: {probe.stderr.strip()[:200]}")
    return prefix


def start_holder(out, prefix=(), env=None):
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLD, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def try_lock(out, prefix=(), env=None):
    return subprocess.run([*prefix, sys.executable, "-c", TRY, str(out)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def stat_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_the_lock_names_boot_pid_namespace_and_start_time(tmp_path):
    proc = start_holder(tmp_path)
    try:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert info["boot_id"] == f.read().strip()
        assert info["pid_ns"] == os.readlink("/proc/self/ns/pid")     # same namespace
        assert info["pid"] == proc.pid and info["start_time"] == stat_start_time(proc.pid)
        assert info["host"] == socket.gethostname()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_naming_a_reused_pid_is_stale(tmp_path):
    """The pid runs, but it is another process than the one that took the lock (its
    start time differs): the lock is recovered, where a pid check alone kept it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        (tmp_path / LOCK_NAME).write_text(json.dumps({
            "owner": "old run", "host": socket.gethostname(), "boot_id": boot,
            "pid_ns": os.readlink("/proc/self/ns/pid"), "pid": sleeper.pid,
            "start_time": stat_start_time(sleeper.pid) - 1000, "started": "then"}))
        warnings = []
        acquire(tmp_path, warn=warnings.append)
        release(tmp_path)
        assert len(warnings) == 1 and "stale lock of old run" in warnings[0], warnings
        # another boot of this host: stale whatever runs under that pid now
        (tmp_path / LOCK_NAME).write_text(json.dumps({
            "owner": "before reboot", "host": socket.gethostname(), "boot_id": "0-other",
            "pid": sleeper.pid, "started": "then"}))
        acquire(tmp_path, warn=warnings.append)
        release(tmp_path)
        assert "stale lock of before reboot" in warnings[-1]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_second_writer_in_another_pid_namespace_is_refused(tmp_path):
    prefix = new_pid_namespace()
    proc = start_holder(tmp_path)                     # the holder in this namespace
    try:
        second = try_lock(tmp_path, prefix)           # pid 1 of a new namespace
        assert second.returncode == 1, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"being written by holder (pid {proc.pid}" in lines[0]
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / LOCK_NAME).is_file()


def test_a_holder_in_another_pid_namespace_is_alive_until_killed(tmp_path):
    prefix = new_pid_namespace()
    proc = start_holder(tmp_path, prefix)
    try:
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid_ns"] != os.readlink("/proc/self/ns/pid")
        assert info["pid"] != proc.pid               # its pid there, not here
        with pytest.raises(LockError, match="being written by holder"):
            acquire(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)             # --kill-child: the holder dies too
        proc.wait()
    warnings = []
    deadline = time.monotonic() + 10
    while True:                                      # its flock goes when it is reaped
        try:
            acquire(tmp_path, warn=warnings.append)
            break
        except LockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    release(tmp_path)
    assert len(warnings) == 1 and "stale lock of holder" in warnings[0], warnings
    assert "another pid namespace" in warnings[0]
