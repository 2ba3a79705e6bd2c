"""Real downstream video in the layouts people already have.

- ``ssv2``: Something-Something-v2. ``<root>/labels/labels.json`` maps template ->
  class index (a string), ``<root>/labels/<split>.json`` lists ``{"id", "template",
  ...}``, videos are ``<root>/<videos_dir>/<id>.webm``. The label is the template with
  its brackets removed ("Moving [something] up" -> "Moving something up").
- ``list``: ``<root>/<split>.txt`` (or a path to a list file) of ``path label`` lines,
  as Kinetics / VideoMAE / mmaction2 use; relative paths are under ``<root>``.

Clips are ``num_frames`` frames ``stride`` apart (Kinetics style) or one frame per
equal segment (SSv2 style). Evaluation views are ``temporal_clips`` evenly spaced
clips x ``spatial_crops`` crops (left/centre/right along the long side). A video that
cannot be decoded becomes a ``Skipped`` marker: the collate function drops it, the
training loop counts it, and the epoch goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from training import files
from training.synthetic_data import normalize_rgb

log = logging.getLogger(__name__)
# FFmpeg prints its own line ("moov atom not found") to fd 2 for each broken video;
# the skip is logged here with its reason, and errors stay one line. OpenCV reads this
# at its first capture; set it yourself to see FFmpeg's messages (16: errors).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


@dataclass(frozen=True)
class VideoRecord:
    path: str
    label: int


@dataclass(frozen=True)
class Skipped:
    """Marker for a video that could not be decoded."""

    path: str
    reason: str


class VideoDecodeError(RuntimeError):
    pass


def ssv2_label(template: str) -> str:
    return re.sub(r"[\[\]]", "", template)


def read_ssv2(root: str | Path, split: str, videos_dir: str = "videos"
              ) -> tuple[list[VideoRecord], list[str]]:
    """Records of an SSv2 split and the class names by index."""
    root = Path(root)
    labels_path, split_path = root / "labels" / "labels.json", root / "labels" / f"{split}.json"
    for path in (labels_path, split_path):
        if not path.is_file():
            raise FileNotFoundError(f"data_root: no {path.relative_to(root)} under {root}")
    labels = _read_json(labels_path)
    if not isinstance(labels, dict) or not all(
            isinstance(i, (int, str)) and str(i).isdigit() for i in labels.values()):
        raise ValueError(f"data_root: {labels_path} must map each template to its class "
                         "index (an object of name: number)")
    label_index = {name: int(i) for name, i in labels.items()}
    # the classifier has one output per class: its ids must be exactly 0..K-1
    if sorted(label_index.values()) != list(range(len(label_index))):
        raise ValueError(f"data_root: {labels_path} must number its {len(label_index)} "
                         f"classes 0..{len(label_index) - 1}, each once")
    names = [""] * len(label_index)
    for name, i in label_index.items():
        names[i] = name
    records = []
    entries = _read_json(split_path)
    if not isinstance(entries, list):
        raise ValueError(f"data_root: {split_path} must be a list of videos")
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("template"), str)
                and isinstance(entry.get("id"), (str, int))):
            raise ValueError(f"data_root: {split_path}: entry {n} is not an object with an "
                             "'id' and a 'template'")
        if not re.fullmatch(r"[\w.-]+", str(entry["id"])) or str(entry["id"]).strip(".") == "":
            # the id names a file under the videos directory: nothing outside it
            raise ValueError(f"data_root: {split_path}: entry {n} has id {str(entry['id'])!r}, "
                             "not a file name")
        label = ssv2_label(entry["template"])
        if label not in label_index:
            raise ValueError(f"{split_path}: id {entry['id']} has unknown label {label!r}")
        path = root / videos_dir / f"{entry['id']}.webm"
        records.append(VideoRecord(str(path), label_index[label]))
    return records, names


def _read_json(path: Path):
    """``path`` parsed as JSON; ``ValueError`` naming the file (and line) otherwise."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"data_root: {path} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"data_root: {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError(f"data_root: {path}: nested too deeply") from None


