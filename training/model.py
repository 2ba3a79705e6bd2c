"""PromptonomyViT: the training model and the registry of named sizes.

``create_model(name, **overrides)`` is the only way in (as in timm). Sizes register a
dict of architecture arguments; everything else (variant, clip shape, tasks) comes in
as overrides from the stage config.

Variants (one switch, for the paper's ablation):
- ``vit``: backbone + classifier; no prompts, no synthetic heads.
- ``mt``: synthetic task heads read the CLS token; no prompts.
- ``pvit``: one (or ``prompts_per_task``) learned token per task; each head reads its
  own task's prompt token(s), averaged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from training.heads import DenseHead, PoseHead
from training.video_vit import VideoViT

DENSE_CHANNELS = {"depth": 1, "normals": 3}  # segmentation: one channel per class
VARIANTS = ("vit", "mt", "pvit")


def dense_tap_indices(depth: int) -> list[int]:
    """0-based blocks whose patch tokens feed the dense heads: the paper's layers 2, 12
    and 15 of 16, scaled to ``depth``."""
    return [max(0, round(depth * k / 16) - 1) for k in (2, 12, 15)]


class PromptonomyViT(VideoViT):
    """VideoViT + training-only synthetic task heads. ``forward`` gives class logits;
    ``forward_train`` gives the logits and every task's prediction."""

    def __init__(self, variant: str = "pvit", tasks: tuple[str, ...] | list[str] = (),
                 prompts_per_task: int = 1, label_size: int = 56, pose_slots: int = 8,
                 num_seg_classes: int = 2, head_drop_rate: float = 0.1, **vit_kwargs: Any):
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown '{variant}', choose from {VARIANTS}")
        tasks = list(tasks) if variant != "vit" else []
        num_prompts = len(tasks) * prompts_per_task if variant == "pvit" else 0
        super().__init__(num_prompts=num_prompts, **vit_kwargs)
        self.variant, self.tasks, self.prompts_per_task = variant, tasks, prompts_per_task
        self.tap_indices = dense_tap_indices(len(self.blocks))
        tubelet = self.patch_embed.proj.kernel_size[0]
        num_frames = self.grid_size[0] * tubelet
        heads: dict[str, nn.Module] = {}
        for task in tasks:
            if task == "pose":
                heads[task] = PoseHead(self.embed_dim, num_frames, pose_slots, drop=head_drop_rate)
            else:
                channels = num_seg_classes if task == "segmentation" else DENSE_CHANNELS[task]
                heads[task] = DenseHead(self.embed_dim, self.grid_size, tubelet, channels,
                                        label_size)
        self.task_heads = nn.ModuleDict(heads)
        # one dropout on the tapped tokens, shared by the dense heads (the paper's
        # "upsample, dropout, concatenate"; once instead of once per head)
        self.tap_drop = nn.Dropout(head_drop_rate)

    def task_token(self, cls: torch.Tensor, prompts: torch.Tensor, task: str) -> torch.Tensor:
        if self.variant == "mt":
            return cls
        i = self.tasks.index(task) * self.prompts_per_task
        return prompts[:, i:i + self.prompts_per_task].mean(dim=1)

    def forward_train(self, x: torch.Tensor, tasks: bool = True) -> dict[str, torch.Tensor]:
        """``{"logits": [B, classes]}`` plus, when ``tasks``, one prediction per task."""
        need_taps = tasks and any(t != "pose" for t in self.tasks)
        tokens, taps = self.forward_intermediates(x, self.tap_indices if need_taps else None)
        if need_taps:  # a repeated index (shallow nets) appears once in taps
            by_index = dict(zip(sorted(set(self.tap_indices)), taps, strict=True))
            taps = self.tap_drop(torch.cat([by_index[i] for i in self.tap_indices], dim=-1))
        out = {"logits": self.forward_head(tokens)}
        if tasks and self.tasks:
            cls, _, prompts = self.split_tokens(tokens)
            for task, head in self.task_heads.items():
                token = self.task_token(cls, prompts, task)
                out[task] = head(token) if task == "pose" else head(taps, token)
        return out


# --- registry -----------------------------------------------------------------------
_MODEL_ARGS: dict[str, dict[str, Any]] = {}


def register_model(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    _MODEL_ARGS[fn.__name__] = fn()
    return fn


def list_models() -> list[str]:
    return sorted(_MODEL_ARGS)


def model_args(name: str) -> dict[str, Any]:
    if name not in _MODEL_ARGS:
        raise ValueError(f"model: unknown '{name}', choose from {list_models()}")
    return dict(_MODEL_ARGS[name])


def create_model(name: str, **overrides: Any) -> PromptonomyViT:
    return PromptonomyViT(**{**model_args(name), **overrides})


@register_model
def pvit_test() -> dict[str, Any]:
    """For tests: 32px clips of 8px patches, two blocks."""
    return dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2,
                mlp_ratio=2.0)


@register_model
def pvit_tiny() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)  # ViT-Ti widths


@register_model
def pvit_small() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)  # ViT-S widths


@register_model
def pvit_base() -> dict[str, Any]:
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)  # ViT-B widths
