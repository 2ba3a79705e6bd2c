"""Reading runs back through Prefect's API, as a user's UI would (the suite's
``PREFECT_HOME``, tests/conftest.py, so ``pvit`` subprocesses write where these read)."""

from __future__ import annotations

from pathlib import Path


def _client():
    from prefect.client.orchestration import get_client
    return get_client(sync_client=True)


def top_level_runs(flow_name: str, out: Path) -> list:
    """``flow_name``'s runs started by a user (not as a subflow) on ``out``, oldest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    config = (lambda r: r.parameters["config"]) if flow_name == "generate_dataset" else \
        (lambda r: r.parameters["config"]["generation"])
    return sorted((r for r in runs if r.parent_task_run_id is None
                   and str(config(r)["out"]) == str(out)), key=lambda r: r.created)


def artifacts_of(flow_run_id) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def task_runs_of(flow_run_id) -> list:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with _client() as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))


def subflow_runs_of(flow_run_id) -> dict:
    """The runs of ``flow_run_id``'s subflows by name, with the id of the task run that
    stands for each in the parent (whose ``task_inputs`` draw the parent's graph)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    parents = {t.id: t for t in task_runs_of(flow_run_id)}
    with _client() as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=list(parents))))
    return {r.name: (r, parents[r.parent_task_run_id]) for r in runs}
