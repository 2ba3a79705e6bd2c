"""Which Cycles device renders: ``generation.device: auto | cpu | cuda | optix``.

Two halves. The parent (CLI preflight, ``render_shard``) never imports bpy: it lists
the NVIDIA GPUs it may hand out (``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi -L``) and
pins each render worker to one of them through the worker's ``CUDA_VISIBLE_DEVICES``.
The worker asks Blender itself (Cycles' add-on preferences) once, resolves ``auto``
(OptiX, then CUDA, then CPU) and turns the chosen device on for every scene.

An explicit ``cuda``/``optix`` that Blender cannot see is refused before anything
renders: ``preflight`` probes Blender in a short subprocess (``python -m
generation.render.devices``, ~1 s) and raises ``DeviceError`` with one line naming the device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Mapping

# bpy stays inside probe() and use_device(), the worker side: the parent imports this
# module (`pvit generate`'s preflight, render_shard) and never bpy (0.35 s, python -X
# importtime after flows.cli; in the worker it must follow webdataset's torch).

DEVICES = ("auto", "cpu", "cuda", "optix")
GPU_KINDS = ("optix", "cuda")      # auto's order of preference
_NAMES = {"optix": "OptiX", "cuda": "CUDA"}


class DeviceError(ValueError):
    """The requested render device is not there; the message is one line naming it."""


# -- parent side (no bpy) -------------------------------------------------------------

def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPU ids render workers may be pinned to: ``CUDA_VISIBLE_DEVICES`` when it is
    set (an empty value means none), else one per line of ``nvidia-smi -L``, else none."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


def worker_env(device: str, shard_index: int, workers_per_gpu: int = 1,
               gpus: list[str] | None = None) -> dict[str, str]:
    """Environment additions pinning the worker of shard ``shard_index`` to one GPU.

    Consecutive shards share a GPU ``workers_per_gpu`` at a time (shards are started in
    index order, so with ``workers`` = GPUs x ``workers_per_gpu`` each GPU runs that many
    workers at once). ``cpu``, or no GPU at all, hides every GPU: Cycles then does not
    even initialise CUDA in the worker."""
    gpus = visible_gpus() if gpus is None else gpus
    if device == "cpu" or not gpus:
        return {"CUDA_VISIBLE_DEVICES": ""}
    slot = (shard_index // max(1, workers_per_gpu)) % len(gpus)
    return {"CUDA_VISIBLE_DEVICES": gpus[slot]}


def preflight(requested: str, gpus: list[str] | None = None) -> str:
    """The device the workers will use (the parent's view), or ``DeviceError``.

    ``cpu`` needs no check. ``auto`` without any visible NVIDIA GPU is ``cpu`` without
    starting Blender. Otherwise Blender is asked in a subprocess (this process keeps
    bpy out: see docs/generation.md, Known limits)."""
    if requested not in DEVICES:
        raise DeviceError(f"generation.device: unknown device {requested!r} "
                          f"(choose one of {', '.join(DEVICES)})")
    if requested == "cpu":
        return "cpu"
    gpus = visible_gpus() if gpus is None else gpus
    if requested == "auto" and not gpus:
        return "cpu"
    return resolve(requested, probe_in_subprocess(gpus))


def probe_in_subprocess(gpus: list[str]) -> dict[str, list[str]]:
    """``probe()`` run by a fresh interpreter that sees the first GPU a worker gets."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[0] if gpus else ""}
    proc = subprocess.run([sys.executable, "-m", "generation.render.devices"], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {kind: [] for kind in GPU_KINDS}
    return json.loads(lines[-1])


def resolve(requested: str, found: Mapping[str, list[str]]) -> str:
    """``auto`` -> OptiX, then CUDA, then CPU; an explicit GPU kind must be in ``found``."""
    if requested == "auto":
        return next((kind for kind in GPU_KINDS if found.get(kind)), "cpu")
    if requested in GPU_KINDS and not found.get(requested):
        raise DeviceError(f"generation.device: {requested} requested but Blender sees no "
                          f"{_NAMES[requested]} device on this machine (use auto or cpu)")
    return requested


# -- worker side (bpy) ------------------------------------------------------------------

def probe() -> dict[str, list[str]]:
    """GPU devices Blender's Cycles sees, by kind (``get_devices_for_type`` refreshes)."""
    import bpy
    prefs = bpy.context.preferences.addons["cycles"].preferences
    found = {}
    for kind in GPU_KINDS:
        try:
            devices = prefs.get_devices_for_type(kind.upper())
        except (TypeError, ValueError, RuntimeError):   # kind not compiled in
            devices = []
        found[kind] = [d.name for d in devices if d.type == kind.upper()]
    return found


def use_device(device: str) -> None:
    """Make the current Blender scene render on ``device`` (already resolved). Called
    per scene: Kubric's renderer resets Blender (factory settings) for every scene."""
    import bpy
    scene = bpy.context.scene
    if device == "cpu":
        scene.cycles.device = "CPU"
        return
    prefs = bpy.context.preferences.addons["cycles"].preferences
    prefs.compute_device_type = device.upper()
    for d in prefs.get_devices_for_type(device.upper()):
        # only the GPU(s) this worker was pinned to; never CPU+GPU hybrid rendering
        d.use = d.type == device.upper()
    scene.cycles.device = "GPU"


def main() -> int:
    print(json.dumps(probe()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
