"""Semantic segmentation: per-pixel cross-entropy, one channel per class (weight 0.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.heads import DenseHead
from training.tasks.base import ClipView, SyntheticTask, resize


def segmentation_targets(view: ClipView) -> dict[str, torch.Tensor]:
    seg = resize(view.crop("semantic_seg")[:, None].float(), view.label_size, "nearest")
    return {"segmentation": seg[:, 0].long()}


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy over semantic classes: ``[S,T,C,L,L]`` vs ``[S,T,L,L]``."""
    return F.cross_entropy(pred.flatten(0, 1), target.flatten(0, 1))


TASK = SyntheticTask(
    name="segmentation", weight=0.1, fields=("semantic_seg",), target_keys=("segmentation",),
    targets=segmentation_targets, dense=True,
    build_head=lambda ctx: DenseHead(ctx.taps, ctx.width, ctx.num_seg_classes, ctx.label_size),
    loss=lambda pred, t: segmentation_loss(pred, t["segmentation"]))
