"""The ``pretrain``, ``finetune`` and ``evaluate`` commands of the ``pvit`` CLI.

``register(app)`` adds them to the project's typer app (``flows/cli.py``). Each command
reads its section of the experiment file, applies flags as overrides, checks every
input (``error: ...`` on stderr, exit 2, before any training), then calls the plain
function in ``training/`` that Prefect tasks call too. Under ``torchrun`` run this
module directly: ``torchrun --nproc_per_node 2 -m flows.commands pretrain CONFIG``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from flows.cli_common import ConfigFlags, SetOpt, console, fail
from flows.experiment import ConfigError, load_experiment
from generation.dataset.storage import WriteError
from training.config import EvaluateConfig

# Inside the commands: training.train, training.checkpoint, training.synthetic_data,
# training.evaluate and flows.evaluation_home (torch and timm, 2.6-4 s, python -X
# importtime after flows.cli), and rich.progress (6-10 ms, 2-3% of `pvit --help`'s
# 0.3 s): flows/cli.py imports this module for every `pvit` command, `--help` and the
# checks that exit 2 before any training included.

# Each flag sets one key of the experiment file (type and help: that field's); the
# sections' paths are `str` fields, parsed as paths. `--set` sets any key.
PRETRAIN_FLAGS = ConfigFlags({
    "out": ("pretrain.out", Path), "epochs": "pretrain.epochs", "model": "pretrain.model",
    "variant": "pretrain.variant", "synthetic": ("pretrain.synthetic", Path),
    "init": ("pretrain.init", Path), "init_format": "pretrain.init_format"})
FINETUNE_FLAGS = ConfigFlags({
    "out": ("finetune.out", Path), "epochs": "finetune.epochs", "model": "finetune.model",
    "variant": "finetune.variant", "synthetic": ("finetune.synthetic", Path),
    "init": ("finetune.init", Path), "init_format": "finetune.init_format",
    "data_format": "finetune.data_format", "data_root": ("finetune.data_root", Path)})
EVALUATE_FLAGS = ConfigFlags({
    "data_format": "evaluate.data_format", "data_root": ("evaluate.data_root", Path),
    "split": "evaluate.split", "out": ("evaluate.out", Path),
    "temporal_clips": "evaluate.temporal_clips", "spatial_crops": "evaluate.spatial_crops"})


def _stage_config(stage: str, config: Optional[Path], overrides: dict[str, Any],
                  sets: Optional[list[str]] = None):
    try:
        return load_experiment(config, overrides, sets).require(stage)
    except ConfigError as exc:
        fail(str(exc))


def _train(stage: str, cfg) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training import train
    from training.checkpoint import CheckpointError
    from training.synthetic_data import ShardDecodeError

    try:
        train.preflight(stage, cfg)
    except (train.InputError, CheckpointError) as exc:
        fail(f"{stage}.{exc}")
    run = train.run_pretrain if stage == "pretrain" else train.run_finetune
    # under torchrun only rank 0 draws the bar (the others would draw empty ones)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                  console=console, disable=os.environ.get("RANK", "0") != "0") as bar:
        task = bar.add_task(f"{stage} -> {cfg.out}", total=None, loss=float("nan"))

        def progress(record: dict[str, Any]) -> None:
            bar.update(task, completed=record["step"], total=record["total_steps"],
                       loss=record["loss/total"])

        try:
            summary = run(cfg, progress=progress)
        except (ShardDecodeError, train.NonFiniteLoss, WriteError) as exc:  # while training:
            bar.stop()              # exit 1 (WriteError: a disk full, a store still down)
            fail(str(exc), code=1)
    if summary.get("checkpoint"):  # rank 0 only
        # the counts, not the lists (summary.json has those)
        shown = {k: v for k, v in summary.items()
                 if k not in ("skipped_paths", "skipped_shard_paths")}
        typer.echo(json.dumps(shown, indent=2))


@PRETRAIN_FLAGS.add_options
def pretrain(
    config: Path = typer.Argument(..., help="experiment YAML (its `pretrain` section)"),
    sets: Optional[list[str]] = SetOpt,
    **flags: Any,
) -> None:
    """Prompt pretraining on synthetic shards (all task heads)."""
    cfg = _stage_config("pretrain", config, PRETRAIN_FLAGS.overrides(flags), sets)
    _train("pretrain", cfg)


@FINETUNE_FLAGS.add_options
def finetune(
    config: Path = typer.Argument(..., help="experiment YAML (its `finetune` section)"),
    sets: Optional[list[str]] = SetOpt,
    **flags: Any,
) -> None:
    """Downstream training with synthetic batches mixed in (synthetic_ratio)."""
    cfg = _stage_config("finetune", config, FINETUNE_FLAGS.overrides(flags), sets)
    _train("finetune", cfg)


@EVALUATE_FLAGS.add_options
def evaluate(
    # a str: a Path would collapse s3://bucket/run/... to s3:/bucket/run/...
    checkpoint: str = typer.Argument(..., help="finetune checkpoint (.pt): a path or an "
                                     "s3:// / gs:// URL"),
    config: Optional[Path] = typer.Option(None, help="experiment YAML (its `evaluate` section)"),
    sets: Optional[list[str]] = SetOpt,
    **flags: Any,
) -> None:
    """Top-1 / top-5, single view and multi-view, written as JSON."""
    from flows.evaluation_home import run_evaluate_in_home
    from training.checkpoint import CheckpointError
    from training.evaluate import run_evaluate

    section: dict[str, Any] = {}
    if config is not None or sets:
        # validates the file and --set; then this command's flags win
        cfg = _stage_config("evaluate", config, {}, sets)
        section = cfg.model_dump(exclude_unset=True)
    section["checkpoint"] = checkpoint
    section.update({key.removeprefix("evaluate."): value
                    for key, value in EVALUATE_FLAGS.overrides(flags).items()})
    try:
        cfg = EvaluateConfig.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"evaluate.{'.'.join(map(str, first['loc']))}: "
             f"{first['msg'].removeprefix('Value error, ')}".replace("evaluate.: ", "evaluate."))
    try:
        # no --out: into the checkpoint's evaluation home, through its stage record, so
        # `pvit pipeline` finds the result where its own evaluate stage puts it
        result = run_evaluate(cfg) if cfg.out else run_evaluate_in_home(cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        fail(f"evaluate.{str(exc).splitlines()[0]}")
    except WriteError as exc:   # a store that stayed down past its retries
        fail(str(exc), code=1)
    typer.echo(json.dumps({k: result[k] for k in ("top1", "top5", "out")}
                          | {"multi_view_top1": result["multi_view"]["top1"],
                             "multi_view_top5": result["multi_view"]["top5"]}, indent=2))


def register(app: typer.Typer) -> None:
    """Add the training commands to ``app`` (called by ``flows/cli.py``)."""
    app.command()(pretrain)
    app.command()(finetune)
    app.command()(evaluate)


def main() -> None:
    """Entry for ``torchrun -m flows.commands``: the training commands alone."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(app)
    app()


if __name__ == "__main__":
    main()
