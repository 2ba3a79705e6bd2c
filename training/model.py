"""PromptonomyViT: the training model and the registry of named models.

``create_model(name, **overrides)`` is the only way in (as in timm). A registered name
gives a backbone family (``training.backbones``) and its architecture arguments;
everything else (variant, clip shape, tasks) comes in as overrides from the stage
config. The PViT wrapper is a subclass of the family's class (``pvit_class``), so the
state dict keeps the family's own names plus ``task_heads.*``, and the exported model
(``training.convert.export_inference``) is the family's class without the heads.

Variants (one switch, for the paper's ablation):
- ``vit``: backbone + classifier; no prompts, no synthetic heads.
- ``mt``: synthetic task heads read the pooled token (CLS); no prompts.
- ``pvit``: one (or ``prompts_per_task``) learned token per task; each head reads its
  own task's prompt token(s), averaged.
Heads are built from the backbone's ``feature_info`` and ``dense_taps`` only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from training.backbones import dense_tap_indices, get_family  # noqa: F401 (re-exported)
from training.tasks import HeadContext, default_tasks, get_task

VARIANTS = ("vit", "mt", "pvit")


class PromptonomyViT(nn.Module):
    """A backbone family + training-only synthetic task heads. ``forward`` gives class
    logits; ``forward_train`` gives the logits and every task's prediction. Not built
    directly: ``pvit_class(family)`` puts it in front of a family's class."""

    family: str

    def __init__(self, variant: str = "pvit", tasks: tuple[str, ...] | list[str] | None = None,
                 prompts_per_task: int = 1, label_size: int = 56, pose_slots: int = 8,
                 num_seg_classes: int = 2, head_drop_rate: float = 0.1, **backbone_kwargs: Any):
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown '{variant}', choose from {VARIANTS}")
        if variant == "vit":
            tasks = []
        elif tasks is None:   # as the training configs do: the registry's default tasks
            tasks = default_tasks()
        elif not tasks:       # a PViT with no prompt (an MT with no head) is a ViT
            raise ValueError(f"tasks: variant '{variant}' needs at least one synthetic task")
        tasks = list(tasks)
        num_prompts = len(tasks) * prompts_per_task if variant == "pvit" else 0
        super().__init__(num_prompts=num_prompts, **backbone_kwargs)
        # what export_inference rebuilds the bare backbone from
        self.backbone_kwargs = dict(num_prompts=num_prompts, **backbone_kwargs)
        self.variant, self.tasks, self.prompts_per_task = variant, tasks, prompts_per_task
        self.tap_indices = list(self.dense_taps)
        taps = [self.feature_info[i] for i in self.tap_indices]
        width = self.num_features  # prompts and the pooled token leave with the last width
        context = HeadContext(taps=taps, width=width, label_size=label_size,
                              pose_slots=pose_slots, num_seg_classes=num_seg_classes,
                              drop=head_drop_rate)
        # each task builds its own head (training/tasks/); keys stay task_heads.<name>.*
        self.task_heads = nn.ModuleDict({t: get_task(t).build_head(context) for t in tasks})
        # one dropout on the tapped tokens, shared by the dense heads (the paper's
        # "upsample, dropout, concatenate"; once instead of once per head)
        self.tap_drop = nn.Dropout(head_drop_rate)

    def task_token(self, pooled: torch.Tensor, prompts: torch.Tensor, task: str) -> torch.Tensor:
        if self.variant == "mt":
            return pooled
        i = self.tasks.index(task) * self.prompts_per_task
        return prompts[:, i:i + self.prompts_per_task].mean(dim=1)

    def forward_train(self, x: torch.Tensor, tasks: bool = True) -> dict[str, torch.Tensor]:
        """``{"logits": [B, classes]}`` plus, when ``tasks``, one prediction per task."""
        need_taps = tasks and any(get_task(t).dense for t in self.tasks)
        tokens, taps = self.forward_intermediates(x, self.tap_indices if need_taps else None)
        if need_taps:  # a repeated index (shallow nets) appears once in taps
            by_index = dict(zip(sorted(set(self.tap_indices)), taps, strict=True))
            taps = [self.tap_drop(by_index[i]) for i in self.tap_indices]
        out = {"logits": self.forward_head(tokens)}
        if tasks and self.tasks:
            pooled, _, prompts = self.split_tokens(tokens)
            for task, head in self.task_heads.items():
                token = self.task_token(pooled, prompts, task)
                out[task] = get_task(task).predict(head, taps, token)
        return out


@lru_cache(maxsize=None)
def pvit_class(family: str) -> type[PromptonomyViT]:
    """``PromptonomyViT`` over the family's class (one class per family)."""
    base = get_family(family)
    return type(f"PromptonomyViT_{family}", (PromptonomyViT, base), {"family": family})


# --- registry -----------------------------------------------------------------------
_MODEL_ARGS: dict[str, dict[str, Any]] = {}


def register_model(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """``fn`` returns its family's arguments; ``family`` (default ``vit``) names it."""
    _MODEL_ARGS[fn.__name__] = {"family": "vit", **fn()}
    return fn


def list_models() -> list[str]:
    return sorted(_MODEL_ARGS)


def model_args(name: str) -> dict[str, Any]:
    if name not in _MODEL_ARGS:
        raise ValueError(f"model: unknown '{name}', choose from {list_models()}")
    return dict(_MODEL_ARGS[name])


def model_family(name: str) -> str:
    return model_args(name)["family"]


def create_model(name: str, **overrides: Any) -> PromptonomyViT:
    args = model_args(name)
    family = args.pop("family")
    return pvit_class(family)(**{**args, **overrides})


@register_model
def pvit_test() -> dict[str, Any]:
    """For tests: 32px clips of 8px patches, two blocks."""
    return dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, num_heads=2,
                mlp_ratio=2.0)


@register_model
def pvit_study() -> dict[str, Any]:
    """benchmarks/study.py's CPU size: 8 px patches (a 32 px frame is 4 x 4 of them), four
    blocks of width 64; ~0.2 M parameters, so that ~90 runs train on 2 cores in an hour."""
    return dict(img_size=32, patch_size=8, num_frames=8, embed_dim=64, depth=4, num_heads=4,
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


# VideoMAE's ViTs: fixed sin-cos positions, mean pooling + fc_norm, 2x16x16 tubelets
_VIDEOMAE = dict(patch_size=16, tubelet_size=2, pos_embed="sincos", global_pool="avg")


@register_model
def videomae_vit_s() -> dict[str, Any]:
    return dict(embed_dim=384, depth=12, num_heads=6, **_VIDEOMAE)


@register_model
def videomae_vit_b() -> dict[str, Any]:
    return dict(embed_dim=768, depth=12, num_heads=12, **_VIDEOMAE)


@register_model
def mvitv2_s() -> dict[str, Any]:
    """The paper's backbone: torchvision's MViTv2-S (16 blocks, 96 -> 768 channels)."""
    return dict(family="mvit")


@register_model
def mvitv2_test() -> dict[str, Any]:
    """For tests: the mvit family with 4 small blocks (torchvision's MViT class)."""
    return dict(family="mvit", arch="test", img_size=32, num_frames=4)
