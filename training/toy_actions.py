"""A tiny, offline action-recognition set of real (encoded) videos, drawn with OpenCV.

Six classes of one moving shape: moving left / right / up / down, growing, shrinking.
Each clip is a filled circle or square of random colour, size, start and speed on a
noisy background. The same drawn frames are written in both downstream layouts:

    <out>/ssv2/labels/{labels,train,validation}.json + <out>/ssv2/videos/<id>.webm
    <out>/list/{train,validation}.txt ("videos/<id>.mp4 <label>") + <out>/list/videos/

Frames are a pure function of the seed; the whole set is written under a temporary name
and renamed into place, so a killed run never leaves a half set behind.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from training.video_set import VideoSetWriter

# SSv2-style templates; the label is the template without brackets
TEMPLATES = (
    "Moving [something] to the left",
    "Moving [something] to the right",
    "Moving [something] up",
    "Moving [something] down",
    "Making [something] bigger",
    "Making [something] smaller",
)
MOTIONS = ((-1, 0, 1.0), (1, 0, 1.0), (0, -1, 1.0), (0, 1, 1.0), (0, 0, 1.04), (0, 0, 0.96))


def draw_clip(label: int, rng: np.random.Generator, size: int = 64, frames: int = 24
              ) -> np.ndarray:
    """uint8 RGB ``[frames, size, size, 3]`` of one shape doing action ``label``."""
    dx, dy, grow = MOTIONS[label]
    speed = rng.uniform(0.8, 1.6) * size / 64
    radius = rng.uniform(0.10, 0.16) * size if grow >= 1 else rng.uniform(0.22, 0.3) * size
    # start where the motion has room: moving right starts on the left, and so on
    cx = size / 2 - dx * size * 0.25 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 - dy * size * 0.25 + rng.uniform(-0.08, 0.08) * size
    colour = tuple(int(c) for c in rng.integers(60, 256, size=3))
    background = rng.integers(0, 50, size=3)
    square = bool(rng.integers(0, 2))
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        frame = np.clip(background + rng.integers(-6, 7, (size, size, 3)), 0, 255).astype(np.uint8)
        x, y = int(round(cx + dx * speed * t)), int(round(cy + dy * speed * t))
        r = max(1, int(round(radius * grow ** t)))
        if square:
            cv2.rectangle(frame, (x - r, y - r), (x + r, y + r), colour, thickness=-1)
        else:
            cv2.circle(frame, (x, y), r, colour, thickness=-1)
        out[t] = frame
    return out


def write_toy_actions(out: str | Path, *, clips_per_class: int = 8, val_per_class: int = 2,
                      seed: int = 0, size: int = 64, frames: int = 24) -> dict:
    """Write the set under ``out`` (replacing a set written here earlier, never other
    files: ``ValueError``) and return a summary: the two data roots, class names and clip
    counts. ``val_per_class`` of each class's clips form the ``validation`` split; the
    rest are ``train``."""
    if not 0 < val_per_class < clips_per_class:
        raise ValueError("val_per_class must be between 0 and clips_per_class (exclusive)")
    writer = VideoSetWriter(out, writer="training.toy_actions.write_toy_actions")
    rng = np.random.default_rng(seed)
    clip_id = 1000
    for label, template in enumerate(TEMPLATES):
        for n in range(clips_per_class):
            split = "validation" if n < val_per_class else "train"
            writer.add(str(clip_id), draw_clip(label, rng, size, frames), label,
                       template.replace("[something]", "a shape"), split, template=template,
                       placeholders=["a shape"])
            clip_id += 1
    return writer.finish([t.replace("[", "").replace("]", "") for t in TEMPLATES])
