"""Per-task losses (the paper's choices) and their masked, weighted sum.

A batch may mix real clips (action label, no scene labels) and synthetic clips (scene
labels, no action label). ``targets`` says which rows are which:
- ``label``: ``[B]`` long, -1 where a clip has no action label;
- ``synthetic``: ``[B]`` bool, the rows the scene targets belong to;
- scene targets hold only the synthetic rows, in order: ``depth`` ``[S, T, L, L]``
  (already clipped and divided by ``depth_max_m``), ``normals`` ``[S, T, 3, L, L]``,
  ``segmentation`` ``[S, T, L, L]`` long, ``pose_position`` ``[S, T, K, 3]`` metres,
  ``pose_quaternion`` ``[S, T, K, 4]``, ``pose_presence`` ``[S, T, K]`` in {0, 1},
  ``boxes`` ``[S, T, K, 4]`` xyxy in [0, 1], ``boxes_presence`` ``[S, T, K]``; each task's
  module (``training.tasks``) names its keys and computes its loss.
A loss whose rows are absent from the batch is not computed, not zero-filled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.tasks import get_task
from training.tasks.boxes import boxes_loss  # noqa: F401 (the task losses, re-exported)
from training.tasks.depth import depth_loss  # noqa: F401
from training.tasks.normals import normals_loss  # noqa: F401
from training.tasks.pose import pose_loss  # noqa: F401
from training.tasks.segmentation import segmentation_loss  # noqa: F401


def action_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, label)


def compute_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total and the unweighted per-task losses that were computed."""
    parts: dict[str, torch.Tensor] = {}
    labelled = targets["label"] >= 0
    if labelled.any() and "logits" in outputs and outputs["logits"].shape[-1] > 0:
        parts["action"] = action_loss(outputs["logits"][labelled], targets["label"][labelled])
    synthetic = targets["synthetic"]
    if synthetic.any():
        for name, pred in outputs.items():
            if name != "logits":  # every other output is a task's (training/tasks/)
                parts[name] = get_task(name).loss(pred[synthetic], targets)
    if not parts:
        raise ValueError("batch has neither action labels nor synthetic targets the model predicts")
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts
