"""MViTv2 with task prompts: torchvision's ``mvit_v2_s``, the paper's backbone.

The network is torchvision's (same modules, same state-dict names, so its Kinetics-400
``.pth`` loads as is); only where its modules assume a single prefix token (the class
token) they learn about ``num_prefix`` = 1 + prompts:

- ``PrefixPool``: the prefix tokens bypass the q/k/v and skip pooling, as the class
  token does (prompts are never pooled);
- ``PromptAttention``: relative position terms and the pooled-q residual skip the
  prefix tokens, as they skip the class token.

The token sequence is ``[CLS, prompts..., patches...]``; the prompts are projected to
each new width at stage transitions by the same qkv/MLP/projection layers as the class
token. With ``num_prompts=0`` the forward pass is torchvision's, op for op.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video import mvit as tv_mvit

from training.backbones import FeatureInfo, PromptBackbone, dense_tap_indices, register_family


class PrefixPool(tv_mvit.Pool):
    """torchvision's ``Pool`` with ``num_prefix`` unpooled leading tokens (there: 1)."""

    num_prefix: int = 1

    def forward(self, x: torch.Tensor, thw: tuple[int, int, int]
                ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x, tensor_dim = tv_mvit._unsqueeze(x, 4, 1)
        # change: split off every prefix token, not only the first
        prefix, x = torch.tensor_split(x, indices=(self.num_prefix,), dim=2)
        x = x.transpose(2, 3)
        b, n, c = x.shape[:3]
        x = x.reshape((b * n, c) + thw).contiguous()
        if self.norm_before_pool and self.norm_act is not None:
            x = self.norm_act(x)
        x = self.pool(x)
        t, h, w = x.shape[2:]
        x = x.reshape(b, n, c, -1).transpose(2, 3)
        x = torch.cat((prefix, x), dim=2)
        if not self.norm_before_pool and self.norm_act is not None:
            x = self.norm_act(x)
        x = tv_mvit._squeeze(x, 4, 1, tensor_dim)
        return x, (t, h, w)


class PromptAttention(tv_mvit.MultiscaleAttention):
    """torchvision's ``MultiscaleAttention`` aware of ``num_prefix`` leading tokens."""

    num_prefix: int = 1

    def forward(self, x: torch.Tensor, thw: tuple[int, int, int]
                ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).transpose(
            1, 3).unbind(dim=2)
        k_thw = thw
        if self.pool_k is not None:
            k, k_thw = self.pool_k(k, thw)
        if self.pool_v is not None:
            v = self.pool_v(v, thw)[0]
        if self.pool_q is not None:
            q, thw = self.pool_q(q, thw)
        attn = torch.matmul(self.scaler * q, k.transpose(2, 3))
        if self.rel_pos_h is not None:
            # change: torchvision's helper skips one leading token; handing it views that
            # start at the last prefix token makes it skip all of them (it adds in place)
            s = self.num_prefix - 1
            tv_mvit._add_rel_pos(attn[:, :, s:, s:], q[:, :, s:], thw, k_thw, self.rel_pos_h,
                                 self.rel_pos_w, self.rel_pos_t)
        attn = attn.softmax(dim=-1)
        x = torch.matmul(attn, v)
        if self.residual_pool:
            # change: the pooled-q residual skips every prefix token unless it includes them
            if self.residual_with_cls_embed:
                x = x + q
            else:
                p = self.num_prefix
                x = torch.cat([x[:, :, :p], x[:, :, p:] + q[:, :, p:]], dim=2)
        x = x.transpose(1, 2).reshape(b, -1, self.output_dim)
        return self.project(x), thw


def _carry_prefix(net: nn.Module, num_prefix: int) -> None:
    """Turn torchvision's single-prefix modules into the prefix-aware subclasses above
    (only ``forward`` differs, so parameters and state-dict names stay as they are)."""
    for m in net.modules():
        if type(m) is tv_mvit.Pool:
            m.__class__ = PrefixPool
        elif type(m) is tv_mvit.MultiscaleAttention:
            m.__class__ = PromptAttention
        if isinstance(m, (PrefixPool, PromptAttention)):
            m.num_prefix = num_prefix


# per block: heads, in/out channels, q stride, kv stride (kernels 3x3x3, as MViTv2-S's):
# 4 blocks, 3 stages, for tests at tiny clip sizes; ``s`` is torchvision's mvit_v2_s
TEST_BLOCKS = [(1, 16, 32, (1, 2, 2), (1, 4, 4)), (1, 32, 32, (1, 1, 1), (1, 2, 2)),
               (2, 32, 64, (1, 2, 2), (1, 2, 2)), (2, 64, 64, (1, 1, 1), (1, 1, 1))]


def test_block_setting() -> list[tv_mvit.MSBlockConfig]:
    return [tv_mvit.MSBlockConfig(num_heads=h, input_channels=i, output_channels=o,
                                  kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3], stride_q=list(q),
                                  stride_kv=list(kv)) for h, i, o, q, kv in TEST_BLOCKS]


