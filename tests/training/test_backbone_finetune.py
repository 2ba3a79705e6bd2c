"""Fine-tuning from other code bases' checkpoints through the real ``pvit`` CLI: a
torchvision MViTv2 (its MViT class with the 4-block test setting, so that it runs in a
minute on a CPU) and a VideoMAE ViT-S (random weights, saved as their owners save them),
converted by ``--init-format``, trained one epoch and evaluated."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()

TINY = dict(num_frames=4, img_size=32, label_size=16, pose_slots=3, num_workers=0,
            log_every=1, batch_size=4, epochs=1, lr=1e-4, frame_stride=3, synthetic_ratio=0.5,
            val_split="")  # `pvit evaluate` scores it


@pytest.fixture(scope="module")
def mvit_file(tmp_path_factory):
    from torchvision.models.video.mvit import MViT

    from training.backbones.mvit import test_block_setting

    torch.manual_seed(0)
    net = MViT(spatial_size=(224, 224), temporal_size=16, block_setting=test_block_setting(),
               residual_pool=True, residual_with_cls_embed=False, rel_pos_embed=True,
               proj_after_attn=True, num_classes=400)
    path = tmp_path_factory.mktemp("tv") / "mvit_test.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def videomae_file(tmp_path_factory):
    """A ViT-S ``VideoMAEForVideoClassification`` state dict (HF layout), random."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, num_frames=4, hidden_size=384, num_hidden_layers=12,
                            num_attention_heads=6, intermediate_size=1536, num_labels=174,
                            use_mean_pooling=True)
    path = tmp_path_factory.mktemp("hf") / "videomae-small-ssv2.pt"
    torch.save(VideoMAEForVideoClassification(config).state_dict(), path)
    return path


@pytest.fixture
def experiment(tmp_path, shard_dir, toy_set):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"finetune": dict(
        TINY, out=str(tmp_path / "fine"), synthetic=str(shard_dir),
        data_root=toy_set["list_root"], init=None)}))
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
@pytest.mark.parametrize("model, fixture, fmt, theirs, ours", [
    ("mvitv2_test", "mvit_file", "torchvision_mvit", "blocks.2.attn.qkv.weight",
     "blocks.2.attn.qkv.weight"),
    ("videomae_vit_s", "videomae_file", "videomae_hf",
     "videomae.encoder.layer.3.attention.output.dense.weight", "blocks.3.attn.proj.weight"),
])
def test_one_epoch_finetune_and_evaluate_from_a_converted_checkpoint(
        request, tmp_path, experiment, toy_set, model, fixture, fmt, theirs, ours):
    init = request.getfixturevalue(fixture)
    result = invoke("finetune", experiment, "--model", model, "--init", init,
                    "--init-format", fmt)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "fine" / "summary.json").read_text())
    assert summary["steps"] >= 1
    # trained from the file: its weights, not a fresh init, went into the first step
    # (3 Adam steps of lr 1e-4 move a weight by < 1e-3; a fresh init differs by ~0.02)
    ckpt = torch.load(tmp_path / "fine" / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["model_name"] == model and ckpt["config"]["init_format"] == fmt
    source = torch.load(init, weights_only=True)[theirs]
    torch.testing.assert_close(ckpt["model"][ours], source, atol=1e-3, rtol=0)
    assert not torch.equal(ckpt["model"][ours], source)
    result = invoke("evaluate", tmp_path / "fine" / "checkpoints" / "final.pt",
                    "--data-root", toy_set["list_root"], "--temporal-clips", 1,
                    "--spatial-crops", 1, "--out", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["single_view"]["clips"] > 0 and 0 <= scores["top1"] <= 100


@pytest.mark.parametrize("model, fixture, fmt, words", [
    # a VideoMAE file named as torchvision's: the format wanted and the keys found
    ("mvitv2_test", "videomae_file", "torchvision_mvit",
     ["not a torchvision_mvit state dict", "classifier.bias"]),
    # an MViT file for a ViT model: both families
    ("videomae_vit_s", "mvit_file", "torchvision_mvit", ["mvit backbone", "vit family"]),
    ("videomae_vit_s", "mvit_file", "videomae", ["not a videomae state dict", "blocks.0"]),
    ("mvitv2_test", "mvit_file", "timm_image", ["image weights", "mvit family"]),
    # the full-size model from the small file: the shapes are named, not a traceback
    ("mvitv2_s", "mvit_file", "torchvision_mvit", ["weights lack", "another architecture"]),
])
def test_a_checkpoint_of_another_family_or_format_exits_2_naming_both(
        request, tmp_path, experiment, model, fixture, fmt, words):
    init = request.getfixturevalue(fixture)
    result = invoke("finetune", experiment, "--model", model, "--init", init,
                    "--init-format", fmt)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: finetune.init:"), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "fine" / "metrics.jsonl").exists()


def test_init_format_without_init_is_a_config_error(tmp_path, experiment):
    result = invoke("finetune", experiment, "--init-format", "videomae")
    assert result.exit_code == 2 and "init_format" in result.output, result.output
