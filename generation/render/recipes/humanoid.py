"""People: 1-3 mannequins playing real motion capture among a few simulated shapes.

Each actor is DeepMimic's humanoid (``generation.render.actors``: pybullet's clip
reader, slerp and forward kinematics) playing one clip from a random phase, 15 % faster
or slower at most, mirrored at random, turned and placed at random on the floor and
scaled to 1.5-1.9 m. In PyBullet it is a fixed-base multibody whose base and joints are
set before every simulation step (``_PosingClient``): the dropped shapes bounce off it,
it does not yield. Nothing overlaps at the start: an actor is placed where its body
meets no other actor in any frame of the clip, the shapes where they meet nothing.

Its render meshes are the URDF's collision shapes (spheres, boxes, and an ellipsoid in
each capsule's bounds), added after the simulation as Kubric objects keyframed at every
frame, coloured per group like clothes (shirt, trousers, shoes) with skin from a range.
The labels' joints (``Actor.joints``) are the same forward kinematics at each frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kubric as kb
import numpy as np
import pybullet as pb

from generation.dataset.actor_format import ACTION_NAMES
from generation.render import actors as skeleton
from generation.render.physics import PyBullet
from generation.render.procedural import HDRI_NAMES, random_hdri_world, random_procedural_material
from generation.render.recipes.movi import (
    FLOOR_CATEGORY,
    FLOOR_HALF_SIZE,
    SCALE_RANGE,
    SceneContent,
    _camera_position,
    _place,
    _random_material,
)

HEIGHT_M = (1.5, 1.9)
TIME_SCALE = (0.85, 1.15)
ACTOR_REGION = 1.5            # metres: actors start within +-this of the centre
PLACEMENT_TRIES = 50
CAMERA_RADIUS = (5.0, 7.0)
CAMERA_ELEVATION_DEG = (10.0, 35.0)
CAMERA_ARC_DEG = 15.0
LOOK_AT_HEIGHT = 0.9          # metres: about a standing actor's waist
OBJECT_SCALE = 0.6            # of movi's shapes: 0.4-0.8 m across, beside 1.5-1.9 m people
# Skin tones (linear RGB), from light to dark; a tone is drawn between two neighbours.
SKIN_TONES = np.array([[0.87, 0.62, 0.50], [0.76, 0.50, 0.36], [0.58, 0.36, 0.23],
                       [0.36, 0.21, 0.13], [0.20, 0.11, 0.07]])
# Body part -> clothing group; lower arms are sleeves or bare arms at random.
PART_GROUPS = {"head": "skin", "torso": "shirt", "upper_arm": "shirt", "lower_arm": "sleeve",
               "hand": "skin", "upper_leg": "trousers", "lower_leg": "trousers",
               "foot": "shoes"}


@dataclass(frozen=True)
class Domain:
    """The appearance ranges of one domain (``scene.domain``). ``heldout`` shares none
    of ``source``'s looks: an action set rendered in it tests what a model learned from
    ``source`` scenes on people, places and views it never saw (issue 27, the study)."""
    hdris: tuple[str, ...] | None       # None: the sun and a flat sky, as movi
    height_m: tuple[float, float]
    camera_radius: tuple[float, float]
    camera_elevation_deg: tuple[float, float]
    patterned: bool                     # procedural floor and clothes (else plain colours)


DOMAINS = {
    "source": Domain(hdris=None, height_m=HEIGHT_M, camera_radius=CAMERA_RADIUS,
                     camera_elevation_deg=CAMERA_ELEVATION_DEG, patterned=False),
    "heldout": Domain(hdris=HDRI_NAMES, height_m=(1.6, 2.0), camera_radius=(4.0, 5.5),
                      camera_elevation_deg=(30.0, 50.0), patterned=True),
}


@dataclass
class Actor:
    """One actor as the labels need it (``generation.render.actor_labels``); arrays are
    per rendered frame (frame_start..frame_end)."""

    name: str
    spec: skeleton.ActorSpec
    parts: list = field(default_factory=list)         # (kb object, body-part class)
    joints: np.ndarray | None = None                  # [T,J,3] world metres
    root_position: np.ndarray | None = None           # [T,3]
    root_quaternion: np.ndarray | None = None         # [T,4] w x y z
    box_min: np.ndarray | None = None                 # [T,3] world box of the posed body
    box_max: np.ndarray | None = None


@dataclass
class HumanoidContent(SceneContent):
    actors: list = field(default_factory=list)        # Actor, in instance order


class _PosingClient:
    """The scene's physics client with the actors posed before each step (Kubric's run
    loop steps ``stepSimulation`` and has no hook of its own)."""

    def __init__(self, client, pose_at_step):
        self._client, self._pose_at_step, self._step = client, pose_at_step, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def stepSimulation(self):
        self._pose_at_step(self._step)
        self._step += 1
        return self._client.stepSimulation()


def _draw_spec(rng: np.random.RandomState, actions: tuple[str, ...],
               height_m: tuple[float, float]) -> skeleton.ActorSpec:
    action = actions[rng.randint(len(actions))]
    mirrored = bool(rng.randint(2))
    motion = skeleton.load_motion(action, mirrored)
    cycle = motion.getCycleTime()
    return skeleton.ActorSpec(action=action, mirrored=mirrored,
                              phase_s=float(rng.uniform(0.0, cycle)),
                              time_scale=float(rng.uniform(*TIME_SCALE)),
                              heading_rad=float(rng.uniform(-np.pi, np.pi)),
                              origin=tuple(float(v) for v in
                                           rng.uniform(-ACTOR_REGION, ACTOR_REGION, 2)),
                              height_m=float(rng.uniform(*height_m)))


def _overlaps(body: int, others: list[int], client: int) -> bool:
    return any(pb.getClosestPoints(body, other, 0.0, physicsClientId=client)
               for other in others)


def _place_actor(rng, client: int, placed: list[tuple], times: list[float],
                 actions: tuple[str, ...], height_m: tuple[float, float],
                 blockers: list[int] = ()):
    """(spec, body) of a new actor whose body meets no placed actor at any of ``times``
    (each at its own pose then) and no body of ``blockers`` at the first, or None after
    PLACEMENT_TRIES draws."""
    for _ in range(PLACEMENT_TRIES):
        spec = _draw_spec(rng, actions, height_m)
        body = skeleton.load_body(spec, client)
        skeleton.set_pose(spec, body, times[0], client)
        clear = not _overlaps(body, list(blockers), client)
        for t in times if clear else ():
            for other_spec, other in placed:
                skeleton.set_pose(other_spec, other, t, client)
            skeleton.set_pose(spec, body, t, client)
            if _overlaps(body, [b for _, b in placed], client):
                clear = False
                break
        if clear:
            return spec, body
        pb.removeBody(body, physicsClientId=client)
    return None


def _materials(rng: np.random.RandomState, name: str, patterned: bool = False) -> dict:
    """One material per clothing group of an actor (patterned: procedural shirt and
    trousers)."""
    low = rng.randint(len(SKIN_TONES) - 1)
    skin = SKIN_TONES[low] + rng.uniform() * (SKIN_TONES[low + 1] - SKIN_TONES[low])
    if patterned:
        shirt, trousers = (random_procedural_material(rng, f"{name}_{part}", (2.0, 6.0))
                           for part in ("shirt", "trousers"))
        out = {"skin": kb.PrincipledBSDFMaterial(name=f"{name}_skin", color=kb.Color(*skin),
                                                 roughness=0.6, specular=0.3),
               "shirt": shirt, "trousers": trousers,
               "shoes": kb.PrincipledBSDFMaterial(name=f"{name}_shoes",
                                                  color=kb.Color(*(rng.uniform(0.02, 0.3, 3))),
                                                  roughness=0.5, specular=0.4)}
        out["sleeve"] = out["shirt"] if rng.uniform() < 0.5 else out["skin"]
        return out
    shirt = kb.random_hue_color(rng=rng)
    out = {"skin": kb.PrincipledBSDFMaterial(name=f"{name}_skin", color=kb.Color(*skin),
                                             roughness=0.6, specular=0.3),
           "shirt": kb.PrincipledBSDFMaterial(name=f"{name}_shirt", color=shirt, roughness=0.9,
                                              specular=0.2),
           "trousers": kb.PrincipledBSDFMaterial(name=f"{name}_trousers",
                                                 color=kb.random_hue_color(rng=rng),
                                                 roughness=0.9, specular=0.2),
           "shoes": kb.PrincipledBSDFMaterial(name=f"{name}_shoes",
                                              color=kb.Color(*(rng.uniform(0.02, 0.3, 3))),
                                              roughness=0.5, specular=0.4)}
    out["sleeve"] = out["shirt"] if rng.uniform() < 0.5 else out["skin"]
    return out


def _group(part: str) -> str:
    return PART_GROUPS[part.removeprefix("left_").removeprefix("right_")]


def _add_parts(scene: kb.Scene, actor: Actor, materials: dict) -> None:
    """The render meshes of an actor's shapes (unit sphere or cube, scaled to the
    shape's semi-axes); posed later, per frame."""
    for index, shape in enumerate(skeleton.SHAPES):
        part = skeleton.LINK_PARTS[skeleton.LINK_NAMES[shape.link]]
        kind = kb.Cube if shape.kind == "box" else kb.Sphere
        obj = kind(name=f"{actor.name}_{index:02d}_{part}", static=True)
        obj.material = materials[_group(part)]
        scene += obj
        actor.parts.append((obj, part))


