"""Human 3D pose: per frame and actor slot, every joint's position relative to the
actor's root (the pelvis), in camera coordinates (metres), and the actor's presence;
the paper's human-pose task (25 joints x 3, MSE / 75) on this project's skeleton.

Targets come from the actor labels of recipes with people (``actor_joints_3d``,
``actor_ids``; docs/dataset-format.md, "Actors"): world joints minus the root, rotated
into the camera of each frame. Slots are the clip's actors in the order of
``actor_ids``; an actor is present in a frame when any of its pixels is inside the crop
(its instance mask, cropped like every label). A clip without actors has every slot
absent, so the task can train on a mix of recipes.

The loss is the mean squared error over the J x 3 coordinates (the paper's division by
75 for 25 joints) of the present slots, divided by the squared size of the actor's
skeleton (``skeleton_size``: the length of the rigid chain head top - neck - chest -
pelvis - hip - knee - ankle, the same in every pose), so a 1.9 m actor does not weigh
more than a 1.5 m one; plus the presence logit's BCE, as the object pose task has.

A horizontal flip reflects the camera frame (x -> -x) and turns a person's left side
into their right: x is negated and the left/right joints swap (``MIRROR``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from generation.dataset.actor_format import JOINT_NAMES
from training.heads import PoseHead, clip_frames
from training.tasks.base import ClipView, SyntheticTask

JOINTS = len(JOINT_NAMES)
ROOT = JOINT_NAMES.index("pelvis")
ACTOR_SLOTS = 4          # the humanoid recipe places 1-3 actors
FIELDS = JOINTS * 3 + 1  # xyz per joint, then the presence logit


def _mirror_index() -> np.ndarray:
    swap = {"left_": "right_", "right_": "left_"}
    index = []
    for name in JOINT_NAMES:
        side = next((s for s in swap if name.startswith(s)), None)
        index.append(JOINT_NAMES.index(swap[side] + name[len(side):]) if side else
                     JOINT_NAMES.index(name))
    return np.array(index)


MIRROR = _mirror_index()

# the rigid chain whose length is the skeleton's size (each bone's length is fixed)
_CHAIN = ("head_top", "neck", "chest", "pelvis")
_LEGS = (("right_hip", "right_knee", "right_ankle"), ("left_hip", "left_knee", "left_ankle"))


def skeleton_size(joints: np.ndarray) -> np.ndarray:
    """``[..., J, 3]`` -> ``[...]``: head top to pelvis along the spine, plus the mean of
    the legs' hip-knee-ankle lengths (and pelvis to hip). Pose-invariant: bones are rigid."""
    def chain(names) -> np.ndarray:
        idx = [JOINT_NAMES.index(n) for n in names]
        return np.linalg.norm(np.diff(joints[..., idx, :], axis=-2), axis=-1).sum(-1)
    legs = [chain(("pelvis",) + leg) for leg in _LEGS]
    return chain(_CHAIN) + (legs[0] + legs[1]) / 2


def human_pose_targets(view: ClipView) -> dict[str, torch.Tensor]:
    t = len(view.frames)
    joints = np.zeros((t, ACTOR_SLOTS, JOINTS, 3), np.float32)
    presence = np.zeros((t, ACTOR_SLOTS), np.float32)
    size = np.ones((t, ACTOR_SLOTS), np.float32)
    clip = view.clip
    if clip.get("actor_ids") is not None and len(clip["actor_ids"]):
        ids = clip["actor_ids"][:ACTOR_SLOTS].astype(np.int64)
        world = clip["actor_joints_3d"][:len(ids)][:, view.frames].astype(np.float64)  # [A,T,J,3]
        relative = world - world[:, :, ROOT:ROOT + 1]
        rotation = clip["world_to_camera"][view.frames][:, :3, :3].astype(np.float64)  # [T,3,3]
        camera = np.einsum("tij,atkj->taki", rotation, relative)
        joints[:, :len(ids)] = camera
        size[:, :len(ids)] = skeleton_size(world).T
        seg = view.crop("instance_seg").numpy()
        presence[:, :len(ids)] = (seg[:, None] == ids[None, :, None, None]).any((2, 3))
    if view.flip:
        joints = joints[:, :, MIRROR] * np.array([-1, 1, 1], np.float32)
    return {"human_joints": torch.from_numpy(np.ascontiguousarray(joints)),
            "human_presence": torch.from_numpy(presence),
            "human_size": torch.from_numpy(size)}


def human_pose_loss(pred: torch.Tensor, joints: torch.Tensor, presence: torch.Tensor,
                    size: torch.Tensor) -> torch.Tensor:
    """``pred`` ``[S,T,K,J*3+1]``; MSE per coordinate over present slots, each divided
    by its skeleton's size squared, plus the presence logit's BCE."""
    presence_term = F.binary_cross_entropy_with_logits(pred[..., -1], presence.float())
    present = presence > 0.5
    if not present.any():
        return presence_term
    xyz = pred[..., :-1].unflatten(-1, (JOINTS, 3))
    error = (xyz - joints).pow(2).mean((-2, -1)) / size.pow(2)
    return error[present].mean() + presence_term


TASK = SyntheticTask(
    name="human_pose", weight=3.0,
    fields=("actor_ids", "actor_joints_3d", "world_to_camera", "instance_seg"),
    target_keys=("human_joints", "human_presence", "human_size"), targets=human_pose_targets,
    # not in the default task list: datasets without people, configs and checkpoints
    # written before it stay as they were
    default=False,
    build_head=lambda ctx: PoseHead(ctx.width, clip_frames(ctx.taps[0]), ACTOR_SLOTS,
                                    drop=ctx.drop, fields=FIELDS),
    loss=lambda pred, t: human_pose_loss(pred, t["human_joints"], t["human_presence"],
                                         t["human_size"]))
