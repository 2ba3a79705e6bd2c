"""Rendering throughput and where a frame's time goes, measured side by side in one run.

In the order they run:

1. Process 3a: one warm process renders every scene three times, interleaved so that
   drift hits all alike: RGB only and with labels at ``--spp`` (the label layer's
   cost), and with labels at 1 spp (the slope over spp is path tracing proper; what is
   left of the render call is Blender's scene sync, the compositor and the pass files).
2. ``pvit generate``: the whole command (Prefect flow, one worker process per shard
   rendering every scene of it, shards written and verified by checksum). Its worker
   logs its own timings (``timings`` line of ``logs/shard-*.log``): process start and
   imports, per scene build + physics, render call, pass reading, label
   post-processing, and the shard write.
3. Process 3b: the same three renders of every scene again; after each half of the
   scenes, that half again through the render worker's own loop (``render_clips``:
   each scene's labels and encoding run beside the next one's render) and a shard
   write, timed by the wall clock; then frame 1 of each scene at ``--ref-spp``, the
   reference both RGBs' PSNR is taken against.
4. A bare Kubric script run the way Kubric's own workers run: one process per scene,
   writing Kubric's per-frame layer files (``kb.write_image_dict``). Kubric's renderer
   needs this project's Blender 4.5 fixes to run at all, so it uses ``Blender45``.

This machine's speed drifts 10-15 % within minutes, which is why the command is
bracketed by 3a and 3b: its worker is divided by path tracing measured on both sides
of it.

Prints the breakdown table and, on its last line, one JSON object: ``sec_per_frame``,
``sec_per_frame_kubric``, ``ratio_vs_kubric`` (and ``ratio_vs_kubric_cpu``, the same in CPU
seconds of the process trees), ``label_overhead_ratio``,
``sampling_s_per_frame`` (3b's), ``overhead_ratio`` (the pvit generate worker's steady
state: wall time of the scenes after its first, from the second scene's build to the
shard written, / the path tracing of those same scenes, scene by scene (scenes differ
by ~1.5x in cost), the mean of 3a's and 3b's slopes; ``sampling_drift`` is 3b's slope
/ 3a's; ``overhead_ratio_loop`` takes the same loop run in 3b beside its slope runs,
``overhead_ratio_sequential`` 3b's phases added up, over all scenes), ``fixed_s`` (the
command's cost outside the render worker), ``rgb_psnr_db``, ``rgb_psnr_db_kubric``.

    .venv/bin/python benchmarks/render.py [--scenes 8 --frames 8 --resolution 128 --spp 16]
    .venv/bin/python benchmarks/render.py --device cuda --resolution 256 --frames 24 \\
        --spp 64 --denoise --workers 2 --workers-per-gpu 2      # MOVi's settings on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

BARE_KUBRIC_WORKER = textwrap.dedent("""
    import sys, time, numpy as np
    import kubric as kb
    from generation.config import SceneConfig
    from generation.render.devices import use_device
    from generation.render.kubric_compat import Blender45
    from generation.render.recipes import get_recipe
    from generation.render.assets import load_manifest
    cfg = SceneConfig.model_validate_json(sys.argv[1]); seed = int(sys.argv[2]); out = sys.argv[3]
    scene = kb.Scene(resolution=(cfg.resolution,) * 2, frame_start=1, frame_end=cfg.frames,
                     frame_rate=cfg.fps, step_rate=240)
    renderer = Blender45(scene, samples_per_pixel=cfg.spp, use_denoising=cfg.denoise)
    use_device(sys.argv[4])
    ids = sorted(load_manifest(cfg.asset_manifest)["assets"])
    with kb.AssetSource.from_manifest(str(cfg.asset_manifest)) as src:
        get_recipe(cfg.recipe)(scene, cfg, np.random.RandomState(seed), src, ids)
        data = renderer.render(return_layers=("rgba", "depth", "segmentation", "normal"))
    kb.write_image_dict(data, kb.as_path(out))
