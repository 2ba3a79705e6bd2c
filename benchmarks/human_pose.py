"""Does the ``human_pose`` task learn? A 64-clip overfit run on real ``humanoid`` renders.

Renders ``--clips`` humanoid scenes with ``pvit generate`` (source domain, 1-3 actors,
cached in ``--work``: a rerun renders nothing), then pretrains a tiny PViT on them with
``tasks: [human_pose]`` for ``--epochs`` epochs, and reads the logged ``human_pose`` loss
from the run's ``metrics.jsonl``: the mean of its first and of its last logged steps.
The loss is scale-free (MSE per joint coordinate over the skeleton's squared size), so a
fall from ~0.02 means the predicted joints moved from about 14 % of the body's size off
to less.

Last line, one JSON object: ``human_pose_loss_first``, ``human_pose_loss_last``,
``fall_ratio`` (last / first), ``steps``, ``clips``, ``render_s``, ``train_s``.

    .venv/bin/python benchmarks/human_pose.py [--clips 64 --epochs 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/pvit-human-pose"))
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--window", type=int, default=5, help="logged steps averaged at each end")
    return p.parse_args(argv)


def render(args) -> tuple[Path, float]:
    out = args.work / "shards"
    config = args.work / "generate.yaml"
    args.work.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"generation": {
        "out": str(out), "scenes": args.clips, "scenes_per_shard": 16, "workers": 2,
        "scene": {"recipe": "humanoid", "resolution": args.resolution,
                  "frames": args.frames, "spp": 4, "min_objects": 1, "max_objects": 2}}}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "generate", str(config)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    shards, render_s = render(args)
    from training.config import PretrainConfig
    from training.train import run_pretrain

    run = args.work / f"run-{time.strftime('%H%M%S')}"
    cfg = PretrainConfig(model="pvit_test", synthetic=str(shards), out=str(run),
                         tasks=["human_pose"], num_frames=args.frames,
                         img_size=args.resolution, label_size=16, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, warmup_epochs=1.0,
                         num_workers=0, log_every=1, seed=0)
    t0 = time.perf_counter()
    run_pretrain(cfg)
    train_s = time.perf_counter() - t0
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss/human_pose"] for r in records
              if r.get("kind") == "step" and "loss/human_pose" in r]
    first = sum(losses[:args.window]) / args.window
    last = sum(losses[-args.window:]) / args.window
    result = {"human_pose_loss_first": round(first, 5), "human_pose_loss_last": round(last, 5),
              "fall_ratio": round(last / first, 4), "steps": len(losses), "clips": args.clips,
              "render_s": round(render_s, 1), "train_s": round(train_s, 1)}
    print(f"human_pose loss: {first:.4f} (first {args.window} steps) -> {last:.4f} (last "
          f"{args.window}), x{last / first:.3f} over {len(losses)} steps on {args.clips} clips")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
