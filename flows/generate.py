"""``generate_dataset``: the Prefect flow over ``generation.dataset.plan``.

A task renders a chunk of shards (one shard per task up to ``max_tasks_per_flow``
shards, never more tasks than that), each in a fresh worker process, renames each shard
into place and returns the shards' records as its result (a failed task: on its
``RenderError``, the shards it did finish). The flow takes the tasks as they complete
(``prefect.futures.as_completed``) and commits every record to the manifest, so a killed
run keeps every shard committed before the kill. Progress goes to Prefect (a progress
artifact, one log line per shard) and to whoever listens in this process
(``flows.progress``). Retries (with exponential backoff) are Prefect's; the task runner
(threads, processes or Dask) is chosen by config.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.futures import as_completed
from prefect.runtime import flow_run, task_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, State
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import progress
from flows.run_view import (
    artifact_key,
    generate_run_name,
    mark_crashed,
    reused,
    run_owner,
    without_heartbeats,
)
from generation.config import GenerationConfig
from generation.dataset import asset_store
from generation.dataset import plan as dataset
from generation.dataset.contact_sheet import contact_sheet, find_clip, sheet_png, store_sheet
from generation.dataset.lock import dataset_lock, note_run, recovered
from generation.dataset.manifest import location
from generation.dataset.storage import Location
from generation.render import supervisor

# prefect_dask stays inside make_task_runner(): it imports dask and distributed
# (0.23-0.34 s, python -X importtime after flows.cli and this module; Prefect itself takes
# 0.7 s), which only the dask task runner needs, and every `pvit generate` and `pvit
# pipeline` imports this module.

# Where a render task keeps its receipt for each shard it finished (``NAME.json``, the
# shard's record): a retry of the task, on whichever worker, reads them to render only
# what its earlier attempts did not finish. The task's own bookkeeping: the flow gets
# records only from task results (and a failed task's ``RenderError``), never from here;
# it empties the directory before and after rendering, so receipts of a killed run are
# never trusted. Next to the shards (every worker reaches them there); on an object
# store a prefix (one object per receipt), through the same
# ``generation.dataset.storage.Location`` calls.
RECORDS_DIR = ".render-records"


def _chunk_run_name() -> str:
    names = [job["name"] for job in task_run.parameters["jobs"]]
    if len(names) == 1:
        return f"render-{names[0]}"          # one shard per task (the usual case)
    return f"render-{names[0]}..{names[-1]}"


# Not persisted (the flow's summary is): the shard records go into the manifest, and a
# copy in each render machine's result storage would only pile up there.
@task(name="render-shard", task_run_name=_chunk_run_name, persist_result=False)
def render_shard_task(jobs: list[dict], out_dir: str, threads: int, device: str = "auto",
                      workers_per_gpu: int = 1) -> list[dict]:
    """The shards ``jobs`` in sequence, each in a fresh worker process, logged to Prefect;
    returns their records, for the flow to commit.

    A failed shard does not stop the others: the task fails at the end with a
    ``RenderError`` naming every shard that failed and carrying the records of those it
    finished (``records``), which the flow commits all the same. Each finished shard
    leaves its record in ``OUT/.render-records/NAME.json`` too: a retry of the task
    (Prefect's) returns those and renders only the shards its earlier attempts did not
    finish."""
    logger = get_run_logger()
    records, failures = [], []
    where = location(out_dir)
    for data in jobs:
        shard = dataset.job_from_dict(data)
        receipt = f"{RECORDS_DIR}/{shard.name}.json"
        earlier = _read_record(where, receipt, shard.name)
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
        if where.local is not None:
            (where.local / RECORDS_DIR).mkdir(exist_ok=True)
        where.write_bytes(receipt, json.dumps(record, sort_keys=True).encode())
        logger.info("%s: %d scenes, %.1f MB", shard.name, record["samples"],
                    record["bytes"] / 1e6)
        records.append(record)
    if failures:
        raise supervisor.RenderError("; ".join(failures), records=records)
    return records


def _read_record(where: Location, path: str, name: str) -> dict | None:
    """The receipt a render task left at ``path`` (in ``where``) for shard ``name``; None
    if there is none (or it is not one: a receipt is written atomically, so that means
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
        return ProcessPoolTaskRunner(max_workers=cfg.workers)
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
    url = PREFECT_API_URL.value()
    if not url:
        url = str(get_client(sync_client=True).api_url)   # the running temporary server
    return url.rstrip("/")


@flow(name="generate_dataset", flow_run_name=generate_run_name, persist_result=True,
      result_serializer="json")
def generate_dataset(config: GenerationConfig) -> State[dict]:
    """Render the shards ``config`` asks for that are not already valid in ``config.out``.

    Returns a summary: shard and clip counts, how many were rendered or kept, render
    seconds, bytes, and the manifest path; the run's final state carries it (persisted,
    as JSON) with a one-line message, so the UI shows what a run did, cached or not.
    Render tasks run in this flow run, on a task runner the config chooses at run time
    (so deployments and ``pvit serve`` honour it too); when every shard is up to date no
    runner starts at all. The run holds the dataset's lock throughout
    (``generation.dataset.lock``): a second writer of the same ``out`` fails naming it.

    Args:
        config: the experiment file's `generation` section (docs/generation.md)
    """
    with dataset_lock(config.out, owner=f"generate_dataset flow run '{flow_run.name}'"):
        _crash_bookkeeping(config.out)
        return _generate(config)


def _crash_bookkeeping(out) -> None:
    """Name this flow run in the dataset's lock, and end the runs of any killed holder
    whose stale lock this process recovered (here or in the CLI, which takes the lock
    first) as Crashed: a `pvit generate` killed with -9 would otherwise leave its flow
    run and render task runs RUNNING in the UI forever (issue 25)."""
    for holder in recovered(out):
        marked = mark_crashed(holder, str(location(out)), known_dead=True)
        if marked:
            get_run_logger().warning("%s: marked the runs of a killed writer Crashed: %s",
                                     location(out), ", ".join(marked))
    run_id = run_owner()["flow_run_id"]
    if run_id:
        note_run(out, flow_run_id=run_id)


def _generate(config: GenerationConfig) -> State[dict]:
    logger = get_run_logger()
    out = location(config.out)
    manifest, todo, done = dataset.prepare(config)
    logger.info("%s: %d shards planned, %d up to date, %d to render", out,
                len(todo) + len(done), len(done), len(todo))
    if todo:
        if out.remote or config.task_runner == "dask":
            # render machines that share no filesystem with this one find the asset set
            # here when their own checkout lacks it (generation.dataset.asset_store)
            asset_store.publish(out, config.scene.asset_manifest)
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
    _dataset_table(out, summary, shards, message)
    if not todo:
        return reused(message, summary)
    _contact_sheet_artifact(out)
    return Completed(message=message, data=summary)


def _render(config: GenerationConfig, manifest: dict, jobs: list[dict]) -> dict:
    """Render ``jobs`` in at most ``config.max_tasks_per_flow`` tasks (in the calling flow
    run) and record every shard they finish in the manifest; returns the manifest.

    A task renders a chunk of consecutive shards (``chunk_jobs``: one shard per task up
    to ``max_tasks_per_flow`` shards) and returns their records. The flow takes the
    tasks as they complete (``as_completed``, here in the flow: no thread, no polling)
    and commits each record, counts it in the progress artifact, logs it and reports it
    (``flows.progress``); a failed task's ``RenderError`` carries the records of the
    shards it finished, committed before the failure is reported. So a killed run keeps
    every shard whose task had returned (with one shard per task: every shard it had
    finished); a shard renamed into place but not committed renders again on the next
    run (``prepare`` keeps only what the manifest lists).

    The runner is entered here rather than given to ``@flow``: its kind and size come
    from the config, which only exists once the run has started. ``TaskRunner.submit``
    attaches each task run to the current flow run, so the run a user started shows
    the renders and every artifact. Its tasks get the flow's API address (settings and,
    on a LocalCluster, the workers' environment): Prefect in a Dask worker would
    otherwise start a temporary server of its own."""
    logger = get_run_logger()
    out = location(config.out)
    threads = config.render_threads or supervisor.worker_threads(config.workers)
    runner_task = render_shard_task.with_options(
        retries=config.retries, retry_delay_seconds=exponential_backoff(backoff_factor=1),
        retry_jitter_factor=0)
    progress_id = create_progress_artifact(progress=0.0, key=artifact_key("generate-progress",
                                                                          out.url),
                                           description=f"shards rendered into {out}")
    out.delete_prefix(RECORDS_DIR)                  # a killed run's: never trusted
    committed = 0

    def commit(record: dict) -> None:
        nonlocal committed
        dataset.commit(out, manifest, record)
        committed += 1
        try:
            update_progress_artifact(progress_id, 100.0 * committed / len(jobs))
        except Exception as exc:  # noqa: BLE001 - cosmetic: the shard is committed
            logger.warning("progress artifact not updated (%s): the run goes on", exc)
        logger.info("%s committed (%d/%d shards): %d clips, %.1f MB", record["name"],
                    committed, len(jobs), record["samples"], record["bytes"] / 1e6)
        progress.shard_committed(record)

    api_url = _flow_api_url()
    failures = []
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), \
                make_task_runner(config, api_url) as runner:
            chunks = chunk_jobs(jobs, config.max_tasks_per_flow)
            futures = {runner.submit(runner_task, {"jobs": chunk, "out_dir": str(out),
                                                   "threads": threads, "device": config.device,
                                                   "workers_per_gpu": config.workers_per_gpu}):
                       chunk for chunk in chunks}
            for future in as_completed(list(futures)):
                chunk = futures[future]
                try:
                    records = future.result()
                except Exception as exc:  # noqa: BLE001 - collected, reported together below
                    if isinstance(exc, supervisor.RenderError):
                        for record in exc.records:   # the shards it finished: kept
                            commit(record)
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
    logger = get_run_logger()
    path = out.join("contact_sheet.png")
    try:
        sheet = contact_sheet(find_clip(out.url, None))
        png = sheet_png(sheet, SHEET_ARTIFACT_BYTES)
        try:
            kept = store_sheet(out, sheet)
            if kept:
                logger.warning("contact sheet not written: %s", kept)
                where = f"(not written: {kept})"
            else:
                where = f"`{path}`"
        except (ValueError, OSError) as exc:
            logger.warning("contact sheet not written (the shards are fine): %s", exc)
            where = f"(not written to `{path}`: see the run's log)"
        create_markdown_artifact(
            key=artifact_key("synthetic-contact-sheet", out.url),
            description=f"the first clip of {out}",
            markdown=f"![contact sheet](data:image/png;base64,{base64.b64encode(png).decode()})"
                     f"\n\n{where} (RGB, depth, instance seg, semantic seg, normals; a few "
                     "frames of the first clip)")
    except Exception as exc:  # noqa: BLE001 - cosmetic, see the docstring
        logger.warning("contact sheet artifact skipped (the shards are fine): %s", exc)


def _dataset_table(out: Location, summary: dict, shards: list[dict], message: str) -> None:
    create_table_artifact(
        key=artifact_key("synthetic-dataset", out.url),
        table=[{"shard": s["name"], "clips": s["samples"], "bytes": s["bytes"],
                "render_seconds": s.get("render_seconds"), "sha256": s["sha256"][:12]}
               for s in shards],
        description=f"{message} ({summary['frames']} frames)")


def run_generate(config: GenerationConfig,
                 on_shard: progress.ShardListener | None = None) -> dict:
    """Run the flow (without Prefect's heartbeats: ``run_view.without_heartbeats``),
    calling ``on_shard`` with each shard record it commits."""
    with progress.listening(on_shard=on_shard), without_heartbeats():
        return generate_dataset(config)
