"""benchmarks/study.py, the controlled study's harness: its statistics against known
answers, its choices made on validation only, and one tiny end-to-end run on the suite's
shared data (drawn synthetic shards, the toy action set: no Blender here; the study's
render step is two `pvit` commands tested with the commands)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study  # noqa: E402


def test_bootstrap_interval_of_a_constant_is_the_constant():
    ones = np.ones((5, 40))
    assert study.bootstrap(ones, 200, np.random.default_rng(0)) == [100.0, 100.0]


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_clips():
    rng = np.random.default_rng(3)
    few = (rng.random((5, 20)) < 0.6).astype(float)
    many = (rng.random((5, 2000)) < 0.6).astype(float)
    lo, hi = study.bootstrap(few, 500, np.random.default_rng(0))
    assert lo < 100 * few.mean() < hi
    lo2, hi2 = study.bootstrap(many, 500, np.random.default_rng(0))
    assert lo2 < 60 < hi2 and hi2 - lo2 < (hi - lo) / 4


def _runs(correct: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    return {v: [{"seed": s, "test_correct": row.tolist(), "val_correct": row.tolist(),
                 "tasks": ["depth"], "steps": 10} for s, row in enumerate(c)]
            for v, c in correct.items()}


def test_paired_difference_is_paired_by_seed_and_clip():
    rng = np.random.default_rng(1)
    base = (rng.random((5, 50)) < 0.5).astype(int)
    better = base.copy()
    better[:, :10] = 1  # the first 10 clips always right
    runs = _runs({"a": better, "b": base})
    p = study.paired(runs, "a", "b", 500)
    assert p["diff"] == pytest.approx(100 * (better - base).mean())
    assert p["ci95"][0] >= 0  # a is never worse on any clip: no draw can go below 0
    same = study.paired(runs, "b", "b", 200)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_best_tasks_are_chosen_on_validation():
    args = study.parse_args(["--tasks", "depth", "normals", "segmentation"])
    val = {"vit": 40.0, "pvit_depth": 45.0, "pvit_normals": 39.0, "pvit_segmentation": 41.0}
    assert study.best_tasks(args, val) == ["depth", "segmentation"]
    worse = {"vit": 50.0, "pvit_depth": 45.0, "pvit_normals": 49.0, "pvit_segmentation": 41.0}
    assert study.best_tasks(args, worse) == ["normals"]


def test_every_variant_is_a_valid_run_on_the_same_schedule(tmp_path):
    args = study.parse_args(["--work", str(tmp_path)])
    data = {"list_root": str(tmp_path), "synthetic": {1: "s1", 2: "s2", 4: "s4"}}
    from training.config import FinetuneConfig
    base = study.base_fields(args, data, 1e-3, 0)
    variants = study.variants_of(args)
    assert {"vit", "mt", "pvit", "pvit_shuffled", "prompts_only", "pvit_human_pose",
            "pvit_pretrain", "pvit_synth0x", "pvit_synth4x"} <= set(variants)
    for variant in variants:
        fields = {**base, **study.variant_fields(variant, args, data, [])}
        cfg = FinetuneConfig(**fields, out=str(tmp_path / variant))
        # what is compared is the recipe: the same model, schedule and real batches
        assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed) == \
            (args.model, args.epochs, args.batch_size, 1e-3, 0)
    shuffled = study.variant_fields("pvit_shuffled", args, data, [])
    assert shuffled["shuffle_synthetic_labels"] and shuffled["synthetic"] == "s1"
    assert study.variant_fields("pvit_synth4x", args, data, [])["synthetic"] == "s4"
    assert study.variant_fields("pvit_synth0x", args, data, [])["synthetic_ratio"] == 0.0
    assert set(study.variant_fields("prompts_only", args, data, [])["loss_weights"].values()) \
        == {0.0}


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, toy_set, shard_dir):
    # the toy set has train and validation splits; its validation doubles as the test
    # split here (the study's own set has a separate one)
    root = tmp_path / "toy"
    shutil.copytree(toy_set["list_root"], root)
    shutil.copy(root / "validation.txt", root / "test.txt")
    doc = tmp_path / "doc" / "science.md"
    argv = ["--quick", "--work", str(tmp_path / "work"), "--doc", str(doc),
            "--data-root", str(root), "--synthetic", str(shard_dir),
            "--tasks", "depth", "segmentation", "--variants", "vit", "mt", "pvit",
            "--bootstrap", "200", "--jobs", "1"]
    result = study.main(argv)
    for variant in ("vit", "mt", "pvit", "pvit_best"):
        r = result[variant]
        assert len(r["top1_per_seed"]) == 2
        assert r["top1_mean"] == pytest.approx(np.mean(r["top1_per_seed"]), abs=0.01)
        assert r["top1_ci95"][0] <= r["top1_mean"] <= r["top1_ci95"][1]
    for key in ("pvit_minus_vit", "pvit_minus_mt"):
        p = result[key]
        assert p["ci95"][0] <= p["diff"] <= p["ci95"][1]
        assert p["diff"] == pytest.approx(result[key.split("_minus_")[0]]["top1_mean"]
                                          - result[key.split("_minus_")[1]]["top1_mean"],
                                          abs=0.02)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "work" / "runs").glob("*/study.json")]
    assert len({r["steps"] for r in runs}) == 1  # equal steps for every variant
    text = doc.read_text()
    assert "pvit − vit" in text and "| `pvit` |" in text
    for png in ("science_variants.png", "science_synthetic.png"):
        assert (doc.parent / "images" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun trains nothing: every run's result is kept
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "runs").rglob("*.json")}
    assert study.main(argv)["pvit"] == result["pvit"]
    assert before == {p: p.stat().st_mtime_ns
                      for p in (tmp_path / "work" / "runs").rglob("*.json")}
