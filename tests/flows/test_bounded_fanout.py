"""Bounded fan-out (issue 9, part 5) and a quiet LocalCluster (part 7).

A flow run never creates more than ``generation.max_tasks_per_flow`` task runs: above
that many shards a task renders several shards in sequence and returns their records,
which the flow commits shard by shard (manifest, progress artifact, progress listener).
The LocalCluster ``task_runner: dask`` starts listens on no fixed port (no dashboard
unless asked for).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.generate import chunk_jobs, dask_cluster_kwargs
from flows.run_view import artifact_key
from generation.config import GenerationConfig
from generation.dataset.manifest import location


def test_chunks_are_consecutive_even_and_never_more_than_the_bound():
    jobs = list(range(10))
    assert chunk_jobs(jobs, 500) == [[i] for i in jobs]         # one shard per task
    assert chunk_jobs(jobs, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert chunk_jobs(jobs, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_jobs(jobs, 1) == [jobs]
    assert chunk_jobs([], 5) == []
    for n in (1, 7, 499, 500, 501, 25_000):
        for bound in (1, 2, 500):
            chunks = chunk_jobs(list(range(n)), bound)
            assert len(chunks) <= bound and sum(chunks, []) == list(range(n))


def test_max_tasks_per_flow_defaults_to_500_and_is_at_least_1():
    assert GenerationConfig().max_tasks_per_flow == 500
    assert GenerationConfig(max_tasks_per_flow=1).max_tasks_per_flow == 1
    with pytest.raises(ValidationError, match="max_tasks_per_flow"):
        GenerationConfig(max_tasks_per_flow=0)


def test_local_cluster_has_no_dashboard_and_nothing_on_8787_unless_asked():
    import httpx
    from distributed import LocalCluster

    kwargs = dask_cluster_kwargs(GenerationConfig(workers=1), "http://127.0.0.1:1/api")
    assert kwargs["env"] == {"PREFECT_API_URL": "http://127.0.0.1:1/api"}
    # The same arguments, with the worker in this process (quick); the scheduler is
    # configured the same either way.
    in_process = {k: v for k, v in kwargs.items() if k != "env"}   # a Nanny argument
    with LocalCluster(**{**in_process, "processes": False}) as cluster:
        server = cluster.scheduler.http_server
        assert server.port not in (0, 8787) and server.address == "127.0.0.1"
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/health", timeout=10).is_success
        assert httpx.get(f"{base}/status", timeout=10).status_code == 404   # no dashboard
        for worker in cluster.workers.values():
            assert worker.http_server.port != 8787
    asked = dask_cluster_kwargs(GenerationConfig(dask_dashboard="127.0.0.1:0"))
    assert asked["dashboard_address"] == "127.0.0.1:0" and "scheduler_kwargs" not in asked
    assert "env" not in asked


@pytest.mark.slow
@pytest.mark.blender
def test_a_bounded_run_renders_in_chunks_with_per_shard_commits(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    from flows import generate, progress
    from generation.dataset.manifest import read_manifest

    def config(out, **changes):
        return GenerationConfig(
            out=out, scenes=4, scenes_per_shard=1, workers=2, retries=0, render_threads=1,
            scene={"resolution": 32, "frames": 2, "spp": 1, "min_objects": 3, "max_objects": 3},
            **changes)

    committed, seen = [], []                    # shard names, as committed / as heard of
    chunked_out = tmp_path / "chunked"
    commit = generate.dataset.commit

    def recording_commit(*args, **kwargs):
        record = next(a for a in [*args, *kwargs.values()] if isinstance(a, dict) and "sha256" in a)
        commit(*args, **kwargs)
        committed.append(record["name"])

    def on_shard(record):
        seen.append((record["name"], record["name"] in committed))

    monkeypatch.setattr(generate.dataset, "commit", recording_commit)
    with progress.listening(on_shard=on_shard):
        state = generate.generate_dataset(config(chunked_out, max_tasks_per_flow=2),
                                          return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["rendered_shards"] == 4 and summary["shards"] == 4
    # Per shard, not per task: each shard was committed when the hook heard of it.
    assert sorted(seen) == [(f"shard-{i:06d}.tar", True) for i in range(4)]
    assert sorted(committed) == [name for name, _ in sorted(seen)]
    monkeypatch.undo()
    assert not (chunked_out / generate.RECORDS_DIR).exists()

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert sorted(t.name for t in task_runs) == ["render-shard-000000.tar..shard-000001.tar",
                                                  "render-shard-000002.tar..shard-000003.tar"]
    assert all(t.state.is_completed() for t in task_runs)
    progress = [a for a in artifacts
                if a.key == artifact_key("generate-progress", location(chunked_out).url)]
    assert progress and progress[0].data == 100

    # One task per shard (the default bound) renders the same bytes.
    single_out = tmp_path / "single"
    assert generate.generate_dataset(config(single_out))["rendered_shards"] == 4
    chunked, single = read_manifest(chunked_out), read_manifest(single_out)
    assert [s["sha256"] for s in chunked["shards"]] == [s["sha256"] for s in single["shards"]]
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (chunked_out / name).read_bytes() == (single_out / name).read_bytes()


@pytest.mark.slow
@pytest.mark.blender
def test_a_failed_shard_does_not_stop_its_chunk_and_a_retry_renders_only_it(tmp_path,
                                                                          monkeypatch):
    from flows import generate
    from generation.dataset.manifest import read_manifest
    from generation.dataset.plan import plan

    out = tmp_path / "ds"
    cfg = GenerationConfig(
        out=out, scenes=2, scenes_per_shard=1, workers=1, retries=1, render_threads=1,
        max_tasks_per_flow=1,
        scene={"resolution": 32, "frames": 2, "spp": 1, "min_objects": 3, "max_objects": 3})
    bad = plan(cfg)[0]
    monkeypatch.setenv("PVIT_CRASH_ON_SEED", str(bad.seeds[0]))   # the chunk's first shard
    state = generate.generate_dataset(cfg, return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"scene seeds {bad.seeds}" in message and "exited with code 3" in message
    # The shard after the failed one was rendered and committed all the same...
    assert [s["name"] for s in read_manifest(out)["shards"]] == ["shard-000001.tar"]
    # ...once: the task's retry rendered only the shard that had failed.
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["shard-000000.attempt-1.log", "shard-000000.attempt-2.log",
                    "shard-000001.attempt-1.log"]
    assert not (out / generate.RECORDS_DIR).exists() and not (out / bad.name).exists()
