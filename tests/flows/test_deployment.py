"""The deployment path end to end, with real processes, on Prefect's SQLite database:
``prefect server start`` on 127.0.0.1, then (1) a process work pool, ``prefect deploy``
of ``generate_dataset`` from the project's ``prefect.yaml``, a worker, ``prefect
deployment run``; (2) the same flow served by ``pvit serve`` and run the same way. Each
run's shards must exist and verify. Every process started here is stopped in
``finally``. The steps live in ``prefect_deployment.py``; ``test_postgres_deployment.py``
runs (1) on PostgreSQL.

Everything Prefect-side lives in a temporary ``PREFECT_HOME`` (its SQLite database
included), so the tests never touch ``~/.prefect`` or a server the user runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect_deployment import (
    FLOW_RUN_S,
    PVIT,
    SERVER_START_S,
    Processes,
    run_and_verify,
    run_on_process_pool,
    wait_deployment,
)


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + FLOW_RUN_S + 180)
def test_generate_dataset_deployment_on_process_pool(prefect_server, tmp_path):
    procs = Processes(tmp_path, prefect_server)
    try:
        run_on_process_pool(tmp_path / "shards", procs)
    finally:
        procs.stop_all()
    # The server kept its runs in the SQLite database of its own PREFECT_HOME.
    assert (Path(prefect_server["PREFECT_HOME"]) / "prefect.db").is_file()


@pytest.mark.slow
@pytest.mark.timeout(SERVER_START_S + FLOW_RUN_S + 180)
def test_pvit_serve_runs_generate_dataset(prefect_server, tmp_path):
    procs = Processes(tmp_path, prefect_server)
    try:
        serve = procs.start("serve", [*PVIT, "serve", "--flow", "generate_dataset",
                                      "--name", "serve-test"])
        wait_deployment(procs.env["PREFECT_API_URL"], "generate_dataset/serve-test", serve,
                        procs)
        run_and_verify("generate_dataset/serve-test", tmp_path / "shards", procs)
    finally:
        procs.stop_all()
