"""Object poses: per frame and object slot, camera-frame position (metres), quaternion
(wxyz) and presence; MSE over present slots + presence BCE (paper weight 3.0).

Slots are the scene's objects by instance id (background and floor excluded), so the
boxes task (``training.tasks.boxes``) fills the same slots with the same objects."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from generation.dataset.shard_format import CLASSES
from training.heads import PoseHead, clip_frames
from training.tasks.base import ClipView, SyntheticTask

NON_OBJECT_CLASSES = ("background", "floor")  # not pose targets


# --- rotations (numpy, wxyz) ----------------------------------------------------------
def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions wxyz with w >= 0."""
    w = np.sqrt(np.clip(1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2], 0, None)) / 2
    x = np.sqrt(np.clip(1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], 0, None)) / 2
    y = np.sqrt(np.clip(1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 0, None)) / 2
    z = np.sqrt(np.clip(1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2], 0, None)) / 2
    # magnitudes from the diagonal, signs from the off-diagonal (relative to w)
    x = np.copysign(x, m[..., 2, 1] - m[..., 1, 2])
    y = np.copysign(y, m[..., 0, 2] - m[..., 2, 0])
    z = np.copysign(z, m[..., 1, 0] - m[..., 0, 1])
    q = np.stack([w, x, y, z], -1)
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def object_poses(clip: dict, frames: np.ndarray, slots: int) -> dict[str, np.ndarray]:
    """Camera-frame position (metres), quaternion and presence of up to ``slots`` objects
    (by instance id; background and floor excluded) at ``frames``: ``[T, K, ...]``."""
    inst = clip["instances"]
    objects = object_slots(clip, slots)
    t = len(frames)
    position = np.zeros((t, slots, 3), np.float32)
    quaternion = np.zeros((t, slots, 4), np.float32)
    quaternion[..., 0] = 1.0  # identity where no object
    presence = np.zeros((t, slots), np.float32)
    if objects:
        w2c = clip["world_to_camera"][frames]  # [T, 4, 4]
        rot, trans = w2c[:, None, :3, :3], w2c[:, None, :3, 3]
        pos_w = inst["position"][objects][:, frames].transpose(1, 0, 2)  # [T, n, 3]
        position[:, :len(objects)] = np.einsum("tnij,tnj->tni", rot, pos_w) + trans
        rot_obj = quat_to_matrix(inst["quaternion"][objects][:, frames].transpose(1, 0, 2))
        quaternion[:, :len(objects)] = matrix_to_quat(rot @ rot_obj)
        presence[:, :len(objects)] = inst["visibility"][objects][:, frames].T > 0
    return {"pose_position": position, "pose_quaternion": quaternion, "pose_presence": presence}


def mirror_poses(poses: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A horizontal image flip is the reflection x -> -x of the camera frame: positions
    negate x; a rotation R becomes F R F, i.e. quaternion (w, x, -y, -z)."""
    position = poses["pose_position"] * np.array([-1, 1, 1], np.float32)
    quaternion = poses["pose_quaternion"] * np.array([1, 1, -1, -1], np.float32)
    return {**poses, "pose_position": position, "pose_quaternion": quaternion}


def object_slots(clip: dict, slots: int) -> list[int]:
    """Indices into ``clip["instances"]`` of the objects filling the slots, in id order."""
    inst = clip["instances"]
    classes = tuple(clip.get("meta", {}).get("classes", CLASSES))
    skip = [classes.index(c) for c in NON_OBJECT_CLASSES if c in classes]
    objects = [i for i in np.argsort(inst["id"], kind="stable") if inst["category"][i] not in skip]
    return objects[:slots]


def pose_targets(view: ClipView) -> dict[str, torch.Tensor]:
    poses = object_poses(view.clip, view.frames, view.pose_slots)
    if view.flip:
        poses = mirror_poses(poses)
    return {k: torch.from_numpy(v) for k, v in poses.items()}


def pose_loss(pred: torch.Tensor, position: torch.Tensor, quaternion: torch.Tensor,
              presence: torch.Tensor) -> torch.Tensor:
    """MSE of position and quaternion over present slots, plus BCE of the presence logit.

    ``pred`` is ``[S,T,K,8]`` (xyz, wxyz, presence logit). q and -q are one rotation, so
    the quaternion error is the smaller of the two.
    """
    present = presence > 0.5
    presence_term = F.binary_cross_entropy_with_logits(pred[..., 7], presence.float())
    if not present.any():
        return presence_term
    pos_err = (pred[..., :3] - position).pow(2).mean(-1)
    q = pred[..., 3:7]
    quat_err = torch.minimum((q - quaternion).pow(2).mean(-1), (q + quaternion).pow(2).mean(-1))
    return (pos_err + quat_err)[present].mean() + presence_term


TASK = SyntheticTask(
    name="pose", weight=3.0, fields=("instances", "world_to_camera"),
    target_keys=("pose_position", "pose_quaternion", "pose_presence"), targets=pose_targets,
    build_head=lambda ctx: PoseHead(ctx.width, clip_frames(ctx.taps[0]), ctx.pose_slots,
                                    drop=ctx.drop),
    loss=lambda pred, t: pose_loss(pred, t["pose_position"], t["pose_quaternion"],
                                   t["pose_presence"]))
