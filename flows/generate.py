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
from prefect.tasks import exponential_backoff

from generation import dataset
from generation.config import GenerationConfig
from generation.manifest import read_manifest


@task(name="render-shard", task_run_name="render-{job[name]}")
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


@flow(name="generate_dataset")
def generate_dataset(config: GenerationConfig) -> dict:
    """Render the shards ``config`` asks for that are not already valid in ``config.out``.

    Returns a summary: shard and clip counts, how many were rendered or kept, render
    seconds, bytes, and the manifest path. Shards to render go to a subflow whose task
    runner the config chooses (so deployments and ``pvit serve`` honour it too); when
    every shard is up to date no subflow or runner starts at all."""
    logger = get_run_logger()
    out = Path(config.out)
    manifest, todo, done = dataset.prepare(config)
    logger.info("%s: %d shards planned, %d up to date, %d to render", out,
                len(todo) + len(done), len(done), len(todo))
    if todo:
        render = render_shards.with_options(task_runner=make_task_runner(config))
        manifest = render(config, [dataset.job_to_dict(job) for job in todo])
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
    if todo:
        _dataset_table(summary, shards)
        _contact_sheet_artifact(out)
    return summary


@flow(name="render_shards")
def render_shards(config: GenerationConfig, jobs: list[dict]) -> dict:
    """Render ``jobs`` (one task each) and record every finished shard in the manifest
    as its future resolves; returns the manifest."""
    out = Path(config.out)
    manifest = read_manifest(out)
    threads = config.render_threads or dataset.worker_threads(config.workers)
    runner_task = render_shard_task.with_options(
        retries=config.retries, retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0)
    progress_id = create_progress_artifact(progress=0.0, key="generate-progress",
                                           description=f"shards rendered into {out}")
    futures = [runner_task.submit(job, str(out), threads) for job in jobs]
    by_future = dict(zip(futures, jobs, strict=True))
    failures, finished = [], 0
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


def _contact_sheet_artifact(out: Path) -> None:
    """A sheet of the first clip next to the shards, linked from a markdown artifact
    (RGB | depth | instance | semantic | normals) for a person to look at."""
    from prefect.artifacts import create_markdown_artifact

    from generation.contact_sheet import write_contact_sheet
    sheet = write_contact_sheet(out, out / "contact_sheet.png")
    create_markdown_artifact(key="synthetic-contact-sheet",
                             markdown=f"![contact sheet]({sheet.resolve().as_uri()})\n\n"
                                      f"`{sheet}` (RGB, depth, instance seg, semantic seg, "
                                      "normals; a few frames of the first clip)")


def _dataset_table(summary: dict, shards: list[dict]) -> None:
    from prefect.artifacts import create_table_artifact
    create_table_artifact(
        key="synthetic-dataset",
        table=[{"shard": s["name"], "clips": s["samples"], "bytes": s["bytes"],
                "render_seconds": s.get("render_seconds"), "sha256": s["sha256"][:12]}
               for s in shards],
        description=(f"{summary['shards']} shards, {summary['clips']} clips, "
                     f"{summary['frames']} frames in {summary['out']}"))


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
