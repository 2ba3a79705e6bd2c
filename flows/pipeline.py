"""``pipeline``: generate -> (toy actions) -> pretrain -> finetune -> evaluate.

The DAG wires each stage's inputs to its upstream outputs (pretrain and finetune read
the shards of ``generation.out``; finetune starts from pretrain's final checkpoint;
evaluate reads finetune's), and every stage is keyed by the content of what
determines it (``flows.stage_cache``), so a rerun with nothing changed renders and
trains nothing, and a changed fine-tuning rate reruns fine-tuning and evaluation only.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import stage_cache
from flows.experiment import ExperimentConfig, ToyActionsConfig
from flows.generate import generate_dataset
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
from training.run_layout import RunLayout, evaluation_dir, evaluation_file
from training.toy_actions import write_toy_actions

STAGES = ("generate", "toy_actions", "pretrain", "finetune", "evaluate")


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


@task(name="toy-actions", result_serializer="json")
def toy_actions_task(cfg: ToyActionsConfig, key: str) -> dict:
    out = Path(cfg.out)
    stage_cache.begin(out, key, owned=["set", "set.tmp"])   # write_toy_actions' names
    summary = write_toy_actions(out / "set", clips_per_class=cfg.clips_per_class,
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
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "evaluate": cfg.evaluate and cfg.evaluate.checkpoint
        and evaluation_dir(cfg.evaluate.checkpoint),
    }
    if targets.get(stage):
        stage_cache.invalidate(Path(targets[stage]))


def _stage(name: str, fn, *args, logs: str = "", messages: dict | None = None):
    """Run one stage and return its result, recording its final state's message (reused
    or computed) in ``messages``; a failure is re-raised naming the stage, the flow run
    and where the stage's own logs are. Earlier stages' outputs stay as they are."""
    try:
        state = fn(*args, return_state=True)
        result = state.result()
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage named
        where = f"Prefect flow run '{flow_run.name}'" + (f", {logs}" if logs else "")
        raise StageError(f"stage {name} failed: {exc} (logs: {where})") from exc
    if messages is not None:
        messages[name] = state.message or "computed"
    return result


# The result is persisted and the final state's message names what each stage did, so
# the run's page in the UI says it (a fully cached rerun included).
@flow(name="pipeline", persist_result=True, result_serializer="json")
def pipeline(config: ExperimentConfig, force: list[str] | None = None) -> State[dict]:
    """The whole DAG. ``force`` names stages to recompute (``--force STAGE``)."""
    logger = get_run_logger()
    cfg = wire(config)
    for stage in force or []:
        force_stage(cfg, stage)
    messages: dict[str, str] = {}
    results: dict = {"generate": _stage("generate", generate_dataset, cfg.generation,
                                        logs=f"{Path(cfg.generation.out) / 'logs'}/",
                                        messages=messages)}
    logger.info("dataset %s: %s", cfg.generation.out, dataset_key(cfg.generation.out)[:12])

    if cfg.toy_actions is not None:
        key = stage_cache.stage_key("toy_actions", cfg.toy_actions.model_dump(mode="json"), {},
                                    stage_cache.code_version("training"))
        reused = cached("toy_actions", cfg.toy_actions.out, key)
        if reused is not None:
            messages["toy_actions"] = reuse_message(cfg.toy_actions.out)
            results["toy_actions"] = reused
        else:
            results["toy_actions"] = _stage("toy_actions", toy_actions_task, cfg.toy_actions,
                                            key, messages=messages)
    if cfg.pretrain is not None:
        results["pretrain"] = _stage("pretrain", pretrain, cfg.pretrain,
                                     logs=str(RunLayout(cfg.pretrain.out).metrics),
                                     messages=messages)
    if cfg.finetune is not None:
        results["finetune"] = _stage("finetune", finetune, cfg.finetune,
                                     logs=str(RunLayout(cfg.finetune.out).metrics),
                                     messages=messages)
    if cfg.evaluate is not None and cfg.finetune is not None:
        results["evaluate"] = _stage("evaluate", evaluate, cfg.evaluate, messages=messages)
    results["paths"] = {
        "dataset": str(cfg.generation.out),
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "metrics": cfg.evaluate and cfg.evaluate.checkpoint and str(
            evaluation_file(cfg.evaluate.checkpoint, cfg.evaluate.split)),
    }
    return Completed(message="; ".join(f"{name}: {text}" for name, text in messages.items()),
                     data=results)
