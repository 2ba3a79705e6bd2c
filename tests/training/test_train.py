import json

import pytest
import torch

from training.checkpoint import CheckpointError, load_checkpoint
from training.config import FinetuneConfig, PretrainConfig
from training.train import lr_at, run_finetune, run_pretrain

TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, log_every=1, dropout=0.0, drop_path=0.0, head_dropout=0.0)


def pretrain_cfg(tmp_path, shard_dir, name="pre", **kw):
    args = dict(TINY, out=str(tmp_path / name), synthetic=str(shard_dir), epochs=2,
                batch_size=4, lr=2e-3, warmup_epochs=0.5)
    args.update(kw)
    return PretrainConfig(**args)


def finetune_cfg(tmp_path, shard_dir, toy_set, name="fine", **kw):
    args = dict(TINY, out=str(tmp_path / name), synthetic=str(shard_dir), epochs=2,
                batch_size=3, lr=2e-3, data_root=toy_set["list_root"], frame_stride=3,
                synthetic_ratio=1.0)
    args.update(kw)
    return FinetuneConfig(**args)


def test_lr_schedule_warms_up_then_follows_a_cosine():
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.55, abs=0.01)  # half way down the cosine
    assert lrs[-1] > 0.1 and lr_at(100, total_steps=100, warmup_steps=10, lr=1, min_lr=0.1) == 0.1


def test_overfit_every_task_loss_falls(tmp_path, shard_dir):
    cfg = pretrain_cfg(tmp_path, shard_dir, epochs=12, crop_scale=(1.0, 1.0), flip=False)
    summary = run_pretrain(cfg)
    lines = (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    first, last = epochs[0], epochs[-1]
    for task in ("depth", "normals", "segmentation", "pose"):
        assert last[f"loss/{task}"] < 0.7 * first[f"loss/{task}"], task
    assert summary["losses"]["total"] == pytest.approx(last["loss/total"])
    for name in ("config.yaml", "summary.json", "loss_curve.png", "inference.safetensors",
                 "checkpoints/final.pt"):
        assert (tmp_path / "pre" / name).is_file(), name
    assert summary["params_inference"] < summary["params_train"]


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path, shard_dir):
    # dropout on, so the restored RNG matters too
    kw = dict(epochs=2, checkpoint_every=1, dropout=0.3, drop_path=0.2, head_dropout=0.2)
    full = run_pretrain(pretrain_cfg(tmp_path, shard_dir, "full", **kw))
    cfg = pretrain_cfg(tmp_path, shard_dir, "killed", **kw)
    run_pretrain(cfg, stop_after=3)  # steps 1-3 of 4, then "killed" mid-epoch 2
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 3
    resumed = run_pretrain(cfg)
    a = load_checkpoint(full["checkpoint"])
    b = load_checkpoint(resumed["checkpoint"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert resumed["losses"] == full["losses"]
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in
                     (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_finetune_mixes_real_and_synthetic_and_reports_accuracy(tmp_path, shard_dir, toy_set):
    pre = run_pretrain(pretrain_cfg(tmp_path, shard_dir, epochs=1))
    summary = run_finetune(finetune_cfg(tmp_path, shard_dir, toy_set, init=pre["checkpoint"]))
    assert {"top1", "top5", "skipped_videos", "wall_time_s"} <= set(summary)
    assert set(summary["losses"]) == {"total", "action", "depth", "normals", "segmentation", "pose"}
    assert 0 <= summary["top1"] <= summary["top5"] <= 100


def test_plain_finetuning_without_synthetic_clips(tmp_path, toy_set):
    summary = run_finetune(finetune_cfg(tmp_path, None, toy_set, synthetic_ratio=0.0,
                                        synthetic=None, epochs=1, variant="vit"))
    assert set(summary["losses"]) == {"total", "action"}


def test_init_from_another_variant_fails_with_a_sentence(tmp_path, shard_dir, toy_set):
    pre = run_pretrain(pretrain_cfg(tmp_path, shard_dir, epochs=1, variant="mt"))
    with pytest.raises(CheckpointError, match="variant='mt'"):
        run_finetune(finetune_cfg(tmp_path, shard_dir, toy_set, init=pre["checkpoint"]))


def test_undecodable_videos_are_counted_not_fatal(tmp_path, shard_dir, toy_set):
    lines = (tmp_path / "list.txt")
    good = open(f"{toy_set['list_root']}/train.txt").read().splitlines()
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    lines.write_text("\n".join([f"{toy_set['list_root']}/{line}" for line in good]
                               + [f"{tmp_path / 'bad.mp4'} 0"]) + "\n")
    summary = run_finetune(finetune_cfg(tmp_path, shard_dir, toy_set, data_root=str(tmp_path),
                                        train_split=str(lines), val_split="", epochs=1,
                                        synthetic_ratio=0.0, variant="vit", synthetic=None))
    assert summary["skipped_videos"] == 1 and summary["skipped_paths"][0].endswith("bad.mp4")


def test_a_finished_run_started_again_trains_nothing_and_keeps_its_summary(tmp_path, shard_dir):
    cfg = pretrain_cfg(tmp_path, shard_dir, epochs=1)
    first = run_pretrain(cfg)
    again = run_pretrain(cfg)
    assert again["losses"] == first["losses"] and again["steps"] == first["steps"]
    assert again["train_time_s"] < first["train_time_s"]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, shard_dir):
    eager = run_pretrain(pretrain_cfg(tmp_path, shard_dir, "eager", epochs=1))
    compiled = run_pretrain(pretrain_cfg(tmp_path, shard_dir, "compiled", epochs=1, compile=True))
    for task, loss in eager["losses"].items():
        assert compiled["losses"][task] == pytest.approx(loss, rel=1e-3), task


def test_finetune_starts_from_image_weights(tmp_path, toy_set):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    image = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=7)
    save_file(image.state_dict(), str(tmp_path / "vit.safetensors"))
    cfg = finetune_cfg(tmp_path, None, toy_set, synthetic=None, synthetic_ratio=0.0,
                       variant="vit", epochs=1, lr=1e-9, min_lr=0.0, weight_decay=0.0,
                       init=str(tmp_path / "vit.safetensors"), val_split="")
    summary = run_finetune(cfg)
    weights = load_checkpoint(summary["checkpoint"])["model"]
    torch.testing.assert_close(weights["blocks.1.mlp.fc2.weight"],
                               image.state_dict()["blocks.1.mlp.fc2.weight"])


def test_a_checkpoint_from_before_a_new_config_field_resumes_only_at_its_default():
    from training.resume import check_resumable

    cfg = PretrainConfig(**dict(TINY, synthetic="data/x"))
    older = cfg.model_dump(mode="json")
    del older["bad_shards"]                 # a checkpoint written before the field existed
    check_resumable({"config": older}, cfg, "last.pt")
    with pytest.raises(CheckpointError, match="bad_shards=None"):
        check_resumable({"config": older}, cfg.model_copy(update={"bad_shards": "skip"}),
                        "last.pt")
