"""Humanoid actors: DeepMimic's humanoid (``pybullet_data/humanoid/humanoid.urdf``)
playing DeepMimic's motion capture (``pybullet_data/data/motions``). No bpy.

Everything geometric comes from pybullet: its reader of the clips
(``motion_capture_data.MotionCaptureData``), its pose interpolation
(``humanoid_pose_interpolator.HumanoidPoseInterpolator.Slerp``: linear root position,
quaternion slerp of each spherical joint) and its forward kinematics (the URDF loaded,
joint states set, ``getLinkState`` read). This module only places the body:

- DeepMimic's data are Y-up (x forward, z to the body's right) and its URDF is loaded at
  ``globalScaling=0.25`` (the clips' root positions are metres for that size). The
  scenes are Z-up. The one conversion is the actor's base transform (``base_pose``):
  ``origin + Rz(heading) @ Y_UP_TO_Z_UP @ (scale * p)`` for a DeepMimic point p, the
  same rotation applied to the root's orientation.
- A mirrored clip swaps the left and right joints' data and reflects the motion in
  DeepMimic's sagittal plane (z -> -z): positions (x, y, -z), quaternions
  (w, -x, -y, z); the knees' and elbows' angles (axis z) are unchanged.
- Clip time: ``phase_s + time_scale * t`` for scene time t (frame f at f / fps). A
  looping clip repeats with its root moved by each cycle's displacement (pybullet's
  ``computeCycleOffset``, as DeepMimic does); a clip that does not loop holds its last
  pose.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybullet as pb
import pybullet_data

from generation.dataset.actor_format import ACTION_NAMES, JOINT_NAMES

DATA = Path(pybullet_data.getDataPath())
URDF = DATA / "humanoid" / "humanoid.urdf"
MOTIONS = DATA / "data" / "motions"
URDF_SCALE = 0.25             # DeepMimic's globalScaling: the clips are metres at this size
# +90 degrees about x: DeepMimic's y (up) becomes z, its z (right) becomes -y.
Y_UP_TO_Z_UP = (math.sqrt(0.5), 0.0, 0.0, math.sqrt(0.5))     # x y z w (pybullet's order)

# Frame layout of a clip (44 numbers): duration, root position (3), root rotation (w x y z),
# chest, neck (4 each); then the right leg and arm (hip 4, knee 1, ankle 4, shoulder 4,
# elbow 1) at RIGHT, the left ones at LEFT.
RIGHT, LEFT = slice(16, 30), slice(30, 44)
QUATERNIONS = (4, 8, 12, 16, 21, 25, 30, 35, 39)      # first index (w) of each rotation
# pybullet joint index of each pose entry, in HumanoidPoseInterpolator.GetPose()'s order
# (after the root): chest, neck, right hip/knee/ankle/shoulder/elbow, left the same.
POSE_JOINTS = (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13)
POSE_SIZES = (4, 4, 4, 1, 4, 4, 1, 4, 1, 4, 4, 1)


def _pybullet_env_module(name: str):
    """A module of pybullet_envs.deep_mimic.env, loaded from its file: importing the
    package runs pybullet_envs/__init__.py, which needs gym (not installed, not needed)."""
    spec = importlib.util.find_spec("pybullet_envs")
    path = Path(spec.submodule_search_locations[0]) / "deep_mimic" / "env" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"_deep_mimic_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_mocap = _pybullet_env_module("motion_capture_data")
_interpolator = _pybullet_env_module("humanoid_pose_interpolator")


# ---------------------------------------------------------------- motion capture


def mirror_frame(frame: list[float]) -> list[float]:
    """One clip frame played by the other side of the body (module docstring)."""
    out = list(frame)
    out[RIGHT], out[LEFT] = frame[LEFT], frame[RIGHT]
    out[3] = -out[3]                                   # root position z
    for i in QUATERNIONS:                              # (w, x, y, z) -> (w, -x, -y, z)
        out[i + 1], out[i + 2] = -out[i + 1], -out[i + 2]
    return out


@functools.lru_cache(maxsize=None)
def load_motion(action: str, mirrored: bool = False):
    """pybullet's ``MotionCaptureData`` of one clip (its frames mirrored if asked)."""
    if action not in ACTION_NAMES:
        raise ValueError(f"unknown action {action!r} (known: {', '.join(ACTION_NAMES)})")
    motion = _mocap.MotionCaptureData()
    motion.Load(str(MOTIONS / f"humanoid3d_{action}.txt"))
    if mirrored:
        motion._motion_data["Frames"] = [mirror_frame(f) for f in motion._motion_data["Frames"]]
    return motion


