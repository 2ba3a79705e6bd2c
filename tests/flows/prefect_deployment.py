"""The deployment path end to end with real processes, shared by the tests that run it
against different servers (``test_deployment.py``: SQLite, ``test_postgres_deployment.py``:
PostgreSQL; the ``prefect_server`` fixture in ``conftest.py`` chooses).

``prefect server start`` on a free 127.0.0.1 port with a temporary ``PREFECT_HOME``, a
process work pool, ``prefect deploy`` of ``generate_dataset`` from the project's
``prefect.yaml``, a worker, ``prefect deployment run``; the run's shards must exist and
verify. Every process started here runs in its own process group and is stopped by
``Processes.stop_all``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
PVIT = [sys.executable, "-m", "flows.cli"]
POOL = "pvit-process"                    # the work pool named in prefect.yaml
DEPLOYMENT = "generate_dataset/process"  # <flow name>/<deployment name> in prefect.yaml
SERVER_START_S = 120
FLOW_RUN_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Both names of the server's database setting (Prefect 3 reads either): the caller's
# environment must not point the "SQLite" server at some other database.
DATABASE_URL_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL",
                         "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_generation(out: Path) -> dict:
    """A ``GenerationConfig`` as the flow's ``config`` parameter: 2 one-clip shards."""
    return {"out": str(out), "scenes": 2, "scenes_per_shard": 1, "workers": 1, "retries": 0,
            "scene": {"resolution": 32, "frames": 2, "spp": 4,
                      "min_objects": 3, "max_objects": 4}}


class Processes:
    """Background processes in their own process groups, each logging to a file."""

    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env = log_dir, env
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-tail:]}"
                         for _, log in self.started)

    def stop_all(self) -> None:
        # Descendants first noted, then the groups stopped: a flow-run subprocess may
        # have started its own session, so killing the group alone could miss it.
        for proc, _ in reversed(self.started):
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(children, timeout=5)


def prefect(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PREFECT, "--no-prompt", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess, procs: Processes) -> str:
    assert result.returncode == 0, (f"{result.args} exited {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}\n{procs.logs()}")
    return result.stdout


def wait_healthy(api_url: str, server: subprocess.Popen, procs: Processes) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{procs.logs()}"
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_S}s:\n{procs.logs()}")


def wait_deployment(api_url: str, name: str, serving: subprocess.Popen,
                    procs: Processes) -> None:
    """Wait until ``pvit serve`` has registered deployment ``name`` (flow/deployment)."""
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert serving.poll() is None, f"pvit serve exited:\n{procs.logs()}"
        if httpx.get(f"{api_url}/deployments/name/{name}", timeout=5).status_code == 200:
            return
        time.sleep(1)
    pytest.fail(f"deployment {name} not registered after {SERVER_START_S}s:\n{procs.logs()}")


def wait_flow_run(api_url: str, flow_run_id: str, procs: Processes) -> str:
    """Poll the REST API until the run is terminal; returns its state type."""
    deadline = time.monotonic() + FLOW_RUN_S
    state = None
    while time.monotonic() < deadline:
        response = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10)
        response.raise_for_status()
        state = (response.json().get("state") or {}).get("type")
        if state in TERMINAL:
            return state
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} still {state} after {FLOW_RUN_S}s:\n{procs.logs()}")


# What the servers and the processes around them run with in the tests.
QUICK = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network here
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_WORKER_QUERY_SECONDS": "2",          # pick runs up quickly
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",         # the same for `pvit serve`
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


@contextlib.contextmanager
def running_prefect_server(home: Path, database_url: str | None = None) -> Iterator[dict]:
    """A real ``prefect server start`` on a free 127.0.0.1 port with its own
    ``PREFECT_HOME``, on ``database_url`` (``postgresql+asyncpg://...``) or, without one,
    on the SQLite database Prefect makes in that home. Yields the environment that points
    every client at it; the server is stopped on exit."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items()
           if key not in DATABASE_URL_SETTINGS}
    env.update({
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_API_URL": api_url,
        **QUICK,
    })
    if database_url is not None:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    procs = Processes(home, env)
    try:
        server = procs.start("server", [*PREFECT, "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port), "--no-ui"])
        wait_healthy(api_url, server, procs)
        yield env
    finally:
        procs.stop_all()


def run_and_verify(deployment: str, out: Path, procs: Processes) -> str:
    """Trigger ``deployment`` with the tiny config, wait for it, verify the shards.
    Returns the flow run's id."""
    env = procs.env
    params = json.dumps({"config": tiny_generation(out)})
    stdout = check(prefect("deployment", "run", deployment, "--params", params, env=env), procs)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", stdout)
    assert match, f"no flow run id in:\n{stdout}"
    state = wait_flow_run(env["PREFECT_API_URL"], match.group(1), procs)
    assert state == "COMPLETED", f"flow run ended {state}:\n{procs.logs()}"

    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar",
                                                                "shard-000001.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [1, 1]
    verify = subprocess.run([*PVIT, "verify", str(out)], cwd=REPO, env=env, check=False,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    return match.group(1)


def run_on_process_pool(out: Path, procs: Processes) -> str:
    """The ``prefect.yaml`` path: pool, ``prefect deploy``, a worker, one verified run.
    Returns the flow run's id."""
    check(prefect("work-pool", "create", POOL, "--type", "process", env=procs.env), procs)
    check(prefect("deploy", "--prefect-file", str(REPO / "prefect.yaml"),
                  "--name", DEPLOYMENT, env=procs.env), procs)
    procs.start("worker", [*PREFECT, "worker", "start", "--pool", POOL,
                           "--type", "process", "--limit", "1"])
    return run_and_verify(DEPLOYMENT, out, procs)
