"""The actor labels of a clip (pure numpy): instance rows, body-part classes and joints.

Joints come from the recipe (``recipes/humanoid.py``: pybullet's forward kinematics at
each frame); here they are projected with the clip's own ``K`` and ``world_to_camera``
(the projection every label uses) and tested against the rendered depth.
"""

from __future__ import annotations

import numpy as np

from generation.dataset.actor_format import ACTION_NAMES, JOINT_NAMES, PERSON

# A joint is visible when the surface its pixel shows is within this of the joint's own
# depth: joints are inside the body, up to a limb's radius (the chest's sphere: 0.11 m
# at 1.62 m, 0.13 m at 1.9 m) behind the surface the camera sees. Nearer is something in
# front of it (occluded); farther is the background seen past a limb thinner than a
# pixel, so the joint is not in the image either.
DEPTH_TOLERANCE_M = 0.15


def project(K: np.ndarray, w2c: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([..., 2] pixels, [...] camera z) of world ``points`` [T, ..., 3] by the clip's
    ``K`` and per-frame ``world_to_camera`` [T,4,4] (OpenCV: pixel (u, v)'s centre is at
    (u+0.5, v+0.5))."""
    T = w2c.shape[0]
    flat = points.reshape(T, -1, 3).astype(np.float64)
    cam = flat @ w2c[:, :3, :3].transpose(0, 2, 1).astype(np.float64) + w2c[:, None, :3, 3]
    pix = cam @ K.T.astype(np.float64)
    uv = pix[..., :2] / pix[..., 2:3]
    return uv.reshape(points.shape[:-1] + (2,)), cam[..., 2].reshape(points.shape[:-1])


def visible(uv: np.ndarray, z: np.ndarray, depth: np.ndarray,
            tolerance: float = DEPTH_TOLERANCE_M) -> np.ndarray:
    """[T, ...] uint8: the point is in front of the camera, inside the frame, and the
    rendered z-depth of the pixel it falls in is within ``tolerance`` of its own z."""
    T, H, W = depth.shape
    col, row = np.floor(uv[..., 0]), np.floor(uv[..., 1])
    inside = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    c = np.clip(col, 0, W - 1).astype(np.int64)
    r = np.clip(row, 0, H - 1).astype(np.int64)
    frame = np.arange(T).reshape((T,) + (1,) * (uv.ndim - 2))
    surface = depth[frame, r, c]
    return (inside & (np.abs(surface - z) <= tolerance)).astype(np.uint8)


def actor_assets(scene_assets, actors, first_id: int, classes: list[str]) -> dict:
    """{Kubric's segmentation value (asset index + 1): (instance id, class index)} of
    every body part: all parts of actor a get instance id ``first_id + a``."""
    index = {id(asset): i for i, asset in enumerate(scene_assets)}
    return {index[id(part)] + 1: (first_id + a, classes.index(part_class))
            for a, actor in enumerate(actors) for part, part_class in actor.parts}


def categories(actors, classes: list[str]) -> list[int]:
    """Each actor's instance category: "person"."""
    return [classes.index(PERSON)] * len(actors) if actors else []


def part_classes(semantic_seg: np.ndarray, kubric_seg: np.ndarray, parts: dict) -> np.ndarray:
    """``semantic_seg`` with each body part's pixels set to the part's class."""
    if not parts:
        return semantic_seg
    lookup = np.zeros(max(parts) + 1, dtype=np.int32) - 1
    for idx, (_, part_class) in parts.items():
        lookup[idx] = part_class
    seg = np.asarray(kubric_seg)
    part = lookup[np.where(seg < len(lookup), seg, 0)]
    return np.where(part >= 0, part, semantic_seg).astype(semantic_seg.dtype)


def instance_rows(actors) -> dict:
    """The actors' rows of clip["instances"] position, quaternion and bbox_3d: the root
    (pelvis) link's frame, and the world box enclosing the posed body's render shapes
    in each frame (axis-aligned, corners x fastest as ``labels.box_corners``)."""
    return {"position": np.array([a.root_position for a in actors], dtype=np.float32),
            "quaternion": np.array([a.root_quaternion for a in actors], dtype=np.float32),
            "bbox_3d": np.array([[_box(lo, hi) for lo, hi in zip(a.box_min, a.box_max, strict=True)]
                                 for a in actors], dtype=np.float32)}


def meta(actors) -> dict:
    """What the clip's meta adds: the names the actor arrays index, and each actor's
    drawn motion (``actors.ActorSpec``)."""
    return {"action_names": list(ACTION_NAMES), "joint_names": list(JOINT_NAMES),
            "actors": [a.spec.to_json() for a in actors]}


def _box(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[x, y, z] for z in (lo[2], hi[2]) for y in (lo[1], hi[1])
                     for x in (lo[0], hi[0])])


def clip_fields(actors, ids: np.ndarray, K: np.ndarray, w2c: np.ndarray,
                depth: np.ndarray) -> dict:
    """The clip's actor_* arrays (docs/dataset-format.md, "Actors")."""
    joints_3d = np.array([a.joints for a in actors], dtype=np.float32)     # [A,T,J,3]
    uv, z = project(K, w2c, joints_3d.transpose(1, 0, 2, 3))               # [T,A,J,...]
    return {
        "actor_ids": np.asarray(ids, dtype=np.uint16),
        "actor_action": np.array([ACTION_NAMES.index(a.spec.action) for a in actors],
                                 dtype=np.int32),
        "actor_mirrored": np.array([a.spec.mirrored for a in actors], dtype=np.uint8),
        "actor_joints_3d": joints_3d,
        "actor_joints_2d": uv.transpose(1, 0, 2, 3).astype(np.float32),
        "actor_joints_visible": visible(uv, z, depth).transpose(1, 0, 2),
    }
