"""Prefect flows of the training stages, thin over ``training`` (which runs without
Prefect too: ``pvit pretrain|finetune|evaluate``).

Each stage is a task whose output directory carries a content-keyed record
(``flows.stage_cache``): an unchanged stage is skipped, a changed training stage starts
from a clean directory, and a retried task resumes from its last checkpoint. The
evaluate stage writes into the checkpoint's evaluation home, shared with
``pvit evaluate`` (``flows.evaluation_home.run_evaluate_in_home``): its record is rewritten,
the other results there are kept. Paths come from ``training.run_layout``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from flows import progress, stage_cache
from flows.run_view import artifact_key, reused, training_run_name
from generation.dataset.contact_sheet import sheet_png
from generation.dataset.manifest import read_manifest
from generation.dataset.storage import scratch_dir
from training import files
from training.config import EvaluateConfig, FinetuneConfig, PretrainConfig
from training.run_layout import RunLayout, evaluation_dir, evaluation_name

# torch, training.train and flows.evaluation_home (which imports training.evaluate) stay
# inside the functions: with timm they take 2.2-2.8 s (python -X importtime after
# flows.cli and this module; flows.pipeline, Prefect included, takes 1.0 s), and `pvit
# pipeline` imports this module in the checks that exit 2 before any work, as `pvit serve`
# does for every flow it serves.

TRAIN_RETRIES = 1


def _log_progress(stage: str):
    """The training loop's ``progress`` callback: each logged step goes to the run's log
    and to whoever listens in this process (``flows.progress.listening(on_step=...)``,
    the CLI's progress bars)."""
    logger = get_run_logger()

    def hook(record: dict) -> None:
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        logger.info("%s %s", stage, shown)
        progress.step_logged(stage, record)
    return hook


def _metrics_artifact(stage: str, summary: dict) -> None:
    rows = [{"metric": k, "value": v} for k, v in summary.items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    losses = summary.get("losses") or summary.get("final_losses") or {}
    rows += [{"metric": f"loss/{k}", "value": v} for k, v in losses.items()]
    where = summary.get("run_dir", "")
    create_table_artifact(key=artifact_key(f"{stage}-metrics", where), table=rows,
                          description=f"{stage} summary of {where}")
    curve = RunLayout(summary.get("run_dir", "")).loss_curve
    image = None
    if files.is_file(curve):    # here or on a bucket
        image = cv2.imdecode(np.frombuffer(files.read_bytes(curve), np.uint8), cv2.IMREAD_COLOR)
    if image is not None:
        # Embedded, as the contact sheet is: a file:// link does not load in the UI.
        png = base64.b64encode(sheet_png(image[..., ::-1], 150_000)).decode()
        create_markdown_artifact(key=artifact_key(f"{stage}-loss-curve", where),
                                 description=f"{stage} loss curve of {where}",
                                 markdown=f"![{stage} loss curve](data:image/png;base64,{png})"
                                          f"\n\n`{curve}`")


def processes_for(cfg) -> int:
    if cfg.nproc_per_node:
        return cfg.nproc_per_node
    import torch
    return max(1, torch.cuda.device_count())


def _train(stage: str, cfg, run) -> dict:
    """Train in this process, or -- with several processes per node -- launch torchrun
    on this machine (DDP: NCCL on GPUs, gloo on CPUs) and read the run's summary. A run
    on an object store keeps torchrun's config and log in scratch while it runs; the
    log is then uploaded next to the run's other files."""
    nproc = processes_for(cfg)
    if nproc == 1:
        return run(cfg, progress=_log_progress(stage))
    layout = RunLayout(cfg.out)
    local = RunLayout(scratch_dir("pvit-torchrun-")) if layout.remote else layout
    config_path, log_path = local.torchrun_config(stage), local.torchrun_log(stage)
    config_path.write_text(yaml.safe_dump({stage: cfg.model_dump(mode="json")}))
    try:
        code = _torchrun(stage, nproc, config_path, log_path)
    finally:
        if layout.remote:
            files.write_bytes(layout.torchrun_log(stage), log_path.read_bytes())
            shutil.rmtree(local.root, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"{stage}: torchrun exited with code {code} (log: "
                           f"{layout.torchrun_log(stage)})")
    return json.loads(files.read_bytes(layout.summary))


def _torchrun(stage: str, nproc: int, config_path: Path, log_path: Path) -> int:
    logger = get_run_logger()
    logger.info("%s: torchrun with %d processes (log: %s)", stage, nproc, log_path)
    with open(log_path, "a") as log:
        code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={nproc}", "-m", "flows.commands", stage,
                               str(config_path)], stdout=log, stderr=subprocess.STDOUT).returncode
    return code


@task(name="pretrain", task_run_name="pretrain", retries=TRAIN_RETRIES, retry_delay_seconds=2,
      result_serializer="json")
def pretrain_task(cfg: PretrainConfig, key: str) -> dict:
    from training.train import run_pretrain
    # a retry finds "resumable": keeps last.pt; a stale run loses only what a run writes
    stage_cache.begin(cfg.out, key, owned=RunLayout(cfg.out).owned("pretrain"))
    summary = _train("pretrain", cfg, run_pretrain)
    stage_cache.finish(cfg.out, key, summary, trained_outputs(cfg.out))
    _metrics_artifact("pretrain", {**summary, "run_dir": cfg.out})
    return summary


