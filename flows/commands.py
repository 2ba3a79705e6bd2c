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
from rich.console import Console

DataFormatOpt = typer.Option(None, "--data-format", help="ssv2 | list")
MODEL_HELP = ("pvit_test | pvit_tiny | pvit_small | pvit_base | mvitv2_s | videomae_vit_s | "
              "videomae_vit_b")
INIT_FORMAT_HELP = ("format of --init: pvit | timm_image | torchvision_mvit | videomae | "
                    "videomae_hf [default: pvit if it is one, else timm_image]")
# every command takes it (flows/cli.py too); keys are the file's, dotted from the top
SET_HELP = ("override any key of the experiment file: section.key=value (repeatable; the "
            "value is YAML, e.g. null, 1e-4, [depth, pose]; unknown keys are errors)")
SetOpt = typer.Option(None, "--set", help=SET_HELP, metavar="KEY=VALUE")
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _stage_config(stage: str, config: Optional[Path], overrides: dict[str, Any],
                  sets: Optional[list[str]] = None):
    from flows.experiment import ConfigError, load_experiment

    try:
        dotted = {f"{stage}.{k}": v for k, v in overrides.items()}
        return load_experiment(config, dotted, sets).require(stage)
    except ConfigError as exc:
        _fail(str(exc))


def _train(stage: str, cfg) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from training import train
    from training.checkpoint import CheckpointError
    from training.synthetic_data import ShardDecodeError

    try:
        train.preflight(stage, cfg)
    except (train.InputError, CheckpointError) as exc:
        _fail(f"{stage}.{exc}")
    run = train.run_pretrain if stage == "pretrain" else train.run_finetune
    # under torchrun only rank 0 draws the bar (the others would draw empty ones)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(),
                  console=err_console, disable=os.environ.get("RANK", "0") != "0") as bar:
        task = bar.add_task(f"{stage} -> {cfg.out}", total=None, loss=float("nan"))

        def progress(record: dict[str, Any]) -> None:
            bar.update(task, completed=record["step"], total=record["total_steps"],
                       loss=record["loss/total"])

        try:
            summary = run(cfg, progress=progress)
        except ShardDecodeError as exc:  # bad data met while training: one line, exit 1
            bar.stop()
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    if summary.get("checkpoint"):  # rank 0 only
        # the counts, not the lists (summary.json has those)
        shown = {k: v for k, v in summary.items()
                 if k not in ("skipped_paths", "skipped_shard_paths")}
        typer.echo(json.dumps(shown, indent=2))


def pretrain(
    config: Path = typer.Argument(..., help="experiment YAML (its `pretrain` section)"),
    out: Optional[Path] = typer.Option(None, help="run directory"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    variant: Optional[str] = typer.Option(None, help="mt | pvit"),
    synthetic: Optional[Path] = typer.Option(None, help="shard directory"),
    init: Optional[Path] = typer.Option(None, help="initial weights (see --init-format)"),
    init_format: Optional[str] = typer.Option(None, help=INIT_FORMAT_HELP),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Prompt pretraining on synthetic shards (all task heads)."""
    cfg = _stage_config("pretrain", config, {
        "out": out and str(out), "epochs": epochs, "model": model, "variant": variant,
        "synthetic": synthetic and str(synthetic), "init": init and str(init),
        "init_format": init_format}, sets)
    _train("pretrain", cfg)


def finetune(
    config: Path = typer.Argument(..., help="experiment YAML (its `finetune` section)"),
    out: Optional[Path] = typer.Option(None, help="run directory"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    variant: Optional[str] = typer.Option(None, help="vit | mt | pvit"),
    synthetic: Optional[Path] = typer.Option(None, help="shard directory mixed into batches"),
    init: Optional[Path] = typer.Option(None, help="pretrain checkpoint or other weights"),
    init_format: Optional[str] = typer.Option(None, help=INIT_FORMAT_HELP),
    data_format: Optional[str] = DataFormatOpt,
    data_root: Optional[Path] = typer.Option(None, help="downstream data set root"),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Downstream training with synthetic batches mixed in (synthetic_ratio)."""
    cfg = _stage_config("finetune", config, {
        "out": out and str(out), "epochs": epochs, "model": model, "variant": variant,
        "synthetic": synthetic and str(synthetic), "init": init and str(init),
        "init_format": init_format, "data_format": data_format,
        "data_root": data_root and str(data_root)}, sets)
    _train("finetune", cfg)


def evaluate(
    checkpoint: Path = typer.Argument(..., help="finetune checkpoint (.pt)"),
    data_format: Optional[str] = DataFormatOpt,
    data_root: Optional[Path] = typer.Option(None, help="downstream data set root"),
    split: Optional[str] = typer.Option(None, help="split to evaluate [default: validation]"),
    config: Optional[Path] = typer.Option(None, help="experiment YAML (its `evaluate` section)"),
    out: Optional[Path] = typer.Option(None, help="result JSON [default: the run's evaluation "
                                       "home, CHECKPOINT_DIR/evaluate/, shared with the "
                                       "pipeline]"),
    temporal_clips: Optional[int] = typer.Option(None, help="clips per video (multi-view)"),
    spatial_crops: Optional[int] = typer.Option(None, help="crops per clip, 1 or 3"),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Top-1 / top-5, single view and multi-view, written as JSON."""
    from pydantic import ValidationError

    from flows.evaluation_home import run_evaluate_in_home
    from training.checkpoint import CheckpointError
    from training.config import EvaluateConfig
    from training.evaluate import run_evaluate

    section: dict[str, Any] = {}
    if config is not None or sets:
        # validates the file and --set; then this command's flags win
        cfg = _stage_config("evaluate", config, {}, sets)
        section = cfg.model_dump(exclude_unset=True)
    flags = {"checkpoint": str(checkpoint), "data_format": data_format,
             "data_root": data_root and str(data_root), "split": split, "out": out and str(out),
             "temporal_clips": temporal_clips, "spatial_crops": spatial_crops}
    section.update({k: v for k, v in flags.items() if v is not None})
    try:
        cfg = EvaluateConfig.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"evaluate.{'.'.join(map(str, first['loc']))}: "
              f"{first['msg'].removeprefix('Value error, ')}".replace("evaluate.: ", "evaluate."))
    try:
        # no --out: into the checkpoint's evaluation home, through its stage record, so
        # `pvit pipeline` finds the result where its own evaluate stage puts it
        result = run_evaluate(cfg) if cfg.out else run_evaluate_in_home(cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        _fail(f"evaluate.{str(exc).splitlines()[0]}")
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
