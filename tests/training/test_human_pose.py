"""The human_pose task: root-relative joints in the camera frame, mirrored with the
image, scored scale-free; one registered module that a model trains with."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from generation.dataset.actor_format import JOINT_NAMES
from training.tasks import default_tasks, get_task, target_keys
from training.tasks.base import ClipView
from training.tasks.human_pose import (
    ACTOR_SLOTS,
    JOINTS,
    MIRROR,
    human_pose_loss,
    human_pose_targets,
    skeleton_size,
)

T, SIDE = 3, 16


def clip_with_actors(seed: int = 0, scale=(1.0, 1.0)) -> dict:
    """Two actors: a rigid random skeleton each (scaled), moved and turned per frame,
    seen by a camera that turns too; actor 7 fills the left half of the frame, actor 9
    a corner of the right half except in the last frame."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(JOINTS, 3))
    joints = np.empty((2, T, JOINTS, 3))
    for a in range(2):
        for t in range(T):
            turn = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
            joints[a, t] = scale[a] * base @ turn.T + rng.normal(size=3) * 3
    w2c = np.tile(np.eye(4), (T, 1, 1))
    for t in range(T):
        w2c[t, :3, :3] = Rotation.from_rotvec(rng.normal(size=3)).as_matrix()
        w2c[t, :3, 3] = rng.normal(size=3)
    seg = np.zeros((T, SIDE, SIDE), np.uint16)
    seg[:, :, :SIDE // 2] = 7
    seg[:-1, :4, -4:] = 9
    return {"actor_ids": np.array([7, 9], np.uint16),
            "actor_joints_3d": joints.astype(np.float32),
            "world_to_camera": w2c.astype(np.float32), "instance_seg": seg}


def view(clip: dict, flip: bool = False) -> ClipView:
    return ClipView(clip=clip, frames=np.arange(T), top=0, left=0, side=SIDE, flip=flip,
                    label_size=SIDE, depth_max_m=10.0, pose_slots=8)


def test_targets_are_root_relative_joints_in_each_frames_camera():
    clip = clip_with_actors()
    out = human_pose_targets(view(clip))
    assert out["human_joints"].shape == (T, ACTOR_SLOTS, JOINTS, 3)
    root = JOINT_NAMES.index("pelvis")
    for a in range(2):
        for t in range(T):
            world = clip["actor_joints_3d"][a, t].astype(np.float64)
            w2c = clip["world_to_camera"][t].astype(np.float64)
            camera = world @ w2c[:3, :3].T + w2c[:3, 3]       # full projection to camera
            expected = camera - camera[root]                  # relative to the root there
            assert np.allclose(out["human_joints"][t, a].numpy(), expected, atol=1e-4)
    assert out["human_presence"][:, :2].tolist() == [[1, 1], [1, 1], [1, 0]]
    assert not out["human_presence"][:, 2:].any() and not out["human_joints"][:, 2:].any()
    # sizes are the skeleton's, the same in every (rigidly moved) frame
    size = out["human_size"][:, 0]
    assert torch.allclose(size, size[0].expand(T), rtol=1e-5)


def test_a_flip_mirrors_x_and_swaps_left_and_right():
    clip = clip_with_actors()
    plain, flipped = human_pose_targets(view(clip)), human_pose_targets(view(clip, flip=True))
    left, right = JOINT_NAMES.index("left_wrist"), JOINT_NAMES.index("right_wrist")
    assert MIRROR[left] == right and MIRROR[right] == left
    assert MIRROR[JOINT_NAMES.index("neck")] == JOINT_NAMES.index("neck")
    a, b = plain["human_joints"], flipped["human_joints"]
    assert torch.allclose(b[..., left, 0], -a[..., right, 0])
    assert torch.allclose(b[..., left, 1:], a[..., right, 1:])
    # the presence masks are taken from the flipped crop; both actors still in it
    assert torch.equal(flipped["human_presence"], plain["human_presence"])


def test_loss_is_scale_free_masked_and_zero_when_exact():
    clip = clip_with_actors(scale=(1.0, 2.0))
    target = human_pose_targets(view(clip))
    batch = {k: v[None] for k, v in target.items()}
    exact = torch.cat([batch["human_joints"].flatten(-2),
                       (batch["human_presence"] * 40 - 20)[..., None]], -1)
    assert human_pose_loss(exact, **_args(batch)).item() < 1e-6

    # the same relative error on a twice-as-large actor costs the same
    noise = torch.randn(JOINTS, 3) * 0.05
    losses = []
    for slot in (0, 1):
        pred = exact.clone()
        size = batch["human_size"][0, 0, slot]
        pred[0, :2, slot, :-1] += (noise * size).flatten()   # frames where both are present
        losses.append(human_pose_loss(pred, **_args(batch)).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4) and losses[0] > 1e-5

    # an absent slot's joints are not scored
    pred = exact.clone()
    pred[0, :, 3, :-1] += 100.0
    assert human_pose_loss(pred, **_args(batch)).item() < 1e-6


def test_a_clip_without_actors_has_no_present_slot():
    clip = {"world_to_camera": np.tile(np.eye(4, dtype=np.float32), (T, 1, 1)),
            "instance_seg": np.ones((T, SIDE, SIDE), np.uint16)}
    out = human_pose_targets(view(clip))
    assert not out["human_presence"].any() and not out["human_joints"].any()


def test_skeleton_size_is_pose_invariant_and_scales_with_the_body():
    clip = clip_with_actors(scale=(1.0, 1.7))
    size = skeleton_size(clip["actor_joints_3d"].astype(np.float64))
    assert np.allclose(size[1], 1.7 * size[0], rtol=1e-5)
    assert np.allclose(size, size[:, :1], rtol=1e-5)


def test_the_task_is_registered_not_default_and_its_head_predicts_every_slot():
    from training.model import create_model

    task = get_task("human_pose")
    assert "human_pose" not in default_tasks()
    assert target_keys(["human_pose"]) == ("human_joints", "human_presence", "human_size")
    model = create_model("pvit_test", num_classes=3, num_frames=4, img_size=32,
                         tasks=["depth", "human_pose"])
    pred = model.forward_train(torch.zeros(2, 3, 4, 32, 32))["human_pose"]
    assert pred.shape[0] == 2 and pred.shape[2:] == (ACTOR_SLOTS, JOINTS * 3 + 1)
    assert task.weight == 3.0


def _args(batch: dict) -> dict:
    return {"joints": batch["human_joints"], "presence": batch["human_presence"],
            "size": batch["human_size"]}
