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
from typing import Callable, TypeVar

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