""")

BREAKDOWN = textwrap.dedent("""
    import json, sys, tempfile, time
    from pathlib import Path
    import numpy as np
    from generation.config import SceneConfig
    from generation.render.scene import render_clip, render_clips
    from generation.dataset.shard_format import write_samples
    import webdataset  # as the render worker does at start-up: the first write_samples
    #                    would import it (and torch, ~1 s) inside the timed loop
    cfg = SceneConfig.model_validate_json(sys.argv[1]); seeds = json.loads(sys.argv[2])
    ref_spp, device, ref_out = int(sys.argv[3]), sys.argv[4], sys.argv[5]
    slope_only = sys.argv[6] == "slope"
    one = cfg.model_copy(update={"spp": 1})
    render_clip(cfg, seeds[0], "warmup", labels_on=True, device=device)
    runs = {"rgb": [], "labels": [], "labels_1spp": []}
    worker = []     # the render worker's loop (render_clips + shard write), wall time
    half = len(seeds) // 2
    for block in ([seeds[:half], seeds[half:]] if half >= 2 else [seeds]):
        for seed in block:       # interleaved, so drift hits every mode equally
            for mode, c, on in (("rgb", cfg, False), ("labels", cfg, True),
                                ("labels_1spp", one, True)):
                runs[mode].append(render_clip(c, seed, "s", labels_on=on, device=device)[1])
        if slope_only:
            continue
        done = list(render_clips(cfg, block, [f"w{s}" for s in block], labels_on=True,
                                 device=device))
        with tempfile.TemporaryDirectory() as tmp:
            write_samples(Path(tmp) / "shard.tar", [sample for sample, _ in done])
        # the scenes after the first, from the second's build to the shard written
        worker.append({"wall_s": time.perf_counter() - done[1][1]["started_at"],
                       "seeds": block[1:]})
    if not slope_only:
        ref = cfg.model_copy(update={"spp": ref_spp, "denoise": False})
        refs = [render_clip(ref, seed, "r", labels_on=False, device=device,
                            frames=[1])[0]["rgb"][0] for seed in seeds]
        np.save(ref_out, np.stack(refs))
    print("RESULT " + json.dumps({"runs": runs, "worker": worker}), flush=True)
