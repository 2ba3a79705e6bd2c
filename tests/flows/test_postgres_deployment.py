"""The production setup: ``prefect server start`` with
``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...`` on a real PostgreSQL
server (127.0.0.1, started from the system's packages by ``postgres_server.py``), and
the same deployment run as ``test_deployment.py``: process pool, ``prefect deploy`` from
``prefect.yaml``, a worker, ``prefect deployment run``, verified shards. Then the run
must be in PostgreSQL's tables (and no SQLite database made anywhere). The fixtures stop
the Prefect server and then PostgreSQL, the test its worker, pass or fail.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prefect_deployment import FLOW_RUN_S, SERVER_START_S, Processes, run_on_process_pool

pytestmark = [pytest.mark.slow, pytest.mark.blender,
              pytest.mark.parametrize("prefect_server", ["postgresql"], indirect=True)]


@pytest.mark.timeout(SERVER_START_S + FLOW_RUN_S + 180)
def test_generate_dataset_deployment_on_postgresql(prefect_server, postgres_database, tmp_path):
    procs = Processes(tmp_path, prefect_server)
    try:
        flow_run_id = run_on_process_pool(tmp_path / "shards", procs)
    finally:
        procs.stop_all()

    runs = postgres_database.fetch(
        "SELECT f.name, d.name, fr.state_type::text FROM flow_run fr"
        " JOIN flow f ON f.id = fr.flow_id JOIN deployment d ON d.id = fr.deployment_id"
        " WHERE fr.id = $1", uuid.UUID(flow_run_id))
    assert runs == [("generate_dataset", "process", "COMPLETED")]
    [(task_runs,)] = postgres_database.fetch(
        "SELECT count(*) FROM task_run WHERE flow_run_id = $1 AND state_type = 'COMPLETED'",
        uuid.UUID(flow_run_id))
    assert task_runs >= 1
    # Nothing went to SQLite instead: no database file in the server's PREFECT_HOME.
    assert not list(Path(prefect_server["PREFECT_HOME"]).rglob("*.db"))
