"""``generate_dataset``: the Prefect flow over ``generation.dataset.plan``.

A task renders a chunk of shards (one shard per task up to ``max_tasks_per_flow``
shards, never more tasks than that), each in a fresh worker process, and renames each
shard into place; the flow records each finished shard in the manifest as soon as the
task reports it, so a killed run keeps everything that was committed. Retries (with
exponential backoff) are Prefect's; the task runner (threads, processes or Dask) is
chosen by config.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from generation.config import GenerationConfig
from generation.dataset import plan as dataset
from generation.dataset.manifest import location
from generation.dataset.storage import Location
from generation.render import supervisor

# Where a render task leaves the record of each shard it finished (``NAME.json``), for
# the flow to commit while the task goes on with the rest of its chunk. The flow empties
# it before and after rendering; records left by a killed run are never trusted. On an
# object store it is a prefix (one object per record), reached through the same
# ``generation.dataset.storage.Location`` calls.
RECORDS_DIR = ".render-records"
# How often the flow looks there while render tasks run; records it has committed move
# to RECORDS_DIR/COMMITTED.
RECORD_POLL_S = 0.5
COMMITTED = "committed"


def _chunk_run_name() -> str:
    from prefect.runtime import task_run
    names = [job["name"] for job in task_run.parameters["jobs"]]
    if len(names) == 1:
        return f"render-{names[0]}"          # one shard per task (the usual case)
    return f"render-{names[0]}..{names[-1]}"


# Not persisted (the flow's summary is): the shard records go into the manifest, and a
# copy in each render machine's result storage would only pile up there.
@task(name="render-shard", task_run_name=_chunk_run_name, persist_result=False)
def render_shard_task(jobs: list[dict], out_dir: str, threads: int, device: str = "auto",
                      workers_per_gpu: int = 1) -> list[dict]:
    """The shards ``jobs`` in sequence, each in a fresh worker process, logged to Prefect.

    Each finished shard's record goes to ``OUT/.render-records/NAME.json`` at once, so
    the flow commits it (and moves the progress bars) without waiting for the whole
    chunk; a retry of the task renders only the shards its earlier attempts did not
    finish. A failed shard does not stop the others: the task fails at the end, naming
    every shard that failed."""
    logger = get_run_logger()
    records, failures = [], []
    where = location(out_dir)
    for data in jobs:
        shard = dataset.job_from_dict(data)
        note = f"{RECORDS_DIR}/{shard.name}.json"
        earlier = (_read_record(where, note, shard.name)
                   or _read_record(where, f"{RECORDS_DIR}/{COMMITTED}/{shard.name}.json",
                                   shard.name))
        if earlier is not None and where.is_file(shard.name):
            records.append(earlier)         # finished by an earlier attempt of this task
            continue
        try:
            record = supervisor.render_shard(
                shard, Path(out_dir), threads=threads, device=device,
                workers_per_gpu=workers_per_gpu,
                on_scene=lambda e, name=shard.name: logger.info(
                    "%s: scene %s rendered in %.2fs", name, e["seed"],
                    e["build_s"] + e["render_s"]))
        except supervisor.RenderError as exc:
            if len(jobs) == 1:
                raise
            logger.error("%s", exc)
            failures.append(str(exc))
            continue
        where.write_bytes(note, json.dumps(record, sort_keys=True).encode())
        logger.info("%s: %d scenes, %.1f MB", shard.name, record["samples"],
                    record["bytes"] / 1e6)
        records.append(record)
    if failures:
        raise supervisor.RenderError("; ".join(failures))
    return records


def _read_record(where: Location, path: str, name: str) -> dict | None:
    """The record a render task left at ``path`` (in ``where``) for shard ``name``; None
    if there is none (or it is not one: a record is written atomically, so that means
    not ours)."""
    try:
        record = json.loads(where.read_bytes(path))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("name") == name else None


def chunk_jobs(jobs: list, max_tasks: int) -> list[list]:
    """``jobs`` in at most ``max_tasks`` runs of consecutive shards, as even as can be
    (ceil(len / max_tasks) shards each, the last one fewer): one shard per task whenever
    there are no more shards than ``max_tasks``."""
    size = -(-len(jobs) // max(1, max_tasks))
    return [jobs[i:i + size] for i in range(0, len(jobs), size)] if jobs else []


def make_task_runner(cfg: GenerationConfig, api_url: str | None = None):
    """The task runner ``cfg`` asks for. ``api_url`` (the flow's Prefect API) goes into
    the environment of a LocalCluster's worker processes, so that Prefect there reports
    to the flow's server instead of starting a temporary server in each worker."""
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs=dask_cluster_kwargs(cfg, api_url))
    if cfg.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
    from prefect.task_runners import ThreadPoolTaskRunner
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


