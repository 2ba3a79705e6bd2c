"""How DataLoader worker processes start, and how they end with the training process.

Workers start from a fork server instead of forking the training process: in the
pipeline, training runs inside a Prefect task, and the threads Prefect keeps (event
loop, API log handler) do not survive ``fork`` -- forked workers died with exit code 1
mid-epoch. A fork server is a clean single-threaded process, and forking from it stays
cheap after the first worker.

The fork server preloads torch and the data modules: otherwise every worker imports
them itself (~1 s a worker on 2 cores; loaders start every epoch). Preloaded, a worker
starts in ~30 ms.

Neither the fork server nor its workers notice on their own when the training process
is killed (``kill -9``): a worker's parent is the fork server, which PyTorch's worker
watchdog checks, and the fork server outlived the trainer too, with the resource
tracker beside them (~1.2 GB together, indefinitely). So each of them watches the
trainer's pid (``exit_with``): the fork server from its preload
(``training.forkserver_watchdog``), each worker from its ``worker_init_fn``.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import select
import threading
import time

from generation.dataset.lock import pid_alive

FORKSERVER_PRELOAD = ["torch", "training.synthetic_data", "training.video_data",
                      "training.forkserver_watchdog"]


def loader_worker_kwargs(num_workers: int) -> dict:
    """Extra ``DataLoader`` arguments for ``num_workers`` workers."""
    if num_workers == 0:
        return {}
    # takes effect if the fork server has not started yet (a no-op afterwards)
    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
    return {"multiprocessing_context": "forkserver",
            "worker_init_fn": functools.partial(_worker_init, os.getpid())}


def _worker_init(trainer_pid: int, worker_id: int) -> None:
    exit_with(trainer_pid)


def exit_with(pid: int) -> None:
    """End this process (``os._exit``) once process ``pid`` has exited, from a daemon
    thread. A pidfd names that very process (no pid reuse); without one (not Linux),
    the pid is polled every second."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)                      # gone already
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])   # readable once the process has exited
        else:
            while pid_alive(pid):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()

