"""Prefect's temporary API server for ``pvit generate`` and ``pvit pipeline``, tied to
the ``pvit`` process.

Without a configured API, Prefect starts a temporary server of its own, but stops it
only from ``atexit``: after a ``kill -9`` of ``pvit`` it stayed up, listening, and each
process-pool, Dask or torchrun child started yet another one. Instead ``use_server``
(just before the flow; ``start_server`` can start it earlier) runs Prefect's public
``prefect server start`` on 127.0.0.1 and points ``PREFECT_API_URL`` at it, in this
process and in every child's environment, so Prefect never starts one. The server's
stdin is a pipe that only ``pvit`` holds open: the kernel closes it when ``pvit`` dies,
however it dies, and the server then stops itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time

# Prefect gives its own temporary server this long between SIGTERM and SIGKILL.
STOP_GRACE_S = 5
# `python -m MODULE ARGS` (here `prefect server start`) plus a thread that stops it once
# stdin reaches EOF: SIGTERM lets uvicorn shut down cleanly (before uvicorn is up, it just
# ends the process), os._exit is the backstop. A thread of the server, not a watchdog
# process: nothing else can outlive pvit, and no pid is signalled that may be reused.
_SERVER = f"""
import os, runpy, signal, sys, threading, time
def stop_at_eof():
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep({STOP_GRACE_S})
    os._exit(1)
threading.Thread(target=stop_at_eof, daemon=True).start()
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


class TemporaryServerError(RuntimeError):
    """The temporary server exited or did not answer in time (one line, for the CLI)."""


class _Server:
    """``python -m MODULE ARGS``, stopped by ``stop`` or when this process is gone."""

    def __init__(self, module_and_args: list[str]) -> None:
        read_end, self.pipe = os.pipe()         # both non-inheritable (O_CLOEXEC)
        try:
            self.process = subprocess.Popen([sys.executable, "-c", _SERVER, *module_and_args],
                                            stdin=read_end, stdout=subprocess.DEVNULL)
        except BaseException:
            os.close(self.pipe)
            raise
        finally:
            os.close(read_end)
        # A bare fork() (multiprocessing's "fork" context, DataLoader workers) copies the
        # pipe, and the copy would keep the server up after pvit dies.
        os.register_at_fork(after_in_child=self._close_pipe)

    def _close_pipe(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            os.close(pipe)

    def stop(self) -> None:
        if self.pipe is None:       # stopped already, or a forked child's copy
            return
        self._close_pipe()          # the server's cue
        try:
            self.process.wait(timeout=STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _PrefectServer(_Server):
    def __init__(self) -> None:
        # A free port the kernel picks: Prefect picks at random in 8000-8999 and has to
        # relaunch on a clash, likely there when several servers start at once.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"
        self.used = False
        # Not --no-services: task runs reach the database through its event services. No
        # scheduler and no late runs, as in Prefect's own temporary server: it must not act
        # on the deployments of a database it may share.
        super().__init__(["prefect", "--no-prompt", "server", "start", "--host", "127.0.0.1",
                          "--port", str(self.port), "--no-ui", "--no-scheduler",
                          "--no-late-runs", "--log-level", "error"])

    def wait_healthy(self, timeout: float) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TemporaryServerError(f"Prefect's temporary server exited with code "
                                               f"{self.process.returncode} before it answered")
                try:
                    if client.get(f"{self.address}/api/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TemporaryServerError(f"Prefect's temporary server did not answer within "
                                   f"{timeout:g} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
                                   "SECONDS)")

    def stop(self) -> None:
        if self.used and self.pipe is not None:     # the line Prefect logs for its own
            logging.getLogger("prefect").info("Stopping temporary server on %s", self.address)
        super().stop()


_server: _PrefectServer | None = None


def start_server() -> None:
    """Start the temporary server, unless Prefect's settings name an API or forbid a
    temporary server (then Prefect does as it would), or it runs already."""
    global _server
    if _server is None and _needed():
        _server = _PrefectServer()
        atexit.register(_server.stop)


def use_server() -> None:
    """Start the temporary server if needed, wait until it answers, then point this
    process's Prefect settings and its children's environment at it."""
    start_server()
    if _server is None or _server.used:
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    _server.wait_healthy(get_current_settings().server.ephemeral.startup_timeout_seconds)
    _server.used = True
    logging.getLogger("prefect").info("Using temporary server on %s", _server.address)
    os.environ["PREFECT_API_URL"] = f"{_server.address}/api"
    # Prefect read its settings when imported; this makes it read the environment again.
    # Public, but missing from Prefect's docs: if it stops working, Prefect starts a server
    # of its own in-process, and this test fails (tests/flows/test_server_lifetime.py):
    # test_early_server_serves_the_api_without_the_server_module_in_process_and_stops
    refresh_global_settings_context()


def _needed() -> bool:
    from prefect.settings import get_current_settings
    try:
        settings = get_current_settings()
    except ValueError:      # an unreadable profiles file: Prefect says so when the flow runs
        return False
    return not settings.api.url and settings.server.ephemeral.enabled
