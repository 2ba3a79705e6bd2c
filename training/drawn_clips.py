"""Shard-format clips drawn with numpy, no renderer: for tests, benchmarks and the
ablation when no rendered shards are at hand. Written with the real shard writer
(``generation.dataset.shard_format.write_shard``), so readers cannot tell them apart.

A clip is a sky band (depth +inf), a floor (depth by row, normal up) and two squares
moving right whose colour is their class, so every scene label is learnable from the
pixels."""

from pathlib import Path

import numpy as np

from generation.dataset.index import write_index
from generation.dataset.shard_format import CLASSES, write_shard


def make_clip(key: str, seed: int, frames: int = 6, size: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    t, h, w = frames, size, size
    semantic = np.zeros((t, h, w), np.uint8)
    instance = np.zeros((t, h, w), np.uint16)
    depth = np.full((t, h, w), np.inf, np.float32)
    normal = np.zeros((t, h, w, 3), np.float32)
    sky = h // 4
    semantic[:, sky:] = 1
    instance[:, sky:] = 1
    depth[:, sky:] = np.linspace(12.0, 3.0, h - sky, dtype=np.float32)[None, :, None]
    normal[:, sky:] = (0.0, -1.0, 0.0)  # floor faces up: -y in OpenCV camera frame
    categories = rng.integers(2, len(CLASSES), size=2)
    position = np.zeros((3, t, 3), np.float32)
    quaternion = np.zeros((3, t, 4), np.float32)
    quaternion[..., 0] = 1.0
    visibility = np.zeros((3, t), np.float32)
    for n, category in enumerate(categories):
        side = size // 4
        x0, y0 = rng.integers(0, w - side - t), rng.integers(sky, h - side)
        for f in range(t):
            x = x0 + f  # moves right one pixel per frame
            box = (f, slice(y0, y0 + side), slice(x, x + side))
            semantic[box], instance[box] = category, n + 2
            depth[box] = 4.0 + n
            normal[box] = (0.0, 0.0, -1.0)  # faces the camera
            position[n + 1, f] = ((x + side / 2 - w / 2) / 10, (y0 - h / 2) / 10, 4.0 + n)
            visibility[n + 1, f] = side * side / (h * w)
    palette = (np.arange(len(CLASSES))[:, None] * np.array([23, 71, 137])) % 256
    rgb = palette[semantic].astype(np.uint8)
    rgb = np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
    w2c = np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))
    corners = np.zeros((3, t, 8, 3), np.float32)
    return {
        "key": key, "rgb": rgb, "depth": depth, "instance_seg": instance,
        "semantic_seg": semantic, "normal": normal,
        "K": np.array([[40, 0, w / 2], [0, 40, h / 2], [0, 0, 1]], np.float32),
        "world_to_camera": w2c,
        "instances": {
            "id": np.array([1, 2, 3], np.uint16),
            "category": np.array([1, *categories], np.int32),
            "position": position, "quaternion": quaternion, "bbox_3d": corners,
            "visibility": visibility,
        },
        "meta": {"seed": seed, "fps": 12, "classes": list(CLASSES)},
    }


def write_shards(directory: Path, shards: int = 2, clips_per_shard: int = 4, **kw) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        clips = [make_clip(f"clip{s:02d}{i:03d}", seed=100 * s + i, **kw)
                 for i in range(clips_per_shard)]
        write_shard(directory / f"shard-{s:05d}.tar", clips)
    # training reads what a manifest lists (generation/dataset/index.py)
    write_index(directory, [f"shard-{s:05d}.tar" for s in range(shards)], CLASSES)
    return directory
