"""Prefect's temporary API server, tied to the ``pvit`` process that started it.

With ``PREFECT_API_URL`` unset, Prefect 3 starts a temporary server the first time a
client needs one: ``SubprocessASGIServer`` runs ``python -m uvicorn ...`` with a plain
``subprocess.Popen`` and stops it from ``atexit``. ``atexit`` does not run after
``kill -9`` (nor after an unhandled SIGTERM), so the server used to outlive ``pvit``,
still listening, until someone killed it by hand.

What this module changes, installed by ``flows.cli.main`` only:

* Prefect's default temporary server (the instance that every ``SubprocessASGIServer()``
  call returns, the same hook ``prefect.testing.utilities.prefect_test_harness`` uses) is
  a subclass whose server process gets a *sidecar watchdog*: a tiny ``python -I -S``
  process that reads a pipe only this process writes to. The kernel closes the pipe when
  this process dies, however it dies, and the watchdog then stops the server the way
  ``SubprocessASGIServer.stop`` does (SIGTERM, then SIGKILL after 5 s).

  Not ``prctl(PR_SET_PDEATHSIG)``: Prefect builds the server's ``Popen`` itself (no
  ``preexec_fn`` to pass without copying its command line), and the signal fires when
  the *thread* that forked the child exits, while Prefect may start the server from any
  thread (its event-loop thread, the events worker, a flow's heartbeat thread). A pipe
  closes only with the process, and works the same on macOS.
* Once the server is up, ``PREFECT_API_URL`` points at it (environment and Prefect's
  global settings), so process-pool workers, Dask workers and every other child talk to
  this one server instead of each starting its own temporary server (which nothing
  would stop after a ``kill -9`` of ``pvit`` either).

Nothing Prefect-side is imported until Prefect itself imports its server module, so
commands that never run a flow (``pvit verify``, ``pvit show``) pay nothing.

``pvit generate`` and ``pvit pipeline`` do not wait for Prefect to start that server:
``start_early`` launches the same server command (same watchdog) at CLI entry, before
Prefect is even imported, and ``use_early_server`` (just before the flow runs) waits for
it and points ``PREFECT_API_URL`` at it. The server's own start-up (importing
Prefect's server, about 5 s of CPU) then overlaps the CLI's imports, config checks and
Prefect's client import, and the parent never imports the server module (Prefect does,
in-process, to start its own: another 4-5 s). A ``PREFECT_API_URL`` from any of
Prefect's settings sources wins: ``use_early_server`` asks Prefect's settings, and stops
the early server unused if they name an API.

This file is also the watchdog's program: ``python -I -S prefect_server.py SERVER_PID``
(standard library only at module level for that reason).
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time

SERVER_MODULE = "prefect.server.api.server"
# Same grace as SubprocessASGIServer.stop(): SIGTERM, wait 5 s, then SIGKILL.
STOP_GRACE_S = 5.0
# Written to the watchdog by a clean stop: "the parent is stopping the server itself".
_CLEAN_STOP = b"s"


def install() -> None:
    """Make Prefect's temporary server (if this process ever starts one) die with it."""
    if os.environ.get("PREFECT_API_URL") or os.name != "posix":
        # A real server needs nothing (a profile's URL works too: Prefect then never
        # starts a temporary server). Off POSIX there is no sidecar (select() on a pipe,
        # signals): Prefect's own behaviour is kept as it is.
        return
    module = sys.modules.get(SERVER_MODULE)
    if module is not None:
        _register(module)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_register`` right after Prefect imports its server module, which it does
    just before it creates a temporary server: importing it up front costs seconds."""

    def find_spec(self, name, path, target=None):
        if name != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)          # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register(module)

        spec.loader.exec_module = exec_then_register
        return spec


def _register(server_module) -> None:
    base = server_module.SubprocessASGIServer
    if None in base._instances:             # a default server exists already: leave it be
        return

    class ParentBoundServer(base):
        """``SubprocessASGIServer`` whose server process stops when this process dies."""

        _watchdog_pipe: int | None = None

        def _run_uvicorn_command(self) -> subprocess.Popen:
            process = super()._run_uvicorn_command()
            # One watchdog per launch. start() launches again on a port clash (exit code
            # 3: that watchdog has left with its server) and on a later call after a
            # startup timeout, when the earlier server may still be up: closing its pipe
            # stops it, where Prefect would have lost track of it.
            self._close_watchdog_pipe()
            self._watchdog_pipe = _start_watchdog(process.pid)
            return process

        def start(self, timeout: int | None = None) -> None:
            was_running = self.running
            super().start(timeout)
            if not was_running and self.running:
                _share_api_url(self.api_url)

        def stop(self) -> None:
            # Tell the watchdog this stop is ours before stopping, so that it never signals
            # a pid that may have been reused by then.
            self._close_watchdog_pipe(_CLEAN_STOP)
            super().stop()

        def _close_watchdog_pipe(self, message: bytes = b"") -> None:
            fd, self._watchdog_pipe = self._watchdog_pipe, None
            _close_watchdog(fd, message)

    ParentBoundServer()                     # __new__ files it as Prefect's default (None key)


def _close_watchdog(fd: int | None, message: bytes = b"") -> None:
    """Close our end of a watchdog's pipe (None: already closed), first writing
    ``message`` (``_CLEAN_STOP``: the stop is ours, do not signal the server)."""
    if fd is None:
        return
    try:
        if message:
            os.write(fd, message)
    except OSError:
        pass
    finally:
        _pipe_ends.discard(fd)
        os.close(fd)


def _start_watchdog(server_pid: int) -> int:
    """Start the sidecar for ``server_pid``; return the write end of its pipe (our end)."""
    read_end, write_end = os.pipe()         # both non-inheritable (O_CLOEXEC)
    try:
        subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(server_pid)],
                         stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_close_pipes_in_fork_child)
        _fork_hook_registered = True
    _pipe_ends.add(write_end)
    return write_end


# Our pipe ends still open. A child made by a bare fork() (multiprocessing's "fork"
# context, DataLoader workers) would inherit them and keep the pipe open after we die.
_pipe_ends: set[int] = set()
_fork_hook_registered = False


def _close_pipes_in_fork_child() -> None:
    for fd in _pipe_ends:
        try:
            os.close(fd)
        except OSError:
            pass
    _pipe_ends.clear()


def _share_api_url(api_url: str) -> None:
    """Point this process's children (and new settings) at the running server.

    Process-pool and Dask workers get the flow's serialized settings plus
    ``os.environ``; with ``api.url`` unset there, each would start a temporary server of
    its own. ``refresh_global_settings_context`` is Prefect's way to pick up an
    environment change (it runs it after its startup plugins)."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = api_url
    refresh_global_settings_context()


