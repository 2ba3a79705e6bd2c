"""The shard format: one WebDataset sample per clip. Writer and reader live here,
side by side, so they cannot drift; ``docs/dataset-format.md`` documents the same
table for readers who use plain ``tarfile`` + numpy.

Every array is stored as a ``.npy`` member (numpy's own format, written with
``allow_pickle=False`` and read back the same way), so labels are lossless and
RGB too. ``meta.json`` is UTF-8 JSON. Members appear in sorted order with fixed
metadata (mtime 0, mode 0444, no user/group), so the same clips give the same bytes.

A clip dict (what ``decode_sample`` returns and ``encode_clip`` takes)::

    key             str                      sample key, no dots
    rgb             uint8   [T,H,W,3]        sRGB (Filmic view transform)
    depth           float32 [T,H,W]          metres, z-depth along the optical axis; +inf = sky
    instance_seg    uint16  [T,H,W]          0 = background, 1 = floor, 2.. = objects
    semantic_seg    uint8   [T,H,W]          index into meta["classes"] (0 = background)
    normal          float32 [T,H,W,3]        unit, OpenCV camera frame; zeros on background
    K               float32 [3,3]            intrinsics in pixels (OpenCV)
    world_to_camera float32 [T,4,4]          OpenCV camera (x right, y down, z forward)
    instances       dict of arrays, N instances (floor first):
        id          uint16  [N]              value in instance_seg
        category    int32   [N]              index into meta["classes"]
        position    float32 [N,T,3]          world metres (centre of mass)
        quaternion  float32 [N,T,4]          world rotation, w x y z
        bbox_3d     float32 [N,T,8,3]        world corners of the oriented box
        visibility  float32 [N,T]            fraction of the frame's pixels showing it
    meta            dict                     seed, fps, resolution, classes, ...
    optional: forward_flow / backward_flow float32 [T,H,W,2] (pixels, (dy, dx));
              object_coordinates float32 [T,H,W,3] ([0,1] in the object's box)
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from generation.locations import shard_url

# The fixed semantic class list of the built-in asset set. A dataset built from another
# asset manifest appends its extra categories (sorted); meta["classes"] is authoritative.
CLASSES = ("background", "floor", "cube", "sphere", "cylinder", "cone", "torus", "capsule",
           "icosahedron", "pyramid")

# field -> (dtype, number of dimensions); the members written for each clip.
FRAME_FIELDS = {
    "rgb": (np.uint8, 4),
    "depth": (np.float32, 3),
    "instance_seg": (np.uint16, 3),
    "semantic_seg": (np.uint8, 3),
    "normal": (np.float32, 4),
}
CAMERA_FIELDS = {"K": (np.float32, 2), "world_to_camera": (np.float32, 3)}
INSTANCE_FIELDS = {
    "id": (np.uint16, 1),
    "category": (np.int32, 1),
    "position": (np.float32, 3),
    "quaternion": (np.float32, 3),
    "bbox_3d": (np.float32, 4),
    "visibility": (np.float32, 2),
}
OPTIONAL_FIELDS = {
    "forward_flow": (np.float32, 4),
    "backward_flow": (np.float32, 4),
    "object_coordinates": (np.float32, 4),
}
INSTANCE_PREFIX = "inst_"   # instance arrays are stored as inst_<name>.npy


class FormatError(ValueError):
    """A member is missing, has the wrong dtype/shape, or is not a valid .npy."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_array(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a format error
        raise FormatError(f"{name}: not a readable .npy ({exc})") from None


def _check(name: str, array: np.ndarray, dtype, ndim: int) -> np.ndarray:
    if array.dtype != np.dtype(dtype) or array.ndim != ndim:
        raise FormatError(f"{name}: expected {np.dtype(dtype).name} with {ndim} dims, "
                          f"got {array.dtype.name} {array.shape}")
    return array


def encode_clip(clip: dict) -> dict:
    """Clip dict -> WebDataset sample (``__key__`` + member name -> bytes)."""
    key = clip["key"]
    if "." in key or "/" in key or not key:
        raise FormatError(f"sample key {key!r} must be non-empty without dots or slashes")
    sample = {"__key__": key}
    for table in (FRAME_FIELDS, CAMERA_FIELDS):
        for name, (dtype, ndim) in table.items():
            sample[f"{name}.npy"] = _npy_bytes(_check(name, np.asarray(clip[name]), dtype, ndim))
    for name, (dtype, ndim) in OPTIONAL_FIELDS.items():
        if clip.get(name) is not None:
            sample[f"{name}.npy"] = _npy_bytes(_check(name, np.asarray(clip[name]), dtype, ndim))
    for name, (dtype, ndim) in INSTANCE_FIELDS.items():
        array = _check(f"instances.{name}", np.asarray(clip["instances"][name]), dtype, ndim)
        sample[f"{INSTANCE_PREFIX}{name}.npy"] = _npy_bytes(array)
    sample["meta.json"] = json.dumps(clip["meta"], sort_keys=True).encode()
    return sample


