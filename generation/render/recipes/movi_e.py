"""MOVi-E-style scene: ``movi_c``'s world with 10-20 static objects resting on the
floor and 1-3 dynamic objects thrown among them, seen by a camera that moves along a
random straight line while looking at the centre (Kubric's MOVi-D/E ``linear_movement``).

The static objects are dropped without overlap and simulated for ``SETTLE_S`` seconds
before the clip starts, then stopped: they start the clip at rest on the floor (a
dynamic one may still knock them over), as in Kubric's MOVi-D/E worker. Their
``min_objects``/``max_objects`` are not used: the counts are MOVi-E's.
"""

from __future__ import annotations

import kubric as kb
import numpy as np

from generation.render.physics import PyBullet
from generation.render.procedural import random_hdri_world
from generation.render.recipes import humanoid as people
from generation.render.recipes.movi import (
    CAMERA_ELEVATION_DEG,
    CAMERA_RADIUS,
    SceneContent,
    _camera_position,
    _place,
)
from generation.render.recipes.movi_c import (
    _clip_times,
    add_floor,
    keyframe_camera,
    new_object,
    throw_objects,
)

STATIC_OBJECTS = (10, 20)
DYNAMIC_OBJECTS = (1, 3)
STATIC_SPAWN_REGION = ((-5.0, -5.0, 0.6), (5.0, 5.0, 2.0))
SETTLE_S = 3.0                      # seconds; Kubric settles for 100 frames at 24 fps
CAMERA_TRAVEL_M = (1.0, 4.0)       # length of the camera's straight path over the clip
CAMERA_HEIGHT_MIN = 1.5            # the path stays this far above the floor


def camera_line(rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of the camera's path: start on ``movi``'s shell, a random
    direction, redrawn until the end is above ``CAMERA_HEIGHT_MIN`` and no nearer to the
    centre than 5 m (at most 100 draws, then the camera holds still)."""
    start = _camera_position(rng.uniform(*CAMERA_RADIUS), rng.uniform(*CAMERA_ELEVATION_DEG),
                             rng.uniform(0.0, 360.0))
    travel = rng.uniform(*CAMERA_TRAVEL_M)
    for _ in range(100):
        direction = rng.normal(size=3)
        end = start + travel * direction / np.linalg.norm(direction)
        if end[2] >= CAMERA_HEIGHT_MIN and np.linalg.norm(end) >= 5.0:
            return start, end
    return start, start


def _settle(scene: kb.Scene, simulator: PyBullet, statics: list, frame_rate: int) -> None:
    """Let the static objects come to rest before frame 0 (sticky and without bounce,
    as Kubric's worker does), then stop them and give back their own friction and
    restitution."""
    if not statics:
        return
    own = [(obj.friction, obj.restitution) for obj in statics]
    for obj in statics:
        obj.friction, obj.restitution = 1.0, 0.0
    simulator.run(frame_start=-int(round(SETTLE_S * frame_rate)), frame_end=0)
    for obj, (friction, restitution) in zip(statics, own, strict=True):
        obj.velocity = (0.0, 0.0, 0.0)
        obj.angular_velocity = (0.0, 0.0, 0.0)
        obj.friction, obj.restitution = friction, restitution


def build(scene: kb.Scene, cfg, rng: np.random.RandomState, assets: kb.AssetSource,
          asset_ids: list[str]) -> SceneContent:
    """Populate ``scene`` and simulate it. ``cfg`` is a ``SceneConfig``."""
    simulator = PyBullet(scene)
    floor = add_floor(scene, rng)
    world = random_hdri_world(rng)
    start, end = camera_line(rng)
    camera = keyframe_camera(scene, [start + t * (end - start) for t in _clip_times(scene)],
                             look_at=(0.0, 0.0, 0.0))
    statics = []
    n_static = rng.randint(STATIC_OBJECTS[0], STATIC_OBJECTS[1] + 1)
    for i in range(n_static):
        obj = new_object(scene, rng, assets, asset_ids, f"obj{i:02d}")
        scene += obj
        if _place(scene, simulator, obj, rng, STATIC_SPAWN_REGION):
            statics.append(obj)
    _settle(scene, simulator, statics, scene.frame_rate)
    # people among the settled objects when the spec asks for them (none by default:
    # no draw, so a spec without actors renders what it always did)
    placed = people.place_actors(scene, simulator, floor, cfg, rng, people.DOMAINS[cfg.domain],
                                 avoid=statics) if cfg.max_actors else []
    dynamic = throw_objects(scene, simulator, rng, assets, asset_ids,
                            rng.randint(DYNAMIC_OBJECTS[0], DYNAMIC_OBJECTS[1] + 1),
                            first_index=n_static)
    people.simulate(scene, simulator, placed)
    actors = people.dress_actors(scene, simulator, placed, cfg, rng,
                                 people.DOMAINS[cfg.domain]) if placed else []
    return people.HumanoidContent(floor=floor, objects=statics + dynamic, camera=camera,
                                  world=world, actors=actors)
