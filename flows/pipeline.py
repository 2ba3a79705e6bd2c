"""``pipeline``: generate -> (toy actions) -> pretrain -> finetune -> evaluate.

The DAG wires each stage's inputs to its upstream outputs (pretrain and finetune read
the shards of ``generation.out``; finetune starts from pretrain's final checkpoint;
evaluate reads finetune's), and every stage is keyed by the content of what
determines it (``flows.stage_cache``), so a rerun with nothing changed renders and
trains nothing, and a changed fine-tuning rate reruns fine-tuning and evaluation only.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import stage_cache
from flows.actions import humanoid_actions
from flows.experiment import ExperimentConfig, ToyActionsConfig
from flows.generate import generate_dataset
from flows.run_view import CACHED, artifact_key, pipeline_run_name, reused
from flows.train import (
    cached,
    dataset_key,
    evaluate,
    finetune,
    pretrain,
    reuse_message,
)
from generation.dataset.manifest import read_manifest
from generation.dataset.storage import Location
from training import files
from training.run_layout import RunLayout, evaluation_dir, evaluation_file
from training.toy_actions import write_toy_actions

STAGES = ("generate", "toy_actions", "humanoid_actions", "pretrain", "finetune", "evaluate")


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


@task(name="toy-actions", task_run_name="toy-actions", result_serializer="json")
def toy_actions_task(cfg: ToyActionsConfig, key: str) -> dict:
    out = cfg.out     # a directory or an object-store prefix
    stage_cache.begin(out, key, owned=["set", "set.tmp"])   # write_toy_actions' names
    summary = write_toy_actions(files.join(out, "set"), clips_per_class=cfg.clips_per_class,
                                val_per_class=cfg.val_per_class, seed=cfg.seed, size=cfg.size,
                                frames=cfg.frames)
    stage_cache.finish(out, key, summary, ["set"])
    return summary


def wire(cfg: ExperimentConfig) -> ExperimentConfig:
    """Point every stage at its upstream's outputs (the downstream data root comes from
    ``toy_actions`` when the file names none, see ``ExperimentConfig``)."""
    cfg = cfg.model_copy(deep=True)
    shards = str(cfg.generation.out)
    if cfg.pretrain is not None:
        cfg.pretrain = cfg.pretrain.model_copy(update={"synthetic": shards})
    if cfg.finetune is not None:
        update = {"synthetic": shards if cfg.finetune.synthetic_ratio > 0 else None}
        if cfg.pretrain is not None:
            update["init"] = str(RunLayout(cfg.pretrain.out).final_checkpoint)
        cfg.finetune = cfg.finetune.model_copy(update=update)
    if cfg.evaluate is not None and cfg.finetune is not None:
        cfg.evaluate = cfg.evaluate.model_copy(
            update={"checkpoint": str(RunLayout(cfg.finetune.out).final_checkpoint)})
    return cfg


def force_stage(cfg: ExperimentConfig, stage: str) -> None:
    """Make one stage's cached output stale so that it is computed again. Nothing is
    deleted here: the stage clears its own directory when it starts, and only if that
    directory carries its stage record (``stage_cache.begin``)."""
    if stage == "generate":
        # Without its manifest every shard renders again; only a manifest of ours (one
        # that lists shards) is removed.
        if read_manifest(cfg.generation.out) is not None:
            # a directory or an s3:// prefix
            Location(cfg.generation.out).delete("manifest.json")
        # asked for by name: its shards are replaced (each as its new one is committed)
        cfg.generation = cfg.generation.model_copy(update={"overwrite": True})
        return
    targets = {
        "toy_actions": cfg.toy_actions and cfg.toy_actions.out,
        "humanoid_actions": cfg.humanoid_actions and cfg.humanoid_actions.out,
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "evaluate": cfg.evaluate and cfg.evaluate.checkpoint
        and evaluation_dir(cfg.evaluate.checkpoint),
    }
    if targets.get(stage):
        stage_cache.invalidate(targets[stage])


def _stage(name: str, fn, *args, logs: str = "", states: dict, messages: dict,
           after: tuple[str, ...] = ()):
    """Run one stage after the stages named in ``after`` and return its result, keeping
    its final state in ``states`` and its message (reused or computed) in ``messages``.
    ``wait_for`` records the upstream stages as the run's inputs, which is what draws the
    edges of the pipeline's graph in the UI. A failure is re-raised naming the stage, the
    flow run and where the stage's own logs are; earlier stages' outputs stay as they are."""
    try:
        state = fn(*args, return_state=True,
                   wait_for=[states[up] for up in after if up in states])
        result = state.result()
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage named
        where = f"Prefect flow run '{flow_run.name}'" + (f", {logs}" if logs else "")
        raise StageError(f"stage {name} failed: {exc} (logs: {where})") from exc
    states[name] = state
    messages[name] = state.message or "computed"
    return result


# The result is persisted and the final state's message names what each stage did, so
# the run's page in the UI says it (a fully cached rerun included). The run's tags are
# passed on to every stage's run (Prefect gives a subflow only the tags in context).
@flow(name="pipeline", flow_run_name=pipeline_run_name, persist_result=True,
      result_serializer="json")
def pipeline(config: ExperimentConfig, force: list[str] | None = None) -> State[dict]:
    """The whole DAG. ``force`` names stages to recompute (``--force STAGE``).

    Args:
        config: the whole experiment file (every section; README.md)
        force: stages to compute again even if their outputs are up to date: generate,
            toy_actions, pretrain, finetune or evaluate
    """
    with tags(*flow_run.tags):
        return _pipeline(config, force)


def _pipeline(config: ExperimentConfig, force: list[str] | None) -> State[dict]:
    logger = get_run_logger()
    cfg = wire(config)
    for stage in force or []:
        force_stage(cfg, stage)
    messages: dict[str, str] = {}
    states: dict[str, State] = {}
    run = {"states": states, "messages": messages}
    results: dict = {"generate": _stage("generate", generate_dataset, cfg.generation,
                                        logs=f"{Path(cfg.generation.out) / 'logs'}/", **run)}
    logger.info("dataset %s: %s", cfg.generation.out, dataset_key(cfg.generation.out)[:12])

    if cfg.toy_actions is not None:
        key = stage_cache.stage_key("toy_actions", cfg.toy_actions.model_dump(mode="json"), {},
                                    stage_cache.code_version("training"))
        kept = cached("toy_actions", cfg.toy_actions.out, key)
        if kept is not None:
            messages["toy_actions"] = reuse_message(cfg.toy_actions.out)
            results["toy_actions"] = kept
        else:
            results["toy_actions"] = _stage("toy_actions", toy_actions_task, cfg.toy_actions,
                                            key, **run)
    if cfg.humanoid_actions is not None:
        results["humanoid_actions"] = _stage("humanoid_actions", humanoid_actions,
                                             cfg.humanoid_actions, **run)
    if cfg.pretrain is not None:
        results["pretrain"] = _stage("pretrain", pretrain, cfg.pretrain,
                                     logs=str(RunLayout(cfg.pretrain.out).metrics),
                                     after=("generate",), **run)
    if cfg.finetune is not None:
        results["finetune"] = _stage("finetune", finetune, cfg.finetune,
                                     logs=str(RunLayout(cfg.finetune.out).metrics),
                                     after=("generate", "toy_actions", "humanoid_actions",
                                            "pretrain"), **run)
    if cfg.evaluate is not None and cfg.finetune is not None:
        results["evaluate"] = _stage("evaluate", evaluate, cfg.evaluate,
                                     after=("finetune",), **run)
    results["paths"] = {
        "dataset": str(files.location(cfg.generation.out)),   # s3://, not a Path's s3:/
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "metrics": cfg.evaluate and cfg.evaluate.checkpoint and str(
            evaluation_file(cfg.evaluate.checkpoint, cfg.evaluate.split)),
        # evaluate.out: the copy of the result the user asked for (flows/train.py)
        "result": cfg.evaluate and cfg.evaluate.out and str(files.location(cfg.evaluate.out)),
    }
    _summary_artifact(cfg, results, messages)
    message = "; ".join(f"{name}: {text}" for name, text in messages.items())
    if all(name not in states or states[name].name == CACHED for name in messages):
        return reused(message, results)
    return Completed(message=message, data=results)


def _summary_artifact(cfg: ExperimentConfig, results: dict, messages: dict) -> None:
    """One table on the pipeline's own run: each stage, whether it was reused, and what
    a user looks for next (the dataset's hash, the checkpoints, top-1/top-5), so that a
    cached pipeline shows its metrics too (not only inside the evaluate run)."""
    rows = [{"stage": name, "outcome": text} for name, text in messages.items()]
    dataset = files.location(cfg.generation.out)     # s3://, not a Path's s3:/
    rows.append({"stage": "dataset", "outcome": f"{dataset} (content key "
                                                f"{dataset_key(cfg.generation.out)[:12]})"})
    for stage in ("pretrain", "finetune"):
        section = getattr(cfg, stage)
        if section is not None:
            rows.append({"stage": f"{stage} checkpoint",
                         "outcome": str(RunLayout(section.out).final_checkpoint)})
    for name in ("metrics", "result"):
        if results["paths"].get(name):
            rows.append({"stage": f"evaluate {name}", "outcome": results["paths"][name]})
    metrics = results.get("evaluate") or {}
    for name in ("top1", "top5"):
        if isinstance(metrics.get(name), (int, float)):
            rows.append({"stage": f"evaluate {name}", "outcome": f"{metrics[name]:.4f}"})
    try:
        create_table_artifact(key=artifact_key("pipeline-summary", cfg.generation.out),
                              table=rows, description="what each stage did, and where its "
                                                      "outputs are")
    except Exception as exc:  # noqa: BLE001 - cosmetic: every stage has finished
        get_run_logger().warning("pipeline summary artifact skipped: %s", exc)