def loops(motion) -> bool:
    return motion._motion_data.get("Loop") == "wrap"


def clip_pose(motion, clip_time: float) -> list[float]:
    """The pose at ``clip_time`` seconds (DeepMimic frame, GetPose()'s layout: root
    position, root x y z w, then the joints): pybullet's interpolation between the two
    keyframes around it, the root moved by whole cycles (humanoid_stable_pd.setSimTime)."""
    cycle = motion.getCycleTime()
    if loops(motion):
        count = motion.calcCycleCount(clip_time, cycle)
    else:                                            # holds the first / last pose
        clip_time, count = min(max(clip_time, 0.0), cycle), 0
    frame_time = clip_time - count * cycle
    duration = motion.KeyFrameDuraction()
    # the last keyframe's own duration is 0 in some clips (pybullet's Slerp divides by
    # it): the clip's end is the last pair of keyframes at fraction 1
    frame = min(int(frame_time / duration), motion.NumFrames() - 2)
    following = frame + 1
    fraction = (frame_time - frame * duration) / duration
    frames = motion._motion_data["Frames"]
    interpolator = _interpolator.HumanoidPoseInterpolator()
    pose = interpolator.Slerp(fraction, frames[frame], frames[following], pb)
    offset = motion.computeCycleOffset()
    return [pose[i] + count * offset[i] for i in range(3)] + list(pose[3:])


# ---------------------------------------------------------------- one actor


@dataclass(frozen=True)
class ActorSpec:
    """Everything that decides an actor's motion (the recipe draws it; meta records it)."""

    action: str
    mirrored: bool
    phase_s: float          # clip time at scene time 0
    time_scale: float       # clip seconds per scene second
    heading_rad: float      # rotation about world z of DeepMimic's frame
    origin: tuple           # world (x, y) of the root at scene time 0; z = 0 is the floor
    height_m: float         # standing height (sole to head top)

    @property
    def scale(self) -> float:
        return self.height_m / native_height()

    def motion(self):
        return load_motion(self.action, self.mirrored)

    def clip_time(self, scene_time: float) -> float:
        return self.phase_s + self.time_scale * scene_time

    def to_json(self) -> dict:
        return {"action": self.action, "mirrored": self.mirrored, "phase_s": self.phase_s,
                "time_scale": self.time_scale, "heading_rad": self.heading_rad,
                "origin": list(self.origin), "height_m": self.height_m}


def _placement(spec: ActorSpec) -> tuple[np.ndarray, tuple]:
    """(translation, rotation x y z w) taking scaled DeepMimic coordinates to the world:
    the root starts above ``spec.origin`` (its clip position at scene time 0 is
    subtracted), on the clip's own floor (DeepMimic's y = 0 is world z = 0)."""
    rotation = pb.multiplyTransforms((0, 0, 0), pb.getQuaternionFromEuler((0, 0, spec.heading_rad)),
                                     (0, 0, 0), Y_UP_TO_Z_UP)[1]
    start = clip_pose(spec.motion(), spec.clip_time(0.0))[:3]
    start = spec.scale * np.array([start[0], 0.0, start[2]])
    moved = np.array(pb.multiplyTransforms((0, 0, 0), rotation, start, (0, 0, 0, 1))[0])
    return np.array([spec.origin[0], spec.origin[1], 0.0]) - moved, rotation