@task(name="finetune", task_run_name="finetune", retries=TRAIN_RETRIES, retry_delay_seconds=2,
      result_serializer="json")
def finetune_task(cfg: FinetuneConfig, key: str) -> dict:
    from training.train import run_finetune
    stage_cache.begin(cfg.out, key, owned=RunLayout(cfg.out).owned("finetune"))
    summary = _train("finetune", cfg, run_finetune)
    stage_cache.finish(cfg.out, key, summary, trained_outputs(cfg.out))
    _metrics_artifact("finetune", {**summary, "run_dir": cfg.out})
    return summary


@task(name="evaluate", task_run_name="evaluate", result_serializer="json")
def evaluate_task(cfg: EvaluateConfig, key: str) -> dict:
    # the checkpoint's evaluation home, shared with `pvit evaluate` (training/evaluate.py)
    from flows.evaluation_home import run_evaluate_in_home
    result = run_evaluate_in_home(cfg, key)
    _metrics_artifact("evaluate", {**result, "run_dir": str(evaluation_dir(cfg.checkpoint))})
    return result


def trained_outputs(run_dir) -> list[str]:
    """What a finished training stage must still hold to count as done (relative to
    its directory, as its stage record lists them)."""
    layout = RunLayout(run_dir)
    return [layout.relative(layout.final_checkpoint), layout.relative(layout.summary)]


@flow(name="pretrain", flow_run_name=training_run_name("pretrain"), result_serializer="json")
def pretrain(config: PretrainConfig) -> State[dict]:
    """Prompt pretraining on synthetic shards (cached on its config and the shards).

    Args:
        config: the experiment file's `pretrain` section (docs/training.md)
    """
    key = stage_cache.stage_key("pretrain", config.model_dump(mode="json"),
                                {"synthetic": dataset_key(config.synthetic)},
                                stage_cache.code_version("training"))
    return _cached_or_run("pretrain", config.out, key, lambda: pretrain_task(config, key))


@flow(name="finetune", flow_run_name=training_run_name("finetune"), result_serializer="json")
def finetune(config: FinetuneConfig) -> State[dict]:
    """Downstream fine-tuning with synthetic batches mixed in.

    Args:
        config: the experiment file's `finetune` section (docs/training.md)
    """
    upstream = {"synthetic": dataset_key(config.synthetic),
                "init": stage_cache.file_key(config.init)}
    key = stage_cache.stage_key("finetune", config.model_dump(mode="json"), upstream,
                                stage_cache.code_version("training"))
    return _cached_or_run("finetune", config.out, key, lambda: finetune_task(config, key))


@flow(name="evaluate", flow_run_name=training_run_name("evaluate"), result_serializer="json")
def evaluate(config: EvaluateConfig) -> State[dict]:
    """Top-1/top-5 (single and multi-view) of a fine-tuned checkpoint.

    Args:
        config: the experiment file's `evaluate` section (docs/training.md)
    """
    from flows.evaluation_home import evaluation_key
    out_dir = str(evaluation_dir(config.checkpoint))  # shared with `pvit evaluate`
    key = evaluation_key(config)
    state = _cached_or_run("evaluate", out_dir, key, lambda: evaluate_task(config, key))
    if config.out:
        copy_result(files.join(out_dir, evaluation_name(config.checkpoint, config.split)),
                    config.out)
    return state


def copy_result(home_file, out: str) -> None:
    """The result also at the file's ``evaluate.out`` (the stage's record stays in the
    evaluation home): the home file's bytes, written only when ``out`` does not hold them
    yet, so a cached rerun writes nothing."""
    payload = files.read_bytes(home_file)
    if not files.is_file(out) or files.read_bytes(out) != payload:
        files.write_bytes(out, payload)


def cached(stage: str, out_dir, key: str) -> dict | None:
    """The stored summary when ``out_dir`` is done for ``key``. The reuse is put on the
    current run (an artifact), so a cached run does not look like one that did nothing."""
    if stage_cache.state(out_dir, key) != "done":
        return None
    get_run_logger().info("%s is up to date (key %s): skipped", out_dir, key[:12])
    create_markdown_artifact(
        key=artifact_key(f"{stage.replace('_', '-')}-reused", out_dir),
        markdown=f"**{stage}: reused**, nothing recomputed: `{out_dir}` is up to date "
                 f"(stage key `{key[:12]}`, record `{files.join(out_dir, stage_cache.RECORD)}`).",
        description=f"{stage} reused its cached output")
    return stage_cache.read_record(out_dir)["summary"]


def reuse_message(out_dir) -> str:
    return f"reused {out_dir} (up to date), nothing recomputed"


def _cached_or_run(stage: str, out_dir, key: str, run: Callable[[], dict]) -> State[dict]:
    """The stage's summary as the run's final state, whose message says whether it was
    reused or computed (shown next to the state in the UI and in the pipeline's)."""
    summary = cached(stage, out_dir, key)
    if summary is not None:
        return reused(reuse_message(out_dir), summary)
    return Completed(message=f"computed into {out_dir}", data=run())


def dataset_key(directory) -> str:
    """Content key of a shard directory: its spec hash and every shard's sha256."""
    if not directory:
        return "none"
    manifest = read_manifest(Path(directory))
    if manifest is None:
        return "missing"
    return stage_cache.stage_key("dataset", manifest["spec_hash"],
                                 {s["name"]: s["sha256"] for s in manifest["shards"]}, "")
