import pytest
import torch

from training.convert import export_inference
from training.model import create_model, dense_tap_indices, list_models, model_args

TASKS = ["depth", "normals", "segmentation", "pose"]


def tiny(variant="pvit", **kw):
    args = dict(variant=variant, tasks=TASKS, num_classes=5, label_size=16, pose_slots=3,
                num_seg_classes=6, num_frames=4, img_size=32)
    args.update(kw)
    return create_model("pvit_test", **args)


def test_registry_lists_the_paper_sizes_and_a_test_size():
    assert {"pvit_test", "pvit_tiny", "pvit_small", "pvit_base"} <= set(list_models())
    assert model_args("pvit_base")["embed_dim"] == 768
    with pytest.raises(ValueError, match="unknown"):
        create_model("pvit_huge")


def test_dense_taps_follow_the_papers_layers():
    assert dense_tap_indices(16) == [1, 11, 14]  # layers 2, 12, 15 of 16 (1-based)


@pytest.mark.parametrize("variant", ["vit", "mt", "pvit"])
def test_forward_train_shapes(variant):
    model = tiny(variant)
    out = model.forward_train(torch.randn(2, 3, 4, 32, 32))
    assert out["logits"].shape == (2, 5)
    if variant == "vit":
        assert set(out) == {"logits"}
        return
    assert out["depth"].shape == (2, 4, 1, 16, 16)
    assert out["normals"].shape == (2, 4, 3, 16, 16)
    assert out["segmentation"].shape == (2, 4, 6, 16, 16)
    assert out["pose"].shape == (2, 4, 3, 8)


def test_prompts_are_tokens_after_cls_and_patches():
    model = tiny("pvit", prompts_per_task=2)
    assert model.prompt_tokens.shape == (1, 8, 32)
    tokens = model.forward_features(torch.randn(1, 3, 4, 32, 32))
    # CLS + (4/2)*(32/8)^2 patches + 4 tasks x 2 prompts
    assert tokens.shape == (1, 1 + 2 * 16 + 8, 32)
    assert tiny("mt").prompt_tokens is None


def test_prompts_attend_to_patches_and_steer_the_cls_token():
    """Full self-attention: changing a prompt changes the CLS output."""
    model = tiny("pvit").eval()
    x = torch.randn(1, 3, 4, 32, 32)
    before = model(x)
    with torch.no_grad():
        # random, not constant: a constant shift would vanish in LayerNorm
        model.prompt_tokens[:, 0].add_(torch.randn(32))
    assert not torch.allclose(before, model(x))


def test_export_drops_heads_and_keeps_outputs():
    model = tiny("pvit").eval()
    exported = export_inference(model)
    def count(m):
        return sum(p.numel() for p in m.parameters())

    heads = count(model.task_heads)
    assert heads > 0
    assert count(exported) == count(model) - heads
    # backbone + prompts + classifier
    backbone = tiny("vit", num_classes=0)
    assert count(exported) == count(backbone) + 4 * 32 + (32 * 5 + 5)
    x = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(exported(x), model(x))
    assert not any(k.startswith("task_heads") for k in exported.state_dict())


def test_dense_head_upsampling_is_a_transposed_3d_convolution():
    """The head computes its stride=kernel ConvTranspose3d as Linear + pixel shuffle."""
    from training.heads import DenseHead

    head = DenseHead(embed_dim=8, grid_size=(2, 3, 3), tubelet_size=2, out_channels=1,
                     out_size=6, num_taps=1, hidden=4, upsample=2)
    conv = torch.nn.ConvTranspose3d(8, 4, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    with torch.no_grad():  # Linear row (voxel, channel) <- conv weight [in, channel, voxel]
        head.upsample.weight.copy_(conv.weight.flatten(2).permute(2, 1, 0).reshape(32, 8))
        head.upsample.bias.copy_(conv.bias.repeat(8))
    tokens = torch.randn(2, 18, 8)
    want = conv(tokens.transpose(1, 2).reshape(2, 8, 2, 3, 3)).transpose(1, 2)  # [B, T, C, H, W]
    got = head.shuffle(head.upsample(tokens).view(2, 18, 8, 4))
    torch.testing.assert_close(got, want)