def _record_frames(actor: Actor, body: int, client: int, frames: range, fps: int) -> None:
    """Pose the actor at each frame (scene time f / fps): keyframe its parts and keep
    the labels' arrays for the rendered frames (frames[1:-1])."""
    joints, roots, quats, lows, highs = [], [], [], [], []
    for frame in frames:
        skeleton.set_pose(actor.spec, body, frame / fps, client)
        positions, orientations = skeleton.link_frames(body, client)
        poses = skeleton.shape_poses(positions, orientations, actor.spec.scale)
        for (obj, _), (centre, rotation, semi_axes) in zip(actor.parts, poses, strict=True):
            obj.position, obj.scale = centre, semi_axes
            obj.quaternion = (rotation[3], *rotation[:3])
            obj.keyframe_insert("position", frame)
            obj.keyframe_insert("quaternion", frame)
        extent = [_half_extent(kind, rotation, axes) for kind, (_, rotation, axes)
                  in zip([s.kind for s in skeleton.SHAPES], poses, strict=True)]
        centres = np.array([p[0] for p in poses])
        lows.append((centres - extent).min(axis=0))
        highs.append((centres + extent).max(axis=0))
        joints.append(skeleton.joints(positions, orientations, actor.spec.scale))
        roots.append(positions[0])
        quats.append(np.roll(orientations[0], 1))
    keep = slice(1, -1)
    actor.joints, actor.root_position = np.array(joints)[keep], np.array(roots)[keep]
    actor.root_quaternion = np.array(quats)[keep]
    actor.box_min, actor.box_max = np.array(lows)[keep], np.array(highs)[keep]