def base_pose(spec: ActorSpec, pose: list[float]) -> tuple[tuple, tuple]:
    """World (position, x y z w) of the URDF's base for a clip pose."""
    translation, rotation = _placement(spec)
    scaled = [spec.scale * c for c in pose[:3]]
    position, orientation = pb.multiplyTransforms((0, 0, 0), rotation, scaled, pose[3:7])
    return tuple(np.add(position, translation)), orientation


def load_body(spec: ActorSpec, client: int) -> int:
    """The actor's humanoid in pybullet connection ``client``: the URDF at its size, a
    fixed base (moved by resetBasePositionAndOrientation), DeepMimic's link order."""
    return pb.loadURDF(str(URDF), globalScaling=URDF_SCALE * spec.scale, useFixedBase=True,
                       flags=pb.URDF_MAINTAIN_LINK_ORDER, physicsClientId=client)


def set_pose(spec: ActorSpec, body: int, scene_time: float, client: int) -> None:
    """Pose ``body`` as the actor is at ``scene_time`` seconds (pybullet keeps it until
    the next call: forward kinematics and collisions both see it)."""
    pose = clip_pose(spec.motion(), spec.clip_time(scene_time))
    position, orientation = base_pose(spec, pose)
    pb.resetBasePositionAndOrientation(body, position, orientation, physicsClientId=client)
    at = 7
    for joint, size in zip(POSE_JOINTS, POSE_SIZES, strict=True):
        pb.resetJointStateMultiDof(body, joint, pose[at:at + size], physicsClientId=client)
        at += size


