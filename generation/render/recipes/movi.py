"""MOVi-style scene: a floor, 3-10 rubber or metal shapes thrown at each other,
a sun and sky light, and a camera on a random point of a shell looking at the
centre (optionally moving along a short arc). Physics by PyBullet through Kubric
(on the process's one connection: ``generation.render.physics``).

An object that finds no free spot in ``SPAWN_REGION`` within Kubric's 100 tries
is left out of the scene (``_place``): the clip has fewer objects than were
drawn. This is part of the spec, so a seed always gives the same scene; failing
instead would fail every retry of that seed's shard, since placement is
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kubric as kb
import numpy as np

from generation.render.physics import PyBullet

FLOOR_CATEGORY = "floor"
FLOOR_HALF_SIZE = 20.0          # metres; large enough that the camera sees no edge
SPAWN_REGION = ((-3.0, -3.0, 0.6), (3.0, 3.0, 2.5))
VELOCITY_RANGE = ((-4.0, -4.0, 0.0), (4.0, 4.0, 0.0))
SCALE_RANGE = (0.35, 0.7)       # the shapes are ~2 m across at scale 1
CAMERA_RADIUS = (7.0, 9.0)
CAMERA_ELEVATION_DEG = (25.0, 55.0)
CAMERA_ARC_DEG = 15.0           # azimuth swept over the clip when the camera moves


@dataclass
class SceneContent:
    """What the label extractor needs: the floor, the objects and the camera."""
    floor: kb.Cube
    objects: list = field(default_factory=list)   # kb.FileBasedObject, in instance order
    camera: kb.PerspectiveCamera | None = None
    # Applied to Blender after the recipe (procedural_blender.apply_content): an
    # HdriWorld for light and background, and Cycles' motion-blur shutter in frames.
    world: object | None = None
    motion_blur_shutter: float = 0.0


def _random_material(rng: np.random.RandomState, name: str) -> kb.PrincipledBSDFMaterial:
    color = kb.random_hue_color(rng=rng)
    if rng.uniform() < 0.5:
        return kb.PrincipledBSDFMaterial(name=f"{name}_metal", color=color, metallic=1.0,
                                         roughness=0.2, ior=2.5)
    return kb.PrincipledBSDFMaterial(name=f"{name}_rubber", color=color, metallic=0.0,
                                     roughness=0.7, ior=1.25, specular=0.33)


def _camera_position(radius: float, elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    el, az = np.radians(elevation_deg), np.radians(azimuth_deg)
    return radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])


def _place(scene: kb.Scene, simulator: PyBullet, obj, rng: np.random.RandomState,
           spawn_region=SPAWN_REGION) -> bool:
    """Move ``obj`` to a random pose in ``spawn_region`` where it overlaps nothing;
    remove it from the scene (simulator and renderer too) and say False when there is none."""
    try:
        kb.move_until_no_overlap(obj, simulator, spawn_region=spawn_region, rng=rng)
    except RuntimeError as err:
        if not err.args or err.args[0] != "Failed to place":
            raise
        scene.remove(obj)
        return False
    return True


def build(scene: kb.Scene, cfg, rng: np.random.RandomState, assets: kb.AssetSource,
          asset_ids: list[str]) -> SceneContent:
    """Populate ``scene`` and simulate it. ``cfg`` is a ``SceneConfig``."""
    simulator = PyBullet(scene)

    floor = kb.Cube(name="floor", scale=(FLOOR_HALF_SIZE, FLOOR_HALF_SIZE, 0.5),
                    position=(0, 0, -0.5), static=True, friction=0.3, restitution=0.5)
    floor.material = kb.PrincipledBSDFMaterial(name="floor_mat", color=kb.Color(0.6, 0.6, 0.6),
                                               roughness=0.9, specular=0.2)
    floor.metadata["category"] = FLOOR_CATEGORY
    scene += floor

    scene += kb.DirectionalLight(name="sun", position=(10, -10, 12), look_at=(0, 0, 0),
                                 intensity=2.5)
    scene.ambient_illumination = kb.Color(0.05, 0.05, 0.05)
    scene.background = kb.Color(0.3, 0.4, 0.55)   # sky seen by the camera

    radius = rng.uniform(*CAMERA_RADIUS)
    elevation = rng.uniform(*CAMERA_ELEVATION_DEG)
    azimuth = rng.uniform(0.0, 360.0)
    camera = kb.PerspectiveCamera(name="camera", focal_length=35.0, sensor_width=32.0)
    scene += camera
    scene.camera = camera
    sweep = rng.uniform(-CAMERA_ARC_DEG, CAMERA_ARC_DEG) if cfg.camera_motion else 0.0
    for i, frame in enumerate(range(scene.frame_start, scene.frame_end + 1)):
        t = i / max(1, scene.frame_end - scene.frame_start)
        camera.position = _camera_position(radius, elevation, azimuth + sweep * t)
        camera.look_at((0, 0, 0))
        camera.keyframe_insert("position", frame)
        camera.keyframe_insert("quaternion", frame)

    objects = []
    n_objects = rng.randint(cfg.min_objects, cfg.max_objects + 1)
    for i in range(n_objects):
        asset_id = asset_ids[rng.randint(len(asset_ids))]
        obj = assets.create(asset_id=asset_id, name=f"obj{i:02d}_{asset_id}")
        scale = rng.uniform(*SCALE_RANGE)
        obj.scale = scale
        obj.mass *= scale ** 3
        obj.material = _random_material(rng, obj.name)
        obj.metadata["category"] = obj.metadata.get("category", asset_id)
        scene += obj
        if not _place(scene, simulator, obj, rng):
            continue
        # Throw towards the centre so that objects meet.
        obj.velocity = rng.uniform(*VELOCITY_RANGE) - np.array([*obj.position[:2], 0.0])
        objects.append(obj)

    simulator.run(frame_start=0, frame_end=scene.frame_end + 1)
    return SceneContent(floor=floor, objects=objects, camera=camera)
