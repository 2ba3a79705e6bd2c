"""Rendering throughput, measured side by side in one run on the same scenes.

1. ``pvit generate``: the whole command (Prefect flow, one worker process per shard
   rendering every scene of it, shards written and verified by checksum).
2. A bare Kubric script run the way Kubric's own workers run: one process per scene,
   writing Kubric's per-frame layer files (``kb.write_image_dict``). Kubric's renderer
   needs this project's Blender 4.5 fixes to run at all, so it uses ``Blender45``.
3. Label overhead: the same scenes rendered in one process with the label passes
   (Z, Normal, Cryptomatte on the auxiliary view layer) and with RGB only.

Prints a table and, on its last line, one JSON object:
``sec_per_frame``, ``sec_per_frame_kubric``, ``ratio_vs_kubric``, ``label_overhead_ratio``.

    .venv/bin/python benchmarks/render.py [--scenes 8 --frames 8 --resolution 128 --spp 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

BARE_KUBRIC_WORKER = textwrap.dedent("""
    import sys, time, numpy as np
    import kubric as kb
    from generation.config import SceneConfig
    from generation.kubric_compat import Blender45
    from generation.recipes import get_recipe
    from generation.assets import load_manifest
    cfg = SceneConfig.model_validate_json(sys.argv[1]); seed = int(sys.argv[2]); out = sys.argv[3]
    scene = kb.Scene(resolution=(cfg.resolution,) * 2, frame_start=1, frame_end=cfg.frames,
                     frame_rate=cfg.fps, step_rate=240)
    renderer = Blender45(scene, samples_per_pixel=cfg.spp, use_denoising=cfg.denoise)
    ids = sorted(load_manifest(cfg.asset_manifest)["assets"])
    with kb.AssetSource.from_manifest(str(cfg.asset_manifest)) as src:
        get_recipe(cfg.recipe)(scene, cfg, np.random.RandomState(seed), src, ids)
        data = renderer.render(return_layers=("rgba", "depth", "segmentation", "normal"))
    kb.write_image_dict(data, kb.as_path(out))
""")

LABEL_OVERHEAD = textwrap.dedent("""
    import json, sys
    from generation.config import SceneConfig
    from generation.render_scene import render_clip
    cfg = SceneConfig.model_validate_json(sys.argv[1]); seeds = json.loads(sys.argv[2])
    render_clip(cfg, seeds[0], "warmup", labels_on=True)
    times = {"labels": 0.0, "rgb": 0.0}
    for seed in seeds:           # interleaved, so drift hits both equally
        for mode in ("rgb", "labels"):
            _, t = render_clip(cfg, seed, "s", labels_on=(mode == "labels"))
            times[mode] += t["render_s"]
    print("RESULT " + json.dumps(times), flush=True)
""")


def run(cmd: list[str], **kwargs) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, **kwargs)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--spp", type=int, default=16)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from generation.config import GenerationConfig
    from generation.dataset import plan

    scene = {"resolution": args.resolution, "frames": args.frames, "spp": args.spp}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = {"out": str(tmp / "ds"), "scenes": args.scenes, "scenes_per_shard": args.scenes,
               "workers": 1, "scene": scene}
        (tmp / "c.yaml").write_text(yaml.safe_dump({"generation": gen}))
        cfg = GenerationConfig.model_validate(gen)
        seeds = plan(cfg)[0].seeds
        frames = args.scenes * args.frames

        pvit_s = run([sys.executable, "-m", "flows.cli", "generate", str(tmp / "c.yaml")])
        manifest = json.loads((tmp / "ds" / "manifest.json").read_text())
        worker_s = sum(s["worker_seconds"] for s in manifest["shards"])

        spec = cfg.scene.model_dump_json()
        kubric_s = sum(run([sys.executable, "-c", BARE_KUBRIC_WORKER, spec, str(seed),
                            str(tmp / f"kubric_{seed}")]) for seed in seeds)

        out = subprocess.run([sys.executable, "-c", LABEL_OVERHEAD, spec, json.dumps(seeds)],
                             cwd=REPO, check=True, capture_output=True, text=True).stdout
        # Blender writes its own lines to stdout too; ours is marked.
        overhead = json.loads(next(line[7:] for line in out.splitlines()
                                   if line.startswith("RESULT ")))

    result = {
        "scenes": args.scenes, "frames_per_scene": args.frames, "resolution": args.resolution,
        "spp": args.spp,
        "sec_per_frame": round(pvit_s / frames, 4),
        "sec_per_frame_worker": round(worker_s / frames, 4),
        "sec_per_frame_kubric": round(kubric_s / frames, 4),
        "ratio_vs_kubric": round(pvit_s / kubric_s, 3),
        "label_overhead_ratio": round(overhead["labels"] / overhead["rgb"], 3),
    }
    print(f"pvit generate (whole command, Prefect included): {result['sec_per_frame']:.3f} s/frame")
    print(f"  of which the render worker process:            {result['sec_per_frame_worker']:.3f} s/frame")
    print(f"bare Kubric, one process per scene:              {result['sec_per_frame_kubric']:.3f} s/frame")
    print(f"ratio pvit / kubric:                             {result['ratio_vs_kubric']:.3f}")
    print(f"render time with labels / RGB only:              {result['label_overhead_ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
