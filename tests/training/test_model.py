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
    assert {"pvit_test", "pvit_tiny", "pvit_small", "pvit_base", "mvitv2_s", "videomae_vit_s",
            "videomae_vit_b"} <= set(list_models())
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


def test_prompts_are_prefix_tokens_after_cls():
    model = tiny("pvit", prompts_per_task=2)
    assert model.prompt_tokens.shape == (1, 8, 32)
    tokens = model.forward_features(torch.randn(1, 3, 4, 32, 32))
    # CLS + 4 tasks x 2 prompts + (4/2)*(32/8)^2 patches
    assert tokens.shape == (1, 1 + 8 + 2 * 16, 32)
    assert model.num_prefix_tokens == 9
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
    from training.backbones import FeatureInfo
    from training.heads import DenseHead

    tap = FeatureInfo(index=0, channels=8, grid=(2, 3, 3), stride=(2, 8, 8))
    head = DenseHead([tap], token_dim=8, out_channels=1, out_size=6, hidden=4, upsample=2)
    assert head.cells == [(2, 2, 2)]
    conv = torch.nn.ConvTranspose3d(8, 4, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    with torch.no_grad():  # Linear row (voxel, channel) <- conv weight [in, channel, voxel]
        head.upsample[0].weight.copy_(conv.weight.flatten(2).permute(2, 1, 0).reshape(32, 8))
        head.upsample[0].bias.copy_(conv.bias.repeat(8))
    tokens = torch.randn(2, 18, 8)
    want = conv(tokens.transpose(1, 2).reshape(2, 8, 2, 3, 3))  # [B, C, T, H, W]
    got = head.shuffle(head.upsample[0](tokens).view(2, 18, 8, 4), tap.grid, head.cells[0])
    torch.testing.assert_close(got, want.permute(0, 2, 3, 4, 1))  # [B, T, H, W, C]


def test_dense_head_taps_of_different_grids_meet_on_the_finest():
    from training.backbones import FeatureInfo
    from training.heads import DenseHead

    taps = [FeatureInfo(1, 16, (2, 8, 8), (2, 8, 8)), FeatureInfo(11, 32, (2, 4, 4), (2, 16, 16)),
            FeatureInfo(14, 64, (2, 2, 2), (2, 32, 32))]
    head = DenseHead(taps, token_dim=64, out_channels=3, out_size=16)
    assert head.cells == [(2, 2, 2), (2, 4, 4), (2, 8, 8)]
    tokens = [torch.randn(2, i.num_tokens, i.channels) for i in taps]
    assert head(tokens, torch.randn(2, 64)).shape == (2, 4, 3, 16, 16)


def test_old_single_upsample_weights_split_per_tap_exactly():
    """A checkpoint from before per-tap maps: one Linear over the concatenated taps."""
    from training.heads import split_legacy_dense_heads

    model = tiny("pvit").eval()
    head = model.task_heads["depth"]
    old = torch.nn.Linear(3 * 32, head.upsample[0].out_features)
    weights = {k: v for k, v in model.state_dict().items() if ".upsample." not in k}
    for task in ("depth", "normals", "segmentation"):
        weights[f"task_heads.{task}.upsample.weight"] = old.weight.detach()
        weights[f"task_heads.{task}.upsample.bias"] = old.bias.detach()
    model.load_state_dict(split_legacy_dense_heads(weights))
    taps = [torch.randn(1, 32, 32) for _ in range(3)]
    with torch.no_grad():
        split = sum(up(t) for up, t in zip(head.upsample, taps, strict=True))
        torch.testing.assert_close(split, old(torch.cat(taps, dim=-1)))


FAMILY_MODELS = {  # one small model per family and option set
    "pvit_test": {},
    "videomae_vit_s": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "mvitv2_test": {},
}


@pytest.mark.parametrize("name", sorted(FAMILY_MODELS))
@pytest.mark.parametrize("variant", ["mt", "pvit"])
def test_every_family_keeps_the_contract_heads_are_built_from(name, variant):
    """feature_info says what forward_intermediates returns; heads and export work on it."""
    model = create_model(name, variant=variant, tasks=TASKS, num_classes=5, label_size=16,
                         pose_slots=3, num_seg_classes=6, num_frames=4, img_size=32,
                         **FAMILY_MODELS[name]).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    tokens, taps = model.forward_intermediates(x, model.tap_indices)
    for info, tap in zip((model.feature_info[i] for i in sorted(set(model.tap_indices))), taps,
                         strict=True):
        assert tap.shape == (2, info.num_tokens, info.channels)
        assert info.grid[0] * info.stride[0] == 4 and info.grid[1] * info.stride[1] == 32
    pooled, patches, prompts = model.split_tokens(tokens)
    assert pooled.shape == (2, model.num_features)
    assert prompts.shape == (2, model.num_prompts, model.num_features)
    assert tokens.shape[1] == model.num_prefix_tokens + patches.shape[1]
    out = model.forward_train(x)
    assert out["segmentation"].shape == (2, 4, 6, 16, 16) and out["pose"].shape == (2, 4, 3, 8)
    torch.testing.assert_close(export_inference(model)(x), out["logits"])


def test_a_pvit_without_tasks_gets_the_default_tasks_and_an_empty_list_is_refused():
    from training.tasks import default_tasks
    # issue 24: create_model(name, variant="pvit") silently built zero prompts
    model = create_model("pvit_test", num_classes=3, num_frames=4, img_size=32)
    assert model.tasks == default_tasks() and model.num_prompts == len(default_tasks())
    with pytest.raises(ValueError, match="at least one synthetic task"):
        create_model("pvit_test", variant="pvit", tasks=[], num_classes=3)
    assert create_model("pvit_test", variant="vit", num_classes=3).tasks == []
