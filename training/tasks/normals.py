"""Surface normals: MSE on the 3-channel camera-frame normal map (paper weight 0.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.heads import DenseHead
from training.tasks.base import ClipView, SyntheticTask, resize


def normals_targets(view: ClipView) -> dict[str, torch.Tensor]:
    normals = view.crop("normal").permute(0, 3, 1, 2)  # [T, 3, h, w]
    if view.flip:  # a mirrored image mirrors the surfaces: x of the normal negates
        normals = normals * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    return {"normals": resize(normals, view.label_size, "nearest").float()}


def normals_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the 3-channel normal map (background targets are zero vectors)."""
    return F.mse_loss(pred, target)


TASK = SyntheticTask(
    name="normals", weight=0.5, fields=("normal",), target_keys=("normals",),
    targets=normals_targets, dense=True,
    build_head=lambda ctx: DenseHead(ctx.taps, ctx.width, 3, ctx.label_size),
    loss=lambda pred, t: normals_loss(pred, t["normals"]))
