"""What a Prefect user sees of a run: its name, its artifacts' keys and a reused run's state.

- Run names come from the run's location (``generate-<dataset>-<scenes>``,
  ``pretrain-<run>``), not Prefect's random pairs, so the runs page reads as a list
  of datasets and training runs.
- An artifact key names its location (``synthetic-dataset-<dataset>-<hash>``): Prefect
  shows the latest artifact of a key as that key's card, so one key per kind shared by
  every dataset would show one dataset's card on another's runs.
- A stage that reused its outputs ends in a Completed state named ``Cached``, the badge
  Prefect gives a task whose result came from its cache: in the UI a fully reused run
  no longer looks like one that computed.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

from prefect.runtime import flow_run
from prefect.states import Completed, State

CACHED = "Cached"
# Prefect's artifact keys: lowercase letters, digits and dashes
_NOT_KEY = re.compile(r"[^a-z0-9]+")
_KEY_NAME_CHARS = 40        # of the location's name; the hash keeps keys unique


def location_name(location: Any) -> str:
    """The last component of a dataset or run location (a path or an ``s3://`` URL)."""
    text = str(location).rstrip("/")
    return PurePosixPath(text.split("://", 1)[-1]).name or text


def artifact_key(kind: str, location: Any) -> str:
    """``kind`` for ``location``: its name, then 8 hex digits of the whole location, so
    that two datasets called ``ds`` in different places keep their own cards."""
    name = _NOT_KEY.sub("-", location_name(location).lower()).strip("-")[:_KEY_NAME_CHARS]
    digest = hashlib.sha256(str(location).rstrip("/").encode()).hexdigest()[:8]
    return "-".join(part for part in (kind, name, digest) if part)


def reused(message: str, data: Any) -> State:
    """The final state of a run that recomputed nothing."""
    return Completed(name=CACHED, message=message, data=data)


def _config_value(*keys: str) -> Any:
    """``parameters["config"][keys...]`` of the current flow run, whether the config is
    the validated model (in process) or its JSON (as a deployment passes it)."""
    value = flow_run.parameters.get("config")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return value


def generate_run_name() -> str:
    return f"generate-{location_name(_config_value('out'))}-{_config_value('scenes')}"


def pipeline_run_name() -> str:
    return f"pipeline-{location_name(_config_value('generation', 'out'))}"


def training_run_name(stage: str):
    """``<stage>-<run>``: the run directory's name (evaluate: the checkpoint's run)."""
    def name() -> str:
        if stage == "evaluate":
            checkpoint = PurePosixPath(str(_config_value("checkpoint")))
            run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" \
                else checkpoint.parent
            return f"evaluate-{run.name or checkpoint.stem}"
        return f"{stage}-{location_name(_config_value('out'))}"
    name.__name__ = f"{stage}_run_name"
    return name


# Either name sets Prefect's flow heartbeat interval (the second is its legacy alias).
HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextmanager
def without_heartbeats():
    """Flow runs started in the block send no Prefect heartbeats, unless the user set
    the interval (``HEARTBEAT_ENV``).

    Why: Prefect 3.8 heartbeats every flow run (180 s) from a thread that sleeps in 1 s
    steps, and a run's end joins that thread, so every flow run ends up to 1 s late:
    0.96 of a cached ``generate_dataset`` rerun's 1.07 s (cProfile, issue 25), and once
    per stage in a cached pipeline. The heartbeats feed only a zombie-run automation a
    user sets up in Prefect; pvit's own crash bookkeeping (``mark_crashed``, from the
    dataset lock and the stage records) does not need them. A user who runs such an
    automation sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` and keeps them."""
    if any(os.environ.get(name) for name in HEARTBEAT_ENV):
        yield
        return
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    global _quiet
    context = get_settings_context()
    # Prefect's temporary_settings rebuilds the settings every time (0.17 s of pydantic
    # settings sources, half a cached rerun): made once per settings object instead.
    if _quiet is None or _quiet[0] is not context.settings:
        _quiet = (context.settings, context.settings.copy_with_update(
            updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
    with SettingsContext(profile=context.profile, settings=_quiet[1]):
        yield


_quiet = None       # (the settings, the same without heartbeats): without_heartbeats


def run_owner() -> dict:
    """This process (``holder.identity``) and, inside a flow run, that run's id: what a
    running stage record names, so that the next run on the stage can tell Prefect that a
    killed one's runs are over (``mark_crashed``)."""
    from prefect.context import FlowRunContext

    from generation.dataset.holder import identity

    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    return {"flow_run_id": str(run.id) if run is not None else None, **identity()}


def mark_crashed(owner: dict, where: str, known_dead: bool = False) -> list[str]:
    """When the process ``owner`` names is gone, end its flow run, the runs above it
    (the pipeline that started it) and their task runs that still show as running in
    the UI, as Crashed; returns the names of the flow runs marked. A killed client
    leaves its runs RUNNING forever otherwise (issue 25). ``known_dead``: the caller has
    proven it gone (the dataset lock, by its flock or an expired lease), so another
    host's process counts too. Best effort: Prefect being unreachable costs a warning,
    never the stage."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from generation.dataset.holder import holder_state, identity

    if not owner.get("flow_run_id") or not (
            known_dead or holder_state(owner, identity()) == "dead"):
        return []
    live = (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED, StateType.PAUSED)
    message = (f"its process (pid {owner.get('pid')} on {owner.get('host')}) died; found by "
               f"the next run on {where}")
    marked = []
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(owner["flow_run_id"])
            while run is not None:
                if run.state is not None and run.state.type in live:
                    tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                        flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]),
                        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=list(live)))))
                    for task_run in tasks:
                        client.set_task_run_state(task_run.id, Crashed(message=message),
                                                  force=True)
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    marked.append(run.name)
                parent = run.parent_task_run_id
                run = (client.read_flow_run(client.read_task_run(parent).flow_run_id)
                       if parent else None)
    except Exception as exc:  # noqa: BLE001 - bookkeeping only: the stage goes on
        logging.getLogger(__name__).warning("could not mark the runs of a dead process "
                                            "Crashed: %s", exc)
    return marked
