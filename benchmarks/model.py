"""Model benchmark: what prompts and heads cost, and whether the loader keeps up.

Measured side by side in one run, on one machine, so only ratios are compared:
- training-step time of ``pvit`` (prompts + task heads + all losses; half the batch
  synthetic, as in joint training) / ``vit`` (same backbone, action loss only).
  Goal <= 1.10 (the paper: 142.8 / 132.2 ms = 1.08).
- inference time of the exported ``pvit`` (heads dropped, prompts kept) / the backbone
  alone. Goal <= 1.02.
- clips/s of the synthetic webdataset loader / clips/s a ``pvit`` training step
  consumes. Goal >= 3 (the loader never starves training).
Runs are interleaved (vit, pvit, vit, ...) and the median is kept, so drift in machine
load hits both sides. The last line printed is one JSON object.

    .venv/bin/python benchmarks/model.py                   # ViT-Ti, 16 x 224, CPU or GPU
    .venv/bin/python benchmarks/model.py --img-size 64 --frames 8 --batch 8   # quick
    .venv/bin/python benchmarks/model.py --model mvitv2_s --repeats 3   # the paper's backbone

``--model`` takes any registered name (``training.model.list_models()``): the two sides
are the same family, built by ``create_model`` with ``variant`` vit and pvit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.dataset.shard_format import CLASSES  # noqa: E402
from training.convert import export_inference  # noqa: E402
from training.drawn_clips import make_clip, write_shards  # noqa: E402
from training.losses import compute_losses  # noqa: E402
from training.model import create_model  # noqa: E402
from training.synthetic_data import SceneTransform, shard_urls, synthetic_batches  # noqa: E402
from training.tasks import default_tasks, get_task, target_keys, task_names  # noqa: E402

POSE_SLOTS = 8


def loss_weights(tasks: list[str]) -> dict[str, float]:
    """Each task's default (the paper's) weight, from its module, plus the action loss."""
    return {**{name: get_task(name).weight for name in tasks}, "action": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pvit_tiny", help="a registered model, e.g. mvitv2_s")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--label-size", type=int, default=56)
    p.add_argument("--batch", type=int, default=2, help="clips per training step")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    p.add_argument("--shards", type=Path, default=None,
                   help="shard directory for the loader (default: drawn clips in a temp dir)")
    p.add_argument("--shard-res", type=int, default=256, help="drawn clips' frame size")
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--loader-batches", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=default_tasks(), choices=task_names(),
                   help="synthetic tasks of the pvit side [default: the registry's defaults]")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(args, device, num_classes=10):
    g = torch.Generator().manual_seed(0)
    b, t, s = args.batch, args.frames, args.img_size
    half = max(1, b // 2)
    video = torch.randn(b, 3, t, s, s, generator=g).to(device)
    real_targets = {"label": torch.randint(0, num_classes, (b,), generator=g).to(device),
                    "synthetic": torch.zeros(b, dtype=torch.bool, device=device)}
    # every task's targets as training builds them (training.tasks), from drawn clips
    transform = SceneTransform(num_frames=t, img_size=s, label_size=args.label_size,
                               depth_max_m=20.0, pose_slots=POSE_SLOTS, train=False,
                               tasks=tuple(args.tasks))
    samples = [transform(make_clip(f"bench{i}", seed=i, frames=t, size=max(s, 4 * t)))
               for i in range(half)]
    joint = {  # the paper's joint batch: real clips first, then synthetic ones
        "label": torch.cat([real_targets["label"][:b - half], torch.full((half,), -1)]).to(device),
        "synthetic": torch.arange(b, device=device) >= b - half,
        **{k: torch.stack([x[k] for x in samples]).to(device) for k in target_keys(args.tasks)},
    }
    return video, real_targets, joint


def time_calls(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved round-robin."""
    for fn in fns.values():  # warm-up (allocator, kernels, autotuning)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    torch.manual_seed(0)
    common = dict(num_frames=args.frames, img_size=args.img_size, num_classes=10,
                  label_size=args.label_size, pose_slots=POSE_SLOTS,
                  num_seg_classes=len(CLASSES))
    vit = create_model(args.model, variant="vit", **common).to(device)
    pvit = create_model(args.model, variant="pvit", tasks=args.tasks, **common).to(device)
    video, real_targets, joint = make_inputs(args, device)
    opt_vit = torch.optim.AdamW(vit.parameters(), lr=1e-5)
    opt_pvit = torch.optim.AdamW(pvit.parameters(), lr=1e-5)

    weights = loss_weights(args.tasks)

    def step(model, optimizer, targets):
        def run():
            with autocast:
                out = model.forward_train(video)
            loss, _ = compute_losses({k: v.float() for k, v in out.items()}, targets, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return run

    vit.train(), pvit.train()
    train = time_calls({"vit": step(vit, opt_vit, real_targets),
                        "pvit": step(pvit, opt_pvit, joint)}, args.repeats, device)

    backbone, exported = export_inference(vit).to(device), export_inference(pvit).to(device)

    def infer(model):
        @torch.no_grad()
        def run():
            with autocast:
                model(video)
        return run

    infer_times = time_calls({"backbone": infer(backbone), "exported": infer(exported)},
                             args.repeats * 2, device)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_shards(Path(tmp) / "shards", shards=4, clips_per_shard=6,
                                             frames=max(args.frames, 16), size=args.shard_res)
        transform = SceneTransform(num_frames=args.frames, img_size=args.img_size,
                                   label_size=args.label_size, depth_max_m=20.0,
                                   pose_slots=POSE_SLOTS, tasks=tuple(args.tasks))
        batches = synthetic_batches(shard_urls(shards), transform, batch_size=args.batch, seed=0,
                                    epoch=0, shuffle_buffer=8, num_workers=args.workers)
        next(batches)  # workers started, first shard open
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            next(batches)
        loader_cps = args.loader_batches * args.batch / (time.perf_counter() - start)
        del batches  # stops the loader workers

    def count(m):
        return sum(p.numel() for p in m.parameters())

    train_cps = args.batch / train["pvit"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu x{torch.get_num_threads()} threads",
        "model": args.model, "img_size": args.img_size, "num_frames": args.frames,
        "batch": args.batch,
        "train_step_ms_vit": 1000 * train["vit"], "train_step_ms_pvit": 1000 * train["pvit"],
        "train_step_ratio_pvit_vs_vit": train["pvit"] / train["vit"],
        "inference_ms_backbone": 1000 * infer_times["backbone"],
        "inference_ms_exported": 1000 * infer_times["exported"],
        "inference_ratio_vs_backbone": infer_times["exported"] / infer_times["backbone"],
        "loader_clips_per_s": loader_cps, "train_clips_per_s": train_cps,
        "loader_vs_step_ratio": loader_cps / train_cps,
        "params_train_pvit_M": count(pvit) / 1e6, "params_inference_pvit_M": count(exported) / 1e6,
        "params_backbone_M": count(backbone) / 1e6,
    }
    print(f"device: {result['device']}; {args.model}, {args.frames} x {args.img_size} px, "
          f"batch {args.batch}")
    print(f"train step   vit {result['train_step_ms_vit']:8.1f} ms   pvit "
          f"{result['train_step_ms_pvit']:8.1f} ms   ratio "
          f"{result['train_step_ratio_pvit_vs_vit']:.3f} (goal <= 1.10)")
    print(f"inference    backbone {result['inference_ms_backbone']:8.1f} ms   exported "
          f"{result['inference_ms_exported']:8.1f} ms   ratio "
          f"{result['inference_ratio_vs_backbone']:.3f} (goal <= 1.02)")
    print(f"loader {loader_cps:.1f} clips/s vs training {train_cps:.2f} clips/s: ratio "
          f"{result['loader_vs_step_ratio']:.1f} (goal >= 3)")
    print(f"params (M): pvit train {result['params_train_pvit_M']:.2f}, inference "
          f"{result['params_inference_pvit_M']:.2f}, backbone {result['params_backbone_M']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