# --- the early server (``pvit generate`` / ``pvit pipeline``) --------------------------

# Prefect's own command line and environment for its temporary server
# (``SubprocessASGIServer._run_uvicorn_command`` in Prefect 3.8): the same server, and
# the tests find it by SERVER_APP. The settings Prefect adds to that environment come
# from the environment and profile, which the server process reads itself.
SERVER_APP = "prefect.server.api.server:create_app"
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
              "PREFECT__SERVER_FINAL": "1"}
PORT_RANGE = range(8000, 9000)
PORT_IN_USE_EXIT = 3            # uvicorn's exit code when it cannot bind
DEFAULT_STARTUP_TIMEOUT_S = 20


class TemporaryServerError(RuntimeError):
    """The early server exited or did not answer in time (one line, for the CLI)."""


class EarlyServer:
    """Prefect's temporary server, started by us; stopped at exit (or by the watchdog)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.used = False
        self._pipe: int | None = None
        self._launch()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        self.port = _free_port()
        spec = importlib.util.find_spec("prefect")      # finds the package, runs nothing
        app_dir = os.path.dirname(spec.submodule_search_locations[0])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", SERVER_APP,
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error",
             "--lifespan", "on"], env={**os.environ, **SERVER_ENV})
        self._close_pipe(_CLEAN_STOP)                   # a relaunch: the last one has exited
        try:
            self._pipe = _start_watchdog(self.process.pid)
        except BaseException:
            self.process.kill()                         # never a server without its watchdog
            self.process.wait()
            raise

    def wait_healthy(self, timeout: float) -> None:
        """Block until the server answers /health; relaunch on a port clash (as Prefect
        does); TemporaryServerError naming the cause if it exits or does not answer in time."""
        import httpx
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == PORT_IN_USE_EXIT:
                    self._launch()
                    continue
                if code is not None:
                    raise TemporaryServerError(f"Prefect's temporary server exited with "
                                               f"code {code} before it answered")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        self.used = True
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TemporaryServerError(f"Prefect's temporary server did not answer within "
                                   f"{timeout:g} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_"
                                   "SECONDS)")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.used:       # the line Prefect logs when it stops its own temporary server
            import logging
            logging.getLogger("prefect").info("Stopping temporary server on http://127.0.0.1:%s",
                                              self.port)
        self._close_pipe(_CLEAN_STOP)
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _close_pipe(self, message: bytes = b"") -> None:
        fd, self._pipe = self._pipe, None
        _close_watchdog(fd, message)


_early: EarlyServer | None = None


def start_early() -> None:
    """Start Prefect's temporary server now if this run will most likely need one: no
    ``PREFECT_API_URL`` in the environment, no profile chosen or configured that could
    name one (``use_early_server`` makes the final call with Prefect's settings)."""
    global _early
    if _early is not None or os.name != "posix" or _api_configured_elsewhere():
        return
    try:
        _early = EarlyServer()
    except (OSError, RuntimeError):
        _early = None           # no early server: Prefect starts its own when the flow runs


def use_early_server() -> None:
    """Point this process (and its children) at the early server once it answers. If
    Prefect's settings name an API after all (or forbid a temporary server), stop it
    unused and leave everything to Prefect. No-op without an early server."""
    global _early
    if _early is None:
        return
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        _early.stop()
        _early = None
        return
    timeout = settings.server.ephemeral.startup_timeout_seconds or DEFAULT_STARTUP_TIMEOUT_S
    _early.wait_healthy(timeout)
    import logging
    logging.getLogger("prefect").info("Using temporary server on http://127.0.0.1:%s",
                                      _early.port)
    _share_api_url(_early.api_url)


def _api_configured_elsewhere() -> bool:
    """A cheap look (no Prefect import) at what could give this run an API URL or turn
    the temporary server off: the environment, a chosen profile, the user's profiles
    file. Anything it misses (prefect.toml, .env, pyproject.toml) is caught by
    ``use_early_server``, at the cost of an early server stopped unused."""
    env = os.environ
    if env.get("PREFECT_API_URL") or env.get("PREFECT_PROFILE", "ephemeral") != "ephemeral" \
            or not _ephemeral_allowed(env):
        return True
    home = env.get("PREFECT_HOME", "~/.prefect")
    path = os.path.expanduser(env.get("PREFECT_PROFILES_PATH")
                              or os.path.join(home, "profiles.toml"))
    try:
        with open(path, "rb") as f:
            import tomllib
            profiles = tomllib.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True                 # unreadable: let Prefect decide
    active = profiles.get("active", "ephemeral")
    settings = profiles.get("profiles", {}).get(active, {})
    return active != "ephemeral" or "PREFECT_API_URL" in settings \
        or not _ephemeral_allowed(settings)


def _ephemeral_allowed(settings) -> bool:
    for name in ("PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        if str(settings.get(name, "true")).lower() not in ("1", "true"):
            return False
    return True


def _free_port() -> int:
    # Prefect's choice: a random free port in 8000-8999 (a clash later is a relaunch).
    for _ in range(10):
        port = random.choice(PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                time.sleep(random.uniform(0.1, 0.5))
    raise RuntimeError("no free port for Prefect's temporary server in 8000-8999")


# --- the watchdog (a separate ``python -I -S`` process: standard library only) --------

def _watch(server_pid: int) -> None:
    # Ctrl-C goes to the whole foreground group: the server stops on its own then, and the
    # watchdog must not die first and leave it unguarded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pidfd = _open_pidfd(server_pid)
    if pidfd == -1:
        return                              # already gone
    watched = [0] if pidfd is None else [0, pidfd]
    while True:
        # Without a pidfd (macOS) look every second whether the server still exists.
        ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 1.0)
        if (pidfd is not None and pidfd in ready) or not _alive(server_pid, pidfd):
            return                          # the server exited by itself
        if 0 in ready:
            message = os.read(0, 1)
            if message:
                return                      # a clean stop: the parent handles the server
            break                           # EOF without a word: the parent is gone
    _stop(server_pid, pidfd)


def _open_pidfd(pid: int):
    """A pidfd (Linux >= 5.3) names the process itself, so a reused pid is never hit;
    returns None where there is none, -1 if the process is already gone."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except OSError:
        return None


def _signal(pid: int, pidfd, signum: int) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int, pidfd) -> bool:
    if pidfd is not None:
        return not select.select([pidfd], [], [], 0)[0]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _stop(pid: int, pidfd) -> None:
    _signal(pid, pidfd, signal.SIGTERM)     # uvicorn shuts down cleanly on SIGTERM
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if not _alive(pid, pidfd):
            return
        time.sleep(0.05)
    _signal(pid, pidfd, signal.SIGKILL)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
