"""Prefect's temporary API server lives exactly as long as the ``pvit`` that started it.

With ``PREFECT_API_URL`` unset Prefect starts ``python -m uvicorn ... create_app`` as a
child and stops it only from ``atexit``; a ``kill -9`` of ``pvit`` used to leave it
running and listening (issue 12). ``flows.prefect_server`` runs ``prefect server start``
instead, which stops itself when the pipe on its stdin closes: when ``pvit`` is gone.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# `python -m flows.cli` runs flows.cli.main(), like the installed `pvit` script.
PVIT = [sys.executable, "-m", "flows.cli"]
# Prefect's own temporary server, and the one flows.prefect_server starts for pvit.
SERVER_APP = "prefect.server.api.server:create_app"
OUR_SERVER = "server start --host 127.0.0.1"


def is_server(command):
    return SERVER_APP in command or OUR_SERVER in command


def env_without_api_url():
    # The temporary server only exists when no real server is configured. Its default 20 s
    # startup timeout is too short on a loaded 2-core runner.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def write_config(path, out, scenes=1):
    path.write_text(yaml.safe_dump({"generation": {
        "out": str(out), "scenes": scenes, "scenes_per_shard": 1, "workers": 1, "retries": 0,
        "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3, "max_objects": 4}}}))
    return path


def cmdline(process):
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def server_port(process):
    args = process.cmdline()
    return int(args[args.index("--port") + 1])


def wait_for_server(proc, timeout=300, log=None):
    """The temporary server among ``proc``'s descendants, once it answers /health."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise AssertionError(f"pvit exited early ({proc.returncode}): {tail}")
        for child in descendants(proc.pid):
            if is_server(cmdline(child)):
                port = server_port(child)
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).is_success:
                        return child, port
                except httpx.HTTPError:
                    pass
        time.sleep(0.2)
    raise AssertionError("the temporary Prefect server never came up")


