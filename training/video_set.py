"""Writing a downstream video set in both layouts fine-tuning and evaluation read:

    <out>/ssv2/labels/{labels,<split>...}.json + <out>/ssv2/videos/<id>.webm
    <out>/list/<split>.txt ("videos/<id>.mp4 <label>") + <out>/list/videos/<id>.mp4

The whole set is written under ``<out>.tmp`` and renamed into place at the end, so a
killed run never leaves half a set, and only a directory that carries this project's
marker (or is empty) is ever replaced: an ``out`` pointing at someone's files is refused.
An ``out`` on an object store (``s3://bucket/sets/x``) is written in this node's scratch
and uploaded at the end (marker first), after the set written there before is removed;
no rename exists there, so its stage record (``flows.stage_cache``), written once the
upload is done, is what says the set is whole.
Used by the toy action set (``training.toy_actions``) and the humanoid action set
(``flows.actions``).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from generation.dataset.storage import Location, scratch_base, scratch_dir
from training import files

CODECS = {"webm": "VP80", "mp4": "mp4v"}  # both encoders ship with opencv-python wheels
# Written first into every set (and its temporary directory): only a directory that
# carries it, or the layout of a set written before it existed, is ever replaced.
MARKER = ".toy_actions"


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


def check_encoders() -> None:
    """Raise ``RuntimeError`` (one line) unless OpenCV here encodes both layouts' videos:
    checked before a set's clips are rendered (minutes), not at its first video."""
    import tempfile
    scratch_base().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pvit-encoders-", dir=scratch_base()) as tmp:
        for suffix in CODECS:
            write_video(Path(tmp) / f"probe.{suffix}", np.zeros((2, 16, 16, 3), np.uint8))


def _is_set(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    return ({p.name for p in path.iterdir()} <= {"ssv2", "list"}
            and (path / "ssv2" / "labels" / "labels.json").is_file())


def check_replaceable(path: Path) -> None:
    """Raise unless ``path`` is missing, an empty directory, or a set written here: an
    ``out`` pointing at someone's directory must never delete it."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} exists and is not a video set written here: not replacing it")
    if any(path.iterdir()) and not _is_set(path):
        raise ValueError(f"{path} holds files that are not a video set written here: not "
                         "replacing it")


def check_replaceable_objects(url: str) -> None:
    """``check_replaceable`` of a prefix: empty, or a set written here (its marker)."""
    where = Location(url)
    names = {key[len(where.root) + 1:] for key in where.fs.find(where.root)}
    if names and MARKER not in names:
        raise ValueError(f"{url} holds objects that are not a video set written here: not "
                         "replacing it")


def _remove_set(path: Path) -> None:
    """Remove a set (or a killed run's temporary one) written here; refuse anything else."""
    check_replaceable(path)
    if path.exists():
        shutil.rmtree(path)


class VideoSetWriter:
    """``add`` clips (RGB uint8 ``[T, H, W, 3]``) with a class index and a split, then
    ``finish`` with the class names: the set appears at ``out`` all at once."""

    def __init__(self, out: str | Path, *, writer: str, fps: float = 12.0):
        self.out = files.location(out)
        self.fps = fps
        # refuse before anything is drawn or rendered
        if isinstance(self.out, str):
            check_replaceable_objects(self.out)
            self.tmp = scratch_dir("pvit-videoset-") / "set"
        else:
            check_replaceable(self.out)
            self.tmp = self.out.with_name(self.out.name + ".tmp")
            _remove_set(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / MARKER).write_text(f"written by {writer}\n")
        for d in (self.tmp / "ssv2" / "labels", self.tmp / "ssv2" / "videos",
                  self.tmp / "list" / "videos"):
            d.mkdir(parents=True)
        self.entries: dict[str, list[dict]] = {}
        self.lines: dict[str, list[str]] = {}

    def add(self, clip_id: str, frames: np.ndarray, label: int, text: str, split: str,
            template: str | None = None, placeholders: list[str] | None = None) -> None:
        write_video(self.tmp / "ssv2" / "videos" / f"{clip_id}.webm", frames, self.fps)
        write_video(self.tmp / "list" / "videos" / f"{clip_id}.mp4", frames, self.fps)
        self.entries.setdefault(split, []).append(
            {"id": clip_id, "label": text, "template": template or text,
             "placeholders": placeholders or []})
        self.lines.setdefault(split, []).append(f"videos/{clip_id}.mp4 {label}")

    def finish(self, classes: list[str]) -> dict:
        """Write the label files, rename the set into place; returns its summary."""
        labels = {name: str(i) for i, name in enumerate(classes)}
        (self.tmp / "ssv2" / "labels" / "labels.json").write_text(json.dumps(labels, indent=1))
        for split, entries in self.entries.items():
            (self.tmp / "ssv2" / "labels" / f"{split}.json").write_text(
                json.dumps(entries, indent=1))
            (self.tmp / "list" / f"{split}.txt").write_text("\n".join(self.lines[split]) + "\n")
        if isinstance(self.out, str):
            self._upload()
        else:
            _remove_set(self.out)
            self.tmp.rename(self.out)
        return {"ssv2_root": str(files.join(self.out, "ssv2")),
                "list_root": str(files.join(self.out, "list")),
                "classes": list(classes),
                **{f"{split}_clips": len(e) for split, e in self.entries.items()}}

    def _upload(self) -> None:
        """Replace the set at the prefix ``out``: the old one's objects go, the marker
        is put first (a killed upload leaves a prefix this writer may replace), then the
        rest; the scratch copy is removed."""
        check_replaceable_objects(self.out)
        where = Location(self.out)
        where.delete_prefix("ssv2")
        where.delete_prefix("list")
        where.upload(self.tmp / MARKER, MARKER)
        files.upload_tree(self.tmp, self.out)
        shutil.rmtree(self.tmp.parent, ignore_errors=True)