def _half_extent(kind: str, rotation_xyzw, semi_axes) -> np.ndarray:
    """World-axis half size of a rotated ellipsoid (or box) with these semi-axes."""
    columns = np.array(pb.getMatrixFromQuaternion(rotation_xyzw)).reshape(3, 3) * semi_axes
    if kind == "box":
        return np.abs(columns).sum(axis=1)
    return np.sqrt((columns ** 2).sum(axis=1))


def place_actors(scene: kb.Scene, simulator: PyBullet, floor, cfg, rng: np.random.RandomState,
                 domain: Domain, avoid: list = ()) -> list[tuple]:
    """Draw ``cfg.min_actors``..``max_actors`` actors and place each where its body meets
    no other actor in any frame of the clip, nor any body in ``avoid`` (objects already
    in the scene) at the start; returns their (spec, pybullet body). The actors are posed
    bodies in the simulator: the floor never pushes them, the objects bounce off them."""
    client = simulator._physics_client._client
    actions = tuple(cfg.actions or ACTION_NAMES)
    # Frames 0..T+1 as Kubric simulates them (the renderer's neighbours of 1..T).
    times = [f / cfg.fps for f in range(0, scene.frame_end + 2)]
    blockers = [obj.linked_objects[simulator] for obj in avoid]
    placed = []
    for _ in range(rng.randint(cfg.min_actors, cfg.max_actors + 1)):
        found = _place_actor(rng, client, placed, times, actions, domain.height_m, blockers)
        if found is not None:
            placed.append(found)
    for spec, body in placed:
        skeleton.set_pose(spec, body, 0.0, client)
        for link in range(-1, len(skeleton.LINK_NAMES)):   # posed, never pushed back by the floor
            pb.setCollisionFilterPair(body, floor.linked_objects[simulator], link, -1, 0,
                                      physicsClientId=client)
    return placed


def simulate(scene: kb.Scene, simulator: PyBullet, placed: list[tuple]) -> None:
    """Run the simulation of the clip with the actors posed before every step."""
    if not placed:
        simulator.run(frame_start=0, frame_end=scene.frame_end + 1)
        return
    client = simulator._physics_client._client
    step_rate = scene.step_rate

    def pose_at_step(step: int) -> None:
        for spec, body in placed:
            skeleton.set_pose(spec, body, step / step_rate, client)

    real = simulator._physics_client
    simulator._physics_client = _PosingClient(real, pose_at_step)
    try:
        simulator.run(frame_start=0, frame_end=scene.frame_end + 1)
    finally:
        simulator._physics_client = real


