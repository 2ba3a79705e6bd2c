import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="session")
def rendered_clip():
    """One tiny clip rendered in this process (Blender + Kubric), with its config."""
    from generation.config import SceneConfig
    from generation.render.scene import render_clip

    cfg = SceneConfig(resolution=48, frames=3, spp=4, min_objects=4, max_objects=6,
                      object_coordinates=True, flow=True)
    clip, _ = render_clip(cfg, seed=7, key="scene0000007")
    return clip
