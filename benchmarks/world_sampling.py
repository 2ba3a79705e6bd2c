"""Why an HDRI recipe's frame costs what it does: one scene rendered once per variant,
each changing one Cycles or world setting after the recipe's world is applied, in one
warm process (a warm-up render first), every variant's render call side by side.

Variants: ``default`` (what the recipes render), ``auto`` (Cycles' "Automatic" world
importance map, the setting before this was measured), ``mapN`` (a manual map N cells
wide), ``nomis`` (no world importance sampling), ``nolighttree``, ``plainmat`` (every
material's base colour texture unlinked), ``noaux`` (no auxiliary label layer),
``bounces4``. For each: render call s/frame, PSNR of its RGB against a ``--ref-spp``
render of the same frames (``default`` settings; the converged image does not depend on
how the world is sampled) and whether every label array equals ``default``'s. JSON on
the last line.

    .venv/bin/python benchmarks/world_sampling.py --recipe movi_c --seed 5 \\
        --variants default,auto,map4096,map2048,map512,nomis
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tweak(variant: str, renderer) -> None:
    """Change one setting of the built scene (bpy), before the render call."""
    import bpy
    scene = bpy.context.scene
    world = scene.world.cycles
    if variant == "default":
        return
    if variant == "auto":
        world.sampling_method = "AUTOMATIC"
    elif variant.startswith("map"):
        world.sampling_method, world.sample_map_resolution = "MANUAL", int(variant[3:])
    elif variant == "nomis":
        world.sampling_method = "NONE"
    elif variant == "nolighttree":
        scene.cycles.use_light_tree = False
    elif variant == "bounces4":
        scene.cycles.max_bounces = 4
    elif variant == "noaux":
        scene.view_layers["AuxOutputs"].use = False
    elif variant == "plainmat":
        for mat in bpy.data.materials:
            for node in (mat.node_tree.nodes if mat.use_nodes else ()):
                if node.bl_idname == "ShaderNodeBsdfPrincipled":
                    for link in list(node.inputs["Base Color"].links):
                        mat.node_tree.links.remove(link)
    else:
        raise SystemExit(f"error: unknown variant {variant!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="movi_c")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--spp", type=int, default=16)
    parser.add_argument("--ref-spp", type=int, default=1024)
    parser.add_argument("--variants", default="default,auto,map4096,map2048,map512,nomis")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(REPO))
    from generation.config import SceneConfig
    from generation.render import procedural_blender
    from generation.render.scene import render_clip

    variants = args.variants.split(",")
    current = {"variant": "default"}
    apply_content = procedural_blender.apply_content

    def patched(renderer, content):          # render_passes imports it at call time
        apply_content(renderer, content)
        tweak(current["variant"], renderer)
    procedural_blender.apply_content = patched

    cfg = SceneConfig(recipe=args.recipe, resolution=args.resolution, frames=args.frames,
                      spp=args.spp)
    render_clip(cfg, args.seed, "warmup")
    clips, seconds = {}, {}
    for variant in ["default"] + [v for v in variants if v != "default"]:
        current["variant"] = variant
        clip, timings = render_clip(cfg, args.seed, "v")
        clips[variant], seconds[variant] = clip, timings["render_calls_s"] / args.frames
        print(f"{variant:12s} {seconds[variant]:.3f} s/frame", flush=True)
    current["variant"] = "default"
    ref = render_clip(cfg.model_copy(update={"spp": args.ref_spp}), args.seed, "r",
                      labels_on=False)[0]["rgb"].astype(np.float64)
    result = {}
    for variant, clip in clips.items():
        err = np.mean((clip["rgb"].astype(np.float64) - ref) ** 2)
        same = all(np.array_equal(clip[k], clips["default"][k]) for k in clip
                   if k not in ("key", "rgb", "meta", "instances"))
        same &= all(np.array_equal(v, clips["default"]["instances"][k])
                    for k, v in clip["instances"].items())
        result[variant] = {"s_per_frame": round(seconds[variant], 3),
                           "psnr_db": round(float(10 * np.log10(255 ** 2 / err)), 2),
                           "labels_identical": bool(same)}
        print(f"{variant:12s} PSNR {result[variant]['psnr_db']:.2f} dB, labels identical: "
              f"{same}")
    print(json.dumps({"recipe": args.recipe, "seed": args.seed, "spp": args.spp,
                      "resolution": args.resolution, "frames": args.frames, **result}))


if __name__ == "__main__":
    main()
