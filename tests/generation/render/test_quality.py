"""``scene.quality``: a preset sets spp / denoise / adaptive (and is hashed with them),
and changes the RGB only: every label array of a real render stays byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from generation.config import QUALITY_PRESETS, SceneConfig


def test_preset_sets_the_sampling_fields_and_the_hash():
    custom = SceneConfig()
    assert (custom.quality, custom.spp, custom.denoise, custom.adaptive) == \
        ("custom", 16, False, False)            # the default spec renders what it did
    for name, preset in QUALITY_PRESETS.items():
        cfg = SceneConfig(quality=name)
        assert {k: getattr(cfg, k) for k in preset} == preset
        # the same sampling given by hand is another spec: the preset is recorded too
        assert cfg.digest() != SceneConfig(**preset).digest()
        assert SceneConfig(quality=name, spp=preset["spp"]).spp == preset["spp"]
    standard = QUALITY_PRESETS["standard"]
    with pytest.raises(ValidationError, match="quality 'standard' sets spp; leave them out"):
        SceneConfig(quality="standard", spp=standard["spp"] + 1)
    with pytest.raises(ValidationError, match="quality"):
        SceneConfig(quality="best")
    # a spec round-trips (a manifest's spec is validated again when a dataset is resumed)
    cfg = SceneConfig(quality="draft")
    assert SceneConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.blender
def test_labels_do_not_depend_on_the_preset():
    from generation.render.scene import render_clip

    clips = {}
    for name in ("draft", "standard"):
        cfg = SceneConfig(quality=name, resolution=32, frames=2, min_objects=3,
                          max_objects=3, flow=True, tracks=16)
        clips[name], _ = render_clip(cfg, seed=4, key="q")
    draft, other = clips["draft"], clips["standard"]
    assert not np.array_equal(draft["rgb"], other["rgb"])
    # both converge to the same image: the presets differ by noise, not by content
    diff = np.abs(draft["rgb"].astype(float) - other["rgb"].astype(float)).mean()
    assert 0 < diff < 12
    arrays = [k for k in draft if k not in ("key", "rgb", "meta", "instances")]
    assert {"depth", "instance_seg", "normal", "forward_flow", "tracks_2d"} <= set(arrays)
    for key in arrays:
        assert np.array_equal(draft[key], other[key]), key
    for key, value in draft["instances"].items():
        assert np.array_equal(value, other["instances"][key]), key
    assert draft["meta"] == other["meta"]
