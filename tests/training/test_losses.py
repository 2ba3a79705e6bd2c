import pytest
import torch

from training.losses import compute_losses, pose_loss

WEIGHTS = dict(depth=0.5, normals=0.5, segmentation=0.1, pose=3.0, action=1.0)


def outputs(b, t=2, size=4, classes=3, slots=2):
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(b, 5, generator=g, requires_grad=True),
        "depth": torch.randn(b, t, 1, size, size, generator=g, requires_grad=True),
        "normals": torch.randn(b, t, 3, size, size, generator=g, requires_grad=True),
        "segmentation": torch.randn(b, t, classes, size, size, generator=g, requires_grad=True),
        "pose": torch.randn(b, t, slots, 8, generator=g, requires_grad=True),
    }


def scene_targets(s, t=2, size=4, classes=3, slots=2):
    return {
        "depth": torch.rand(s, t, size, size),
        "normals": torch.randn(s, t, 3, size, size),
        "segmentation": torch.randint(0, classes, (s, t, size, size)),
        "pose_position": torch.randn(s, t, slots, 3),
        "pose_quaternion": torch.nn.functional.normalize(torch.randn(s, t, slots, 4), dim=-1),
        "pose_presence": torch.tensor([1.0, 0.0]).expand(s, t, slots).contiguous(),
    }


def test_real_rows_get_only_the_action_loss_and_synthetic_rows_only_scene_losses():
    out = outputs(4)
    targets = {"label": torch.tensor([2, 0, -1, -1]),
               "synthetic": torch.tensor([False, False, True, True]), **scene_targets(2)}
    total, parts = compute_losses(out, targets, WEIGHTS)
    assert set(parts) == {"action", "depth", "normals", "segmentation", "pose"}
    total.backward()
    # the classifier's gradient comes only from the labelled rows
    assert out["logits"].grad[2:].abs().sum() == 0 and out["logits"].grad[:2].abs().sum() > 0
    for task in ("depth", "normals", "segmentation", "pose"):
        assert out[task].grad[:2].abs().sum() == 0 and out[task].grad[2:].abs().sum() > 0
    want = sum(WEIGHTS[k] * v for k, v in parts.items())
    torch.testing.assert_close(total, want)


def test_a_real_only_batch_has_no_scene_losses():
    out = outputs(2)
    targets = {"label": torch.tensor([1, 3]), "synthetic": torch.tensor([False, False])}
    total, parts = compute_losses(out, targets, WEIGHTS)
    assert set(parts) == {"action"}


def test_a_batch_with_nothing_to_learn_is_an_error():
    out = {"logits": torch.randn(2, 5)}
    targets = {"label": torch.tensor([-1, -1]), "synthetic": torch.tensor([True, True]),
               **scene_targets(2)}
    with pytest.raises(ValueError, match="neither"):
        compute_losses(out, targets, WEIGHTS)


def test_pose_loss_ignores_absent_slots_and_quaternion_sign():
    position = torch.randn(1, 1, 2, 3)
    quat = torch.nn.functional.normalize(torch.randn(1, 1, 2, 4), dim=-1)
    presence = torch.tensor([[[1.0, 0.0]]])
    pred = torch.zeros(1, 1, 2, 8)
    pred[0, 0, 0, :3] = position[0, 0, 0]
    pred[0, 0, 0, 3:7] = -quat[0, 0, 0]  # same rotation
    pred[0, 0, 1, :7] = 100.0  # absent slot: whatever it predicts costs nothing
    pred[..., 7] = torch.tensor([20.0, -20.0])  # confident, correct presence
    assert pose_loss(pred, position, quat, presence) < 1e-6
    pred[0, 0, 0, 0] += 1.0
    assert pose_loss(pred, position, quat, presence) > 0.1
