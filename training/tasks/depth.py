"""Depth: MSE on the clipped, normalised depth map (paper weight 0.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.heads import DenseHead
from training.tasks.base import ClipView, SyntheticTask, resize


def depth_targets(view: ClipView) -> dict[str, torch.Tensor]:
    # background depth is +inf: clip to depth_max_m, then scale to [0, 1]
    depth = view.crop("depth").clamp(0, view.depth_max_m) / view.depth_max_m
    return {"depth": resize(depth[:, None], view.label_size, "nearest")[:, 0].float()}


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the downsampled, clipped, normalised depth: ``[S,T,1,L,L]`` vs ``[S,T,L,L]``."""
    return F.mse_loss(pred[:, :, 0], target)


TASK = SyntheticTask(
    name="depth", weight=0.5, fields=("depth",), target_keys=("depth",),
    targets=depth_targets, dense=True,
    build_head=lambda ctx: DenseHead(ctx.taps, ctx.width, 1, ctx.label_size),
    loss=lambda pred, t: depth_loss(pred, t["depth"]))
