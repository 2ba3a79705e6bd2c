"""Render scratch on a node: what a killed run left, and what Kubric leaves per process.

An object-store dataset's shard is rendered under ``PVIT_SCRATCH`` (or the system's temp
dir) in a directory ``pvit-shard-NNNNNN-XXXX`` of the process that renders it
(``storage.scratch_dir``; Blender's EXRs, PNGs and the shard itself), which that process
removes when the shard is uploaded or has failed. A process killed meanwhile (a Dask
worker, ``kill -9``, a lost node) leaves it behind: ``sweep`` removes the directories
whose owner, named in their ``SCRATCH_OWNER`` file (host, boot, pid namespace, pid, start
time: ``generation.dataset.holder``), is provably gone. Every render worker sweeps when
it starts. A directory of a live process, of another host or pid namespace, or without
an owner file (not ours, or not yet claimed) is never touched.

Kubric's ``kubric.simulator.pybullet`` makes a directory at import (``scratch_dir=
tempfile.mkdtemp()`` as a default argument) that our physics (``physics.PyBullet``)
never uses: ``drop_kubric_import_dir`` removes it while it is empty, so a render
process leaves no empty temp directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from generation.dataset.holder import holder_state, identity
from generation.dataset.storage import SCRATCH_CLAIM, SCRATCH_OWNER, scratch_base

# Names of the scratch directories a sweep considers (all made by storage.scratch_dir).
OURS = ("pvit-", SCRATCH_CLAIM)


def sweep(base: Path | None = None, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the scratch directories under ``base`` (default ``scratch_base()``) whose
    owner process is gone; returns them. Never raises: a sweep must not stop a render."""
    base = Path(base) if base is not None else scratch_base()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    me, removed = identity(), []
    for entry in entries:
        if not entry.name.startswith(OURS) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            owner = json.loads(Path(entry.path, SCRATCH_OWNER).read_text())
        except (OSError, ValueError, RecursionError):
            continue                        # no owner file: not ours to judge
        if not isinstance(owner, dict) or holder_state(owner, me) != "dead":
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
        if warn is not None:
            warn(f"removed the scratch {entry.path} of pid {owner.get('pid')}, which is "
                 "no longer running")
    return removed


def drop_kubric_import_dir() -> None:
    """Remove the empty directory ``kubric.simulator.pybullet`` made at import (its
    ``PyBullet.__init__``'s default ``scratch_dir``); leave it if anything wrote there."""
    try:
        from kubric.simulator import pybullet as kubric_pybullet
    except ImportError:
        return
    defaults = kubric_pybullet.PyBullet.__init__.__defaults__ or ()
    for default in defaults:
        if isinstance(default, str) and os.path.isdir(default):
            try:
                os.rmdir(default)           # only while empty
            except OSError:
                pass