def decode_sample(sample: dict) -> dict:
    """WebDataset sample (member name -> bytes) -> clip dict. Use as the ``.map`` stage
    of a ``wds.WebDataset`` pipeline; never pickles, never touches wds's image decoders."""
    # webdataset lowercases member extensions (K.npy arrives as k.npy); match either way.
    sample = {k if k.startswith("__") else k.lower(): v for k, v in sample.items()}

    def member(name: str) -> bytes:
        if name.lower() not in sample:
            raise FormatError(f"sample {sample.get('__key__')!r}: missing member {name}")
        return sample[name.lower()]

    clip: dict = {"key": sample["__key__"]}
    for table in (FRAME_FIELDS, CAMERA_FIELDS):
        for name, (dtype, ndim) in table.items():
            clip[name] = _check(name, _npy_array(member(f"{name}.npy"), name), dtype, ndim)
    for name, (dtype, ndim) in OPTIONAL_FIELDS.items():
        if f"{name}.npy" in sample:
            clip[name] = _check(name, _npy_array(member(f"{name}.npy"), name), dtype, ndim)
    clip["instances"] = {
        name: _check(f"instances.{name}",
                     _npy_array(member(f"{INSTANCE_PREFIX}{name}.npy"), name), dtype, ndim)
        for name, (dtype, ndim) in INSTANCE_FIELDS.items()}
    try:
        clip["meta"] = json.loads(member("meta.json"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"meta.json: {exc}") from None
    _check_shapes(clip)
    return clip


def _check_shapes(clip: dict) -> None:
    t, h, w, _ = clip["rgb"].shape
    for name in ("depth", "instance_seg", "semantic_seg"):
        if clip[name].shape != (t, h, w):
            raise FormatError(f"{name}: shape {clip[name].shape} != {(t, h, w)}")
    if clip["normal"].shape != (t, h, w, 3):
        raise FormatError(f"normal: shape {clip['normal'].shape} != {(t, h, w, 3)}")
    if clip["K"].shape != (3, 3) or clip["world_to_camera"].shape != (t, 4, 4):
        raise FormatError("K/world_to_camera: wrong shape")
    n = clip["instances"]["id"].shape[0]
    expected = {"category": (n,), "position": (n, t, 3), "quaternion": (n, t, 4),
                "bbox_3d": (n, t, 8, 3), "visibility": (n, t)}
    for name, shape in expected.items():
        if clip["instances"][name].shape != shape:
            raise FormatError(f"instances.{name}: shape {clip['instances'][name].shape} "
                              f"!= {shape}")


def write_shard(path: Path, clips: Iterable[dict]) -> int:
    """Write clips to ``path`` (a .tar) deterministically; returns the number written.
    The caller renames a temporary path into place (see ``generation.dataset``)."""
    count = 0
    # An open file, not a string: TarWriter would hand a string to webdataset's gopen,
    # which runs a path starting with "pipe:" as a shell command.
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, mode=0o444,
                                               user="", group="") as sink:
        for clip in clips:
            sink.write(encode_clip(clip))
            count += 1
    return count


def iter_raw_samples(path: Path) -> Iterator[dict]:
    """Group a shard's members into raw samples with plain ``tarfile`` (no webdataset)."""
    current: dict | None = None
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            key, _, field = base.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            current[field] = tar.extractfile(info).read()
    if current is not None:
        yield current


def read_shard(path: Path) -> Iterator[dict]:
    """Decoded clips of one shard, in order."""
    for sample in iter_raw_samples(path):
        yield decode_sample(sample)


def webdataset_pipeline(paths, *, shardshuffle: int = 0, seed: int = 0) -> wds.DataPipeline:
    """A webdataset pipeline over local shard paths that yields clip dicts; like
    ``wds.WebDataset``, each DataLoader worker reads its own shards."""
    return wds.DataPipeline(
        # file: URLs built here: gopen runs a string starting with "pipe:" as a shell
        # command. They are read by gopen (tarfile_to_samples), which decodes them, not by
        # wds.WebDataset's opener, which does not (a ";", "#" or "%" in a name breaks it).
        wds.SimpleShardList([shard_url(p) for p in paths]),
        wds.split_by_worker,
        *([wds.shuffle(shardshuffle, seed=seed)] if shardshuffle else []),
        wds.tarfile_to_samples(),
        wds.map(decode_sample))