def dask_cluster_kwargs(cfg: GenerationConfig, api_url: str | None = None) -> dict:
    """``LocalCluster`` arguments: ``cfg.workers`` single-threaded worker processes.

    ``dashboard_address=None`` alone only turns the dashboard's pages off: the
    scheduler's HTTP server (health and metrics routes) still listens on 8787, on every
    interface. Without ``cfg.dask_dashboard`` it gets an ephemeral port on 127.0.0.1
    instead; workers' HTTP servers are on ephemeral ports and without a dashboard as long
    as ``worker_dashboard_address`` is None (distributed's default)."""
    kwargs = {"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True,
              "dashboard_address": cfg.dask_dashboard}
    if cfg.dask_dashboard is None:
        kwargs["scheduler_kwargs"] = {"dashboard_address": "127.0.0.1:0"}
    if api_url:
        # Nanny's ``env``: set in each worker process before it runs anything.
        kwargs["env"] = {"PREFECT_API_URL": api_url}
    return kwargs


def _flow_api_url() -> str:
    """The Prefect API this flow run reports to: ``PREFECT_API_URL``, else the address
    of the temporary server Prefect started for it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        url = str(get_client(sync_client=True).api_url)   # the running temporary server
    return url.rstrip("/")


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
    runner starts at all. The run holds the dataset's lock throughout
    (``generation.dataset.lock``): a second writer of the same ``out`` fails naming it."""
    from prefect.runtime import flow_run

    from generation.dataset.lock import dataset_lock
    with dataset_lock(config.out, owner=f"generate_dataset flow run '{flow_run.name}'"):
        return _generate(config)


