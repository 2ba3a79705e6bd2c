"""How DataLoader worker processes start.

Workers start from a fork server instead of forking the training process: in the
pipeline, training runs inside a Prefect task, and the threads Prefect keeps (event
loop, API log handler) do not survive ``fork`` -- forked workers died with exit code 1
mid-epoch. A fork server is a clean single-threaded process, and forking from it stays
cheap after the first worker.

The fork server preloads torch and the data modules: otherwise every worker imports
them itself (~1 s a worker on 2 cores; loaders start every epoch). Preloaded, a worker
starts in ~30 ms.
"""

from __future__ import annotations

import multiprocessing

FORKSERVER_PRELOAD = ["torch", "training.synthetic_data", "training.video_data"]


def loader_worker_kwargs(num_workers: int) -> dict:
    """Extra ``DataLoader`` arguments for ``num_workers`` workers."""
    if num_workers == 0:
        return {}
    # takes effect if the fork server has not started yet (a no-op afterwards)
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    return {"multiprocessing_context": "forkserver"}
