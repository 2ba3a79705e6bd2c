"""The mvit family is torchvision's MViTv2-S, with prompts carried like the class token."""

import pytest
import torch
from torchvision.models.video import mvit_v2_s

from training.convert import (
    CheckpointMismatch,
    export_inference,
    from_torchvision_mvit,
    read_weights,
)
from training.model import create_model

TASKS = ["depth", "normals", "segmentation", "pose"]


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    torch.manual_seed(0)
    reference = mvit_v2_s(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "mvit_v2_s.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


@pytest.mark.slow  # two MViTv2-S forward passes at 16 x 224 on a CPU: ~40 s
def test_zero_prompts_reproduce_torchvision_logits_at_16x224(torchvision_file):
    reference, path = torchvision_file
    ours = create_model("mvitv2_s", variant="vit", num_classes=400).eval()
    ours.load_state_dict(from_torchvision_mvit(read_weights(path), ours, keep_classifier=True))
    clip = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(clip), ours(clip)
    assert (got - want).abs().max().item() <= 1e-4


def test_prompts_leave_the_last_block_at_its_width_and_patches_keep_their_shape():
    torch.manual_seed(0)
    plain = create_model("mvitv2_s", variant="vit", num_classes=3, num_frames=4, img_size=64)
    prompted = create_model("mvitv2_s", variant="pvit", tasks=TASKS, num_classes=3,
                            num_frames=4, img_size=64, label_size=16, num_seg_classes=5)
    assert prompted.num_prefix_tokens == 1 + 4
    clip = torch.randn(2, 3, 4, 64, 64)
    with torch.no_grad():
        tokens, taps = prompted.forward_intermediates(clip, prompted.tap_indices)
        plain_tokens, plain_taps = plain.forward_intermediates(clip, plain.tap_indices)
    _, patches, prompts = prompted.split_tokens(tokens)
    assert prompts.shape == (2, 4, 768)  # 96 channels in, projected at each stage
    assert patches.shape == plain.split_tokens(plain_tokens)[1].shape == (2, 2 * 2 * 2, 768)
    assert [t.shape for t in taps] == [t.shape for t in plain_taps]
    # the dense heads read three stages, each on its own grid
    assert [(i.channels, i.grid) for i in (prompted.feature_info[j] for j in
                                           prompted.tap_indices)] == [
        (192, (2, 8, 8)), (384, (2, 4, 4)), (768, (2, 2, 2))]


def test_prompts_steer_the_class_token_and_export_keeps_them():
    torch.manual_seed(0)
    model = create_model("mvitv2_s", variant="pvit", tasks=["depth", "pose"], num_classes=3,
                         num_frames=4, img_size=32, label_size=8).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    out = model.forward_train(clip)
    assert out["depth"].shape == (1, 4, 1, 8, 8) and out["pose"].shape == (1, 4, 8, 8)
    exported = export_inference(model)
    assert not any(k.startswith("task_heads") for k in exported.state_dict())
    torch.testing.assert_close(exported(clip), model(clip))
    with torch.no_grad():
        model.prompt_tokens.add_(torch.randn_like(model.prompt_tokens))
    assert not torch.allclose(exported(clip), model(clip))


def test_a_vit_state_dict_is_not_taken_for_torchvision_mvit():
    model = create_model("mvitv2_s", variant="vit", num_classes=3, num_frames=4, img_size=32)
    vit = create_model("pvit_test", variant="vit", num_classes=3)
    with pytest.raises(CheckpointMismatch, match="not a torchvision_mvit state dict"):
        from_torchvision_mvit(vit.state_dict(), model)
    with pytest.raises(CheckpointMismatch, match="mvit backbone, the model is of the vit"):
        from_torchvision_mvit(model.state_dict(), vit)
