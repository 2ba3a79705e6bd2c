"""Training-only task heads (dropped on export).

- ``DenseHead`` (depth, normals, segmentation): patch tokens from three depths of the
  network are each upsampled by a transposed 3D convolution (back to one step per frame
  and a finer grid), passed through dropout and concatenated; the task token is
  projected and concatenated at every position; a per-position MLP (1x1x1 convs)
  predicts the map, resized to a fixed ``out_size``. Output ``[B, T, C, S, S]``.
- ``PoseHead``: an MLP on the pose token predicting, per frame and object slot,
  position (3, camera frame, metres), quaternion (4, wxyz) and a presence logit (1).
  Output ``[B, T, slots, 8]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Mlp

POSE_FIELDS = 8  # position xyz, quaternion wxyz, presence logit


class DenseHead(nn.Module):
    def __init__(self, embed_dim: int, grid_size: tuple[int, int, int], tubelet_size: int,
                 out_channels: int, out_size: int, num_taps: int = 3, hidden: int = 64,
                 drop: float = 0.1):
        super().__init__()
        self.grid_size = grid_size
        self.out_size = out_size
        # spatial upsampling factor so the conv output is about out_size (rest: interpolate)
        up = max(1, out_size // grid_size[1])
        kernel = (tubelet_size, up, up)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose3d(embed_dim, hidden, kernel_size=kernel, stride=kernel)
            for _ in range(num_taps))
        self.drop = nn.Dropout(drop)
        self.token_proj = nn.Linear(embed_dim, hidden)
        self.mlp = nn.Sequential(
            nn.Conv3d(hidden * (num_taps + 1), hidden, kernel_size=1), nn.GELU(),
            nn.Conv3d(hidden, out_channels, kernel_size=1))

    def forward(self, taps: list[torch.Tensor], task_token: torch.Tensor) -> torch.Tensor:
        b, _, d = taps[0].shape
        t, h, w = self.grid_size
        maps = [self.drop(up(x.transpose(1, 2).reshape(b, d, t, h, w)))
                for up, x in zip(self.upsample, taps)]
        token = self.token_proj(task_token)[:, :, None, None, None].expand_as(maps[0])
        y = self.mlp(torch.cat([*maps, token], dim=1))  # [B, C, T, h', w']
        y = y.transpose(1, 2)  # per-frame maps: [B, T, C, h', w']
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            frames = y.flatten(0, 1)
            frames = F.interpolate(frames, size=(self.out_size, self.out_size), mode="bilinear",
                                   align_corners=False)
            y = frames.unflatten(0, (b, -1))
        return y


class PoseHead(nn.Module):
    def __init__(self, embed_dim: int, num_frames: int, slots: int, drop: float = 0.1):
        super().__init__()
        self.num_frames, self.slots = num_frames, slots
        self.mlp = Mlp(embed_dim, hidden_features=embed_dim,
                       out_features=num_frames * slots * POSE_FIELDS, drop=drop)

    def forward(self, task_token: torch.Tensor) -> torch.Tensor:
        return self.mlp(task_token).unflatten(1, (self.num_frames, self.slots, POSE_FIELDS))
