"""The paper's Table 4a with its controls, over seeds, with intervals that say whether a
difference between variants is a real effect or the noise of a small validation set.

Variants (all fine-tuned jointly: real downstream clips + synthetic clips in each batch,
the paper's recipe, from the same initial weights, for the same steps on the same real
batches per seed):

- ``vit``: no prompts, no heads (skips the synthetic clips: it has no loss for them)
- ``mt``: task heads on the class token
- ``pvit``: one prompt token per task, heads on the prompts
- ``pvit_shuffled``: pvit with the synthetic labels shuffled across the clips of each
  batch: the same label statistics, no correspondence with the pixels
- ``prompts_only``: pvit's prompt tokens and synthetic clips, every synthetic loss
  weight 0: extra tokens and compute without synthetic supervision

Printed: per variant top-1 mean +- sd over seeds; per pair of variants the mean paired
difference (top-1 points) with a bootstrap 95% interval over validation clips (clips
resampled, the same draw for every seed, so the interval covers the clip sample and
the seeds' spread). An interval that contains 0 is no evidence of an effect. Last line:
one JSON object keyed by variant with ``top1_mean``, ``top1_sd``, ``top1_per_seed``
(and ``pairs``: the differences).

Data: the rendered shards of ``pvit generate`` (the experiment file's
``generation.out``, ``data/synthetic`` by default) when present; ``--drawn`` uses drawn
shards instead (fast, no Blender); the downstream set is the toy action set (real
encoded videos) written to the work dir unless ``--data-root`` names one. ``--config``
takes the experiment file's ``finetune`` section (model, clip size, epochs, data) as the
base, so the same command runs on a GPU at the paper's size.

    .venv/bin/python benchmarks/ablation.py --seeds 0 1            # rendered shards
    .venv/bin/python benchmarks/ablation.py --seeds 0 1 --drawn    # no rendering
    .venv/bin/python benchmarks/ablation.py --config configs/paper_ssv2.yaml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import FinetuneConfig  # noqa: E402
from training.drawn_clips import write_shards  # noqa: E402
from training.toy_actions import write_toy_actions  # noqa: E402
from training.train import run_finetune  # noqa: E402

VARIANTS = ("vit", "mt", "pvit", "pvit_shuffled", "prompts_only")
# toy size: a 2-block ViT on 32 px, 8-frame clips (the paper: MViTv2-S, 16 x 224)
TOY = dict(model="pvit_test", img_size=32, num_frames=8, tubelet_size=2, label_size=16,
           pose_slots=8, frame_stride=3, epochs=30, batch_size=8, lr=2e-3, warmup_epochs=1.0,
           dropout=0.1, drop_path=0.0, num_workers=0, log_every=10, synthetic_ratio=1.0,
           data_format="list")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--config", type=Path, default=None,
                   help="experiment YAML whose finetune section is the base (default: toy)")
    p.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    p.add_argument("--shards", type=Path, default=None, help="synthetic dataset (rendered)")
    p.add_argument("--drawn", action="store_true",
                   help="train on drawn synthetic shards instead of rendered ones")
    p.add_argument("--data-root", type=Path, default=None, help="downstream data root")
    p.add_argument("--data-format", default=None, choices=["ssv2", "list"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    return p.parse_args(argv)


def _rendered_shards(args) -> str:
    """The dataset ``pvit generate`` wrote for this experiment; exit 2 if there is none."""
    if args.shards is not None:
        where = args.shards
    else:
        from flows.experiment import load_experiment
        where = Path(load_experiment(args.config).generation.out)
    if not (Path(where) / "manifest.json").is_file():
        sys.exit(f"error: no rendered dataset at {where} (no manifest.json): run "
                 "`pvit generate configs/demo.yaml`, pass --shards DIR, or --drawn")
    return str(where)


def base_config(args, work: Path) -> dict:
    if args.config is not None:
        from flows.experiment import load_experiment
        base = load_experiment(args.config).require("finetune").model_dump()
    else:
        base = dict(TOY)
    base["init"] = None  # every variant starts from the same seeded initialisation
    if args.epochs:
        base["epochs"] = args.epochs
    if args.drawn:
        base["synthetic"] = str(write_shards(work / "shards", shards=4, clips_per_shard=12,
                                             frames=16, size=48))
    else:
        base["synthetic"] = _rendered_shards(args)
    if args.data_root:
        base["data_root"] = str(args.data_root)
        base["data_format"] = args.data_format or base.get("data_format", "list")
    elif args.config is None:
        toy = write_toy_actions(work / "toy", clips_per_class=12, val_per_class=6, size=48,
                                frames=24, seed=0)
        base["data_root"] = toy["list_root"]
    return base


def variant_config(base: dict, variant: str, seed: int, out: Path) -> FinetuneConfig:
    fields = {**base, "seed": seed, "out": str(out / f"seed{seed}" / variant)}
    if variant in ("vit", "mt", "pvit"):
        fields["variant"] = variant
    elif variant == "pvit_shuffled":
        fields.update(variant="pvit", shuffle_synthetic_labels=True)
    elif variant == "prompts_only":
        weights = dict(base.get("loss_weights") or {})
        tasks = base.get("tasks") or FinetuneConfig.model_fields["tasks"].default_factory()
        weights.update({task: 0.0 for task in tasks})
        fields.update(variant="pvit", loss_weights=weights)
    return FinetuneConfig(**fields)


def shared_init_matches(base: dict, variants: list[str], seed: int) -> bool:
    """The backbone weights every variant starts from are the same tensors: the
    comparison is between recipes, not between initialisations."""
    from training.model import create_model
    states = []
    for variant in variants:
        cfg = variant_config(base, variant, seed, Path("unused"))
        torch.manual_seed(seed)
        model = create_model(cfg.model, **cfg.model_kwargs(num_classes=4, num_seg_classes=4))
        states.append(model.state_dict())
    shared = set.intersection(*(set(s) for s in states))
    shared = {k for k in shared if all(s[k].shape == states[0][k].shape for s in states)}
    shared = {k for k in shared if not k.startswith(("task_heads.", "prompt_tokens"))}
    return bool(shared) and all(torch.equal(s[k], states[0][k]) for s in states for k in shared)


def paired(correct: dict[str, np.ndarray], a: str, b: str, resamples: int,
           rng: np.random.Generator) -> dict:
    """Mean paired top-1 difference a - b (points) and its bootstrap 95% interval.

    ``correct[v]`` is [seeds, clips] of 0/1; clips are resampled with one draw shared by
    all seeds and both variants (the pairing), seeds are averaged inside each draw."""
    diff = correct[a].astype(float) - correct[b].astype(float)  # [seeds, clips]
    clips = diff.shape[1]
    draws = rng.integers(0, clips, size=(resamples, clips))
    boot = diff[:, draws].mean(axis=(0, 2)) * 100.0  # [resamples]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(diff.mean() * 100.0), "ci95": [float(lo), float(hi)]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        base = base_config(args, work)
        same_init = all(shared_init_matches(base, args.variants, s) for s in args.seeds)
        top1: dict[str, list[float]] = {v: [] for v in args.variants}
        correct: dict[str, list[np.ndarray]] = {v: [] for v in args.variants}
        steps: dict[str, set[int]] = {v: set() for v in args.variants}
        for seed, variant in itertools.product(args.seeds, args.variants):
            summary = run_finetune(variant_config(base, variant, seed, work))
            top1[variant].append(summary["top1"])
            correct[variant].append(np.asarray(summary["val_correct"], dtype=np.int8))
            steps[variant].add(summary["steps"])
    arrays = {v: np.stack(c) for v, c in correct.items()}
    rng = np.random.default_rng(0)
    pairs = {f"{a}-{b}": paired(arrays, a, b, args.bootstrap, rng)
             for a, b in itertools.combinations(args.variants, 2)}
    results = {v: {"top1_mean": float(np.mean(t)),
                   "top1_sd": float(np.std(t, ddof=1)) if len(t) > 1 else 0.0,
                   "top1_per_seed": [float(x) for x in t]} for v, t in top1.items()}
    clips = next(iter(arrays.values())).shape[1]
    print(f"model {base['model']}, {base['num_frames']} x {base['img_size']} px, "
          f"{base['epochs']} epochs, batch {base['batch_size']} real "
          f"+ {round(base['batch_size'] * base['synthetic_ratio'])} synthetic; "
          f"seeds {args.seeds}; {clips} validation clips; synthetic: {base['synthetic']}")
    print(f"steps per variant: { {v: sorted(s) for v, s in steps.items()} }; "
          f"same initial backbone weights: {same_init}")
    print(f"{'variant':<14} {'top-1 mean':>10} {'sd':>6}  per seed")
    for variant, r in results.items():
        seeds = " ".join(f"{x:5.1f}" for x in r["top1_per_seed"])
        print(f"{variant:<14} {r['top1_mean']:10.1f} {r['top1_sd']:6.1f}  {seeds}")
    print(f"{'pair':<30} {'diff':>7}  95% interval (bootstrap over clips)")
    for name, p in pairs.items():
        print(f"{name:<30} {p['diff']:+7.1f}  [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]")
    results["pairs"] = pairs
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