def read_list(root: str | Path, split: str, num_classes: int | None = None
              ) -> tuple[list[VideoRecord], int]:
    """Records of a ``path label`` list (``<root>/<split>.txt`` or ``split`` as a path)
    and its number of classes K. Labels must be class ids 0..K-1, K being
    ``num_classes`` when given, else the number of distinct labels in the list: a stray
    ``99`` or ``-1`` would otherwise silently widen the classifier or drop out of the
    loss."""
    root = Path(root)
    list_path = Path(split) if Path(split).suffix else root / f"{split}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(f"data_root: no list file {list_path}")
    records, line_of = [], []
    try:
        text = list_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data_root: {list_path} is not UTF-8 text (byte {exc.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            path, label = line.rsplit(maxsplit=1)  # paths may hold spaces, labels do not
            records.append(VideoRecord(str(root / path), int(label)))
            line_of.append(n)
        except ValueError:
            raise ValueError(f"data_root: {list_path}:{n}: expected 'path label', "
                             f"got {line!r}") from None
    k = len({r.label for r in records}) if num_classes is None else num_classes
    why = (f"the model has {k} classes" if num_classes is not None else
           f"the list has {k} distinct labels, so ids must be 0..{k - 1} with none missing")
    for n, record in zip(line_of, records, strict=True):
        if not 0 <= record.label < k:
            raise ValueError(f"data_root: {list_path}:{n}: label {record.label} is not a "
                             f"class id ({why})")
    return records, k


def read_records(data_format: str, root: str | Path, split: str, videos_dir: str = "videos",
                 num_classes: int | None = None) -> tuple[list[VideoRecord], int]:
    """Records and the number of classes of a split in either layout. ``num_classes``
    (a validation split, a trained model) bounds its labels: it may lack some classes."""
    # a set on an object store is read from this node's copy of it (OpenCV reads files)
    root = files.mirror(root)
    if data_format == "ssv2":
        records, names = read_ssv2(root, split, videos_dir)
        if num_classes is not None and len(names) > num_classes:
            raise ValueError(f"data_root: {len(names)} classes in labels.json, "
                             f"the model has {num_classes}")
        return records, len(names)
    return read_list(root, split, num_classes)


def require_decodable(records: list[VideoRecord], what: str) -> None:
    """Raise ``ValueError`` unless some video of ``records`` decodes. Undecodable videos
    are skipped one by one, so a split where all fail would train or score nothing and
    still report (top-1 0.0 over 0 clips). Stops at the first good video: one decode for
    a healthy split."""
    if not records:
        raise ValueError(f"data_root: {what} is empty")
    reasons: dict[str, int] = {}
    for record in records:
        try:
            first_frame_decodes(record.path)
            return
        except Exception as exc:  # noqa: BLE001 - as VideoClips: any failure skips it
            reasons[str(exc)] = reasons.get(str(exc), 0) + 1
    counts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
    raise ValueError(f"data_root: {what}: all {len(records)} videos would be skipped as "
                     f"undecodable ({counts}; first: {records[0].path})")


# Decoded bytes a video may hold in memory at once. A video that decodes to more (a
# 4 MB MJPEG of 40 frames at 4096x4096 is 2 GB) is decoded twice instead: once to count
# its frames, keeping none, and once to keep only the sampled frames, each resized as it
# is decoded. Either way a clip's frames are the same bytes.
MAX_DECODED_BYTES = 256 << 20


@dataclass
class Video:
    """A decoded video: its frames (``[N, H, W, 3]`` uint8 RGB) when they fit in
    ``MAX_DECODED_BYTES``, else None and only their count."""
    path: str
    total: int
    frames: np.ndarray | None

    def clip(self, indices: np.ndarray, short: int) -> np.ndarray:
        """The frames at ``indices``, short side resized to ``short`` pixels."""
        if self.frames is not None:
            return _resize_short_side(self.frames[indices], short)
        wanted = {int(i) for i in indices}
        kept: dict[int, np.ndarray] = {}
        for index, frame in enumerate(_frames(self.path)):
            if index in wanted:
                kept[index] = _resize_short_side(frame[None], short)[0]
                if len(kept) == len(wanted):
                    break
        if len(kept) < len(wanted):
            raise VideoDecodeError(f"decodes to fewer frames the second time ({len(kept)} of "
                                   f"{len(wanted)} sampled)")
        return np.stack([kept[int(i)] for i in indices])


def _frames(path: str) -> Iterator[np.ndarray]:
    """The frames of a video, decoded one at a time (uint8 RGB ``[H, W, 3]``)."""
    capture = cv2.VideoCapture(path)
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def open_video(path: str, max_bytes: int | None = None) -> Video:
    """Decode ``path`` once, keeping its frames if they fit in ``max_bytes`` (default
    ``MAX_DECODED_BYTES``); else count them and keep none (``Video.clip`` decodes the
    sampled ones again). Raises ``VideoDecodeError`` for a video with no frame."""
    max_bytes = MAX_DECODED_BYTES if max_bytes is None else max_bytes
    if not Path(path).is_file():
        raise VideoDecodeError("no such file")  # OpenCV would only say "no frames"
    frames: list[np.ndarray] | None = []
    total = held = 0
    for frame in _frames(path):
        total += 1
        if frames is not None:
            held += frame.nbytes
            frames.append(frame)
            if held > max_bytes:
                frames = None            # too big to hold: count the rest, keep nothing
    if not total:
        raise VideoDecodeError("no decodable frames")
    return Video(path, total, np.stack(frames) if frames is not None else None)


def decode_video(path: str) -> np.ndarray:
    """All frames of a video as uint8 RGB ``[N, H, W, 3]``, however large (tests and
    tools; training goes through ``open_video``, which bounds what it holds)."""
    return open_video(path, max_bytes=1 << 62).frames


def first_frame_decodes(path: str) -> None:
    """Raise ``VideoDecodeError`` unless the video's first frame decodes (the preflight
    probe: nothing more is decoded)."""
    if not Path(path).is_file():
        raise VideoDecodeError("no such file")
    if next(_frames(path), None) is None:
        raise VideoDecodeError("no decodable frames")


def sample_indices(total: int, num_frames: int, *, stride: int, sampling: str,
                   rng: np.random.Generator | None, clip_index: int = 0, num_clips: int = 1
                   ) -> np.ndarray:
    """Frame indices of one clip. ``rng`` None means evaluation: deterministic views,
    clip ``clip_index`` of ``num_clips`` spread evenly over the video."""
    if sampling == "segments":
        edges = np.linspace(0, total, num_frames + 1)
        length = edges[1:] - edges[:-1]
        offset = rng.random(num_frames) if rng is not None else (clip_index + 0.5) / num_clips
        return np.minimum((edges[:-1] + offset * length).astype(int), total - 1)
    span = (num_frames - 1) * stride + 1
    room = max(total - span, 0)
    if rng is not None:
        start = int(rng.integers(0, room + 1))
    else:
        start = room // 2 if num_clips == 1 else round(clip_index * room / (num_clips - 1))
    # a video shorter than the span repeats its last frame
    return np.minimum(start + np.arange(num_frames) * stride, total - 1)


def _resize_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    h, w = frames.shape[1:3]
    scale = short / min(h, w)
    size = (max(short, round(w * scale)), max(short, round(h * scale)))  # cv2 wants (w, h)
    if size == (w, h):
        return frames
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA if scale < 1
                                else cv2.INTER_LINEAR) for f in frames])


