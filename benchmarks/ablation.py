"""The paper's Table 4a at toy size: ``vit`` vs ``mt`` vs ``pvit``, same budget and seed.

Each variant is fine-tuned jointly (real downstream clips + synthetic clips mixed in
each batch, the paper's recipe; ``vit`` has no synthetic loss so it skips them) from
the same initial weights, then scored on the validation split. Printed: top-1/top-5,
train/test parameters and time per training step (data included).

At the defaults it runs on a 2-core CPU in a few minutes on drawn synthetic shards and
the toy action set, both written to a temp dir. Scale it by config: ``--config EXP``
takes the experiment file's ``finetune`` section (model, clip size, epochs, data) as
the base, and ``--shards`` / ``--data-root`` point at real data. Last line: one JSON
object keyed by variant.

    .venv/bin/python benchmarks/ablation.py
    .venv/bin/python benchmarks/ablation.py --config configs/demo.yaml --shards data/synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import FinetuneConfig  # noqa: E402
from training.drawn_clips import write_shards  # noqa: E402
from training.toy_actions import write_toy_actions  # noqa: E402
from training.train import run_finetune  # noqa: E402

VARIANTS = ("vit", "mt", "pvit")
# toy size: a 2-block ViT on 32 px, 8-frame clips (the paper: MViTv2-S, 16 x 224)
TOY = dict(model="pvit_test", img_size=32, num_frames=8, tubelet_size=2, label_size=16,
           pose_slots=4, frame_stride=3, epochs=40, batch_size=8, lr=2e-3, warmup_epochs=1.0,
           dropout=0.1, drop_path=0.0, num_workers=0, log_every=10, synthetic_ratio=1.0,
           data_format="list")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=None,
                   help="experiment YAML whose finetune section is the base (default: toy)")
    p.add_argument("--out", type=Path, default=None, help="run dirs (default: a temp dir)")
    p.add_argument("--shards", type=Path, default=None, help="synthetic shard directory")
    p.add_argument("--data-root", type=Path, default=None, help="downstream data root")
    p.add_argument("--data-format", default=None, choices=["ssv2", "list"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def base_config(args, work: Path) -> dict:
    if args.config is not None:
        from flows.experiment import load_experiment
        base = load_experiment(args.config).require("finetune").model_dump()
    else:
        base = dict(TOY)
    base["init"] = None  # every variant starts from the same seeded initialisation
    base["seed"] = args.seed
    if args.epochs:
        base["epochs"] = args.epochs
    if args.shards:
        base["synthetic"] = str(args.shards)
    elif args.config is None:
        base["synthetic"] = str(write_shards(work / "shards", shards=4, clips_per_shard=12,
                                             frames=16, size=48))
    if args.data_root:
        base["data_root"] = str(args.data_root)
        base["data_format"] = args.data_format or base.get("data_format", "list")
    elif args.config is None:
        toy = write_toy_actions(work / "toy", clips_per_class=12, val_per_class=4, size=48,
                                frames=24, seed=args.seed)
        base["data_root"] = toy["list_root"]
    return base


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        base = base_config(args, work)
        results = {}
        for variant in VARIANTS:
            cfg = FinetuneConfig(**{**base, "variant": variant, "out": str(work / variant)})
            summary = run_finetune(cfg)
            results[variant] = {
                "top1": summary["top1"], "top5": summary["top5"],
                "params_train_M": summary["params_train"] / 1e6,
                "params_test_M": summary["params_inference"] / 1e6,
                "step_ms": 1000 * summary["step_time_s"], "steps": summary["steps"],
                "final_losses": summary["losses"],
            }
    print(f"model {base['model']}, {base['num_frames']} x {base['img_size']} px, "
          f"{base['epochs']} epochs, batch {base['batch_size']} real "
          f"+ {round(base['batch_size'] * base['synthetic_ratio'])} synthetic, seed {args.seed}")
    print(f"{'variant':<8} {'top-1':>6} {'top-5':>6} {'params train/test (M)':>22} "
          f"{'step (ms)':>10}")
    for variant, r in results.items():
        print(f"{variant:<8} {r['top1']:6.1f} {r['top5']:6.1f} "
              f"{r['params_train_M']:10.3f} / {r['params_test_M']:.3f} {r['step_ms']:10.1f}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
