import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from training.convert import CheckpointMismatch, image_to_video, pretrain_to_finetune, read_weights
from training.model import create_model


def image_vit(img_size=32, embed_dim=32):
    """A tiny timm image ViT with pvit_test's widths (its weights are random)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=embed_dim, depth=2,
                              num_heads=2, mlp_ratio=2.0, num_classes=7)
    with torch.no_grad():  # timm inits the pos table to ~0: make it matter
        model.pos_embed.normal_(std=0.5)
    return model.eval()


def video_model(num_frames, img_size=32, variant="vit", **kw):
    return create_model("pvit_test", variant=variant, num_frames=num_frames, img_size=img_size,
                        tubelet_size=2, num_classes=0, **kw).eval()


def static_clip(image, frames):
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()


def test_loaded_model_reproduces_image_patch_tokens_for_a_static_clip(tmp_path):
    image_model = image_vit()
    path = tmp_path / "vit.safetensors"
    save_file(image_model.state_dict(), str(path))

    video = video_model(num_frames=2)  # one tubelet: the video net is the image net
    video.load_state_dict(image_to_video(read_weights(path), video))
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = image_model.forward_features(image)
        got = video.forward_features(static_clip(image, 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # CLS and all 16 patches


def test_inflated_embedding_repeats_the_image_tokens_at_every_time_step():
    image_model = image_vit()
    video = video_model(num_frames=8, variant="pvit", tasks=["depth"], label_size=8)
    video.load_state_dict(image_to_video(image_model.state_dict(), video))
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = image_model._pos_embed(image_model.patch_embed(image))  # [1, 1+16, D]
        got, _ = video._embed(static_clip(image, 8))  # [1, 1 + 1 + 4*16, D]: CLS, prompt, patches
    torch.testing.assert_close(got[:, 0], want[:, 0])
    for t in range(4):
        torch.testing.assert_close(got[:, 2 + 16 * t: 2 + 16 * (t + 1)], want[:, 1:],
                                   atol=1e-5, rtol=1e-4)


def test_position_table_is_resized_to_the_video_grid(tmp_path):
    image_model = image_vit(img_size=32)
    torch.save({"state_dict": image_model.state_dict()}, tmp_path / "vit.pth")
    video = video_model(num_frames=4, img_size=48)  # 4x4 grid -> 6x6
    converted = image_to_video(read_weights(tmp_path / "vit.pth"), video)
    assert converted["pos_embed_spatial"].shape == (1, 36, 32)
    video.load_state_dict(converted)


def test_wrong_width_fails_with_a_message_not_a_shape_traceback():
    with pytest.raises(CheckpointMismatch, match="another model size"):
        image_to_video(image_vit(embed_dim=64).state_dict(), video_model(num_frames=2))


def test_pretrain_to_finetune_keeps_prompts_and_heads_and_adds_a_classifier():
    tasks = dict(variant="pvit", tasks=["depth", "pose"], label_size=8, pose_slots=2)
    pre = create_model("pvit_test", num_frames=4, img_size=32, num_classes=0, **tasks)
    fine = create_model("pvit_test", num_frames=8, img_size=32, num_classes=3, **tasks)
    head_before = fine.head.weight.clone()
    sd = pretrain_to_finetune(pre.state_dict(), fine)
    fine.load_state_dict(sd)
    torch.testing.assert_close(fine.prompt_tokens, pre.prompt_tokens)
    torch.testing.assert_close(fine.task_heads["depth"].out.weight,
                               pre.task_heads["depth"].out.weight)
    torch.testing.assert_close(fine.head.weight, head_before)  # new classifier, untouched
    assert fine.pos_embed_temporal.shape == (1, 4, 32)  # 2 steps resampled to 4


def test_image_weights_do_not_fit_other_families():
    mvit = create_model("mvitv2_s", variant="vit", num_classes=0, num_frames=4, img_size=32)
    with pytest.raises(CheckpointMismatch, match="mvit family"):
        image_to_video(image_vit().state_dict(), mvit)


def test_pretrain_to_finetune_rejects_another_variant():
    pre = create_model("pvit_test", variant="pvit", tasks=["depth"], label_size=8, num_classes=0)
    fine = create_model("pvit_test", variant="mt", tasks=["depth"], label_size=8, num_classes=3)
    with pytest.raises(CheckpointMismatch, match="prompt_tokens"):
        pretrain_to_finetune(pre.state_dict(), fine)
