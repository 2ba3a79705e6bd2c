"""Orchestration costs of ``generate_dataset``, measured in one run, in one process
(one Prefect temporary server for all runs, as a user's server would be):

- ``first_run_s``: a demo-sized dataset into an empty directory;
- ``rerun_s``: the identical rerun (nothing to render) and ``rerun_fraction``;
- ``prefect_overhead_per_task_s``: (flow wall time - sum of the render worker
  processes' wall times) / tasks, on one worker so that nothing overlaps;
- ``dask_speedup_2_vs_1``: clips/s through an already running Dask ``LocalCluster`` of
  2 worker processes vs 1, each render worker using one Blender thread (so the figure
  is the scaling of the fan-out itself, not the cluster's start-up).

The last line is one JSON object.

    .venv/bin/python benchmarks/pipeline.py [--scenes 24 --scenes-per-shard 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--scenes", type=int, default=None, help="default: the config's")
    parser.add_argument("--scenes-per-shard", type=int, default=None)
    parser.add_argument("--dask-scenes", type=int, default=12)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.experiment import load_experiment
    from flows.generate import generate_dataset

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
        rates = {}
        for workers in (1, 2):
            # the flow's own cluster settings: no dashboard on 8787, loopback only
            with LocalCluster(**dask_cluster_kwargs(cfg("sizing", workers=workers))) as cluster:
                dask_cfg = cfg(f"dask{workers}", task_runner="dask", workers=workers,
                               dask_address=cluster.scheduler_address, render_threads=1,
                               scenes=args.dask_scenes, scenes_per_shard=2)
                t0 = time.perf_counter()
                generate_dataset(dask_cfg)
                rates[workers] = args.dask_scenes / (time.perf_counter() - t0)

    result = {
        "scenes": first["clips"], "shards": first["shards"], "workers": first_cfg.workers,
        "first_run_s": round(first_s, 3), "rerun_s": round(rerun_s, 3),
        "rerun_fraction": round(rerun_s / first_s, 4),
        "prefect_overhead_per_task_s": round(overhead, 3),
        "dask_clips_per_s_1": round(rates[1], 3), "dask_clips_per_s_2": round(rates[2], 3),
        "dask_speedup_2_vs_1": round(rates[2] / rates[1], 3),
    }
    print(f"first demo-sized generate_dataset:  {first_s:8.2f} s ({first['clips']} clips)")
    print(f"identical rerun:                    {rerun_s:8.2f} s ({result['rerun_fraction']:.2%})")
    print(f"Prefect overhead per render task:   {overhead:8.3f} s")
    print(f"Dask LocalCluster 2 vs 1 workers:   {result['dask_speedup_2_vs_1']:8.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
