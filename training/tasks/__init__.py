"""The registry of synthetic tasks: one module each, one line here.

``TASKS`` maps a task name to its ``SyntheticTask`` (``training.tasks.base``). Config
validation, the model's heads, ``compute_losses``, ``SceneTransform``'s targets and the
converters loop over it. Adding a task: a module defining a ``SyntheticTask`` and a
``register`` call (a test may register one at runtime, see tests/training/test_tasks.py).
"""

from __future__ import annotations

from training.tasks import boxes, depth, human_pose, normals, pose, segmentation
from training.tasks.base import ClipView, HeadContext, SyntheticTask  # noqa: F401

TASKS: dict[str, SyntheticTask] = {}


def register(task: SyntheticTask) -> SyntheticTask:
    if task.name in TASKS and TASKS[task.name] is not task:
        raise ValueError(f"tasks: '{task.name}' is registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> SyntheticTask:
    if name not in TASKS:
        raise ValueError(f"tasks: unknown '{name}', choose from {task_names()}")
    return TASKS[name]


def task_names() -> list[str]:
    return list(TASKS)


def default_tasks() -> list[str]:
    return [name for name, task in TASKS.items() if task.default]


def target_keys(names: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The sample keys the targets of ``names`` (default: every task) fill."""
    return tuple(k for n in (task_names() if names is None else names)
                 for k in get_task(n).target_keys)


def _register_builtins() -> None:
    for module in (depth, normals, segmentation, pose, boxes, human_pose):
        register(module.TASK)


_register_builtins()
