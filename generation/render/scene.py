"""The Blender adapter: build one scene with its recipe, render it once (RGB and the
auxiliary label passes come from the same render), and return a clip dict in the
shard format. Imports bpy; everything it computes labels with is in ``labels``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from generation.config import SceneConfig
from generation.dataset.shard_format import encode_clip
from generation.render import actor_labels, labels
from generation.render.assets import load_manifest
from generation.render.devices import use_device
from generation.render.recipes import get_recipe
from generation.render.tracks import point_tracks

# kubric and bpy, and asset_cache and kubric_compat (which import them at load), stay
# inside the functions that use them: the render worker imports this module before it
# imports webdataset (torch), bpy, its TensorFlow stand-in and kubric, in that order
# (worker.py; tests/conftest.py: TensorFlow before torch's triton crashes), and `pvit
# generate` imports it before the flow starts (warm_workers -> worker), a process that
# never loads bpy (0.35 s) or kubric with TensorFlow (2.8 s, python -X importtime).

logger = logging.getLogger(__name__)


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
    """Render scene ``seed``; returns (clip dict, timings in seconds): ``render_passes``
    then ``finish_clip``, one after the other.

    ``labels_on=False`` renders RGB only (used by the label-overhead benchmark);
    ``threads > 0`` caps Blender's render threads (several workers share the cores);
    ``device`` is a resolved Cycles device (``generation.render.devices``: cpu, cuda, optix);
    ``frames`` (RGB only) renders just those frame numbers (benchmark reference images)."""
    passes, timings = render_passes(cfg, seed, key, scratch_root=scratch_root,
                                    labels_on=labels_on, threads=threads, device=device,
                                    frames=frames)
    return finish_clip(passes, timings), timings


@dataclasses.dataclass
class RenderedPasses:
    """One scene rendered to pass files (``scratch``), with the Kubric scene that
    ``finish_clip`` needs to turn them into a clip. Nothing in it touches bpy any more:
    Kubric's post-processors and ours read only the files and the scene's Python-side
    keyframes, so a worker finishes a scene on a thread while Blender, reset for the next
    scene, renders that one."""
    cfg: SceneConfig
    seed: int
    key: str
    renderer: object        # the Blender45 view (its postprocess and post-processors)
    scene: object           # kubric.Scene
    content: object         # the recipe's SceneContent
    classes: list[str]
    layers: tuple[str, ...]
    labels_on: bool
    scratch: Path

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def render_passes(cfg: SceneConfig, seed: int, key: str, *, scratch_root: Path | None = None,
                  labels_on: bool = True, threads: int = 0, device: str = "cpu",
                  frames: list[int] | None = None) -> tuple[RenderedPasses, dict]:
    """Build scene ``seed`` and render its passes to files (the part that needs bpy).

    Timings: ``build_s`` (Blender reset + recipe + physics; ``setup_s`` of it is the
    renderer's set-up), ``render_s`` and ``render_calls_s`` (the render call, in Cycles)."""
    import kubric as kb

    from generation.render.asset_cache import asset_source
    from generation.render.kubric_compat import Blender45
    from generation.render.procedural_blender import apply_content

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
            # (tests/generation/render/test_kubric_compat.py), less per-call work; no Vector
            # pass unless flow is asked for, no UV pass (never read): same bytes, and
            # Cycles skips syncing object motion at the neighbouring frames; pass files
            # without what nobody reads and without compression: same arrays, less I/O
            renderer = Blender45(scene, scratch_dir=scratch, samples_per_pixel=cfg.spp,
                                 use_denoising=cfg.denoise, adaptive_sampling=cfg.adaptive,
                                 one_call=True, flow=cfg.flow, uv=False,
                                 object_coordinates=cfg.object_coordinates,
                                 linear_image=False, compress_scratch=False)
        timings["setup_s"] = time.perf_counter() - t0
        use_device(device)
        if threads > 0:
            import bpy
            bpy.context.scene.render.threads_mode = "FIXED"
            bpy.context.scene.render.threads = threads
        if not labels_on:
            _disable_label_passes()
        manifest = load_manifest(cfg.asset_manifest)
        classes = cfg.classes()
        asset_ids = sorted(cfg.assets or manifest["assets"])
        # the process's asset source: each asset is unpacked once per process, not
        # once per scene
        source = asset_source(cfg.asset_manifest, scratch_root)
        with _quiet_fd():
            content = get_recipe(cfg.recipe)(scene, cfg, rng, source, asset_ids)
        # the recipe's HDRI world and motion blur (none for movi)
        apply_content(renderer, content)
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
            renderer.render_files(frames=frames if not labels_on else None)
        timings["render_s"] = time.perf_counter() - t1
        timings.update(renderer.timings)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return RenderedPasses(cfg=cfg, seed=seed, key=key, renderer=renderer, scene=scene,
                          content=content, classes=classes, layers=tuple(layers),
                          labels_on=labels_on, scratch=scratch), timings


def finish_clip(passes: RenderedPasses, timings: dict) -> dict:
    """Read the passes back and compute the labels: the clip dict in the shard format
    (RGB only if the scene was rendered without labels). Adds ``pass_io_s`` (pass files
    and Kubric's post-processors) and ``labels_s`` (``generation.render.labels``) to
    ``timings``; removes the scratch files. No bpy: safe beside another scene's render."""
    try:
        t1 = time.perf_counter()
        out = passes.renderer.postprocess(passes.scratch, return_layers=passes.layers)
        timings["pass_io_s"] = time.perf_counter() - t1
        if not passes.labels_on:
            return {"key": passes.key, "rgb": out["rgba"][..., :3]}
        t2 = time.perf_counter()
        clip = _clip_from_render(out, passes.scene, passes.content, passes.cfg, passes.seed,
                                 passes.key, passes.classes)
        timings["labels_s"] = time.perf_counter() - t2
        return clip
    finally:
        passes.discard()


def render_clips(cfg: SceneConfig, seeds: list[int], keys: list[str], *,
                 before_scene: Callable[[int], None] | None = None,
                 overlap: bool = True, **kwargs) -> Iterator[tuple[dict, dict]]:
    """Render the scenes in order, yielding (shard sample from ``encode_clip``, timings)
    per scene; ``kwargs`` as ``render_passes`` takes them, ``before_scene(seed)`` is
    called before each scene is built (the worker's fault injection).

    With ``overlap`` (the default), Blender renders scene N+1 while one thread finishes
    scene N (``finish_clip``, then ``encode_clip``): that half is numpy, OpenEXR, OpenCV
    and zstd, which release the GIL, so on a GPU it runs during sampling, and on the CPU
    in the stretches where only one core works (the next scene's build, Cycles' scene
    sync) instead of after the render (2 cores: 2-5 % less wall time per scene, faster
    in 9 of 12 interleaved A/B runs; docs/performance.md). ``overlap=False`` finishes
    each scene before the next is built. The bytes are the same either way: each second
    half reads only its own pass files and its own scene's Python-side keyframes. Timings
    add ``encode_s`` and, on the ``time.perf_counter`` clock, ``started_at`` (the scene's
    build begins), ``rendered_at`` (passes written) and ``finished_at`` (sample encoded),
    from which the wall time of a run follows."""
    def finish(passes: RenderedPasses, timings: dict) -> dict:
        clip = finish_clip(passes, timings)
        t = time.perf_counter()
        sample = encode_clip(clip) if passes.labels_on else clip
        timings["encode_s"] = time.perf_counter() - t
        timings["finished_at"] = time.perf_counter()
        return sample

    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="finish-clip") as finisher:
        for seed, key in zip(seeds, keys, strict=True):
            if before_scene is not None:
                before_scene(seed)
            started_at = time.perf_counter()
            passes, timings = render_passes(cfg, seed, key, **kwargs)
            timings["started_at"], timings["rendered_at"] = started_at, time.perf_counter()
            if pending is not None:
                yield pending[0].result(), pending[1]
                pending = None
            pending = finisher.submit(finish, passes, timings), timings
            if not overlap:                # finished (and reported) before the next scene
                yield pending[0].result(), pending[1]
                pending = None
        if pending is not None:
            yield pending[0].result(), pending[1]


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

    # Our instance ids: floor 1, objects 2.. in the order the recipe added them, then the
    # actors of a recipe with people (all body parts of one actor are one instance).
    instances = [content.floor] + list(content.objects)
    actors = list(getattr(content, "actors", ()))
    lookup = np.zeros(len(scene.assets) + 1, dtype=np.uint16)
    for idx, asset in enumerate(scene.assets, start=1):
        for our_id, inst in enumerate(instances, start=1):
            if asset is inst:
                lookup[idx] = our_id
    parts = actor_labels.actor_assets(scene.assets, actors, len(instances) + 1, classes)
    for idx, (our_id, _) in parts.items():
        lookup[idx] = our_id
    instance_seg = labels.remap_ids(out["segmentation"][..., 0], lookup).astype(np.uint16)
    categories = np.array([classes.index(i.metadata["category"]) for i in instances]
                          + actor_labels.categories(actors, classes), dtype=np.int32)
    cat_lookup = np.concatenate([[0], categories]).astype(np.uint8)
    semantic_seg = actor_labels.part_classes(cat_lookup[instance_seg],
                                             out["segmentation"][..., 0], parts)

    mask = instance_seg > 0
    normal = np.stack([labels.normals_to_camera(out["normal_float"][t], w2c[t], mask[t])
                       for t in range(len(frames))])
    ids = np.arange(1, len(instances) + len(actors) + 1, dtype=np.uint16)
    position = np.array([[i.get_value_at("position", f) for f in frames] for i in instances],
                        dtype=np.float32)
    quaternion = np.array([[i.get_value_at("quaternion", f) for f in frames] for i in instances],
                          dtype=np.float32)
    bbox = np.array([[labels.box_corners(i.bounds, i.scale, position[n, t], quaternion[n, t])
                      for t in range(len(frames))] for n, i in enumerate(instances)],
                    dtype=np.float32)
    if actors:
        rows = actor_labels.instance_rows(actors)
        position, quaternion, bbox = (np.concatenate([a, rows[k]]) for a, k in
                                      ((position, "position"), (quaternion, "quaternion"),
                                       (bbox, "bbox_3d")))
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
        # (dx, dy) pixels to the next / previous frame (kubric_compat.flows_from_vector_pass).
        # Blender's pass at the clip's ends points at frames 0 and T+1, which are not in
        # the clip (the camera holds still there, simulated objects do not): 0 instead.
        forward = out["forward_flow"].astype(np.float32)       # copies
        backward = out["backward_flow"].astype(np.float32)
        forward[-1] = 0.0
        backward[0] = 0.0
        clip["forward_flow"], clip["backward_flow"] = forward, backward
    if cfg.object_coordinates:
        clip["object_coordinates"] = (out["object_coordinates"].astype(np.float32) / 65535.0)
    if actors:
        clip.update(actor_labels.clip_fields(actors, ids[len(instances):], K, w2c, clip["depth"]))
        clip["meta"].update(actor_labels.meta(actors))
    if cfg.tracks:     # from the clip's own labels, once they are all there
        clip.update(point_tracks(clip, cfg.tracks, seed))
    return clip
