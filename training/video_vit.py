"""Moved to ``training.backbones.vit`` (the ViT family); kept so old imports work."""

from training.backbones.vit import TubeletEmbed, VideoViT  # noqa: F401
