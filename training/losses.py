"""Per-task losses (the paper's choices) and their masked, weighted sum.

A batch may mix real clips (action label, no scene labels) and synthetic clips (scene
labels, no action label). ``targets`` says which rows are which:
- ``label``: ``[B]`` long, -1 where a clip has no action label;
- ``synthetic``: ``[B]`` bool, the rows the scene targets belong to;
- scene targets hold only the synthetic rows, in order: ``depth`` ``[S, T, L, L]``
  (already clipped and divided by ``depth_max_m``), ``normals`` ``[S, T, 3, L, L]``,
  ``segmentation`` ``[S, T, L, L]`` long, ``pose_position`` ``[S, T, K, 3]`` metres,
  ``pose_quaternion`` ``[S, T, K, 4]``, ``pose_presence`` ``[S, T, K]`` in {0, 1}.
A loss whose rows are absent from the batch is not computed, not zero-filled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the downsampled, clipped, normalised depth: ``[S,T,1,L,L]`` vs ``[S,T,L,L]``."""
    return F.mse_loss(pred[:, :, 0], target)


def normals_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the 3-channel normal map (background targets are zero vectors)."""
    return F.mse_loss(pred, target)


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy over semantic classes: ``[S,T,C,L,L]`` vs ``[S,T,L,L]``."""
    return F.cross_entropy(pred.flatten(0, 1), target.flatten(0, 1))


def pose_loss(pred: torch.Tensor, position: torch.Tensor, quaternion: torch.Tensor,
              presence: torch.Tensor) -> torch.Tensor:
    """MSE of position and quaternion over present slots, plus BCE of the presence logit.

    ``pred`` is ``[S,T,K,8]`` (xyz, wxyz, presence logit). q and -q are one rotation, so
    the quaternion error is the smaller of the two.
    """
    present = presence > 0.5
    presence_term = F.binary_cross_entropy_with_logits(pred[..., 7], presence.float())
    if not present.any():
        return presence_term
    pos_err = (pred[..., :3] - position).pow(2).mean(-1)
    q = pred[..., 3:7]
    quat_err = torch.minimum((q - quaternion).pow(2).mean(-1), (q + quaternion).pow(2).mean(-1))
    return (pos_err + quat_err)[present].mean() + presence_term


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
        if "depth" in outputs:
            parts["depth"] = depth_loss(outputs["depth"][synthetic], targets["depth"])
        if "normals" in outputs:
            parts["normals"] = normals_loss(outputs["normals"][synthetic], targets["normals"])
        if "segmentation" in outputs:
            parts["segmentation"] = segmentation_loss(outputs["segmentation"][synthetic],
                                                      targets["segmentation"])
        if "pose" in outputs:
            parts["pose"] = pose_loss(outputs["pose"][synthetic], targets["pose_position"],
                                      targets["pose_quaternion"], targets["pose_presence"])
    if not parts:
        raise ValueError("batch has neither action labels nor synthetic targets the model predicts")
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts
