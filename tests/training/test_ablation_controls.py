"""The ablation's controls: shuffled synthetic labels, same initial weights per variant,
and the paired bootstrap that says whether a difference is more than noise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from training.model import create_model
from training.train import _assemble, _label_shuffle

ROOT = Path(__file__).resolve().parents[2]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synth(n=8):
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.randn(n, 3, 2, 8, 8, generator=g)}
    from training.tasks import target_keys
    for key in target_keys():
        batch[key] = torch.arange(n).view(n, *([1] * 2)).expand(n, 2, 3).float() + 0.5
    return batch


def test_shuffled_labels_move_between_clips_and_the_clips_stay():
    synth = _synth()
    cfg = SimpleNamespace(shuffle_synthetic_labels=True, seed=3)
    perm = _label_shuffle(cfg, synth, step=5)
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    assert torch.equal(perm, _label_shuffle(cfg, synth, step=5))  # same seed, same pairing
    assert not torch.equal(perm, _label_shuffle(cfg, synth, step=6))
    video, targets = _assemble(None, synth, torch.device("cpu"), perm)
    assert torch.equal(video, synth["video"])  # the pixels are not reordered
    for key in targets:
        if key in synth:
            assert torch.equal(targets[key], synth[key][perm])
    plain = SimpleNamespace(shuffle_synthetic_labels=False, seed=3)
    assert _label_shuffle(plain, synth, step=5) is None


def test_every_variant_starts_from_the_same_backbone():
    kwargs = dict(num_frames=4, img_size=32, tubelet_size=2, num_classes=5, label_size=8,
                  num_seg_classes=4)
    states = {}
    for variant in ("vit", "mt", "pvit"):
        torch.manual_seed(11)
        tasks = [] if variant == "vit" else ["depth", "normals", "segmentation", "pose"]
        states[variant] = create_model("pvit_test", variant=variant, tasks=tasks,
                                       **kwargs).state_dict()
    backbone = [k for k in states["vit"]]
    assert "blocks.0.attn.qkv.weight" in backbone
    for variant in ("mt", "pvit"):
        for key in backbone:
            assert torch.equal(states[variant][key], states["vit"][key]), (variant, key)


def test_paired_bootstrap_interval():
    ablation = _ablation()
    rng = np.random.default_rng(0)
    same = np.array([[1, 0, 1, 1, 0, 1]] * 2)
    equal = ablation.paired({"a": same, "b": same.copy()}, "a", "b", 500, rng)
    assert equal == {"diff": 0.0, "ci95": [0.0, 0.0]}
    right, wrong = np.ones((2, 40), int), np.zeros((2, 40), int)
    assert ablation.paired({"a": right, "b": wrong}, "a", "b", 500, rng)["diff"] == 100.0
    # one clip of 40 apart: an interval that contains 0, so no evidence of an effect
    near = right.copy()
    near[:, 0] = 0
    result = ablation.paired({"a": right, "b": near}, "a", "b", 2000, rng)
    assert result["diff"] == 2.5 and result["ci95"][0] <= 0.0 <= result["ci95"][1]
