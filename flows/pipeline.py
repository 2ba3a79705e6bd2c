"""``pipeline``: generate -> (toy actions) -> pretrain -> finetune -> evaluate.

The DAG wires each stage's inputs to its upstream outputs (pretrain and finetune read
the shards of ``generation.out``; finetune starts from pretrain's final checkpoint;
evaluate reads finetune's), and every stage is keyed by the content of what
determines it (``flows.stage_cache``), so a rerun with nothing changed renders and
trains nothing, and a changed fine-tuning rate reruns fine-tuning and evaluation only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import stage_cache
from flows.experiment import ExperimentConfig, ToyActionsConfig
from flows.generate import generate_dataset
from flows.train import cached, dataset_key, evaluate, evaluation_dir, finetune, pretrain

STAGES = ("generate", "toy_actions", "pretrain", "finetune", "evaluate")


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


@task(name="toy-actions")
def toy_actions_task(cfg: ToyActionsConfig, key: str) -> dict:
    from training.toy_actions import write_toy_actions
    out = Path(cfg.out)
    stage_cache.begin(out, key)
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
            update["init"] = str(Path(cfg.pretrain.out) / "checkpoints" / "final.pt")
        cfg.finetune = cfg.finetune.model_copy(update=update)
    if cfg.evaluate is not None and cfg.finetune is not None:
        cfg.evaluate = cfg.evaluate.model_copy(
            update={"checkpoint": str(Path(cfg.finetune.out) / "checkpoints" / "final.pt")})
    return cfg


def force_stage(cfg: ExperimentConfig, stage: str) -> None:
    """Drop one stage's cached output so that it is computed again."""
    if stage == "generate":
        (Path(cfg.generation.out) / "manifest.json").unlink(missing_ok=True)
        return
    targets = {
        "toy_actions": cfg.toy_actions and cfg.toy_actions.out,
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "evaluate": cfg.evaluate and cfg.evaluate.checkpoint
        and evaluation_dir(cfg.evaluate.checkpoint),
    }
    if targets.get(stage):
        shutil.rmtree(targets[stage], ignore_errors=True)


def _stage(name: str, fn, *args, logs: str = ""):
    """Run one stage; a failure is re-raised naming the stage, the flow run and where
    the stage's own logs are. Earlier stages' outputs stay as they are."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage named
        from prefect.runtime import flow_run
        where = f"Prefect flow run '{flow_run.name}'" + (f", {logs}" if logs else "")
        raise StageError(f"stage {name} failed: {exc} (logs: {where})") from exc


@flow(name="pipeline")
def pipeline(config: ExperimentConfig, force: list[str] | None = None) -> dict:
    """The whole DAG. ``force`` names stages to recompute (``--force STAGE``)."""
    logger = get_run_logger()
    cfg = wire(config)
    for stage in force or []:
        force_stage(cfg, stage)
    results: dict = {"generate": _stage("generate", generate_dataset, cfg.generation,
                                        logs=f"{Path(cfg.generation.out) / 'logs'}/")}
    logger.info("dataset %s: %s", cfg.generation.out, dataset_key(cfg.generation.out)[:12])

    if cfg.toy_actions is not None:
        key = stage_cache.stage_key("toy_actions", cfg.toy_actions.model_dump(mode="json"), {},
                                    stage_cache.code_version("training"))
        results["toy_actions"] = (cached(cfg.toy_actions.out, key)
                                  or _stage("toy_actions", toy_actions_task, cfg.toy_actions, key))
    if cfg.pretrain is not None:
        results["pretrain"] = _stage("pretrain", pretrain, cfg.pretrain,
                                     logs=f"{cfg.pretrain.out}/metrics.jsonl")
    if cfg.finetune is not None:
        results["finetune"] = _stage("finetune", finetune, cfg.finetune,
                                     logs=f"{cfg.finetune.out}/metrics.jsonl")
    if cfg.evaluate is not None and cfg.finetune is not None:
        results["evaluate"] = _stage("evaluate", evaluate, cfg.evaluate)
    results["paths"] = {
        "dataset": str(cfg.generation.out),
        "pretrain": cfg.pretrain and cfg.pretrain.out,
        "finetune": cfg.finetune and cfg.finetune.out,
        "metrics": cfg.evaluate and cfg.evaluate.checkpoint and str(
            evaluation_dir(cfg.evaluate.checkpoint) / f"eval_{cfg.evaluate.split}.json"),
    }
    return results