def gone(process):
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(processes, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline and not all(gone(p) for p in processes):
        time.sleep(0.1)
    return [p for p in processes if not gone(p)]


def refuses_connections(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


DASK_DASHBOARD_PORT = 8787
IN_PROCESS_DASK = """
import sys, yaml
from flows.generate import generate_dataset
from generation.config import GenerationConfig
section = yaml.safe_load(open(sys.argv[1]))["generation"]
generate_dataset(GenerationConfig(**{**section, "task_runner": "dask"}))
"""


def listening_ports(pid):
    """Ports that ``pid`` or any of its descendants listens on."""
    ports = set()
    try:
        tree = [psutil.Process(pid), *descendants(pid)]
    except psutil.NoSuchProcess:
        return ports
    for p in tree:
        try:
            ports |= {c.laddr.port for c in p.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
    return ports


def kill_all(processes):
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
@pytest.mark.blender
def test_temporary_server_dies_when_pvit_generate_is_killed(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds", scenes=2)
    log = tmp_path / "pvit.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([*PVIT, "generate", str(cfg)], cwd=REPO,
                                env=env_without_api_url(), stdout=sink, stderr=sink)
    tree = []
    try:
        server, port = wait_for_server(proc, log=log)
        assert OUR_SERVER in cmdline(server)         # not Prefect's own, in-process
        tree = descendants(proc.pid)
        proc.kill()                                  # kill -9 the pvit process only
        proc.wait()
        # No atexit ran: the closed pipe stops it (SIGTERM, its own exit after 5 s).
        assert not wait_gone([server], timeout=10), "temporary server outlived pvit"
        assert refuses_connections(port)
    finally:
        proc.kill()
        kill_all(tree)                               # e.g. a render worker still running


@pytest.mark.slow
@pytest.mark.blender
@pytest.mark.parametrize("runner", ["processes", "dask", "dask-in-process"])
def test_task_runner_children_share_the_server_and_a_clean_exit_stops_it(tmp_path, runner):
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out)
    log = tmp_path / "pvit.log"                      # a file: an unread pipe could fill up
    # "dask-in-process": the flow called from Python (benchmarks/pipeline.py, a notebook),
    # without pvit's hook that shares the server's address through the environment.
    command = ([sys.executable, "-c", IN_PROCESS_DASK, str(cfg)] if runner == "dask-in-process"
               else [*PVIT, "generate", str(cfg), "--task-runner", runner])
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=env_without_api_url(), stdout=sink,
                                stderr=sink)
    seen = {}                                        # pid -> (process, cmdline, PREFECT_API_URL)
    listening = set()                                # ports the tree listened on (pvit too)
    try:
        server, port = wait_for_server(proc, log=log)
        server_command = cmdline(server)
        while proc.poll() is None:
            listening |= listening_ports(proc.pid)
            for child in descendants(proc.pid):
                if child.pid not in seen and cmdline(child):
                    try:
                        url = child.environ().get("PREFECT_API_URL")
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    seen[child.pid] = (child, cmdline(child), url)
            time.sleep(0.2)
        err = log.read_text()
    finally:
        proc.kill()
        kill_all(entry[0] for entry in seen.values())
    assert proc.returncode == 0, err[-2000:]
    servers = [entry for entry in seen.values() if is_server(entry[1])]
    # Without the shared PREFECT_API_URL, every pool / Dask worker process started a
    # temporary server of its own, which nothing stopped after a kill -9 of pvit.
    assert [entry[0].pid for entry in servers] == [server.pid], [e[1][:200] for e in servers]
    workers = [entry for entry in seen.values() if "multiprocessing" in entry[1]
               or "distributed" in entry[1]]
    assert workers
    if runner != "dask-in-process":
        # (In-process the address reaches the workers through Nanny's ``env``, set after
        # the spawn, which /proc/PID/environ does not show; the one server above says it.)
        assert all(url == f"http://127.0.0.1:{port}/api" for _, _, url in workers)
    # No Dask dashboard unless asked for: the scheduler (in pvit) used to serve one on
    # 8787, on every interface, although the cluster was asked for none.
    assert DASK_DASHBOARD_PORT not in listening and port in listening
    # The normal path still stops the server: ours from atexit, or Prefect's own (the
    # flow called from Python) from Prefect's atexit.
    assert "Stopping temporary server" in err
    assert (OUR_SERVER in server_command) is (runner != "dask-in-process")
    assert not wait_gone([server], timeout=5)
    assert refuses_connections(port)
    assert len(list(out.glob("shard-*.tar"))) == 1


NO_FLOW_COMMAND = """
import sys
from flows.cli import main
sys.argv = ["pvit", "verify", sys.argv[1]]
try:
    main()
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m.split(".")[0] == "prefect"))
"""


def test_a_command_without_a_flow_imports_no_prefect(tmp_path):
    # `pvit verify` / `pvit show` never start a server: main() must import nothing of
    # Prefect for them (its import alone takes seconds).
    result = subprocess.run([sys.executable, "-c", NO_FLOW_COMMAND, str(tmp_path / "none")],
                            cwd=REPO, env=env_without_api_url(), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# A stand-in for `prefect server start` (fast), run as flows.prefect_server runs that.
STAND_IN = """
import signal, sys, time
if sys.argv[1] == "ignores-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(120)
"""
STAND_IN_PARENT = """
import os, sys, time
from flows.prefect_server import _Server
server = _Server(["stand_in", sys.argv[2]])
if sys.argv[1] == "forked" and os.fork() == 0:
    time.sleep(120)                      # a bare fork() child, outliving its parent
    os._exit(0)
print(server.process.pid, flush=True)
if sys.argv[1] == "clean":
    server.stop()
    print(server.process.returncode, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how, stand_in", [("killed", "plain"), ("killed", "ignores-sigterm"),
                                           ("forked", "plain"), ("clean", "plain")])
def test_the_server_stops_when_its_parent_dies_or_stops_it(tmp_path, how, stand_in):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    parent = subprocess.Popen([sys.executable, "-c", STAND_IN_PARENT, how, stand_in],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                              env={**env_without_api_url(), "PYTHONPATH": str(REPO)})
    others = []
    try:
        server = psutil.Process(int(parent.stdout.readline()))
        others = [p for p in psutil.Process(parent.pid).children() if p.pid != server.pid]
        if how == "clean":
            assert parent.stdout.readline().strip() == "-15"    # SIGTERM, as Prefect stops it
            assert gone(server)
            return
        parent.kill()                        # kill -9: no atexit, no finally
        parent.wait()
        # SIGTERM at once; a server that ignores it ends itself 5 s later.
        assert not wait_gone([server], timeout=10 if stand_in == "ignores-sigterm" else 5)
        if how == "forked":
            assert others and not any(gone(p) for p in others)  # the fork child held no pipe
    finally:
        parent.kill()
        kill_all(others)


# --- the server started ahead of the flow (`pvit pipeline` starts it at CLI entry) ---

EARLY_SERVER = """
import os, sys
from flows import prefect_server
prefect_server.start_server()
server = prefect_server._server
print("started", server is not None and server.process.pid, flush=True)
prefect_server.use_server()
print("url", os.environ.get("PREFECT_API_URL"), flush=True)
print("in-process server module", "prefect.server.api.server" in sys.modules, flush=True)
if server is not None and os.environ.get("PREFECT_API_URL"):
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:      # a real API call to the server
        print("flows", len(client.read_flows()), flush=True)
"""


def run_early(env, cwd=REPO):
    result = subprocess.run([sys.executable, "-c", EARLY_SERVER], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines()
                 if line.split(" ", 1)[0] in ("started", "url", "in-process", "flows"))
    return lines, result.stderr


@pytest.mark.slow
def test_early_server_serves_the_api_without_the_server_module_in_process_and_stops(tmp_path):
    lines, _ = run_early({**env_without_api_url(), "PYTHONPATH": str(REPO),
                          "PREFECT_HOME": str(tmp_path / "home")})
    pid = int(lines["started"])
    port = int(lines["url"].rsplit(":", 1)[1].split("/")[0])
    assert lines["url"] == f"http://127.0.0.1:{port}/api"
    # The point of starting it ourselves: the parent never imports Prefect's server.
    assert lines["in-process"] == "server module False"
    assert lines["flows"] == "0"
    # The clean exit stopped it (atexit; through pvit the log line says so: see above).
    assert not psutil.pid_exists(pid) or gone(psutil.Process(pid))
    assert refuses_connections(port)


def test_early_server_steps_aside_for_an_api_url_from_prefect_settings(tmp_path):
    # prefect.toml: Prefect's settings name an API, so no server starts and nothing points
    # elsewhere.
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    lines, _ = run_early({**env_without_api_url(), "PYTHONPATH": str(REPO),
                          "PREFECT_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert lines["started"] == "False"
    assert lines["url"] == "None"                        # left to Prefect (and prefect.toml)


LOCAL = '[profiles.local]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'


@pytest.mark.parametrize("env, profiles, needed", [
    ({}, None, True),
    ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, None, False),
    ({"PREFECT_PROFILE": "local"}, LOCAL, False),
    ({"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}, None, False),
    ({}, 'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "true"\n',
     True),
    ({}, 'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_LOGGING_LEVEL = "INFO"\n', False),
    ({}, 'active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_API_URL = "http://h:1/api"\n',
     False),
    ({}, 'active = "work"\n[profiles.work]\n', False),    # no temporary server outside
    ({}, "not toml [", False),                              # Prefect's to report
])
def test_a_temporary_server_only_where_prefect_would_start_one(tmp_path, monkeypatch, env,
                                                              profiles, needed):
    from prefect.settings import Settings

    from flows.prefect_server import _needed
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
                 "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if profiles is not None:
        (tmp_path / "profiles.toml").write_text(profiles)
    # Settings as a fresh process reads them (this one read its own at import).
    monkeypatch.setattr("prefect.settings.get_current_settings", Settings)
    assert _needed() is needed
