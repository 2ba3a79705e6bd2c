"""Progress of the flows, for whoever runs one in this process (the CLI's progress bars).

The flows report progress here: ``generate_dataset`` each shard it commits
(``shard_committed``), the training stages each logged step (``step_logged``). Whoever
runs a flow and wants to hear of it runs the flow inside ``listening(...)``::

    with progress.listening(on_shard=lambda record: bar.advance(record["samples"])):
        generate_dataset(config)

The listeners live in a ``ContextVar``, not in module-global hooks: they are seen by
what runs in this thread (and contexts copied from it) inside the block -- a sync
Prefect flow, its subflows and the tasks it calls directly run there -- and by no other
run or thread, and they are nothing a flow's parameters or Prefect's serialised run
context carry (a Dask worker never sees them; a listener holding a rich progress bar,
locks included, could not be pickled). The flows name only this module's functions,
which pickle by reference. With no listener, reporting does nothing (deployments,
``pvit serve``): Prefect's own progress artifact and logs are what the UI shows.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

ShardListener = Callable[[dict], None]          # a committed shard's manifest record
StepListener = Callable[[str, dict], None]      # (stage, the step's logged record)


@dataclass(frozen=True)
class _Listeners:
    on_shard: Optional[ShardListener] = None
    on_step: Optional[StepListener] = None


_NONE = _Listeners()
_listeners: ContextVar[Optional[_Listeners]] = ContextVar("pvit_progress_listeners",
                                                          default=None)


def _current() -> _Listeners:
    return _listeners.get() or _NONE


@contextmanager
def listening(on_shard: Optional[ShardListener] = None,
              on_step: Optional[StepListener] = None) -> Iterator[None]:
    """Within this block (in this context), ``on_shard`` is called with each shard the
    flow commits and ``on_step`` with each training step logged. A listener not given
    is the enclosing block's, if any."""
    outer = _current()
    token = _listeners.set(_Listeners(on_shard or outer.on_shard, on_step or outer.on_step))
    try:
        yield
    finally:
        _listeners.reset(token)


def shard_committed(record: dict) -> None:
    """A shard was committed to the manifest (``record`` is its manifest record)."""
    listener = _current().on_shard
    if listener is not None:
        listener(record)


def step_logged(stage: str, record: dict) -> None:
    """A training stage logged ``record`` (``step``, ``total_steps``, losses...)."""
    listener = _current().on_step
    if listener is not None:
        listener(stage, record)