def build_torchvision_mvit(arch: str, **kwargs) -> tv_mvit.MViT:
    """torchvision's network: ``mvit_v2_s``, or its MViT class with ``TEST_BLOCKS`` and
    mvit_v2_s's other settings (``arch: test``)."""
    if arch == "s":
        return tv_mvit.mvit_v2_s(weights=None, **kwargs)
    if arch != "test":
        raise ValueError(f"arch: unknown '{arch}', choose from s, test")
    return tv_mvit.MViT(spatial_size=(224, 224), temporal_size=16,
                        block_setting=test_block_setting(), residual_pool=True,
                        residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True,
                        **kwargs)


@register_family("mvit")
class PromptMViT(PromptBackbone):
    """MViTv2-S (16 blocks, 4 stages) with optional prompt tokens.

    Its state dict is torchvision's (``conv_proj``, ``pos_encoding``, ``blocks``,
    ``norm``, ``head.1``) plus ``prompt_tokens``. The relative position tables have
    torchvision's 16x224 sizes at any clip size (torchvision interpolates them)."""

    def __init__(self, img_size: int = 224, num_frames: int = 16, tubelet_size: int = 2,
                 num_classes: int = 0, num_prompts: int = 0, drop_rate: float = 0.5,
                 drop_path_rate: float = 0.2, arch: str = "s"):
        super().__init__()
        if tubelet_size != 2:
            raise ValueError(f"tubelet_size: MViTv2's patch embedding steps 2 frames, "
                             f"not {tubelet_size}")
        if img_size % 32 or num_frames % 2:
            raise ValueError(f"img_size {img_size} / num_frames {num_frames}: MViTv2 needs "
                             "multiples of 32 / 2 (its grid is pooled 3 times by 2)")
        net = build_torchvision_mvit(arch, num_classes=max(num_classes, 1), dropout=drop_rate,
                                     stochastic_depth_prob=drop_path_rate)
        self.num_prompts, self.num_classes = num_prompts, num_classes
        _carry_prefix(net, self.num_prefix_tokens)
        self.conv_proj, self.pos_encoding, self.blocks, self.norm = (
            net.conv_proj, net.pos_encoding, net.blocks, net.norm)
        self.num_features = self.norm.normalized_shape[0]
        self.head = net.head
        # not in place: the normed tokens it reads a view of also feed the task heads
        self.head[0].inplace = False
        if num_classes <= 0:
            self.head[1] = nn.Identity()
        width = self.conv_proj.out_channels
        self.prompt_tokens = (nn.Parameter(torch.zeros(1, num_prompts, width))
                              if num_prompts else None)
        if self.prompt_tokens is not None:  # as torchvision initialises the class token
            nn.init.trunc_normal_(self.prompt_tokens, std=0.02)
        self.feature_info = self._feature_info(num_frames, img_size)
        self.dense_taps = dense_tap_indices(len(self.blocks))  # 1, 11, 14: stages 2, 3, 4

    def _feature_info(self, num_frames: int, img_size: int) -> list[FeatureInfo]:
        stride = [s for s in self.conv_proj.stride]
        grid = [num_frames // stride[0], img_size // stride[1], img_size // stride[2]]
        info = []
        for i, blk in enumerate(self.blocks):
            pool_q = blk.attn.pool_q
            if pool_q is not None:  # a stride-s, pad-k//2 conv: ceil(n / s) tokens
                for d, s in enumerate(pool_q.pool.stride):
                    grid[d], stride[d] = -(-grid[d] // s), stride[d] * s
            channels = blk.mlp[-2].out_features  # torchvision's MLP: [..., Linear, Dropout]
            info.append(FeatureInfo(i, channels, tuple(grid), tuple(stride)))
        return info

    # --- the family contract (timm's names) ---------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_encoding.class_token", "prompt_tokens"} | {
            n for n, _ in self.named_parameters() if ".rel_pos_" in n}

    def get_classifier(self) -> nn.Module:
        return self.head[1]

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        if num_classes <= 0:
            self.head[1] = nn.Identity()
            return
        self.head[1] = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = self.conv_proj(x)
        thw = tuple(x.shape[2:])  # from the clip, not fixed at 16x224 as torchvision's
        x = self.pos_encoding(x.flatten(2).transpose(1, 2))  # [B, 1+N, C]: CLS first
        if self.prompt_tokens is not None:
            prompts = self.prompt_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        return x, thw

    def _block(self, blk: nn.Module, x: torch.Tensor, thw: tuple[int, int, int]
               ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        return blk(x, thw)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head[0](self.pool(x))
        return x if pre_logits else self.head[1](x)
