"""Training-only task heads (dropped on export), built from a backbone's ``feature_info``.

- ``DenseHead`` (depth, normals, segmentation): patch tokens from three blocks of the
  network (the paper's layers 2, 12, 15 of 16) are each upsampled from their own token
  grid by a transposed 3D convolution to one common grid (one step per frame, 2x the
  finest tap's grid), summed (the fusing 1x1x1 conv of their concatenation), the task
  token is joined at every position, and a per-position MLP predicts the map, resized
  to a fixed ``out_size``. Output ``[B, T, C, S, S]``.
- ``PoseHead``: an MLP on the pose token predicting, per frame and object slot,
  position (3, camera frame, metres), quaternion (4, wxyz) and a presence logit (1).
  Output ``[B, T, slots, 8]``. The boxes task uses it with 4 numbers per slot.
Which head a task gets is the task's choice (``training.tasks``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from training.backbones import FeatureInfo

POSE_FIELDS = 8  # position xyz, quaternion wxyz, presence logit


def clip_frames(info: FeatureInfo) -> int:
    """Frames of the input clip a block's token grid covers."""
    return info.grid[0] * info.stride[0]


class DenseHead(nn.Module):
    """Dense map head, computed as GEMMs.

    A transposed 3D convolution whose stride equals its kernel fills one cell of voxels
    per token: a per-token ``Linear`` followed by a pixel shuffle (``shuffle``; a test
    checks it against ``nn.ConvTranspose3d``). Each tap has its own such map, whose cell
    takes its grid to the common one; upsample-then-1x1x1-conv of the concatenated taps
    is linear, so it is the sum of the per-tap maps. The task token's projection is
    added at every voxel, then GELU and a 1x1x1 conv give the map. The caller applies
    dropout to the taps once for all dense heads."""

    def __init__(self, taps: Sequence[FeatureInfo], token_dim: int, out_channels: int,
                 out_size: int, hidden: int = 32, upsample: int = 2):
        super().__init__()
        self.out_size, self.hidden = out_size, hidden
        frames = clip_frames(taps[0])
        side_h = upsample * max(i.grid[1] for i in taps)
        side_w = upsample * max(i.grid[2] for i in taps)
        self.grids, self.cells = [], []
        for info in taps:
            t, h, w = info.grid
            if frames % t or side_h % h or side_w % w:
                raise ValueError(f"dense head: tap grid {info.grid} does not divide the "
                                 f"output grid {(frames, side_h, side_w)}")
            self.grids.append(info.grid)
            self.cells.append((frames // t, side_h // h, side_w // w))
        self.upsample = nn.ModuleList(
            nn.Linear(info.channels, hidden * c[0] * c[1] * c[2])
            for info, c in zip(taps, self.cells, strict=True))
        self.token_proj = nn.Linear(token_dim, hidden, bias=False)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, out_channels)

    def forward(self, taps: Sequence[torch.Tensor], task_token: torch.Tensor) -> torch.Tensor:
        """``taps``: the tapped patch tokens ``[B, N_i, C_i]``, in ``feature_info`` order."""
        y = None
        for i, (tokens, up) in enumerate(zip(taps, self.upsample, strict=True)):
            b, n, _ = tokens.shape
            cell = self.shuffle(up(tokens).view(b, n, -1, self.hidden), self.grids[i],
                                self.cells[i])
            y = cell if y is None else y + cell
        y = self.act(y + self.token_proj(task_token)[:, None, None, None, :])
        y = self.out(y).permute(0, 1, 4, 2, 3)  # [B, T, C, H, W]
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            # bilinear to the fixed label size (cheap: C channels only)
            y = F.interpolate(y.flatten(0, 1), size=(self.out_size, self.out_size),
                              mode="bilinear", align_corners=False).unflatten(0, (b, -1))
        return y

    @staticmethod
    def shuffle(y: torch.Tensor, grid: tuple[int, int, int], cell: tuple[int, int, int]
                ) -> torch.Tensor:
        """``[B, tokens, voxels, C]`` -> ``[B, T, H, W, C]``: token (t, h, w) and voxel
        (i, j, k) of its cell land on frame t*kt+i, pixel (h*kh+j, w*kw+k)."""
        (t, h, w), (kt, kh, kw) = grid, cell
        b, c = y.shape[0], y.shape[-1]
        y = y.view(b, t, h, w, kt, kh, kw, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return y.reshape(b, t * kt, h * kh, w * kw, c)


def split_legacy_dense_heads(weights: dict[str, torch.Tensor],
                             taps: int = 3) -> dict[str, torch.Tensor]:
    """Checkpoints written before the heads had one upsampling map per tap held one
    ``upsample`` over the concatenated taps: its column blocks are the per-tap maps
    (the bias goes to the first). Other weights pass unchanged."""
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".upsample.weight")]:
        prefix = key[: -len("weight")]
        for i, w in enumerate(out.pop(key).chunk(taps, dim=1)):
            out[f"{prefix}{i}.weight"] = w.contiguous()
        bias = out.pop(prefix + "bias")
        for i in range(taps):
            out[f"{prefix}{i}.bias"] = bias if i == 0 else torch.zeros_like(bias)
    return out


class PoseHead(nn.Module):
    """Per frame and object slot, ``fields`` numbers from the task token (pose: 8; the
    boxes task reuses it with 4)."""

    def __init__(self, embed_dim: int, num_frames: int, slots: int, drop: float = 0.1,
                 fields: int = POSE_FIELDS):
        super().__init__()
        self.num_frames, self.slots, self.fields = num_frames, slots, fields
        self.mlp = Mlp(embed_dim, hidden_features=embed_dim,
                       out_features=num_frames * slots * fields, drop=drop)

    def forward(self, task_token: torch.Tensor) -> torch.Tensor:
        return self.mlp(task_token).unflatten(1, (self.num_frames, self.slots, self.fields))