def dress_actors(scene: kb.Scene, simulator: PyBullet, placed: list[tuple], cfg,
                 rng: np.random.RandomState, domain: Domain) -> list[Actor]:
    """The actors' render meshes, keyframed at every frame, and their labels' arrays."""
    client = simulator._physics_client._client
    actors = []
    for n, (spec, body) in enumerate(placed):
        actor = Actor(name=f"actor{n}_{spec.action}", spec=spec)
        _add_parts(scene, actor, _materials(rng, actor.name, domain.patterned))
        _record_frames(actor, body, client, range(0, scene.frame_end + 2), cfg.fps)
        actors.append(actor)
    return actors


def build(scene: kb.Scene, cfg, rng: np.random.RandomState, assets: kb.AssetSource,
          asset_ids: list[str]) -> HumanoidContent:
    """Populate ``scene`` and simulate it. ``cfg`` is a ``SceneConfig``."""
    simulator = PyBullet(scene)

    floor = kb.Cube(name="floor", scale=(FLOOR_HALF_SIZE, FLOOR_HALF_SIZE, 0.5),
                    position=(0, 0, -0.5), static=True, friction=0.3, restitution=0.5)
    domain = DOMAINS[cfg.domain]
    world = None
    if domain.patterned:
        floor.material = random_procedural_material(rng, "floor_mat", (20.0, 80.0))
    else:
        floor.material = kb.PrincipledBSDFMaterial(name="floor_mat",
                                                   color=kb.Color(0.6, 0.6, 0.6),
                                                   roughness=0.9, specular=0.2)
    floor.metadata["category"] = FLOOR_CATEGORY
    scene += floor
    if domain.hdris is None:
        scene += kb.DirectionalLight(name="sun", position=(10, -10, 12), look_at=(0, 0, 0),
                                     intensity=2.5)
        scene.ambient_illumination = kb.Color(0.05, 0.05, 0.05)
        scene.background = kb.Color(0.3, 0.4, 0.55)
    else:   # light and background from an HDRI (movi_c's world): depth +inf, id 0 there
        world = random_hdri_world(rng)
    view = _draw_view(cfg, rng, domain)
    placed = place_actors(scene, simulator, floor, cfg, rng, domain)
    # the camera looks at the actors' mean start place, at waist height: they fill the
    # frame wherever they were placed
    centre = np.mean([spec.origin for spec, _ in placed], axis=0) if placed else np.zeros(2)
    camera = _add_camera(scene, view, (float(centre[0]), float(centre[1]), LOOK_AT_HEIGHT))

    objects = []
    for i in range(rng.randint(cfg.min_objects, cfg.max_objects + 1)):
        asset_id = asset_ids[rng.randint(len(asset_ids))]
        obj = assets.create(asset_id=asset_id, name=f"obj{i:02d}_{asset_id}")
        scale = rng.uniform(*SCALE_RANGE) * OBJECT_SCALE
        obj.scale = scale
        obj.mass *= scale ** 3
        obj.material = _random_material(rng, obj.name)
        obj.metadata["category"] = obj.metadata.get("category", asset_id)
        scene += obj
        if _place(scene, simulator, obj, rng):     # movi's spawn region, clear of the actors
            objects.append(obj)
    simulate(scene, simulator, placed)
    actors = dress_actors(scene, simulator, placed, cfg, rng, domain)
    return HumanoidContent(floor=floor, objects=objects, camera=camera, world=world,
                           actors=actors)


def _draw_view(cfg, rng: np.random.RandomState, domain: Domain) -> tuple[float, ...]:
    """(radius, elevation, azimuth, sweep) of the camera's arc, in degrees."""
    radius = rng.uniform(*domain.camera_radius)
    elevation = rng.uniform(*domain.camera_elevation_deg)
    azimuth = rng.uniform(0.0, 360.0)
    sweep = rng.uniform(-CAMERA_ARC_DEG, CAMERA_ARC_DEG) if cfg.camera_motion else 0.0
    return radius, elevation, azimuth, sweep


def _add_camera(scene: kb.Scene, view: tuple[float, ...],
                look_at: tuple[float, float, float]) -> kb.PerspectiveCamera:
    radius, elevation, azimuth, sweep = view
    camera = kb.PerspectiveCamera(name="camera", focal_length=35.0, sensor_width=32.0)
    scene += camera
    scene.camera = camera
    for i, frame in enumerate(range(scene.frame_start, scene.frame_end + 1)):
        t = i / max(1, scene.frame_end - scene.frame_start)
        camera.position = np.add(_camera_position(radius, elevation, azimuth + sweep * t), look_at)
        camera.look_at(look_at)
        camera.keyframe_insert("position", frame)
        camera.keyframe_insert("quaternion", frame)
    return camera
