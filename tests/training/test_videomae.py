"""VideoMAE checkpoints load into the vit family (sin-cos positions, mean pooling, q/v
biases) and give the reference's logits."""

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from training.convert import CheckpointMismatch, from_videomae, from_videomae_hf
from training.model import create_model, model_args

SMALL = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2,
             mlp_ratio=2.0)


@pytest.fixture(scope="module")
def reference():
    """A random small ``VideoMAEForVideoClassification`` (no download); every weight,
    the q/v biases included, is made non-trivial."""
    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                            hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, use_mean_pooling=True, num_labels=5,
                            qkv_bias=True, layer_norm_eps=1e-6)
    model = VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def ours(**kw):
    return create_model("videomae_vit_s", variant="vit", num_classes=5, **SMALL, **kw).eval()


def test_registered_sizes_are_videomaes():
    assert model_args("videomae_vit_s")["embed_dim"] == 384
    assert model_args("videomae_vit_b")["embed_dim"] == 768
    assert model_args("videomae_vit_b")["global_pool"] == "avg"


def test_hf_classifier_converted_gives_the_same_logits(reference):
    model = ours()
    model.load_state_dict(from_videomae_hf(reference.state_dict(), model, keep_classifier=True))
    clip = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        want = reference(pixel_values=clip.transpose(1, 2)).logits  # HF: [B, T, C, H, W]
        got = model(clip)
    assert (got - want).abs().max().item() <= 1e-4
    # q and v biases were carried, k's is zero
    qkv_bias = model.blocks[0].attn.qkv.bias.view(3, -1)
    assert qkv_bias[0].abs().sum() > 0 and qkv_bias[1].abs().sum() == 0


def original_layout(hf_state):
    """The VideoMAE repository's names for the same weights (``modeling_finetune``:
    timm's ViT with ``attn.qkv`` unbiased and ``attn.q_bias`` / ``attn.v_bias``)."""
    out = {"patch_embed.proj.weight": hf_state["videomae.embeddings.patch_embeddings."
                                               "projection.weight"],
           "patch_embed.proj.bias": hf_state["videomae.embeddings.patch_embeddings."
                                             "projection.bias"],
           "fc_norm.weight": hf_state["fc_norm.weight"], "fc_norm.bias": hf_state["fc_norm.bias"],
           "head.weight": hf_state["classifier.weight"], "head.bias": hf_state["classifier.bias"]}
    for i in range(2):
        h, o = f"videomae.encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.attention."
        out[o + "attn.qkv.weight"] = torch.cat([hf_state[a + n + ".weight"]
                                                for n in ("query", "key", "value")])
        out[o + "attn.q_bias"] = hf_state[a + "query.bias"]
        out[o + "attn.v_bias"] = hf_state[a + "value.bias"]
        for theirs, mine in (("attention.output.dense", "attn.proj"),
                             ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
                             ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            for leaf in ("weight", "bias"):
                out[f"{o}{mine}.{leaf}"] = hf_state[f"{h}{theirs}.{leaf}"]
    return out


def test_original_repository_layout_gives_the_same_logits(reference):
    model = ours()
    model.load_state_dict(from_videomae(original_layout(reference.state_dict()), model,
                                        keep_classifier=True))
    clip = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        want = reference(pixel_values=clip.transpose(1, 2)).logits
        assert (model(clip) - want).abs().max().item() <= 1e-4


def test_pretrained_encoder_loads_with_prompts_and_a_new_classifier(reference):
    encoder = {f"encoder.{k}": v for k, v in original_layout(reference.state_dict()).items()
               if not k.startswith(("head.", "fc_norm."))}
    encoder["encoder.norm.weight"] = torch.ones(32)  # the pretrained encoder's last norm
    encoder["decoder.blocks.0.norm1.weight"] = torch.ones(32)
    encoder["mask_token"] = torch.zeros(1, 1, 32)
    model = create_model("videomae_vit_s", variant="pvit", tasks=["depth"], num_classes=3,
                         label_size=8, **SMALL)
    head = model.head.weight.clone()
    model.load_state_dict(from_videomae(encoder, model))
    torch.testing.assert_close(model.head.weight, head)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight,
                               encoder["encoder.blocks.1.mlp.fc1.weight"])


def test_wrong_format_or_family_is_named(reference):
    with pytest.raises(CheckpointMismatch, match="not a videomae_hf state dict"):
        from_videomae_hf(original_layout(reference.state_dict()), ours())
    mvit = create_model("mvitv2_s", variant="vit", num_classes=3, num_frames=4, img_size=32)
    with pytest.raises(CheckpointMismatch, match="vit backbone, the model is of the mvit"):
        from_videomae(original_layout(reference.state_dict()), mvit)
    wider = create_model("videomae_vit_s", variant="vit", num_classes=5,
                         **{**SMALL, "embed_dim": 64})
    with pytest.raises(CheckpointMismatch, match="another model size"):
        from_videomae_hf(reference.state_dict(), wider)
