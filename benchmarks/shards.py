"""Shard format v2 on real renders: bytes per clip and decode throughput.

The clips are the demo dataset's first scenes (``configs/demo.yaml``'s
``generation.scene`` and ``seed``), rendered in this process with the real renderer, or
the clips of an existing shard directory (``--dataset``, format 1 or 2). Measured side
by side in one run:

- per field: format 1 bytes (plain ``.npy``, "raw") and format 2 bytes (``.npy.zst``),
  and, for the 8/16-bit images, the PNG alternative (a lossless PNG of the frames
  stacked vertically, OpenCV at its smallest level) with its decode time, which is what
  decided the codec of those fields;
- ``decode_clips_per_s``: clips per second read back from a written format 2 shard
  file (tar read + ``decode_sample``), and the in-memory decode of format 1 vs 2.

Prints a table and, on its last line, one JSON object with ``raw_bytes_per_clip``,
``stored_bytes_per_clip``, ``compression_ratio`` (raw / stored; goal >= 6 on the demo
dataset) and ``decode_clips_per_s``.

    .venv/bin/python benchmarks/shards.py [--clips 8] [--config configs/demo.yaml]
    .venv/bin/python benchmarks/shards.py --dataset data/synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from generation.dataset import shard_format as sf  # noqa: E402

IMAGE_FIELDS = ("rgb", "instance_seg", "semantic_seg")   # 8/16-bit: PNG is an option


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--clips", type=int, default=8, help="demo scenes to render")
    p.add_argument("--dataset", type=Path, default=None,
                   help="read the clips of this shard directory instead of rendering")
    p.add_argument("--repeats", type=int, default=5, help="timed decode passes (median)")
    args = p.parse_args(argv)
    if args.clips <= 0 or args.repeats <= 0:
        p.error("--clips and --repeats must be positive")
    if args.dataset is not None and not sorted(args.dataset.glob("*.tar")):
        p.error(f"--dataset {args.dataset}: no *.tar shards there")
    return args


def render_demo_clips(config: Path, count: int) -> list[dict]:
    from generation.config import SceneConfig
    from generation.dataset.plan import scene_seed
    from generation.render.scene import render_clip

    generation = yaml.safe_load(config.read_text())["generation"]
    cfg = SceneConfig(**generation.get("scene", {}))
    clips = []
    for index in range(count):
        seed = scene_seed(int(generation.get("seed", 0)), index)
        clip, _ = render_clip(cfg, seed=seed, key=f"scene{index:07d}")
        clips.append(clip)
        print(f"rendered {clip['key']} (seed {seed})", file=sys.stderr, flush=True)
    return clips


def read_clips(dataset: Path, count: int) -> list[dict]:
    clips = []
    for path in sorted(dataset.glob("*.tar")):
        clips.extend(sf.read_shard(path))
        if len(clips) >= count:
            break
    return clips[:count]


def format1_sample(clip: dict) -> dict:
    """The sample the format 1 writer made: every array a plain .npy member."""
    sample = {"__key__": clip["key"]}
    for field in sf.FIELDS:
        value = sf._get(clip, field.key)
        if value is not None:
            codec = sf.NPY if field.dtype is not None else field.codec
            sample[f"{field.member}.{codec}"] = sf._encode(value, codec, None)
    return sample


def png_bytes(array: np.ndarray) -> bytes:
    import cv2
    t, h = array.shape[:2]
    frames = array.reshape(t * h, *array.shape[2:])   # frames stacked vertically
    if frames.ndim == 3:
        frames = frames[..., ::-1]                       # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(frames),
                           [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return buf.tobytes()


def png_decode(data: bytes) -> np.ndarray:
    import cv2
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def field_table(clips: list[dict], v1: list[dict], v2: list[dict], repeats: int) -> list:
    rows = []
    n = len(clips)
    for field in sf.FIELDS:
        names = (f"{field.member}.{sf.NPY if field.dtype is not None else field.codec}",
                 field.name)
        if names[1] not in v2[0]:
            continue
        raw = sum(len(s[names[0]]) for s in v1) / n
        stored = sum(len(s[names[1]]) for s in v2) / n
        members = [s[names[1]] for s in v2]
        decode = median_seconds(lambda m=members, f=field, name=names[1]: [
            decode_member(b, f, name) for b in m], repeats) / n
        png = png_decode_s = None
        if field.key in IMAGE_FIELDS:
            blobs = [png_bytes(c[field.key]) for c in clips]
            for blob, clip in zip(blobs, clips, strict=True):   # PNG is lossless too
                back = png_decode(blob)
                back = back[..., ::-1] if back.ndim == 3 else back
                assert back.tobytes() == clip[field.key].tobytes()
            png = sum(map(len, blobs)) / n
            png_decode_s = median_seconds(lambda m=blobs: [png_decode(b) for b in m],
                                          repeats) / n
        rows.append((field.name, raw, stored, decode, png, png_decode_s))
    return rows


def decode_member(data: bytes, field, name: str):
    """One member decoded as ``sf.decode_sample`` decodes it (a JSON value, or the array
    with its header checked before the buffer is allocated)."""
    if field.dtype is None:
        return sf._decode_json(data, name)
    return sf._read_array(data, sf.NPY_ZST, field, name, sf._frame_size(data, name, False))


def main(argv=None) -> int:
    args = parse_args(argv)
    clips = (read_clips(args.dataset, args.clips) if args.dataset
             else render_demo_clips(args.config, args.clips))
    n = len(clips)
    v1 = [format1_sample(c) for c in clips]
    encode_s = median_seconds(lambda: [sf.encode_clip(c) for c in clips], args.repeats) / n
    v2 = [sf.encode_clip(c) for c in clips]
    raw = sum(len(b) for s in v1 for k, b in s.items() if not k.startswith("__")) / n
    stored = sum(len(b) for s in v2 for k, b in s.items() if not k.startswith("__")) / n

    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard-000000.tar"
        sf.write_shard(shard, clips)
        shard_bytes = shard.stat().st_size / n
        for a, b in zip(clips, sf.read_shard(shard), strict=True):  # lossless, every bit
            for field in sf.FIELDS:
                x, y = sf._get(a, field.key), sf._get(b, field.key)
                assert (x is None) == (y is None), field.key
                if field.dtype is not None and x is not None:
                    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), field.key
        read_s = median_seconds(lambda: sum(1 for _ in sf.read_shard(shard)), args.repeats) / n
    decode_v1_s = median_seconds(lambda: [sf.decode_sample(s) for s in v1], args.repeats) / n
    decode_v2_s = median_seconds(lambda: [sf.decode_sample(s) for s in v2], args.repeats) / n

    t, h = clips[0]["rgb"].shape[:2]
    print(f"{n} clips, {t} frames of {h}x{h} px; bytes per clip (members, no tar headers)")
    print(f"{'member':26s} {'raw .npy':>10s} {'.npy.zst':>10s} {'ratio':>6s} {'decode':>9s}"
          f" {'png':>10s} {'ratio':>6s} {'decode':>9s}")
    for name, raw_b, stored_b, dec, png, png_dec in field_table(clips, v1, v2, args.repeats):
        line = (f"{name:26s} {raw_b:10.0f} {stored_b:10.0f} {raw_b / stored_b:6.1f} "
                f"{dec * 1e3:7.3f}ms")
        if png is not None:
            line += f" {png:10.0f} {raw_b / png:6.1f} {png_dec * 1e3:7.3f}ms"
        print(line)
    print(f"{'whole clip':26s} {raw:10.0f} {stored:10.0f} {raw / stored:6.2f}")
    print(f"shard file bytes per clip (tar headers included): {shard_bytes:.0f}")
    print(f"encode (writer) {encode_s * 1e3:.1f} ms/clip; decode in memory: format 1 "
          f"{decode_v1_s * 1e3:.2f} ms/clip, format 2 {decode_v2_s * 1e3:.2f} ms/clip; "
          f"shard file read + decode {read_s * 1e3:.2f} ms/clip")
    print(json.dumps({
        "clips": n, "frames": int(t), "resolution": int(h),
        "raw_bytes_per_clip": round(raw), "stored_bytes_per_clip": round(stored),
        "compression_ratio": round(raw / stored, 2),
        "decode_clips_per_s": round(1 / read_s, 1),
        "shard_bytes_per_clip": round(shard_bytes),
        "encode_ms_per_clip": round(encode_s * 1e3, 2),
        "decode_ms_per_clip_format1": round(decode_v1_s * 1e3, 3),
        "decode_ms_per_clip_format2": round(decode_v2_s * 1e3, 3),
        "zstd_level": sf.ZSTD_LEVEL}), flush=True)
    # Blender (imported in this process when it renders) prints its exit report ("Error:
    # Not freed memory blocks ...") to stdout at interpreter exit: send what comes after
    # the JSON to stderr, so the JSON stays the last line of stdout.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