def spatial_crops(frames: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` (1 or 3) square crops along the long side: centre, or start/centre/end."""
    h, w = frames.shape[1:3]
    if count == 1:
        positions = [0.5]
    else:
        positions = np.linspace(0.0, 1.0, count).tolist()
    crops = []
    for p in positions:
        top, left = round((h - size) * p), round((w - size) * p)
        crops.append(frames[:, top:top + size, left:left + size])
    return crops


class VideoClips(Dataset):
    """Clips of labelled videos. Training: one random clip, scale-jittered random crop
    (short side in ``[256/224, 320/224] x img_size``, the paper's jitter), optional flip.
    Evaluation: ``temporal_clips x spatial_crops`` views stacked as ``[V, 3, T, S, S]``."""

    def __init__(self, records: list[VideoRecord], *, num_frames: int, img_size: int,
                 stride: int = 4, sampling: str = "stride", train: bool = True,
                 flip: bool = False, seed: int = 0, temporal_clips: int = 1,
                 spatial_crops: int = 1):
        self.records = records
        self.num_frames, self.img_size = num_frames, img_size
        self.stride, self.sampling = stride, sampling
        self.train, self.flip, self.seed = train, flip, seed
        self.temporal_clips, self.spatial_crops = temporal_clips, spatial_crops
        self.epoch = 0  # set before each epoch; workers copy it when the loader starts

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        record = self.records[index]
        try:
            video = open_video(record.path)
        except Exception as exc:  # noqa: BLE001 - any decoder failure skips the video
            log.warning("skipping undecodable video %s: %s", record.path, exc)
            return Skipped(record.path, str(exc))
        try:
            if self.train:
                return self._train_clip(video, record, index)
            views = []
            for clip in range(self.temporal_clips):
                idx = sample_indices(video.total, self.num_frames, stride=self.stride,
                                     sampling=self.sampling, rng=None, clip_index=clip,
                                     num_clips=self.temporal_clips)
                resized = video.clip(idx, self.img_size)
                views += [normalize_rgb(torch.from_numpy(np.ascontiguousarray(c)))
                          for c in spatial_crops(resized, self.img_size, self.spatial_crops)]
        except VideoDecodeError as exc:   # a large video's second decode fell short
            log.warning("skipping undecodable video %s: %s", record.path, exc)
            return Skipped(record.path, str(exc))
        return {"video": torch.stack(views), "label": record.label}

    def _train_clip(self, video: Video, record: VideoRecord, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        idx = sample_indices(video.total, self.num_frames, stride=self.stride,
                             sampling=self.sampling, rng=rng)
        short = int(rng.integers(round(self.img_size * 256 / 224),
                                 round(self.img_size * 320 / 224) + 1))
        clip = video.clip(idx, short)
        h, w = clip.shape[1:3]
        top = int(rng.integers(0, h - self.img_size + 1))
        left = int(rng.integers(0, w - self.img_size + 1))
        clip = clip[:, top:top + self.img_size, left:left + self.img_size]
        if self.flip and rng.integers(0, 2):
            clip = clip[:, :, ::-1]
        return {"video": normalize_rgb(torch.from_numpy(np.ascontiguousarray(clip))),
                "label": record.label}


def collate_videos(samples: list[dict | Skipped]) -> dict:
    """Stack decodable clips; ``skipped`` lists the paths that were not."""
    good = [s for s in samples if not isinstance(s, Skipped)]
    batch: dict = {"skipped": [s.path for s in samples if isinstance(s, Skipped)]}
    if good:
        batch["video"] = torch.stack([s["video"] for s in good])
        batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
    return batch


def epoch_batches(n: int, batch_size: int, *, epoch: int, seed: int, shuffle: bool,
                  rank: int = 0, world_size: int = 1, drop_last: bool = True) -> list[list[int]]:
    """This rank's index batches for one epoch: a seeded permutation, padded by wrapping
    so every rank gets the same number of batches (DDP steps stay in lockstep)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order.tolist()
    per_rank = -(-n // world_size)
    order = (order * (1 + (per_rank * world_size) // max(n, 1)))[:per_rank * world_size]
    mine = order[rank::world_size]
    # drop a ragged last batch, unless it is the only one (a tiny data set)
    ragged = len(mine) % batch_size if drop_last and len(mine) >= batch_size else 0
    stop = len(mine) - ragged
    return [mine[i:i + batch_size] for i in range(0, stop, batch_size)]
