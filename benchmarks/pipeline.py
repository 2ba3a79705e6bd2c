"""Orchestration costs of ``generate_dataset`` and ``pipeline``, measured in one process
against a real ``prefect server start`` (127.0.0.1, a free port, its own PREFECT_HOME;
``--server temporary``: Prefect's temporary server instead):

- ``first_run_s``: a demo-sized dataset into an empty directory;
- ``rerun_s``: the identical rerun (nothing to render) and ``rerun_fraction``;
- ``pipeline_first_s`` / ``pipeline_rerun_s`` / ``pipeline_rerun_fraction``: a tiny
  whole pipeline (generate, toy actions, pretrain, finetune, evaluate), or with
  ``--pipeline-config`` that experiment's, and its cached rerun, through the flow as
  ``pvit pipeline`` runs it;
- ``prefect_overhead_per_task_s``: (flow wall time - sum of the render worker
  processes' wall times) / tasks, on one worker so that nothing overlaps;
- ``dask_speedup_2_vs_1``: clips/s through an already running Dask ``LocalCluster`` of
  2 worker processes vs 1, each render worker using one Blender thread (so the figure
  is the scaling of the fan-out itself, not the cluster's start-up); ``dask_cpu``: where
  the time went per process (CPU seconds of the client, the scheduler, each worker and
  its render processes, from psutil) beside the wall time.

The last line is one JSON object.

    .venv/bin/python benchmarks/pipeline.py [--scenes 24 --scenes-per-shard 4]
        [--pipeline-config configs/demo.yaml]   # the pipeline `make run` runs, not a tiny one
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "flows"))
from prefect_deployment import running_prefect_server  # noqa: E402  (the tests' helper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--scenes", type=int, default=None, help="default: the config's")
    parser.add_argument("--scenes-per-shard", type=int, default=None)
    parser.add_argument("--dask-scenes", type=int, default=12)
    parser.add_argument("--server", choices=("real", "temporary"), default="real")
    parser.add_argument("--pipeline-config", default=None,
                        help="time this experiment's whole pipeline and its cached rerun "
                        "(e.g. configs/demo.yaml, as `make run` runs it; its outputs go to "
                        "a temporary directory) instead of the tiny one")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.server == "real":
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            os.environ.update(stack.enter_context(running_prefect_server(home)))
        result = measure(args)
    print(json.dumps(result))


def measure(args) -> dict:

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.experiment import load_experiment
    from flows.generate import run_generate as generate_dataset  # as `pvit generate`

    base = load_experiment(args.config).generation
    overrides = {k: v for k, v in {"scenes": args.scenes,
                                   "scenes_per_shard": args.scenes_per_shard}.items() if v}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def cfg(name: str, **update):
            return base.model_copy(update={"out": tmp / name, **overrides, **update})

        first_cfg = cfg("demo")
        t0 = time.perf_counter()
        first = generate_dataset(first_cfg)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rerun = generate_dataset(first_cfg)
        rerun_s = time.perf_counter() - t0
        assert rerun["rendered_shards"] == 0, rerun

        serial_cfg = cfg("serial", workers=1, scenes=min(8, first_cfg.scenes),
                         scenes_per_shard=2)
        t0 = time.perf_counter()
        generate_dataset(serial_cfg)
        serial_s = time.perf_counter() - t0
        manifest = json.loads((serial_cfg.out / "manifest.json").read_text())
        worker_s = sum(s["worker_seconds"] for s in manifest["shards"])
        overhead = (serial_s - worker_s) / len(manifest["shards"])

        # An existing cluster per size, as on a real cluster: its start-up (seconds of
        # process spawning and imports) is not part of the rendering throughput.
        from distributed import LocalCluster

        from flows.generate import dask_cluster_kwargs
        rates, cpu = {}, {}
        for workers in (1, 2):
            # the flow's own cluster settings: no dashboard on 8787, loopback only
            with LocalCluster(**dask_cluster_kwargs(cfg("sizing", workers=workers))) as cluster:
                dask_cfg = cfg(f"dask{workers}", task_runner="dask", workers=workers,
                               dask_address=cluster.scheduler_address, render_threads=1,
                               scenes=args.dask_scenes, scenes_per_shard=2)
                before = process_cpu()
                t0 = time.perf_counter()
                generate_dataset(dask_cfg)
                wall = time.perf_counter() - t0
                rates[workers] = args.dask_scenes / wall
                cpu[workers] = {"wall_s": round(wall, 2),
                                **cpu_since(before, process_cpu())}

        pipeline_first_s, pipeline_rerun_s = time_pipeline(tmp / "pipeline",
                                                           args.pipeline_config)

    result = {
        "scenes": first["clips"], "shards": first["shards"], "workers": first_cfg.workers,
        "first_run_s": round(first_s, 3), "rerun_s": round(rerun_s, 3),
        "rerun_fraction": round(rerun_s / first_s, 4),
        "prefect_overhead_per_task_s": round(overhead, 3),
        "dask_clips_per_s_1": round(rates[1], 3), "dask_clips_per_s_2": round(rates[2], 3),
        "dask_speedup_2_vs_1": round(rates[2] / rates[1], 3), "dask_cpu": cpu,
        "pipeline_first_s": round(pipeline_first_s, 3),
        "pipeline_rerun_s": round(pipeline_rerun_s, 3),
        "pipeline_rerun_fraction": round(pipeline_rerun_s / pipeline_first_s, 4),
        "pipeline": args.pipeline_config or "tiny", "server": args.server,
    }
    print(f"first demo-sized generate_dataset:  {first_s:8.2f} s ({first['clips']} clips)")
    print(f"identical rerun:                    {rerun_s:8.2f} s ({result['rerun_fraction']:.2%})")
    print(f"Prefect overhead per render task:   {overhead:8.3f} s")
    print(f"Dask LocalCluster 2 vs 1 workers:   {result['dask_speedup_2_vs_1']:8.2f}x")
    print(f"{args.pipeline_config or 'tiny'} pipeline, first / cached rerun: "
          f"{pipeline_first_s:8.2f} s / "
          f"{pipeline_rerun_s:.2f} s ({result['pipeline_rerun_fraction']:.2%})")
    return result


TINY = dict(model="pvit_test", num_frames=2, img_size=32, label_size=16, pose_slots=4,
            num_workers=0, log_every=1, batch_size=2, epochs=1, lr=1e-3)


def time_pipeline(root: Path, config: str | None = None) -> tuple[float, float]:
    """The first run and the cached rerun of a tiny experiment (the pipeline tests'
    sizes), or of ``config`` with every stage's ``out`` under ``root``, through the
    ``pipeline`` flow as ``pvit pipeline`` calls it."""
    import yaml

    from flows.experiment import load_experiment

    root.mkdir(parents=True)
    if config is not None:
        cfg = load_experiment(config, sets=[f"{section}.out={root / section}" for section in
                                            ("generation", "toy_actions", "pretrain",
                                             "finetune")])
        return _first_and_rerun(cfg)
    data = {"generation": {"out": str(root / "shards"), "scenes": 2, "scenes_per_shard": 1,
                           "workers": 2, "retries": 0,
                           "scene": {"resolution": 32, "frames": 2, "spp": 4,
                                     "min_objects": 3, "max_objects": 4}},
            "toy_actions": {"out": str(root / "toy"), "clips_per_class": 3,
                            "val_per_class": 1, "size": 32, "frames": 8},
            "pretrain": dict(TINY, out=str(root / "pre")),
            "finetune": dict(TINY, out=str(root / "fine"), frame_stride=3),
            "evaluate": {"spatial_crops": 3, "temporal_clips": 2, "batch_size": 4,
                         "num_workers": 0}}
    (root / "exp.yaml").write_text(yaml.safe_dump(data))
    return _first_and_rerun(load_experiment(root / "exp.yaml"))


def _first_and_rerun(cfg) -> tuple[float, float]:
    from flows.pipeline import pipeline
    from flows.run_view import without_heartbeats

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with without_heartbeats():
            pipeline(cfg)
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def process_cpu() -> dict:
    """CPU seconds (user + system) so far of this process (the flow's client; Dask's
    scheduler runs in it too) and of its descendants (Dask's nannies and workers, render
    processes, Prefect's server), summed by role."""
    import psutil

    me = psutil.Process()
    roles: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = ("client+scheduler" if proc.pid == me.pid else
                "render" if "generation.render.worker" in cmd else
                "prefect-server" if "prefect" in cmd and "server" in cmd else
                "dask-worker" if "multiprocessing" in cmd or "dask" in cmd else "other")
        roles[role] = roles.get(role, 0.0) + times.user + times.system
        if proc.pid != me.pid:      # its exited children (a worker's render processes)
            key = f"{role}-exited-children"
            roles[key] = roles.get(key, 0.0) + times.children_user + times.children_system
    return roles


def cpu_since(before: dict, after: dict) -> dict:
    """CPU seconds per role over the interval (render processes that exited meanwhile:
    in ``dask-worker-exited-children``, their parent worker's children times)."""
    return {f"{role}_cpu_s": round(after.get(role, 0.0) - before.get(role, 0.0), 2)
            for role in sorted(set(before) | set(after))}


if __name__ == "__main__":
    main()
