"""What a synthetic task is: the contract every module of ``training.tasks`` fills.

A task names the shard fields it reads, turns one clip into its targets following the
clip's shared geometry (``ClipView``: frames, one crop box, one flip, computed once per
clip by ``SceneTransform``), builds its head from the backbone's ``feature_info``
(``HeadContext``), predicts from that head and scores the prediction. Nothing outside a
task's own module asks which task it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import FeatureInfo


def resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``[T, C, h, w]`` -> ``[T, C, size, size]``; labels use ``nearest`` (no new values)."""
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)


@dataclass
class ClipView:
    """One clip seen through the sample's geometry: ``frames`` picked, a square box of
    ``side`` pixels at (``top``, ``left``) of the ``height`` x ``width`` frame, then
    ``flip`` (horizontal) and a resize to ``label_size`` for dense labels."""

    clip: dict
    frames: np.ndarray
    top: int
    left: int
    side: int
    flip: bool
    label_size: int
    depth_max_m: float
    pose_slots: int

    def crop(self, name: str) -> torch.Tensor:
        """Field ``name`` ``[T, H, W(, C)]`` at the frames, cropped and flipped."""
        box = (slice(self.top, self.top + self.side), slice(self.left, self.left + self.side))
        x = self.clip[name][self.frames][:, box[0], box[1]]
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.flip(2) if self.flip else x  # width is dim 2 of [T, H, W(, C)]


@dataclass
class HeadContext:
    """What a head is built from: the tapped blocks' ``feature_info`` (their order is the
    order of ``taps`` in ``predict``), the width of prompts/pooled token, and the sizes
    the stage config fixes."""

    taps: Sequence[FeatureInfo]
    width: int
    label_size: int
    pose_slots: int
    num_seg_classes: int
    drop: float


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task. ``dense`` heads read the tapped patch tokens and the task
    token; the others read the task token only. ``targets`` returns tensors keyed by
    ``target_keys``; ``loss`` gets the prediction rows of the synthetic clips and the
    batch's targets (only synthetic rows)."""

    name: str
    weight: float  # the paper's loss weight (LossWeights default)
    fields: tuple[str, ...]  # shard fields (generation.dataset.shard_format) the targets read
    target_keys: tuple[str, ...]
    targets: Callable[[ClipView], dict[str, torch.Tensor]]
    build_head: Callable[[HeadContext], nn.Module]
    loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
    dense: bool = False
    default: bool = True  # in the stage configs' default ``tasks``

    def predict(self, head: nn.Module, taps: Sequence[torch.Tensor],
                token: torch.Tensor) -> torch.Tensor:
        return head(taps, token) if self.dense else head(token)
