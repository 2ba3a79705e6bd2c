"""The Blender adapter: build one scene with its recipe, render it once (RGB and the
auxiliary label passes come from the same render), and return a clip dict in the
shard format. Imports bpy; everything it computes labels with is in ``labels``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from generation import labels
from generation.config import SceneConfig
from generation.shard_format import CLASSES

logger = logging.getLogger(__name__)


def class_list(manifest: dict) -> list[str]:
    """The fixed class list, then any extra categories of a user's asset manifest."""
    categories = {a.get("metadata", {}).get("category", k) for k, a in manifest["assets"].items()}
    return list(CLASSES) + sorted(categories - set(CLASSES))


@contextlib.contextmanager
def _quiet_fd(fd: int = 1):
    """Blender's C code prints to the process's stdout (e.g. per OBJ import); keep the
    worker's stdout for our own progress lines."""
    saved = os.dup(fd)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def render_clip(cfg: SceneConfig, seed: int, key: str, *, scratch_root: Path | None = None,
                labels_on: bool = True, threads: int = 0,
                device: str = "cpu", frames: list[int] | None = None) -> tuple[dict, dict]:
    """Render scene ``seed``; returns (clip dict, timings in seconds).

    ``labels_on=False`` renders RGB only (used by the label-overhead benchmark);
    ``threads > 0`` caps Blender's render threads (several workers share the cores);
    ``device`` is a resolved Cycles device (``generation.devices``: cpu, cuda, optix);
    ``frames`` (RGB only) renders just those frame numbers (benchmark reference images).

    Timings: ``build_s`` (Blender reset + recipe + physics; ``setup_s`` of it is the
    renderer's set-up), ``render_s`` (the render call: ``render_calls_s`` in Cycles,
    ``pass_io_s`` reading the passes back), ``labels_s`` (our label post-processing)."""
    import kubric as kb  # TensorFlow (not in the render worker: see render_worker.py)

    from generation.assets import load_manifest
    from generation.kubric_compat import Blender45
    from generation.recipes import get_recipe

    timings = {}
    scratch = Path(tempfile.mkdtemp(prefix=f"render_{key}_", dir=scratch_root))
    try:
        t0 = time.perf_counter()
        rng = np.random.RandomState(seed)
        res = cfg.resolution
        scene = kb.Scene(resolution=(res, res), frame_start=1, frame_end=cfg.frames,
                         frame_rate=cfg.fps, step_rate=240)
        with _quiet_fd():
            # one animation render: the same bytes as Kubric's per-frame loop
            # (tests/generation/test_kubric_compat.py), less per-call work; no Vector
            # pass unless flow is asked for, no UV pass (never read): same bytes, and
            # Cycles skips syncing object motion at the neighbouring frames
            renderer = Blender45(scene, scratch_dir=scratch, samples_per_pixel=cfg.spp,
                                 use_denoising=cfg.denoise, adaptive_sampling=False,
                                 one_call=True, flow=cfg.flow, uv=False)
        timings["setup_s"] = time.perf_counter() - t0
        from generation.devices import use_device
        use_device(device)
        if threads > 0:
            import bpy
            bpy.context.scene.render.threads_mode = "FIXED"
            bpy.context.scene.render.threads = threads
        if not labels_on:
            _disable_label_passes()
        manifest = load_manifest(cfg.asset_manifest)
        classes = class_list(manifest)
        asset_ids = sorted(cfg.assets or manifest["assets"])
        with kb.AssetSource.from_manifest(str(cfg.asset_manifest), scratch_dir=scratch) as source:
            with _quiet_fd():
                content = get_recipe(cfg.recipe)(scene, cfg, rng, source, asset_ids)
            timings["build_s"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            layers = ["rgba"]
            if labels_on:
                layers += ["z", "normal_float", "segmentation"]
                if cfg.flow:
                    layers += ["forward_flow", "backward_flow"]
                if cfg.object_coordinates:
                    layers += ["object_coordinates"]
            with _quiet_fd():
                out = renderer.render(frames=frames if not labels_on else None,
                                      return_layers=tuple(layers))
            timings["render_s"] = time.perf_counter() - t1
            timings.update(renderer.timings)
            if not labels_on:
                return {"key": key, "rgb": out["rgba"][..., :3]}, timings
            t2 = time.perf_counter()
            clip = _clip_from_render(out, scene, content, cfg, seed, key, classes)
            timings["labels_s"] = time.perf_counter() - t2
        return clip, timings
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _disable_label_passes() -> None:
    import bpy
    scene = bpy.context.scene
    scene.view_layers["AuxOutputs"].use = False
    scene.view_layers[0].use_pass_z = False


def _clip_from_render(out: dict, scene, content, cfg: SceneConfig, seed: int, key: str,
                      classes: list[str]) -> dict:
    frames = list(range(scene.frame_start, scene.frame_end + 1))
    res = cfg.resolution
    cam = content.camera
    K = labels.intrinsics_pixels(cam.focal_length, cam.sensor_width, res, res)
    w2c = np.stack([labels.world_to_camera(cam.get_value_at("position", f),
                                           cam.get_value_at("quaternion", f)) for f in frames])

    # Our instance ids: floor 1, objects 2.. in the order the recipe added them.
    instances = [content.floor] + list(content.objects)
    lookup = np.zeros(len(scene.assets) + 1, dtype=np.uint16)
    for idx, asset in enumerate(scene.assets, start=1):
        for our_id, inst in enumerate(instances, start=1):
            if asset is inst:
                lookup[idx] = our_id
    instance_seg = labels.remap_ids(out["segmentation"][..., 0], lookup).astype(np.uint16)
    categories = np.array([classes.index(i.metadata["category"]) for i in instances],
                          dtype=np.int32)
    cat_lookup = np.concatenate([[0], categories]).astype(np.uint8)
    semantic_seg = cat_lookup[instance_seg]

    mask = instance_seg > 0
    normal = np.stack([labels.normals_to_camera(out["normal_float"][t], w2c[t], mask[t])
                       for t in range(len(frames))])
    ids = np.arange(1, len(instances) + 1, dtype=np.uint16)
    position = np.array([[i.get_value_at("position", f) for f in frames] for i in instances],
                        dtype=np.float32)
    quaternion = np.array([[i.get_value_at("quaternion", f) for f in frames] for i in instances],
                          dtype=np.float32)
    bbox = np.array([[labels.box_corners(i.bounds, i.scale, position[n, t], quaternion[n, t])
                      for t in range(len(frames))] for n, i in enumerate(instances)],
                    dtype=np.float32)
    clip = {
        "key": key,
        "rgb": np.ascontiguousarray(out["rgba"][..., :3]),
        "depth": labels.depth_from_z(out["z"][..., 0]),
        "instance_seg": instance_seg,
        "semantic_seg": semantic_seg,
        "normal": normal,
        "K": K,
        "world_to_camera": w2c,
        "instances": {"id": ids, "category": categories, "position": position,
                      "quaternion": quaternion, "bbox_3d": bbox,
                      "visibility": labels.visibility(instance_seg, ids)},
        "meta": {"seed": int(seed), "fps": cfg.fps, "frames": cfg.frames, "resolution": res,
                 "recipe": cfg.recipe, "classes": classes,
                 "instance_names": [i.name for i in instances]},
    }
    if cfg.flow:
        clip["forward_flow"] = out["forward_flow"].astype(np.float32)
        clip["backward_flow"] = out["backward_flow"].astype(np.float32)
    if cfg.object_coordinates:
        clip["object_coordinates"] = (out["object_coordinates"].astype(np.float32) / 65535.0)
    return clip
