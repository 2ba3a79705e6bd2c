"""Helpers for tests that run ``pvit`` as a user does (a subprocess) on a tiny config.

A module of its own, not a conftest: test files import these names, and pytest's
conftest modules of several directories share the name ``conftest``."""

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PVIT = [sys.executable, "-m", "flows.cli"]

# Tiny renders keep the suite fast: 32-48 px, 2-3 frames, a few samples.
TINY_SCENE = {"resolution": 40, "frames": 3, "spp": 4, "min_objects": 3, "max_objects": 5}


def write_config(path: Path, out: Path, **generation) -> Path:
    scene = {**TINY_SCENE, **generation.pop("scene", {})}
    data = {"generation": {"out": str(out), "scenes": 4, "scenes_per_shard": 2, "workers": 2,
                           "retries": 0, "scene": scene, **generation}}
    path.write_text(yaml.safe_dump(data))
    return path


def pvit(*args, env=None, timeout=600, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*PVIT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
