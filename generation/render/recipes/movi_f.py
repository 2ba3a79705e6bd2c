"""MOVi-F-style scene: ``movi_e`` with Cycles motion blur (``SceneConfig.shutter``,
in frames, centred on each frame). The scene is ``movi_e``'s for the same seed, draw
for draw; only the RGB is blurred: every label is for the shutter's centre, the
frame's time (``procedural_blender.apply_motion_blur``)."""

from __future__ import annotations

import dataclasses

import kubric as kb
import numpy as np

from generation.render.recipes import movi_e
from generation.render.recipes.movi import SceneContent


def build(scene: kb.Scene, cfg, rng: np.random.RandomState, assets: kb.AssetSource,
          asset_ids: list[str]) -> SceneContent:
    content = movi_e.build(scene, cfg, rng, assets, asset_ids)
    return dataclasses.replace(content, motion_blur_shutter=cfg.shutter)