def link_frames(body: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """([L,3] world positions, [L,4] x y z w) of the URDF frame of each link, from
    pybullet's forward kinematics (not the centre of mass: getLinkState's 5th and 6th)."""
    states = pb.getLinkStates(body, list(range(len(LINK_NAMES))), computeForwardKinematics=True,
                              physicsClientId=client)
    return (np.array([s[4] for s in states], dtype=np.float64),
            np.array([s[5] for s in states], dtype=np.float64))


# ---------------------------------------------------------------- the skeleton's shapes


@dataclass(frozen=True)
class Shape:
    """A link's collision shape in the URDF (unscaled units, the link's frame)."""

    link: int
    kind: str               # sphere, capsule, box
    size: tuple             # sphere (r,), capsule (r, length), box (x, y, z) full sizes
    xyz: tuple
    rpy: tuple

    def half_extents(self) -> np.ndarray:
        """Semi-axes of the render shape: a sphere, an ellipsoid in the capsule's bounds
        (its axis is z), a box."""
        if self.kind == "sphere":
            return np.full(3, self.size[0])
        if self.kind == "capsule":
            radius, length = self.size
            return np.array([radius, radius, length / 2 + radius])
        return np.array(self.size) / 2


def _floats(text: str) -> tuple:
    return tuple(float(v) for v in text.split())


@functools.lru_cache(maxsize=None)
def _urdf() -> tuple[tuple[str, ...], tuple[Shape, ...], dict]:
    """(link names in pybullet's order, collision shapes, {link: parent link}) read from
    the URDF: its links after the base, in file order (URDF_MAINTAIN_LINK_ORDER)."""
    # the file ends in a NUL byte after </robot> (pybullet's parser stops at it)
    root = ET.fromstring(URDF.read_bytes().rstrip(b"\0\r\n"))
    links = [link for link in root.findall("link") if link.get("name") != "base"]
    shapes = []
    for index, link in enumerate(links):
        for collision in link.findall("collision"):
            origin, geometry = collision.find("origin"), collision.find("geometry")[0]
            size = {"sphere": lambda g: (float(g.get("radius")),),
                    "capsule": lambda g: (float(g.get("radius")), float(g.get("length"))),
                    "box": lambda g: _floats(g.get("size"))}[geometry.tag](geometry)
            shapes.append(Shape(index, geometry.tag, size, _floats(origin.get("xyz")),
                                _floats(origin.get("rpy"))))
    parents = {j.find("child").get("link"): j.find("parent").get("link")
               for j in root.findall("joint")}
    return tuple(link.get("name") for link in links), tuple(shapes), parents


LINK_NAMES, SHAPES, _PARENTS = _urdf()
# A link's body part (semantic class); links are named as their joint in the URDF.
LINK_PARTS = {"root": "torso", "chest": "torso", "neck": "head"}
for _side in ("right", "left"):
    LINK_PARTS.update({f"{_side}_hip": f"{_side}_upper_leg", f"{_side}_knee": f"{_side}_lower_leg",
                       f"{_side}_ankle": f"{_side}_foot", f"{_side}_shoulder": f"{_side}_upper_arm",
                       f"{_side}_elbow": f"{_side}_lower_arm", f"{_side}_wrist": f"{_side}_hand"})
assert JOINT_NAMES[1:len(LINK_NAMES)] == LINK_NAMES[1:] and LINK_NAMES[0] == "root"


def _shape_of(link: str) -> Shape:
    return next(s for s in SHAPES if LINK_NAMES[s.link] == link)


def _extra_points() -> list[tuple[int, np.ndarray]]:
    """(link, point in the link's frame, URDF units) of the joints the skeleton lacks:
    the head's top (the neck link's sphere, straight up its y axis) and each toe tip
    (the front face of the ankle link's foot box, x forward)."""
    head = _shape_of("neck")
    points = [(head.link, np.array(head.xyz) + [0.0, head.size[0], 0.0])]
    for side in ("right", "left"):
        foot = _shape_of(f"{side}_ankle")
        points.append((foot.link, np.array(foot.xyz) + [foot.size[0] / 2, 0.0, 0.0]))
    return points


EXTRA_POINTS = _extra_points()
# The body parts each joint lies where: a link's origin is where its shape meets its
# parent's (the elbow: upper and lower arm), an extra point is on its link's shape.
JOINT_PARTS = tuple([tuple(sorted({LINK_PARTS.get(_PARENTS[n], "torso"), LINK_PARTS[n]}))
                     for n in LINK_NAMES]
                    + [(LINK_PARTS[LINK_NAMES[link]],) for link, _ in EXTRA_POINTS])
assert len(JOINT_PARTS) == len(JOINT_NAMES)


def joints(positions: np.ndarray, orientations: np.ndarray, scale: float) -> np.ndarray:
    """[J,3] world joints (JOINT_NAMES) from the link frames of a posed body of
    ``scale``: each link's origin, then the extra points carried by their link."""
    extra = [positions[link] + _rotate(orientations[link], URDF_SCALE * scale * point)
             for link, point in EXTRA_POINTS]
    return np.concatenate([positions, np.array(extra)], axis=0)


def _rotate(quaternion_xyzw, vector) -> np.ndarray:
    return np.array(pb.multiplyTransforms((0, 0, 0), quaternion_xyzw, vector, (0, 0, 0, 1))[0])


def shape_poses(positions: np.ndarray, orientations: np.ndarray, scale: float):
    """Per shape: (world centre, x y z w, world semi-axes scaled) of its render shape."""
    out = []
    for shape in SHAPES:
        local = pb.getQuaternionFromEuler(shape.rpy)
        centre, rotation = pb.multiplyTransforms(
            positions[shape.link], orientations[shape.link],
            URDF_SCALE * scale * np.array(shape.xyz), local)
        out.append((np.array(centre), np.array(rotation),
                    URDF_SCALE * scale * shape.half_extents()))
    return out


@functools.lru_cache(maxsize=None)
def native_height() -> float:
    """Standing height (sole to head top, metres) of the URDF at URDF_SCALE in its rest
    pose: pybullet's FK of the unposed body in a connection of its own."""
    client = pb.connect(pb.DIRECT)
    try:
        body = pb.loadURDF(str(URDF), globalScaling=URDF_SCALE, useFixedBase=True,
                           flags=pb.URDF_MAINTAIN_LINK_ORDER, physicsClientId=client)
        positions, orientations = link_frames(body, client)
        up = joints(positions, orientations, 1.0)[JOINT_NAMES.index("head_top"), 1]
        foot = _shape_of("right_ankle")
        sole = positions[foot.link, 1] + URDF_SCALE * (foot.xyz[1] - foot.size[1] / 2)
        return float(up - sole)
    finally:
        pb.disconnect(client)
