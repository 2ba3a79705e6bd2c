"""MOVi-C-style scene: real meshes (``assets/objects`` by default) with their own
textures, or random procedural materials where they have none, on a floor with a
procedural material, lit by a random Blender HDRI that is also the background
(random rotation and strength); 3-10 objects thrown at each other; the camera as in
``movi``. No sun: the HDRI is the only light, as in Kubric's MOVi-C.

Objects are rescaled from their real size (metres, ``object_assets``) so that their
largest extent is ``OBJECT_SIZE_M``: the camera stands 7-9 m away, where a real 10 cm
duck would cover about a pixel at 64 px; Kubric's MOVi-C rescales its scanned objects
the same way. Mass scales with the volume (same density).
"""

from __future__ import annotations

import kubric as kb
import numpy as np

from generation.render.physics import PyBullet
from generation.render.procedural import random_hdri_world, random_procedural_material
from generation.render.recipes import humanoid as people
from generation.render.recipes.movi import (
    CAMERA_ARC_DEG,
    CAMERA_ELEVATION_DEG,
    CAMERA_RADIUS,
    FLOOR_CATEGORY,
    FLOOR_HALF_SIZE,
    VELOCITY_RANGE,
    SceneContent,
    _camera_position,
    _place,
)

OBJECT_SIZE_M = (0.75, 1.5)     # largest extent of an object in the scene
# The floor's generated coordinates span its 40 m: 5-25 pattern cells across it.
FLOOR_PATTERN_SCALE = (5.0, 25.0)


def add_floor(scene: kb.Scene, rng: np.random.RandomState) -> kb.Cube:
    floor = kb.Cube(name="floor", scale=(FLOOR_HALF_SIZE, FLOOR_HALF_SIZE, 0.5),
                    position=(0, 0, -0.5), static=True, friction=0.3, restitution=0.5)
    floor.material = random_procedural_material(rng, "floor_mat", FLOOR_PATTERN_SCALE)
    floor.metadata["category"] = FLOOR_CATEGORY
    scene += floor
    return floor


def add_camera(scene: kb.Scene, rng: np.random.RandomState, moving: bool) -> kb.PerspectiveCamera:
    """``movi``'s camera: a random point of the shell looking at the centre, sweeping a
    small arc when ``moving``."""
    radius = rng.uniform(*CAMERA_RADIUS)
    elevation = rng.uniform(*CAMERA_ELEVATION_DEG)
    azimuth = rng.uniform(0.0, 360.0)
    sweep = rng.uniform(-CAMERA_ARC_DEG, CAMERA_ARC_DEG) if moving else 0.0
    positions = [_camera_position(radius, elevation, azimuth + sweep * t)
                 for t in _clip_times(scene)]
    return keyframe_camera(scene, positions, look_at=(0.0, 0.0, 0.0))


def _clip_times(scene: kb.Scene) -> np.ndarray:
    """0..1 over the clip's frames."""
    n = scene.frame_end - scene.frame_start
    return np.arange(n + 1) / max(1, n)


def keyframe_camera(scene: kb.Scene, positions, look_at) -> kb.PerspectiveCamera:
    camera = kb.PerspectiveCamera(name="camera", focal_length=35.0, sensor_width=32.0)
    scene += camera
    scene.camera = camera
    for frame, position in zip(range(scene.frame_start, scene.frame_end + 1), positions,
                               strict=True):
        camera.position = position
        camera.look_at(look_at)
        camera.keyframe_insert("position", frame)
        camera.keyframe_insert("quaternion", frame)
    return camera


def new_object(scene: kb.Scene, rng: np.random.RandomState, assets: kb.AssetSource,
               asset_ids: list[str], name: str):
    """A random asset at a random size in ``OBJECT_SIZE_M``; its own texture if the
    asset set says it has one, else a random procedural material."""
    asset_id = asset_ids[rng.randint(len(asset_ids))]
    obj = assets.create(asset_id=asset_id, name=f"{name}_{asset_id}")
    extent = float(np.max(np.subtract(*np.asarray(obj.bounds)[::-1])))
    scale = rng.uniform(*OBJECT_SIZE_M) / extent
    obj.scale = scale
    obj.mass *= scale ** 3
    if not obj.metadata.get("textured", False):
        obj.material = random_procedural_material(rng, obj.name)
    obj.metadata["category"] = obj.metadata.get("category", asset_id)
    return obj


def throw_objects(scene: kb.Scene, simulator: PyBullet, rng: np.random.RandomState,
                  assets: kb.AssetSource, asset_ids: list[str], count: int,
                  first_index: int = 0) -> list:
    """``count`` objects dropped without overlap in ``SPAWN_REGION`` and thrown towards
    the centre (an object with no free spot is left out, as in ``movi``)."""
    objects = []
    for i in range(first_index, first_index + count):
        obj = new_object(scene, rng, assets, asset_ids, f"obj{i:02d}")
        scene += obj
        if not _place(scene, simulator, obj, rng):
            continue
        obj.velocity = rng.uniform(*VELOCITY_RANGE) - np.array([*obj.position[:2], 0.0])
        objects.append(obj)
    return objects


def build(scene: kb.Scene, cfg, rng: np.random.RandomState, assets: kb.AssetSource,
          asset_ids: list[str]) -> SceneContent:
    """Populate ``scene`` and simulate it. ``cfg`` is a ``SceneConfig``."""
    simulator = PyBullet(scene)
    floor = add_floor(scene, rng)
    world = random_hdri_world(rng)
    camera = add_camera(scene, rng, moving=cfg.camera_motion)
    # people when the spec asks for them (none by default: no draw, so a spec without
    # actors renders what it always did); the objects are then placed clear of them
    placed = people.place_actors(scene, simulator, floor, cfg, rng,
                                 people.DOMAINS[cfg.domain]) if cfg.max_actors else []
    count = rng.randint(cfg.min_objects, cfg.max_objects + 1)
    objects = throw_objects(scene, simulator, rng, assets, asset_ids, count)
    people.simulate(scene, simulator, placed)
    actors = people.dress_actors(scene, simulator, placed, cfg, rng,
                                 people.DOMAINS[cfg.domain]) if placed else []
    return people.HumanoidContent(floor=floor, objects=objects, camera=camera, world=world,
                                  actors=actors)
