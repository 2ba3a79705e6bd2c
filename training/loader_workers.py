"""How DataLoader worker processes start.

Workers start from a fork server instead of forking the training process: in the
pipeline, training runs inside a Prefect task, and the threads Prefect keeps (event
loop, API log handler) do not survive ``fork`` -- forked workers died with exit code 1
mid-epoch. A fork server is a clean single-threaded process, and forking from it stays
cheap after the first worker.
"""

from __future__ import annotations


def loader_worker_kwargs(num_workers: int) -> dict:
    """Extra ``DataLoader`` arguments for ``num_workers`` workers."""
    return {"multiprocessing_context": "forkserver"} if num_workers > 0 else {}
