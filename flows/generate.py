"""``generate_dataset``: the Prefect flow over ``generation.dataset``.

One task per shard renders in a fresh worker process and renames the shard into
place; the flow records each finished shard in the manifest as its future resolves,
so a killed run keeps everything that finished. Retries (with exponential backoff)
are Prefect's; the task runner (threads, processes or Dask) is chosen by config.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from generation import dataset
from generation.config import GenerationConfig


# Not persisted (the flow's summary is): the shard record goes into the manifest, and a
# copy in each render machine's result storage would only pile up there.
@task(name="render-shard", task_run_name="render-{job[name]}", persist_result=False)
def render_shard_task(job: dict, out_dir: str, threads: int) -> dict:
    """One shard in a fresh worker process, logged to Prefect."""
    logger = get_run_logger()
    shard = dataset.job_from_dict(job)
    record = dataset.render_shard(
        shard, Path(out_dir), threads=threads,
        on_scene=lambda e: logger.info("%s: scene %s rendered in %.2fs", shard.name,
                                       e["seed"], e["build_s"] + e["render_s"]))
    logger.info("%s: %d scenes, %.1f MB", shard.name, record["samples"], record["bytes"] / 1e6)
    return record


def make_task_runner(cfg: GenerationConfig):
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if cfg.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect.task_runners import ThreadPoolTaskRunner
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


# Called with each finished shard record (the CLI's rich progress bar). Kept out of the
# flow's parameters, which Prefect serialises.
ProgressHook = Optional[Callable[[dict], None]]
_on_shard: list[Callable[[dict], None]] = []


@flow(name="generate_dataset", persist_result=True, result_serializer="json")
def generate_dataset(config: GenerationConfig) -> State[dict]:
    """Render the shards ``config`` asks for that are not already valid in ``config.out``.

    Returns a summary: shard and clip counts, how many were rendered or kept, render
    seconds, bytes, and the manifest path; the run's final state carries it (persisted,
    as JSON) with a one-line message, so the UI shows what a run did, cached or not.
    Render tasks run in this flow run, on a task runner the config chooses at run time
    (so deployments and ``pvit serve`` honour it too); when every shard is up to date no
    runner starts at all."""
    logger = get_run_logger()
    out = Path(config.out)
    manifest, todo, done = dataset.prepare(config)
    logger.info("%s: %d shards planned, %d up to date, %d to render", out,
                len(todo) + len(done), len(done), len(todo))
    if todo:
        manifest = _render(config, manifest, [dataset.job_to_dict(job) for job in todo])
    shards = manifest["shards"]
    rendered = {job.name for job in todo}
    summary = {
        "out": str(out), "manifest": str(out / "manifest.json"),
        "shards": len(shards), "clips": sum(s["samples"] for s in shards),
        "frames": sum(s["samples"] for s in shards) * config.scene.frames,
        "rendered_shards": len(todo), "kept_shards": len(done),
        "render_seconds": round(sum(s.get("render_seconds", 0.0) for s in shards
                                    if s["name"] in rendered), 3),
        "bytes": sum(s["bytes"] for s in shards),
    }
    message = (f"{len(done)} shards kept, {len(todo)} rendered: {summary['shards']} shards, "
               f"{summary['clips']} clips in {out}")
    # Every run, cached ones included, gets the table: a rerun that reused everything says
    # so on its own page instead of looking like a run that did nothing.
    _dataset_table(summary, shards, message)
    if todo:
        _contact_sheet_artifact(out)
    return Completed(message=message, data=summary)


def _render(config: GenerationConfig, manifest: dict, jobs: list[dict]) -> dict:
    """Render ``jobs`` (one task each, in the calling flow run) and record every finished
    shard in the manifest as its future resolves; returns the manifest.

    The runner is entered here rather than given to ``@flow``: its kind and size come
    from the config, which only exists once the run has started. ``TaskRunner.submit``
    attaches each task run to the current flow run, so the run a user started shows
    the renders and every artifact."""
    out = Path(config.out)
    threads = config.render_threads or dataset.worker_threads(config.workers)
    runner_task = render_shard_task.with_options(
        retries=config.retries, retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0)
    progress_id = create_progress_artifact(progress=0.0, key="generate-progress",
                                           description=f"shards rendered into {out}")
    failures, finished = [], 0
    with make_task_runner(config) as runner:
        futures = [runner.submit(runner_task, {"job": job, "out_dir": str(out),
                                               "threads": threads}) for job in jobs]
        by_future = dict(zip(futures, jobs, strict=True))
        for future in as_completed(futures):
            job = dataset.job_from_dict(by_future[future])
            try:
                record = future.result()
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"{job.label}: {exc}")
                continue
            dataset.commit(out, manifest, record)
            finished += 1
            update_progress_artifact(progress_id, 100.0 * finished / len(jobs))
            _notify_shard(record)
    if failures:
        raise dataset.RenderError("render failed for " + "; ".join(failures))
    return manifest


# The image is embedded in the artifact (a file:// link neither loads in a browser nor
# exists on a remote worker's UI), so it is kept small.
SHEET_ARTIFACT_BYTES = 150_000


def _contact_sheet_artifact(out: Path) -> None:
    """A sheet of the first clip (RGB | depth | instance | semantic | normals), written
    next to the shards and embedded in a markdown artifact for a person to look at.
    Cosmetic: any failure (a full disk, say) is a warning, never a failed run after
    every shard was committed."""
    import base64

    from prefect.artifacts import create_markdown_artifact

    from generation.contact_sheet import contact_sheet, find_clip, save_sheet, sheet_png
    logger = get_run_logger()
    path = out / "contact_sheet.png"
    try:
        sheet = contact_sheet(find_clip(out, None))
        png = sheet_png(sheet, SHEET_ARTIFACT_BYTES)
        try:
            save_sheet(sheet, path)
            where = f"`{path}`"
        except ValueError as exc:
            logger.warning("contact sheet not written (the shards are fine): %s", exc)
            where = f"(not written to `{path}`: see the run's log)"
        create_markdown_artifact(
            key="synthetic-contact-sheet",
            markdown=f"![contact sheet](data:image/png;base64,{base64.b64encode(png).decode()})"
                     f"\n\n{where} (RGB, depth, instance seg, semantic seg, normals; a few "
                     "frames of the first clip)")
    except Exception as exc:  # noqa: BLE001 - cosmetic, see the docstring
        logger.warning("contact sheet artifact skipped (the shards are fine): %s", exc)


def _dataset_table(summary: dict, shards: list[dict], message: str) -> None:
    from prefect.artifacts import create_table_artifact
    create_table_artifact(
        key="synthetic-dataset",
        table=[{"shard": s["name"], "clips": s["samples"], "bytes": s["bytes"],
                "render_seconds": s.get("render_seconds"), "sha256": s["sha256"][:12]}
               for s in shards],
        description=f"{message} ({summary['frames']} frames)")


def _notify_shard(record: dict) -> None:
    # A module-level function, not an inline loop over ``_on_shard``: Dask pickles the
    # running flow's function by value, with the globals it names, and the hooks hold
    # the CLI's progress bar (locks), which cannot be pickled.
    for hook in _on_shard:
        hook(record)


@contextmanager
def shard_progress(hook: ProgressHook):
    """Within this block, ``hook`` is called with each finished shard record."""
    if hook is not None:
        _on_shard.append(hook)
    try:
        yield
    finally:
        if hook is not None:
            _on_shard.remove(hook)


def run_generate(config: GenerationConfig, on_shard: ProgressHook = None) -> dict:
    """Run the flow, calling ``on_shard`` with each finished shard record."""
    with shard_progress(on_shard):
        return generate_dataset(config)