def _generate(config: GenerationConfig) -> State[dict]:
    logger = get_run_logger()
    out = location(config.out)
    manifest, todo, done = dataset.prepare(config)
    logger.info("%s: %d shards planned, %d up to date, %d to render", out,
                len(todo) + len(done), len(done), len(todo))
    if todo:
        try:
            manifest = _render(config, manifest, [dataset.job_to_dict(job) for job in todo])
        finally:
            # Commits went to the manifest's journal (O(1) each): fold them into
            # manifest.json now, failed run or not (a killed one's: the next prepare).
            manifest = dataset.compact(out, manifest)
    shards = manifest["shards"]
    rendered = {job.name for job in todo}
    summary = {
        "out": out.url, "manifest": out.join("manifest.json"),
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
    """Render ``jobs`` in at most ``config.max_tasks_per_flow`` tasks (in the calling flow
    run) and record every finished shard in the manifest as soon as it is finished;
    returns the manifest.

    A task renders a chunk of consecutive shards (``chunk_jobs``: one shard per task up
    to ``max_tasks_per_flow`` shards). Each shard is committed, counted in the progress
    artifact and passed to the progress hook once its task has left its record in
    ``OUT/.render-records`` (looked for every ``RECORD_POLL_S``) or returned, whichever
    comes first; so a killed run keeps every shard committed before the kill, as with one
    task per shard. (A shard renamed into place but not yet committed renders again on
    the next run: ``prepare`` keeps only what the manifest lists.)

    The runner is entered here rather than given to ``@flow``: its kind and size come
    from the config, which only exists once the run has started. ``TaskRunner.submit``
    attaches each task run to the current flow run, so the run a user started shows
    the renders and every artifact. Its tasks get the flow's API address (settings and,
    on a LocalCluster, the workers' environment): Prefect in a Dask worker would
    otherwise start a temporary server of its own."""
    import queue
    import threading

    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = location(config.out)
    threads = config.render_threads or supervisor.worker_threads(config.workers)
    runner_task = render_shard_task.with_options(
        retries=config.retries, retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0)
    progress_id = create_progress_artifact(progress=0.0, key="generate-progress",
                                           description=f"shards rendered into {out}")
    out.delete_prefix(RECORDS_DIR)                  # a killed run's: never trusted
    if out.local is not None:
        (out.local / RECORDS_DIR / COMMITTED).mkdir(parents=True)
    wanted = {job["name"] for job in jobs}
    committed: set[str] = set()

    def commit(record: dict) -> None:
        if record["name"] in committed or record["name"] not in wanted:
            return
        dataset.commit(out, manifest, record)
        committed.add(record["name"])
        update_progress_artifact(progress_id, 100.0 * len(committed) / len(jobs))
        _notify_shard(record)

    def commit_recorded() -> None:
        # O(records not yet seen) per look: a seen record moves to committed/ (where a
        # retry of its task still finds it), so the directory listed stays small.
        for entry in sorted(out.listing(RECORDS_DIR)):   # files only: not committed/
            name = entry.removesuffix(".json")
            if entry.startswith(".") or name == entry:
                continue                        # a record being written
            record = _read_record(out, f"{RECORDS_DIR}/{entry}", name)
            if record is not None:
                commit(record)
                out.move(f"{RECORDS_DIR}/{entry}", f"{RECORDS_DIR}/{COMMITTED}/{entry}")

    api_url = _flow_api_url()
    failures = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), \
                make_task_runner(config, api_url) as runner:
            chunks = chunk_jobs(jobs, config.max_tasks_per_flow)
            futures = [runner.submit(runner_task, {"jobs": chunk, "out_dir": str(out),
                                                   "threads": threads, "device": config.device,
                                                   "workers_per_gpu": config.workers_per_gpu})
                       for chunk in chunks]
            by_future = dict(zip(futures, chunks, strict=True))
            finished: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [finished.put(f) for f in as_completed(futures)],
                             name="render-futures", daemon=True).start()
            for _ in futures:
                while True:
                    try:
                        future = finished.get(timeout=RECORD_POLL_S)
                        break
                    except queue.Empty:
                        commit_recorded()
                commit_recorded()               # the records it left before it failed
                chunk = by_future[future]
                try:
                    records = future.result()
                except Exception as exc:  # noqa: BLE001 - collected, reported together below
                    label = dataset.job_from_dict(chunk[0]).label
                    failures.append(f"{label}: {exc}" if len(chunk) == 1 else str(exc))
                    continue
                for record in records:
                    commit(record)
    finally:
        out.delete_prefix(RECORDS_DIR)
    if failures:
        raise supervisor.RenderError("render failed for " + "; ".join(failures))
    return manifest


# The image is embedded in the artifact (a file:// link neither loads in a browser nor
# exists on a remote worker's UI), so it is kept small.
SHEET_ARTIFACT_BYTES = 150_000


def _contact_sheet_artifact(out: Location) -> None:
    """A sheet of the first clip (RGB | depth | instance | semantic | normals), written
    next to the shards and embedded in a markdown artifact for a person to look at.
    Cosmetic: any failure (a full disk, say) is a warning, never a failed run after
    every shard was committed."""
    import base64

    from prefect.artifacts import create_markdown_artifact

    from generation.dataset.contact_sheet import contact_sheet, find_clip, save_sheet, sheet_png
    logger = get_run_logger()
    path = out.join("contact_sheet.png")
    try:
        sheet = contact_sheet(find_clip(out.url, None))
        png = sheet_png(sheet, SHEET_ARTIFACT_BYTES)
        try:
            if out.remote:
                out.write_bytes("contact_sheet.png", sheet_png(sheet, 1 << 30))
            else:
                save_sheet(sheet, path)
            where = f"`{path}`"
        except (ValueError, OSError) as exc:
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