""")



# CPU seconds of every finished command's process tree (what run() adds up per label).
cpu_s: dict[str, float] = {}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict | None = None, label: str = "") -> float:
    """Wall seconds of ``cmd``; its process tree's CPU seconds go to ``cpu_s[label]``
    (the machine is shared: CPU time moves less with the load than wall time does)."""
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} failed ({proc.returncode}): "
                 f"{proc.stderr.strip().splitlines()[-1:]}")
    cpu_s[label] = cpu_s.get(label, 0.0) + _children_cpu() - c0
    return time.perf_counter() - t0


def psnr(images: list[np.ndarray], refs: np.ndarray) -> float:
    """PSNR of 8-bit RGB frames against the references, over all pixels pooled."""
    err = np.mean([(np.asarray(a, np.float64) - np.asarray(r, np.float64)) ** 2
                   for a, r in zip(images, refs, strict=True)])
    return float(10 * np.log10(255.0 ** 2 / max(err, 1e-12)))


def worker_timings(out: Path) -> list[dict]:
    """The ``timings`` line of each shard's (last) worker log."""
    found = []
    for log in sorted((out / "logs").glob("*.log")):
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("timings ")]
        if lines:
            found.append(json.loads(lines[-1][len("timings "):]))
    return found


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--spp", type=int, default=16)
    parser.add_argument("--ref-spp", type=int, default=256, help="reference render for PSNR")
    parser.add_argument("--denoise", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "optix"])
    parser.add_argument("--workers", type=int, default=1, help="pvit generate --workers")
    parser.add_argument("--workers-per-gpu", type=int, default=1)
    parser.add_argument("--scenes-per-shard", type=int, default=None,
                        help="default: all scenes in one shard (one worker)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from generation.config import GenerationConfig
    from generation.dataset.plan import plan
    from generation.dataset.shard_format import read_shard
    from generation.render.devices import preflight, visible_gpus, worker_env

    device = preflight(args.device)
    pin = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           **worker_env(device, 0, 1, visible_gpus())}
    scene = {"resolution": args.resolution, "frames": args.frames, "spp": args.spp,
             "denoise": args.denoise}
    per_shard = args.scenes_per_shard or args.scenes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = {"out": str(tmp / "ds"), "scenes": args.scenes, "scenes_per_shard": per_shard,
               "workers": args.workers, "device": device,
               "workers_per_gpu": args.workers_per_gpu, "scene": scene}
        (tmp / "c.yaml").write_text(yaml.safe_dump({"generation": gen}))
        cfg = GenerationConfig.model_validate(gen)
        seeds = [s for job in plan(cfg) for s in job.seeds]
        frames = args.scenes * args.frames

        spec = cfg.scene.model_dump_json()

        def breakdown(mode: str) -> dict:
            out = subprocess.run([sys.executable, "-c", BREAKDOWN, spec, json.dumps(seeds),
                                  str(args.ref_spp), device, str(tmp / "ref.npy"), mode],
                                 cwd=REPO, check=True, capture_output=True, text=True,
                                 env=pin).stdout
            # Blender writes its own lines to stdout too; ours is marked.
            return json.loads(next(line[7:] for line in out.splitlines()
                                   if line.startswith("RESULT ")))

        # The pvit generate worker is bracketed by two slope measurements of its scenes,
        # one just before the command and one just after: this machine's speed drifts
        # 10-15 % within minutes, and the headline divides the worker by their mean.
        before = breakdown("slope")["runs"]
        pvit_s = run([sys.executable, "-m", "flows.cli", "generate", str(tmp / "c.yaml")],
                     label="pvit")
        after = breakdown("full")
        runs, loop = after["runs"], after["worker"]
        refs = np.load(tmp / "ref.npy")
        manifest = json.loads((tmp / "ds" / "manifest.json").read_text())
        worker_s = sum(s["worker_seconds"] for s in manifest["shards"])
        workers = worker_timings(tmp / "ds")
        ours = {}
        for shard in sorted(manifest["shards"], key=lambda s: s["name"]):
            for clip in read_shard(tmp / "ds" / shard["name"]):
                ours[clip["meta"]["seed"]] = clip["rgb"][0]

        kubric_s = sum(run([sys.executable, "-c", BARE_KUBRIC_WORKER, spec, str(seed),
                            str(tmp / f"kubric_{seed}"), device], env=pin, label="kubric")
                       for seed in seeds)
        from PIL import Image
        kubric_rgb = [np.asarray(Image.open(tmp / f"kubric_{seed}" / "rgba_00000.png"))[..., :3]
                      for seed in seeds]

    f = args.frames
    calls = {m: mean(t["render_calls_s"] for t in runs[m]) / f for m in runs}
    # The slope over spp, per scene (runs[mode][i] is seeds[i]): scenes differ by ~1.5x
    # in cost, so a window that leaves scene 1 out is divided by its own scenes' sampling.
    def slopes(process_runs) -> dict:
        return {seed: (lab["render_calls_s"] - one["render_calls_s"])
                / max(args.spp - 1, 1) * args.spp / f
                for seed, lab, one in zip(seeds, process_runs["labels"],
                                          process_runs["labels_1spp"], strict=True)}
    sampling_of = slopes(runs)                  # process 3b, beside the loop
    before_of = slopes(before)                  # process 3a, just before the command
    sampling, sampling_before = mean(sampling_of.values()), mean(before_of.values())
    # the pvit generate worker ran between 3a and 3b
    bracket_of = {seed: (before_of[seed] + sampling_of[seed]) / 2 for seed in seeds}

    def window_sampling(window_seeds, of=sampling_of) -> float:
        """Path tracing proper of these scenes, in seconds (a slope measurement)."""
        return sum(of[seed] * f for seed in window_seeds)
    aux = calls["labels"] - calls["rgb"]
    # The worker's steady state is wall time, not a sum of phases (on a GPU it finishes
    # scene N while Blender renders N+1; and time between scenes is in no phase): the
    # issue's window, the scenes after the first, from the second's build to the shard
    # written (on a GPU the first scene's second half overlaps the second's render).
    steady_worker, worker_wall, worker_sampling = [], 0.0, 0.0
    for w in workers:
        scenes = w["scenes"]
        if len(scenes) > 1:
            wall = scenes[-1]["finished_at_s"] - scenes[1]["started_at_s"] + w["write_s"]
            steady_worker.append(wall / ((len(scenes) - 1) * f))
            worker_wall += wall
            worker_sampling += window_sampling((s["seed"] for s in scenes[1:]),
                                               bracket_of)
    n_scenes = sum(len(w["scenes"]) for w in workers)
    write_per_frame = sum(w["write_s"] for w in workers) / (n_scenes * f)
    encode_per_frame = mean(s["encode_s"] for w in workers for s in w["scenes"]) / f

    def per_frame(scenes) -> float:
        """One scene after another, phases added up (as process 3b renders)."""
        return mean(s["build_s"] + s["render_s"] + s["pass_io_s"] + s["labels_s"]
                    for s in scenes) / f + encode_per_frame + write_per_frame

    # The same steady state done sequentially, in the process that measured the slope
    # (scenes after a warm-up; the same machine load as the sampling figure).
    steady = runs["labels"]
    build = mean(s["build_s"] for s in steady) / f
    pass_io = mean(s["pass_io_s"] for s in steady) / f
    label_post = mean(s["labels_s"] for s in steady) / f
    steady_per_frame = per_frame(steady)
    loop_per_frame = sum(b["wall_s"] for b in loop) / (sum(len(b["seeds"]) for b in loop) * f)
    loop_ratio = (sum(b["wall_s"] for b in loop)
                  / sum(window_sampling(b["seeds"]) for b in loop))
    # one scene per shard: no steady state to time, so that worker's phases added up
    worker_per_frame = (mean(steady_worker) if steady_worker else
                        per_frame([s for w in workers for s in w["scenes"]]))
    sync = calls["labels"] - sampling - aux
    start = mean(w["interpreter_s"] + w["startup_s"] for w in workers)
    fixed = pvit_s - worker_s

    rows = [
        ("process start and imports (Python, torch, bpy, kubric without TensorFlow)",
         f"{start:.2f} s per worker"),
        ("scene build and physics (Blender reset, assets, recipe, PyBullet)",
         f"{build:.4f} s/frame"),
        ("Blender scene sync + compositor + pass file writes (render call - the two below)",
         f"{sync:.4f} s/frame"),
        (f"path tracing proper (slope over spp x {args.spp})", f"{sampling:.4f} s/frame"),
        ("  the same, measured just before the pvit generate command",
         f"{sampling_before:.4f} s/frame"),
        ("auxiliary label layer (render call with labels - RGB only)", f"{aux:.4f} s/frame"),
        ("pass file reading + Kubric post-processors", f"{pass_io:.4f} s/frame"),
        ("label post-processing (generation.render.labels)", f"{label_post:.4f} s/frame"),
        ("shard encoding (zstd, PNG) + shard write",
         f"{encode_per_frame:.4f} + {write_per_frame:.4f} s/frame"),
        ("sum of the phases above, one scene after another (build to shard write)",
         f"{steady_per_frame:.4f} s/frame"),
        ("steady state of the pvit generate worker (wall clock)",
         f"{worker_per_frame:.4f} s/frame"),
        ("  the same loop in the process of the rows above (wall)",
         f"{loop_per_frame:.4f} s/frame"),
        ("command's fixed cost (Prefect server, flow, checksums; outside the worker)",
         f"{fixed:.2f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'where the time goes':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

    result = {
        "scenes": args.scenes, "frames_per_scene": args.frames, "resolution": args.resolution,
        "spp": args.spp, "device": device, "denoise": args.denoise, "workers": args.workers,
        "workers_per_gpu": args.workers_per_gpu, "ref_spp": args.ref_spp,
        "sec_per_frame": round(pvit_s / frames, 4),
        "sec_per_frame_worker": round(worker_s / frames, 4),
        "sec_per_frame_kubric": round(kubric_s / frames, 4),
        "ratio_vs_kubric": round(pvit_s / kubric_s, 3),
        # The same ratio in CPU seconds of the process trees (pvit's includes its Prefect
        # server and render workers): the two sides run minutes apart, and on a shared
        # machine the load between them moves wall time more than CPU time.
        "ratio_vs_kubric_cpu": round(cpu_s["pvit"] / cpu_s["kubric"], 3),
        "label_overhead_ratio": round(calls["labels"] / calls["rgb"], 3),
        "sampling_s_per_frame": round(sampling, 4),
        "steady_s_per_frame": round(worker_per_frame, 4),
        "steady_s_per_frame_loop": round(loop_per_frame, 4),
        "steady_s_per_frame_sequential": round(steady_per_frame, 4),
        # the definition: the pvit generate worker's steady state (wall time),
        # over the path tracing of the same scenes, measured just before and just after
        "overhead_ratio": round(worker_wall / worker_sampling if worker_sampling else
                                worker_per_frame / mean(bracket_of.values()), 3),
        # the slope just after the command / just before it (1 = no drift between them)
        "sampling_drift": round(sampling / sampling_before, 3),
        # the worker's loop again, in process 3b beside the runs that measure the slope
        "overhead_ratio_loop": round(loop_ratio, 3),
        # the phases added up, one scene after another (process 3b)
        "overhead_ratio_sequential": round(steady_per_frame / sampling, 3),
        "fixed_s": round(fixed, 2),
        "rgb_psnr_db": round(psnr([ours[s] for s in seeds], refs), 2),
        "rgb_psnr_db_kubric": round(psnr(kubric_rgb, refs), 2),
    }
    print(f"pvit generate (whole command): {result['sec_per_frame']:.3f} s/frame; "
          f"bare Kubric: {result['sec_per_frame_kubric']:.3f} s/frame; "
          f"ratio {result['ratio_vs_kubric']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
