"""Training-only task heads (dropped on export).

- ``DenseHead`` (depth, normals, segmentation): patch tokens from three depths of the
  network (the paper's layers 2, 12, 15 of 16) are upsampled by a transposed 3D
  convolution (back to one step per frame and a 2x finer grid), the task token is
  joined at every position, and a per-position MLP predicts the map, resized to a fixed
  ``out_size``. Output ``[B, T, C, S, S]``.
- ``PoseHead``: an MLP on the pose token predicting, per frame and object slot,
  position (3, camera frame, metres), quaternion (4, wxyz) and a presence logit (1).
  Output ``[B, T, slots, 8]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

POSE_FIELDS = 8  # position xyz, quaternion wxyz, presence logit


class DenseHead(nn.Module):
    """Dense map head, computed as GEMMs.

    A transposed 3D convolution whose stride equals its kernel ``(tubelet, up, up)``
    fills one cell of voxels per token: a per-token ``Linear`` followed by a pixel
    shuffle (``shuffle``; a test checks it against ``nn.ConvTranspose3d``). The three
    taps are upsampled and fused by one such map over their concatenated channels
    (upsample-then-1x1x1-conv of each tap is linear, so the two convs collapse into
    one), the task token's projection is added at every voxel, then GELU and a 1x1x1
    conv give the map. The caller concatenates the taps and applies dropout once for
    all dense heads. On CPU this is several times faster than ``ConvTranspose3d`` +
    ``cat`` + ``Conv3d`` per head and keeps the heads a few % of a training step."""

    def __init__(self, embed_dim: int, grid_size: tuple[int, int, int], tubelet_size: int,
                 out_channels: int, out_size: int, num_taps: int = 3, hidden: int = 32,
                 upsample: int = 2):
        super().__init__()
        self.grid_size, self.out_size, self.hidden = grid_size, out_size, hidden
        self.cell = (tubelet_size, upsample, upsample)  # one step per frame, 2x finer grid
        voxels = tubelet_size * upsample * upsample
        self.upsample = nn.Linear(embed_dim * num_taps, hidden * voxels)
        self.token_proj = nn.Linear(embed_dim, hidden, bias=False)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, out_channels)

    def forward(self, taps: torch.Tensor, task_token: torch.Tensor) -> torch.Tensor:
        """``taps``: the tapped patch tokens concatenated, ``[B, N, num_taps * D]``."""
        b, n, _ = taps.shape
        voxels = self.cell[0] * self.cell[1] * self.cell[2]
        y = self.upsample(taps).view(b, n, voxels, self.hidden)
        y = self.act(y + self.token_proj(task_token)[:, None, None, :])
        y = self.shuffle(self.out(y))  # [B, T, C, h*up, w*up]
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            # bilinear to the fixed label size (cheap: C channels only)
            y = F.interpolate(y.flatten(0, 1), size=(self.out_size, self.out_size),
                              mode="bilinear", align_corners=False).unflatten(0, (b, -1))
        return y

    def shuffle(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, tokens, voxels, C]`` -> ``[B, T, C, H, W]``: token (t, h, w) and voxel
        (i, j, k) of its cell land on frame t*kt+i, pixel (h*u+j, w*u+k)."""
        (t, h, w), (kt, u, _) = self.grid_size, self.cell
        b, c = y.shape[0], y.shape[-1]
        y = y.view(b, t, h, w, kt, u, u, c).permute(0, 1, 4, 7, 2, 5, 3, 6)
        return y.reshape(b, t * kt, c, h * u, w * u)


class PoseHead(nn.Module):
    def __init__(self, embed_dim: int, num_frames: int, slots: int, drop: float = 0.1):
        super().__init__()
        self.num_frames, self.slots = num_frames, slots
        self.mlp = Mlp(embed_dim, hidden_features=embed_dim,
                       out_features=num_frames * slots * POSE_FIELDS, drop=drop)

    def forward(self, task_token: torch.Tensor) -> torch.Tensor:
        return self.mlp(task_token).unflatten(1, (self.num_frames, self.slots, POSE_FIELDS))
