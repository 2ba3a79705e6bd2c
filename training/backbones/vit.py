"""The plain video ViT family, built from timm's layers, with VideoMAE's options.

Input clips are ``[B, 3, T, H, W]`` floats. A Conv3d cuts them into tubelets (default
2x16x16). The token sequence is ``[CLS, prompts..., patches...]``: the task prompts are
concatenated once at the input and everything attends to everything in every timm
``Block`` (no mask), as in PromptonomyViT (with full attention and position terms added
before the concatenation, token order changes nothing but where each token is read).

Options (the defaults are this project's ViT; ``videomae_*`` sizes set the others):
- ``pos_embed``: ``factorized`` sums learned spatial and temporal tables (image weights
  map onto the spatial table, the temporal one starts at zero); ``sincos`` is
  VideoMAE's fixed sinusoid table over the flattened (t, h, w) token index.
- ``global_pool``: ``token`` classifies the CLS token; ``avg`` (VideoMAE) has no CLS
  token and classifies ``fc_norm`` of the mean patch token (prompts are not averaged).
VideoMAE's q/v biases without a k bias are timm's qkv bias with zeros for k (the
converters write them; a k bias gets no gradient, softmax ignores a per-query shift).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from training.backbones import FeatureInfo, PromptBackbone, dense_tap_indices, register_family


class TubeletEmbed(nn.Module):
    """Non-overlapping ``tubelet x patch x patch`` cubes -> tokens ``[B, N, D]``."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int,
                 in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} / num_frames {num_frames} are not multiples "
                             f"of patch {patch_size} / tubelet {tubelet_size}")
        side = img_size // patch_size
        self.grid_size = (num_frames // tubelet_size, side, side)
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, t, h, w] -> [B, t*h*w, D]


def sincos_table(positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's ``get_sinusoid_encoding_table``: ``[1, positions, dim]``; even channels
    sin, odd cos, of ``pos / 10000^(2*(j//2)/dim)`` (float64 like its numpy original)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


@register_family("vit")
class VideoViT(PromptBackbone):
    """Plain (non-hierarchical) video ViT with optional prompt tokens."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_prompts: int = 0,
        pos_embed: Literal["factorized", "sincos"] = "factorized",
        global_pool: Literal["token", "avg"] = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        block_fn: Callable[..., nn.Module] = Block,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),  # timm ViT's
        act_layer: Callable[..., nn.Module] = nn.GELU,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ):
        super().__init__()
        if pos_embed not in ("factorized", "sincos") or global_pool not in ("token", "avg"):
            raise ValueError(f"pos_embed '{pos_embed}' / global_pool '{global_pool}': choose "
                             "factorized|sincos / token|avg")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prompts = num_prompts
        self.pos_embed_kind, self.global_pool = pos_embed, global_pool
        self.patch_embed = TubeletEmbed(img_size, patch_size, num_frames, tubelet_size,
                                        in_chans, embed_dim)
        t, h, w = self.grid_size = self.patch_embed.grid_size
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, embed_dim))
                          if global_pool == "token" else None)
        self.num_class_tokens = int(self.cls_token is not None)
        if pos_embed == "factorized":
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, embed_dim))
            # zero at init: an inflated image model then sees each time step like an image
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, embed_dim))
        else:  # fixed, so not in the state dict (VideoMAE's checkpoints do not hold it)
            self.register_buffer("pos_embed", sincos_table(t * h * w, embed_dim),
                                 persistent=False)
        self.prompt_tokens = (nn.Parameter(torch.zeros(1, num_prompts, embed_dim))
                              if num_prompts else None)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     drop_path=dpr[i], norm_layer=norm_layer, act_layer=act_layer,
                     mlp_layer=mlp_layer)
            for i in range(depth)])
        # VideoMAE with mean pooling: no final norm on the tokens, fc_norm on their mean
        self.norm = norm_layer(embed_dim) if global_pool == "token" else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if global_pool == "avg" else None
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [FeatureInfo(i, embed_dim, self.grid_size,
                                         (tubelet_size, patch_size, patch_size))
                             for i in range(depth)]
        self.dense_taps = dense_tap_indices(depth)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed_kind == "factorized":
            trunc_normal_(self.pos_embed_spatial, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # drawn last: with or without prompts the rest gets the same values from a seed,
        # so the variants of an ablation start from the same backbone
        if self.prompt_tokens is not None:
            trunc_normal_(self.prompt_tokens, std=0.02)

    # --- timm's method names: training and export code rely on them, not on the class ---
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed_spatial", "pos_embed_temporal", "prompt_tokens"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.patch_embed(x)  # [B, t*h*w, D], time-major
        b, _, d = x.shape
        if self.pos_embed_kind == "factorized":
            t, hw = self.grid_size[0], self.grid_size[1] * self.grid_size[2]
            pos = (self.pos_embed_temporal[:, :, None, :] + self.pos_embed_spatial[:, None, :, :])
            x = x + pos.reshape(1, t * hw, d)
        else:
            x = x + self.pos_embed.to(x.dtype)
        tokens = [] if self.cls_token is None else [self.cls_token.expand(b, -1, -1)]
        if self.prompt_tokens is not None:
            tokens.append(self.prompt_tokens.expand(b, -1, -1))
        return torch.cat([*tokens, x], dim=1), None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``[B, D]``: the CLS token, or fc_norm of the patch mean."""
        if self.fc_norm is None:
            return x[:, 0]
        return self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)
