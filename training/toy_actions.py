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

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

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
CODECS = {"webm": "VP80", "mp4": "mp4v"}  # both encoders ship with opencv-python wheels


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


@contextmanager
def _quiet_stderr():
    """FFmpeg prints a harmless note about the VP80 tag in WebM straight to fd 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def write_video(path: Path, frames: np.ndarray, fps: float = 12.0) -> None:
    fourcc = cv2.VideoWriter_fourcc(*CODECS[path.suffix[1:]])
    with _quiet_stderr():
        writer = cv2.VideoWriter(str(path), fourcc, fps, (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot encode {path.suffix} here")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


# Written first into every set (and its temporary directory): only a directory that
# carries it, or the layout of a set written before it existed, is ever replaced.
MARKER = ".toy_actions"


def _is_toy_set(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    return ({p.name for p in path.iterdir()} <= {"ssv2", "list"}
            and (path / "ssv2" / "labels" / "labels.json").is_file())


def _check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is missing, an empty directory, or a set written here: an
    ``out`` pointing at someone's directory must never delete it."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} exists and is not a toy-actions set: not replacing it")
    if any(path.iterdir()) and not _is_toy_set(path):
        raise ValueError(f"{path} holds files that are not a toy-actions set: not replacing it")


def _remove_set(path: Path) -> None:
    """Remove a set (or a killed run's temporary one) written here; refuse anything else."""
    _check_replaceable(path)
    if path.exists():
        shutil.rmtree(path)


def write_toy_actions(out: str | Path, *, clips_per_class: int = 8, val_per_class: int = 2,
                      seed: int = 0, size: int = 64, frames: int = 24) -> dict:
    """Write the set under ``out`` (replacing a set written here earlier, never other
    files: ``ValueError``) and return a summary: the two data roots, class names and clip
    counts. ``val_per_class`` of each class's clips form the ``validation`` split; the
    rest are ``train``."""
    out = Path(out)
    if not 0 < val_per_class < clips_per_class:
        raise ValueError("val_per_class must be between 0 and clips_per_class (exclusive)")
    tmp = out.with_name(out.name + ".tmp")
    _check_replaceable(out)                   # refuse before drawing anything
    _remove_set(tmp)
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("written by training.toy_actions.write_toy_actions\n")
    ssv2, lists = tmp / "ssv2", tmp / "list"
    for d in (ssv2 / "labels", ssv2 / "videos", lists / "videos"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    lines: dict[str, list[str]] = {"train": [], "validation": []}
    clip_id = 1000
    for label, template in enumerate(TEMPLATES):
        for n in range(clips_per_class):
            split = "validation" if n < val_per_class else "train"
            clip = draw_clip(label, rng, size, frames)
            write_video(ssv2 / "videos" / f"{clip_id}.webm", clip)
            write_video(lists / "videos" / f"{clip_id}.mp4", clip)
            splits[split].append({"id": str(clip_id),
                                  "label": template.replace("[something]", "a shape"),
                                  "template": template, "placeholders": ["a shape"]})
            lines[split].append(f"videos/{clip_id}.mp4 {label}")
            clip_id += 1
    labels = {template.replace("[", "").replace("]", ""): str(i)
              for i, template in enumerate(TEMPLATES)}
    (ssv2 / "labels" / "labels.json").write_text(json.dumps(labels, indent=1))
    for split, entries in splits.items():
        (ssv2 / "labels" / f"{split}.json").write_text(json.dumps(entries, indent=1))
        (lists / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    _remove_set(out)
    tmp.rename(out)
    return {"ssv2_root": str(out / "ssv2"), "list_root": str(out / "list"),
            "classes": list(labels), "train_clips": len(splits["train"]),
            "validation_clips": len(splits["validation"])}
