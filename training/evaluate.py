"""Top-1 / top-5 of a fine-tuned checkpoint, single view and multi-view.

Single view: the centre clip, centre crop. Multi-view: ``temporal_clips`` clips spread
evenly over the video x ``spatial_crops`` crops along its long side; the softmax scores
of the views are averaged (the paper tests with 3 spatial crops). The model evaluated
is the exported one: task heads dropped.

Where results land: ``--out`` if given, else the checkpoint's evaluation home
(``training.run_layout.evaluation_file``: ``RUN_DIR/checkpoints/evaluate/eval_<split>.json``
for ``final.pt``), the same file the pipeline's evaluate stage writes. Writing there goes
through that directory's stage record (``flows.stage_cache``), so ``pvit evaluate`` and
``pvit pipeline`` share it: a pipeline finds an evaluation of the same checkpoint and
settings done, and neither refuses the other's directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from training import files
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.config import EvaluateConfig
from training.convert import export_inference
from training.loader_workers import loader_worker_kwargs
from training.run_layout import evaluation_file
from training.video_data import (
    VideoClips,
    VideoRecord,
    collate_videos,
    read_records,
    require_decodable,
)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, records: list[VideoRecord], *, num_frames: int,
                   img_size: int, stride: int, sampling: str, temporal_clips: int = 1,
                   spatial_crops: int = 1, batch_size: int = 8, num_workers: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy of ``model`` (clips ``[B, 3, T, H, W]`` -> logits) over ``records``."""
    dataset = VideoClips(records, num_frames=num_frames, img_size=img_size, stride=stride,
                         sampling=sampling, train=False, temporal_clips=temporal_clips,
                         spatial_crops=spatial_crops)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_videos, **loader_worker_kwargs(num_workers))
    model.eval()
    top1 = top5 = seen = 0
    correct: list[bool] = []  # per scored clip, in record order
    skipped: list[str] = []
    for batch in loader:
        skipped += batch["skipped"]
        if "video" not in batch:
            continue
        views = batch["video"].to(device)  # [B, V, 3, T, H, W]
        b, v = views.shape[:2]
        scores = model(views.flatten(0, 1)).float().softmax(-1).view(b, v, -1).mean(1)
        label = batch["label"].to(device)
        ranked = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
        hits = ranked[:, 0] == label
        correct += hits.tolist()
        top1 += hits.sum().item()
        top5 += (ranked == label[:, None]).any(-1).sum().item()
        seen += b
    if not seen:  # a score over no clips is no score (run_evaluate checks this up front)
        raise ValueError(f"data_root: no clip to score: all {len(skipped)} videos were "
                         "skipped as undecodable")
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1),
            "clips": seen, "correct": correct, "views_per_clip": temporal_clips * spatial_crops,
            "skipped_videos": len(skipped), "skipped_paths": skipped}


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.split``; writes and returns the JSON result
    (to ``cfg.out``, or the checkpoint's evaluation home without a stage record: see
    ``flows.evaluation_home`` for the recorded one the commands use)."""
    if not cfg.checkpoint:
        raise CheckpointError("checkpoint: none given")
    out = files.location(cfg.out) if cfg.out else evaluation_file(cfg.checkpoint, cfg.split)
    files.check_writable(files.parent(out), "out")  # before the evaluation, not after it
    return write_result(out, score(cfg))


def score(cfg: EvaluateConfig) -> dict[str, Any]:
    """The evaluation itself: checks the checkpoint and the split, then scores."""
    state = load_checkpoint(cfg.checkpoint)
    model = model_from_checkpoint(state, cfg.checkpoint)  # checks its fields agree
    if model.num_classes <= 0:
        raise CheckpointError(f"checkpoint: {cfg.checkpoint} has no classifier "
                              "(a pretrain checkpoint? evaluate a finetune one)")
    train_cfg = state["config"]
    records, _ = read_records(cfg.data_format, cfg.data_root, cfg.split, cfg.videos_dir,
                              num_classes=model.num_classes)
    require_decodable(records, f"split '{cfg.split}' of {cfg.data_root}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = export_inference(model).to(device)
    clip = dict(num_frames=train_cfg["num_frames"], img_size=train_cfg["img_size"],
                stride=train_cfg.get("frame_stride", 4),
                sampling=train_cfg.get("sampling", "stride"),
                batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    start = time.perf_counter()
    single = evaluate_model(model, records, **clip)
    multi = evaluate_model(model, records, temporal_clips=cfg.temporal_clips,
                           spatial_crops=cfg.spatial_crops, **clip)
    return {
        "checkpoint": str(cfg.checkpoint), "split": cfg.split, "data_format": cfg.data_format,
        "data_root": str(cfg.data_root), "top1": single["top1"], "top5": single["top5"],
        "single_view": single, "multi_view": multi, "wall_time_s": time.perf_counter() - start,
    }


def write_result(out: Path | str, result: dict[str, Any]) -> dict[str, Any]:
    """``out``: a local path or an object URL (``training.files``)."""
    files.write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    result["out"] = str(out)
    return result
