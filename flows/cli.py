"""``pvit``: the one entry point. Every command takes the experiment file and reads
its sections; flags override the file. Bad input: one ``error: ...`` line, exit 2."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from flows import stage_cache
from flows.cli_common import ConfigFlags, SetOpt, console, fail, load_or_exit
from flows.commands import register as register_training
from flows.experiment import ExperimentConfig
from flows.progress import listening
from flows.serve import register as register_serve
from generation.dataset.manifest import WriteError
from generation.dataset.spec_change import HINT, SpecChanged, check
from generation.dataset.storage import (
    Location,
    LocationError,
    canonical,
    dataset_path,
    filesystem,
    is_remote,
)
from generation.dataset.storage import check_writable_dir as probe
from generation.render.devices import DeviceError, preflight, worker_env
from training import files
from training.run_layout import evaluation_dir

# What stays inside the commands that use it, by its cost on top of this module's own
# imports (python -X importtime, after `import flows.cli`; `pvit --help` takes ~0.33 s):
# Prefect and the flows (flows.generate, flows.pipeline, flows.prefect_server: 0.7-1 s,
# torch for the pipeline's stages 2.4 s), the render supervisor and warm workers (10-15
# ms), verify (7 ms), the lock (5 ms), the plan (5.5 ms), rich.progress (6-10 ms) and the
# contact sheet (cv2, ~20 ms): each is needed by one command only.

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Synthetic scenes -> WebDataset shards -> PViT, as Prefect flows.")


def dataset_or_exit(location: str) -> Path | str:
    """The shard directory (a local ``Path``) or object-store URL (``s3://b/ds``) named by
    a DIR argument; any other scheme (pipe:...) exits 2."""
    try:
        return dataset_path(str(location))
    except LocationError as exc:
        fail(f"DIR: {exc}")


def check_writable_dir(path: Path, what: str) -> None:
    """Fail (exit 2) before any work if ``path`` cannot become a writable directory (for
    an object-store URL: if its bucket does not answer or does not exist)."""
    try:
        if is_remote(path):
            try:                            # e.g. gs:// without gcsfs: name the field
                filesystem(Location(path).scheme)
            except LocationError as exc:
                raise LocationError(f"{what}: {exc}") from None
            Location(path).makedirs()
        else:
            probe(path, what)
    except (LocationError, WriteError) as exc:
        fail(f"{what}: {exc}" if isinstance(exc, WriteError) else str(exc))


# Each flag sets one key of the experiment file (type and help: that field's, see
# flows/cli_common.py); `--set` sets any key.
GENERATE_FLAGS = ConfigFlags({
    "out": "generation.out", "scenes": "generation.scenes",
    "frames": "generation.scene.frames", "resolution": "generation.scene.resolution",
    "spp": "generation.scene.spp", "seed": "generation.seed",
    "scenes_per_shard": "generation.scenes_per_shard", "workers": "generation.workers",
    "retries": "generation.retries", "task_runner": "generation.task_runner",
    "overwrite": "generation.overwrite", "device": "generation.device",
    "workers_per_gpu": "generation.workers_per_gpu"})


@app.command()
@GENERATE_FLAGS.add_options
def generate(
    config: Path = typer.Argument(..., help="experiment YAML (its `generation` section is used)"),
    break_lock: bool = typer.Option(False, "--break-lock", help="remove another host's lock "
                                    "on --out (only when that run is known to be gone)"),
    sets: Optional[list[str]] = SetOpt,
    **flags: Any,
) -> None:
    """Render synthetic clips with Kubric/Blender into verified WebDataset shards.

    One run writes a dataset at a time (lock file OUT/.pvit.lock); a second exits 2
    naming the first."""
    cfg = load_or_exit(config, GENERATE_FLAGS.overrides(flags), sets)
    gen = cfg.generation
    device = check_render_device(gen.device)
    check_writable_dir(gen.out, "generation.out")
    with writer_lock(gen.out, "pvit generate", break_lock=break_lock):
        _generate(gen, device)


def check_render_device(requested: str) -> str:
    """Exit 2 with one line, before any render, when Blender cannot see the requested
    GPU kind; else the line that says which device (``auto``'s pick) will render. It is
    printed once the other checks passed, so a refused run still says one line."""
    try:
        picked = preflight(requested)
    except DeviceError as exc:
        fail(str(exc))
    return f"render device: {picked}" + (" (auto)" if requested == "auto" else "")


def warn(message: str) -> None:
    console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def writer_lock(out: Path, owner: str, *, break_lock: bool = False):
    """Hold the dataset lock of ``out`` for the block (the flow takes it again, within
    this process); another writer: one line naming it, exit 2."""
    from generation.dataset.lock import LockError, acquire, release
    try:
        acquire(out, owner=owner, break_lock=break_lock, warn=warn)
    except LockError as exc:
        fail(str(exc))
    except WriteError as exc:   # a full disk: the first file a run writes is the lock
        fail(str(exc), code=1)
    try:
        yield
    finally:
        release(out)


def check_spec_or_exit(gen, hint: Optional[str] = None) -> None:
    """Exit 2, naming the changed fields, before anything is touched when ``gen`` would
    replace a dataset made with another spec (and does not say overwrite)."""
    try:
        check(gen, hint or HINT)
    except SpecChanged as exc:
        fail(str(exc))


def _generate(gen, device_line: Optional[str] = None) -> None:
    check_spec_or_exit(gen)
    if device_line:
        console.print(device_line, markup=False, highlight=False)
    start_render_workers(gen)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flows.generate import run_generate
    from flows.prefect_server import TemporaryServerError, use_server
    from generation.dataset.lock import LockError
    from generation.render.supervisor import RenderError

    def no_traceback(record: logging.LogRecord) -> bool:
        # Prefect logs each failed run with a traceback; for these errors the one line
        # they carry (printed below as `error: ...`) says it all, so keep only that.
        if record.exc_info and isinstance(record.exc_info[1], (RenderError, WriteError,
                                                               SpecChanged, LockError)):
            record.exc_info = record.exc_text = None
        return True

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(no_traceback)
    total = gen.scenes   # every planned clip, without building the plan (O(1))
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        # gen.out is a Path, which spells s3://b/p as s3:/b/p: print the URL form
        bar = progress.add_task(f"rendering into {canonical(gen.out)}", total=total)
        try:
            use_server()
            summary = run_generate(gen, on_shard=lambda rec: progress.advance(bar, rec["samples"]))
        except (RenderError, WriteError, TemporaryServerError) as exc:
            fail(str(exc), code=1)
        except (SpecChanged, LockError) as exc:   # changed since the checks above
            fail(str(exc))
        progress.update(bar, completed=total, description=_render_outcome(summary))
    console.print(f"{summary['shards']} shards, {summary['clips']} clips "
                  f"({summary['rendered_shards']} rendered, {summary['kept_shards']} kept) -> "
                  f"{summary['manifest']}")


def _render_outcome(summary: dict) -> str:
    """The render bar's last words: a run that rendered nothing says it kept the shards,
    rather than "rendering 4/4"."""
    rendered, kept = summary["rendered_shards"], summary["kept_shards"]
    if not rendered:
        return f"kept {kept} shards (up to date), rendered none"
    return f"rendered {rendered} shards" + (f", kept {kept}" if kept else "")


def start_render_workers(gen) -> None:
    """Start the render workers of the first shards now, while Prefect's server starts
    (it holds one core; the CLI only waits for it): their imports (torch, bpy, Kubric:
    seconds) are then done when the flow hands them their shards. Only for the thread
    task runner, whose tasks run in this process; as many as ``generation.workers``, and
    none when the manifest already lists every planned shard (a rerun with nothing to do,
    or a pipeline whose generate stage is cached)."""
    if gen.task_runner != "threads":
        return
    from generation.dataset.plan import unlisted_jobs
    from generation.render import warm_workers
    first = unlisted_jobs(gen)[:gen.workers]     # the shards the first tasks render
    warm_workers.prewarm([worker_env(gen.device, job.index, gen.workers_per_gpu)
                          for job in first])


# DIR arguments are str, not Path: a Path collapses file://HOST/p to file:/HOST/p (read
# as the local /HOST/p) before the location check a config value gets.
@app.command()
def verify(directory: str = typer.Argument(..., help="shard directory or URL",
                                           metavar="DIR"),
           labels: bool = typer.Option(False, "--labels", help="also check each clip's labels "
                                       "against each other: floor plane, normals, masks in "
                                       "boxes, classes, visibility, flow, tracks "
                                       "(docs/dataset-format.md, 'Label checks')")) -> None:
    """Check every shard against the manifest and the planned dataset; exits 1 naming
    each bad or missing shard, 2 when DIR is not a shard directory."""
    from generation.dataset.verify import NotADataset, verify_dataset

    directory = dataset_or_exit(directory)
    try:
        problems = verify_dataset(directory, labels=labels)
    except NotADataset as exc:
        fail(str(exc))
    if not problems:
        console.print(f"ok: {directory} holds every planned shard and each matches its "
                      "manifest" + ("; every clip's labels agree with each other" if labels
                                    else ""), markup=False, highlight=False, soft_wrap=True)
        return
    for name, found in problems.items():
        for line in found:
            # soft_wrap: one problem stays one line whatever the terminal width
            console.print(f"bad: {name}: {line}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def show(directory: str = typer.Argument(..., help="shard directory or URL", metavar="DIR"),
         out: Path = typer.Option(..., help="PNG to write"),
         sample: Optional[str] = typer.Option(None, help="sample key (default: the first)")
         ) -> None:
    """Write a contact sheet: RGB | depth | instance seg | semantic seg | normals (and
    flow and point tracks when the clip has them)."""
    from generation.dataset.contact_sheet import write_contact_sheet
    from generation.dataset.shard_format import FormatError

    try:
        path = write_contact_sheet(dataset_or_exit(directory), out, sample)
    except (FormatError, WriteError) as exc:   # a bad shard or record; a store still
        fail(str(exc), code=1)                  # down after its retries (StoreUnreachable)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"wrote {path}")


def check_stage_outputs(cfg: ExperimentConfig) -> None:
    """Fail (exit 2) before any work on a stage ``out`` a stale stage would clear but
    that is not the project's: a directory holding other files, or one that contains
    (or sits inside) another stage's output, whose files clearing it would delete."""
    from flows.pipeline import wire

    wired = wire(cfg)
    outs = {"generation.out": wired.generation.out}
    for section in ("toy_actions", "humanoid_actions", "pretrain", "finetune"):
        stage = getattr(wired, section)
        if stage is not None:
            outs[f"{section}.out"] = stage.out
    for what, path in outs.items():
        try:    # a path, or an object-store URL (a scheme it cannot write: one line)
            canonical(path)
        except LocationError as exc:
            fail(f"{what}: {exc}")
        check_writable_dir(path, what)
        if what != "generation.out" and (problem := stage_cache.foreign(path)):
            fail(f"{what}: {problem}")
    resolved = {what: _comparable(path) for what, path in outs.items()}
    for a, pa in resolved.items():
        for b, pb in resolved.items():
            if a < b and (pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")):
                fail(f"{a} ({outs[a]}) and {b} ({outs[b]}) overlap: each stage needs a "
                     "directory of its own")
    check_stage_inputs(wired)
    if wired.toy_actions is not None or wired.humanoid_actions is not None:
        from training.video_set import check_encoders
        try:
            check_encoders()
        except RuntimeError as exc:
            fail(f"{'toy_actions' if wired.toy_actions else 'humanoid_actions'}: {exc}")
    if wired.evaluate is not None and wired.finetune is not None:
        # inside finetune.out, so only a foreign directory already there can be in the way
        target = evaluation_dir(wired.evaluate.checkpoint)
        if problem := stage_cache.foreign(target):
            fail(f"evaluate: {problem}")
        if wired.evaluate.out:      # a copy of the result is written there too
            try:
                canonical(wired.evaluate.out)
            except LocationError as exc:
                fail(f"evaluate.out: {exc}")
            check_writable_dir(files.parent(wired.evaluate.out), "evaluate.out")


def _comparable(path) -> str:
    """An output as a string whose ``/``-prefixes are its parents: a resolved local path,
    or the canonical URL of an object-store prefix."""
    where = canonical(path)
    return where if isinstance(where, str) else str(where.resolve())


def check_stage_inputs(wired: ExperimentConfig) -> None:
    """Fail (exit 2) before any work on an input that neither exists nor is made by an
    earlier stage: found after rendering and pretraining, it would have cost both. The
    wired config reads the shards, the pretrained and the fine-tuned checkpoints from the
    stages that make them; what is left is the downstream set (made by ``toy_actions``
    when that section is there and the stage names no ``data_root`` of its own) and a
    fine-tuning ``init`` without a pretrain stage."""
    made = set()
    action_set = wired.toy_actions or wired.humanoid_actions
    if action_set is not None:
        made |= {os.path.normpath(action_set.root(fmt)) for fmt in ("list", "ssv2")}
    inputs = []
    for section in ("finetune", "evaluate"):
        stage = getattr(wired, section)
        if stage is not None:
            inputs.append((f"{section}.data_root", stage.data_root))
    if wired.finetune is not None and wired.pretrain is None and wired.finetune.init:
        inputs.append(("finetune.init", wired.finetune.init))
    for what, value in inputs:
        if not value or os.path.normpath(str(value)) in made:
            continue        # made upstream
        try:    # a path, or an object-store input looked up where it lives
            there = Location(value).exists()
        except (LocationError, WriteError) as exc:
            fail(f"{what}: {exc}")
        if not there:
            hint = (f" (the action set stage makes {action_set.root('list')})"
                    if action_set is not None and what.endswith("data_root") else "")
            fail(f"{what}: {value} does not exist and no stage of this pipeline makes "
                 f"it{hint}")


@app.command()
def pipeline(
    config: Path = typer.Argument(..., help="experiment YAML (all sections)"),
    force: list[str] = typer.Option([], "--force", help="recompute a stage: generate | "
                                    "toy_actions | humanoid_actions | pretrain | finetune | "
                                    "evaluate (repeatable)"),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Run the whole DAG: generate -> pretrain -> finetune -> evaluate, cached per stage."""
    from flows.pipeline import STAGES
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        fail(f"--force: unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
    cfg = load_or_exit(config, {}, sets)
    check_writable_dir(cfg.generation.out, "generation.out")
    check_stage_outputs(cfg)
    with writer_lock(cfg.generation.out, "pvit pipeline"):
        if "generate" not in force:
            check_spec_or_exit(cfg.generation, hint="rerun with --force generate to render "
                               "it again (or set generation.overwrite: true); each old shard "
                               "stays until its replacement is rendered")
        _pipeline(cfg, force)


@app.command()
def actions(
    config: Path = typer.Argument(..., help="experiment YAML with a humanoid_actions section"),
    sets: Optional[list[str]] = SetOpt,
) -> None:
    """Render the humanoid action set (one actor playing one motion per clip) and write it
    as videos in the SSv2 and list layouts: the controlled downstream task."""
    from flows.actions import humanoid_actions
    from flows.prefect_server import TemporaryServerError, use_server
    from generation.dataset.lock import LockError
    from generation.render.supervisor import RenderError

    cfg = load_or_exit(config, {}, sets)
    section = cfg.humanoid_actions
    if section is None:
        fail("the experiment file has no `humanoid_actions` section")
    check_writable_dir(section.out, "humanoid_actions.out")
    if problem := stage_cache.foreign(section.out):
        fail(f"humanoid_actions.out: {problem}")
    try:
        use_server()
        summary = humanoid_actions(section)
    except (RenderError, WriteError, TemporaryServerError) as exc:
        fail(str(exc), code=1)
    except LockError as exc:
        fail(str(exc))
    console.print(f"action set: {len(summary['classes'])} classes, "
                  + ", ".join(f"{summary.get(f'{s}_clips', 0)} {s}"
                              for s in ("train", "validation", "test"))
                  + f" clips -> {summary['list_root']} (list), {summary['ssv2_root']} (ssv2)",
                  markup=False)


def _pipeline(cfg: ExperimentConfig, force: list[str]) -> None:

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flows.pipeline import StageError
    from flows.pipeline import pipeline as pipeline_flow
    from flows.prefect_server import TemporaryServerError, use_server
    from flows.run_view import without_heartbeats

    total = cfg.generation.scenes   # every planned clip, without building the plan
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task(f"rendering into {canonical(cfg.generation.out)}", total=total)
        training_bars: dict[str, int] = {}

        def on_step(stage: str, record: dict) -> None:
            if "step" not in record or "total_steps" not in record:
                return
            if stage not in training_bars:
                training_bars[stage] = progress.add_task(f"{stage} (steps)",
                                                         total=record["total_steps"])
            progress.update(training_bars[stage], completed=record["step"])

        start_render_workers(cfg.generation)
        try:
            use_server()
            # without Prefect's heartbeats: each flow run's end waited up to 1 s for
            # them, 4.2 of a cached tiny pipeline's 5.1 s (flows.run_view)
            with listening(on_shard=lambda rec: progress.advance(bar, rec["samples"]),
                           on_step=on_step), without_heartbeats():
                result = pipeline_flow(cfg, force=list(force))
        except (StageError, TemporaryServerError) as exc:
            fail(str(exc), code=1)
        progress.update(bar, completed=total, description=_render_outcome(result["generate"]))
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


register_training(app)
register_serve(app)


def main() -> None:
    # Bad flags (typer/click usage errors) already exit with code 2.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # No network here (and none needed): do not try to send telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to answer; on a busy 2-core laptop (or a
    # render node whose cores Blender holds) starting it took longer and the command
    # failed before doing anything.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Prefect's events worker warns "Still processing items: 1 items remaining..." at the
    # end of every run against a real server whenever an event is still queued at exit
    # (it warns before sending it): noise, not a fault. A failed send is an ERROR, shown.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    if sys.argv[1:2] == ["pipeline"] and not {"--help", "-h"} & set(sys.argv):
        # Start Prefect's temporary server (if no API is configured) while the pipeline
        # imports its stages; `_pipeline` waits for it. Measured on a busy 2-core machine
        # (5 interleaved pairs): the flow could begin after 9.2 s instead of 17.8 s
        # (medians). `pvit generate` reaches its flow about 1 s after this point, and
        # gained nothing measurable: it starts the server when it needs it.
        from flows.prefect_server import start_server
        start_server()
    sys.exit(app())


if __name__ == "__main__":
    main()
