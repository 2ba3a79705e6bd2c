"""``pvit``: the one entry point. Every command takes the experiment file and reads
its sections; flags override the file. Bad input: one ``error: ...`` line, exit 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.experiment import ConfigError, ExperimentConfig, load_experiment

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Synthetic scenes -> WebDataset shards -> PViT, as Prefect flows.")
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_or_exit(config: Optional[Path], overrides: dict) -> ExperimentConfig:
    try:
        return load_experiment(config, overrides)
    except ConfigError as exc:
        fail(str(exc))


def check_writable_dir(path: Path, what: str) -> None:
    """Fail (exit 2) before any work if ``path`` cannot become a writable directory."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{what}: {path} is not a usable directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{what}: {path} is not writable")


@app.command()
def generate(
    config: Path = typer.Argument(..., help="experiment YAML (its `generation` section is used)"),
    out: Optional[Path] = typer.Option(None, help="shard directory"),
    scenes: Optional[int] = typer.Option(None, help="number of clips"),
    frames: Optional[int] = typer.Option(None, help="frames per clip"),
    resolution: Optional[int] = typer.Option(None, help="square frame size, pixels"),
    spp: Optional[int] = typer.Option(None, help="Cycles samples per pixel"),
    seed: Optional[int] = typer.Option(None, help="dataset seed"),
    scenes_per_shard: Optional[int] = typer.Option(None, help="clips per shard"),
    workers: Optional[int] = typer.Option(None, help="shards rendered at once"),
    retries: Optional[int] = typer.Option(None, help="re-runs of a crashed render worker"),
    task_runner: Optional[str] = typer.Option(None, help="threads | processes | dask"),
) -> None:
    """Render synthetic clips with Kubric/Blender into verified WebDataset shards."""
    cfg = load_or_exit(config, {
        "generation.out": out, "generation.scenes": scenes, "generation.scene.frames": frames,
        "generation.scene.resolution": resolution, "generation.scene.spp": spp,
        "generation.seed": seed, "generation.scenes_per_shard": scenes_per_shard,
        "generation.workers": workers, "generation.retries": retries,
        "generation.task_runner": task_runner})
    gen = cfg.generation
    check_writable_dir(gen.out, "generation.out")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flows.generate import run_generate
    from generation.dataset import RenderError, plan

    total = sum(len(job.seeds) for job in plan(gen))
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        bar = progress.add_task(f"rendering into {gen.out}", total=total)
        try:
            summary = run_generate(gen, on_shard=lambda rec: progress.advance(bar, rec["samples"]))
        except RenderError as exc:
            fail(str(exc), code=1)
        progress.update(bar, completed=total)
    console.print(f"{summary['shards']} shards, {summary['clips']} clips "
                  f"({summary['rendered_shards']} rendered, {summary['kept_shards']} kept) -> "
                  f"{summary['manifest']}")


@app.command()
def verify(directory: Path = typer.Argument(..., help="shard directory")) -> None:
    """Check every shard against the manifest; exits 1 naming each bad shard."""
    from generation.verify import verify_dataset

    problems = verify_dataset(directory)
    if not problems:
        console.print(f"ok: every shard in {directory} matches its manifest")
        return
    for name, found in problems.items():
        for line in found:
            console.print(f"bad: {name}: {line}", markup=False, highlight=False)
    raise typer.Exit(1)


@app.command()
def show(directory: Path = typer.Argument(..., help="shard directory"),
         out: Path = typer.Option(..., help="PNG to write"),
         sample: Optional[str] = typer.Option(None, help="sample key (default: the first)")
         ) -> None:
    """Write a contact sheet: RGB | depth | instance seg | semantic seg | normals."""
    from generation.contact_sheet import write_contact_sheet

    try:
        path = write_contact_sheet(directory, out, sample)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"wrote {path}")


@app.command()
def pipeline(
    config: Path = typer.Argument(..., help="experiment YAML (all sections)"),
    force: list[str] = typer.Option([], "--force", help="recompute a stage: generate | "
                                    "toy_actions | pretrain | finetune | evaluate (repeatable)"),
) -> None:
    """Run the whole DAG: generate -> pretrain -> finetune -> evaluate, cached per stage."""
    from flows.pipeline import STAGES
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        fail(f"--force: unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
    cfg = load_or_exit(config, {})
    check_writable_dir(cfg.generation.out, "generation.out")
    for section in ("pretrain", "finetune"):
        stage = getattr(cfg, section)
        if stage is not None:
            check_writable_dir(Path(stage.out), f"{section}.out")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flows.generate import shard_progress
    from flows.pipeline import StageError
    from flows.pipeline import pipeline as pipeline_flow
    from flows.train import step_progress
    from generation.dataset import plan

    total = sum(len(job.seeds) for job in plan(cfg.generation))
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("rendering (new shards)", total=total)
        training_bars: dict[str, int] = {}

        def on_step(stage: str, record: dict) -> None:
            if "step" not in record or "total_steps" not in record:
                return
            if stage not in training_bars:
                training_bars[stage] = progress.add_task(f"{stage} (steps)",
                                                         total=record["total_steps"])
            progress.update(training_bars[stage], completed=record["step"])

        try:
            with shard_progress(lambda rec: progress.advance(bar, rec["samples"])), \
                    step_progress(on_step):
                result = pipeline_flow(cfg, force=list(force))
        except StageError as exc:
            fail(str(exc), code=1)
        progress.update(bar, completed=total)
    console.print("pipeline finished:", markup=False)
    for name, path in result["paths"].items():
        if path:
            console.print(f"  {name:9s} {path}", markup=False)
    evaluation = result.get("evaluate")
    if evaluation:
        multi = evaluation.get("multi_view", {})
        console.print(f"  top1 {evaluation['top1']:.1f}  top5 {evaluation['top5']:.1f}  "
                      f"(multi-view top1 {multi.get('top1', float('nan')):.1f}, "
                      f"{multi.get('views_per_clip', '?')} views/clip)", markup=False)


def _register_commands() -> None:
    from flows.serve import register as register_serve
    from training.commands import register as register_training
    register_training(app)
    register_serve(app)


_register_commands()


def main() -> None:
    # Bad flags (typer/click usage errors) already exit with code 2.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # No network here (and none needed): do not try to send telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(app())


if __name__ == "__main__":
    main()
