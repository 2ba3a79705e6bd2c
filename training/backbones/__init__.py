"""Backbone families, registered by name (as timm registers its architectures).

A family is an ``nn.Module`` class that takes ``num_prompts`` (task prompt tokens) plus
its own architecture arguments, and exposes one contract that the PViT wrapper, the
task heads and the exporter rely on instead of any family's internals:

- ``forward_features(x)``: clip ``[B, 3, T, H, W]`` -> final normed tokens
  ``[B, num_prefix_tokens + N, C]``, prefix first (class token if any, then prompts);
- ``forward_intermediates(x, indices)``: those tokens plus the patch tokens
  ``[B, N_i, C_i]`` after each block in ``indices``;
- ``forward_head(tokens, pre_logits=False)``; ``pool(tokens)``: the ``[B, C]`` feature
  the classifier reads; ``split_tokens(tokens)`` -> pooled, patches, prompts;
- ``num_prefix_tokens`` (class token + prompts), ``num_prompts``, ``num_features``,
  ``num_classes``, ``prompt_tokens`` (a parameter or None), ``no_weight_decay()``,
  ``get_classifier()``, ``reset_classifier(n)``;
- ``feature_info``: one ``FeatureInfo`` per block (channels, token grid, stride), and
  ``dense_taps``: the blocks the dense heads read (the paper's layers 2, 12, 15 of 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import nn

T = TypeVar("T", bound=type[nn.Module])


@dataclass(frozen=True)
class FeatureInfo:
    """What block ``index`` outputs: ``channels`` per token on a ``grid`` of (t, h, w)
    patch tokens, each covering ``stride`` (frames, pixels, pixels) of the input clip."""

    index: int
    channels: int
    grid: tuple[int, int, int]
    stride: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def dense_tap_indices(depth: int) -> list[int]:
    """0-based blocks whose patch tokens feed the dense heads: the paper's layers 2, 12
    and 15 of 16, scaled to ``depth``."""
    return [max(0, round(depth * k / 16) - 1) for k in (2, 12, 15)]


class PromptBackbone(nn.Module):
    """What the families share: the token order ``[class token?, prompts, patches]`` and
    the block loop that taps intermediate patch tokens. A family says how a clip becomes
    its first tokens (``_embed``) and how one block runs (``_block``: MViT's blocks also
    carry the token grid, which pooling shrinks)."""

    num_class_tokens: int = 1
    num_prompts: int = 0

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_class_tokens + self.num_prompts

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Clip ``[B, 3, T, H, W]`` -> (tokens with the prefix, state for ``_block``)."""
        raise NotImplementedError

    def _block(self, blk: nn.Module, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return blk(x), state

    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normed tokens ``[B, prefix+N, C]`` and the patch tokens ``[B, N_i, C_i]``
        after each block in ``indices`` (0-based, in block order, each once; not normed)."""
        take = set(indices or ())
        x, state = self._embed(x)
        p = self.num_prefix_tokens
        intermediates = []
        for i, blk in enumerate(self.blocks):
            x, state = self._block(blk, x, state)
            if i in take:
                intermediates.append(x[:, p:])
        return self.norm(x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input ``[B, C]``: the class token (families without one
        override this)."""
        return x[:, 0]

    def split_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, prefix+N, C]`` -> pooled ``[B, C]``, patches ``[B, N, C]``, prompts
        ``[B, P, C]``."""
        p, c = self.num_prefix_tokens, self.num_class_tokens
        return self.pool(x), x[:, p:], x[:, c:p]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_FAMILIES: dict[str, type[nn.Module]] = {}


def register_family(name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        _FAMILIES[name] = cls
        cls.family = name
        return cls
    return add


def get_family(name: str) -> type[nn.Module]:
    if name not in _FAMILIES:
        raise ValueError(f"family: unknown '{name}', choose from {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    return sorted(_FAMILIES)


# the families register themselves on import
from training.backbones import mvit, vit  # noqa: E402,F401
