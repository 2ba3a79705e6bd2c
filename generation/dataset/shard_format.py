"""The shard format: one WebDataset sample per clip. Writer and reader live here,
side by side, so they cannot drift; ``docs/dataset-format.md`` documents the same
table for readers who use plain ``tarfile`` + numpy + zstandard.

``FIELDS`` is the one table of what a clip holds: each row is a clip field, its tar
member, dtype, number of dimensions and codec. The codec is the member's extension
(webdataset's convention: ``depth.npy.zst`` is ``.npy`` bytes in a zstd frame), so a
reader picks the decoder from the name. Format 2 (``FORMAT_VERSION``) writes every
array as ``.npy.zst``: numpy's own ``.npy`` bytes (``allow_pickle=False`` both ways),
compressed losslessly with zstd at a pinned level, single-threaded, with a checksum and
the content size in the frame, so the same clips give the same bytes. Format 1 shards
(plain ``.npy`` members) are still read. ``meta.json`` is UTF-8 JSON. Members appear in
sorted order with fixed metadata (mtime 0, mode 0444, no user/group).

Reading is bounded: a member's size once decompressed is known from its frame header,
and counts against one budget per clip before anything is decompressed (``ReadRules``,
``clip_limit``, the constants below ``MAX_MEMBER_BYTES``), so a crafted shard of a few
kilobytes cannot expand into gigabytes. ``pvit verify`` holds a shard to this format
(``ReadRules.for_manifest``): regular files with safe names, checksummed frames, no
plain ``.npy`` in a format 2 dataset, no clip larger than its spec.

Why zstd for the 8/16-bit images too, not PNG: on rendered demo clips zstd is smaller
on each of them (RGB 2.5x vs PNG's 2.2x at its smallest level, instance ids 52x vs 35x,
classes 29x vs 21x) and decodes RGB 3x faster, the segmentations as fast or faster
(``benchmarks/shards.py``; docs/performance.md, "Shard format v2").

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
    optional: forward_flow / backward_flow float32 [T,H,W,2] (pixels, (dx, dy), y down:
              to frame t+1 / t-1; 0 in the last / first frame);
              object_coordinates float32 [T,H,W,3] ([0,1] in the object's box)
    point tracks (``scene.tracks`` = Q > 0; ``track_format``): tracks_query float32
              [Q,3] (t, y, x), tracks_2d float32 [Q,T,2] (x, y pixels),
              tracks_occluded bool [Q,T], tracks_instance uint16 [Q]
    actors (recipes with people, ``actor_format``; A actors, J = meta["joint_names"]):
              actor_ids uint16 [A], actor_action int32 [A], actor_mirrored uint8 [A],
              actor_joints_3d float32 [A,T,J,3] (world metres), actor_joints_2d
              float32 [A,T,J,2] (pixels), actor_joints_visible uint8 [A,T,J]
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zstandard

from generation.dataset.actor_format import (
    ACTOR_CLASSES,
    ACTOR_SHAPES,
    ACTOR_SWITCH,
    MAX_ACTORS,
    MAX_JOINTS,
    check_actor_shapes,
    writes_actors,
)
from generation.dataset.storage import open_file
from generation.dataset.track_format import (
    MAX_TRACKS,
    TRACK_SHAPES,
    TRACK_SWITCH,
    check_track_shapes,
)

# webdataset stays inside write_samples() and group_samples(): it imports torch (1.0-1.6
# s, python -X importtime after flows.cli), and every `pvit` command imports this module
# (generation.config; `pvit --help` takes 0.33 s). A reader pays it once: `pvit verify`
# and `pvit show` at their first shard.

# The fixed semantic class list of the built-in asset set. A dataset built from another
# asset manifest appends its extra categories (sorted); meta["classes"] is authoritative.
CLASSES = ("background", "floor", "cube", "sphere", "cylinder", "cone", "torus", "capsule",
           "icosahedron", "pyramid")


def class_list(manifest: dict, actors: bool = False) -> list[str]:
    """A dataset's classes for an asset manifest (Kubric's format, as a dict): the fixed
    list, then any extra categories of a user's asset set, sorted, then (``actors``: a
    recipe with people) "person" and the body parts (``actor_format.ACTOR_CLASSES``), so
    a dataset without people keeps its list. Lives with the format (and its hash,
    ``manifest.RENDER_CODE``): a shard's semantic ids index this list."""
    categories = {a.get("metadata", {}).get("category", k) for k, a in manifest["assets"].items()}
    classes = list(CLASSES) + sorted(categories - set(CLASSES))
    return classes + [c for c in ACTOR_CLASSES if actors and c not in classes]


# 1: every array a plain .npy member. 2: every array .npy.zst (format 1 is still read).
FORMAT_VERSION = 2

# Codecs, named by the member extension that says how the bytes are encoded.
NPY = "npy"            # numpy's .npy bytes (format 1; read, no longer written)
NPY_ZST = "npy.zst"    # the same .npy bytes in one zstd frame (format 2)
JSON = "json"          # UTF-8 JSON
ARRAY_CODECS = (NPY_ZST, NPY)   # what an array member may be stored as, newest first

# Pinned so the same clip always gives the same bytes: zstd output depends only on the
# level, the parameters and the library version. Level 9: on the demo clips level 3 gives
# 6.1x, 9 gives 6.5x at ~10 ms per clip, 19 gives 7.0x at ~130 ms (10% of a render).
ZSTD_LEVEL = 9
MAX_MEMBER_BYTES = 1 << 33    # a frame claiming more is damage, not a clip (8 GiB)

# What decoding a clip may cost, checked before anything is decompressed (a 51 KB shard
# once expanded to 2.1 GB in `pvit verify`): every array member's .npy size (a frame's
# declared content size, which zstd holds it to; a plain .npy's own length) counts
# against one budget per clip. With the dataset's spec (``ReadRules.for_manifest``) the
# budget is the largest clip that spec renders (``clip_limit``); without one it is
# EXPANSION times what the sample stores, and at least DEFAULT_CLIP_BYTES, so a crafted
# shard of 1 MB decodes to ~100 MB at most. An array is read straight from the stream into
# its own buffer (one copy in memory, not two), its .npy header checked first.
DEFAULT_CLIP_BYTES = 64 << 20
EXPANSION = 100
MAX_INSTANCES = 1024          # N a spec's clip may have at least (the renderer: max_objects+1)
NPY_HEADER_BYTES = 1 << 14    # what a member's .npy header may add (numpy reads up to 10 KB)
# zstd's streaming decoder keeps a window of min(window, content size) besides the output;
# the writer's frames use 4 MiB (level 9), `zstd -19` 8 MiB. A larger one is refused.
MAX_WINDOW_BYTES = 1 << 25


@dataclass(frozen=True)
class Field:
    """One row of the shard table: a clip field and how it is stored."""

    key: str                # clip dict key; "instances.id" is clip["instances"]["id"]
    member: str             # tar member name before the codec extension
    dtype: type | None      # numpy dtype (None for meta)
    ndim: int               # number of dimensions
    codec: str              # what the writer writes (the member's extension)
    optional: bool = False  # written only when the clip has it

    @property
    def name(self) -> str:
        """The member name the writer writes (``depth.npy.zst``)."""
        return f"{self.member}.{self.codec}"


FIELDS = (
    #     clip key                 member               dtype       ndim codec
    Field("rgb",                   "rgb",               np.uint8,   4,   NPY_ZST),
    Field("depth",                 "depth",             np.float32, 3,   NPY_ZST),
    Field("instance_seg",          "instance_seg",      np.uint16,  3,   NPY_ZST),
    Field("semantic_seg",          "semantic_seg",      np.uint8,   3,   NPY_ZST),
    Field("normal",                "normal",            np.float32, 4,   NPY_ZST),
    Field("K",                     "K",                 np.float32, 2,   NPY_ZST),
    Field("world_to_camera",       "world_to_camera",   np.float32, 3,   NPY_ZST),
    Field("instances.id",          "inst_id",           np.uint16,  1,   NPY_ZST),
    Field("instances.category",    "inst_category",     np.int32,   1,   NPY_ZST),
    Field("instances.position",    "inst_position",     np.float32, 3,   NPY_ZST),
    Field("instances.quaternion",  "inst_quaternion",   np.float32, 3,   NPY_ZST),
    Field("instances.bbox_3d",     "inst_bbox_3d",      np.float32, 4,   NPY_ZST),
    Field("instances.visibility",  "inst_visibility",   np.float32, 2,   NPY_ZST),
    Field("meta",                  "meta",              None,       0,   JSON),
    Field("forward_flow",          "forward_flow",      np.float32, 4,   NPY_ZST, True),
    Field("backward_flow",         "backward_flow",     np.float32, 4,   NPY_ZST, True),
    Field("object_coordinates",    "object_coordinates", np.float32, 4,  NPY_ZST, True),
    Field("actor_ids",             "actor_ids",         np.uint16,  1,   NPY_ZST, True),
    Field("actor_action",          "actor_action",      np.int32,   1,   NPY_ZST, True),
    Field("actor_mirrored",        "actor_mirrored",    np.uint8,   1,   NPY_ZST, True),
    Field("actor_joints_3d",       "actor_joints_3d",   np.float32, 4,   NPY_ZST, True),
    Field("actor_joints_2d",       "actor_joints_2d",   np.float32, 4,   NPY_ZST, True),
    Field("actor_joints_visible",  "actor_joints_visible", np.uint8, 3,  NPY_ZST, True),
    Field("tracks_query",          "tracks_query",      np.float32, 2,   NPY_ZST, True),
    Field("tracks_2d",             "tracks_2d",         np.float32, 3,   NPY_ZST, True),
    Field("tracks_occluded",       "tracks_occluded",   np.bool_,   2,   NPY_ZST, True),
    Field("tracks_instance",       "tracks_instance",   np.uint16,  1,   NPY_ZST, True),
)

# Each array field's shape: T frames, H x W pixels, N instances, or a fixed size. Only
# bounds memory here (``clip_limit``); the decoded clip is checked by ``_check_shapes``.
SHAPES = {
    "rgb": ("T", "H", "W", 3), "depth": ("T", "H", "W"), "instance_seg": ("T", "H", "W"),
    "semantic_seg": ("T", "H", "W"), "normal": ("T", "H", "W", 3), "K": (3, 3),
    "world_to_camera": ("T", 4, 4), "instances.id": ("N",), "instances.category": ("N",),
    "instances.position": ("N", "T", 3), "instances.quaternion": ("N", "T", 4),
    "instances.bbox_3d": ("N", "T", 8, 3), "instances.visibility": ("N", "T"),
    "forward_flow": ("T", "H", "W", 2), "backward_flow": ("T", "H", "W", 2),
    "object_coordinates": ("T", "H", "W", 3),
    **ACTOR_SHAPES,
    **TRACK_SHAPES,
}
# The spec switch (``generation.scene``) that makes the renderer write an optional field.
SPEC_SWITCHES = {"forward_flow": "flow", "backward_flow": "flow",
                 "object_coordinates": "object_coordinates",
                 **{key: TRACK_SWITCH for key in TRACK_SHAPES},
                 **{key: ACTOR_SWITCH for key in ACTOR_SHAPES}}


class FormatError(ValueError):
    """A member is missing, has the wrong dtype/shape, or does not decode."""


def _compressor() -> zstandard.ZstdCompressor:
    # threads=0: single-threaded, so the bytes do not depend on the machine's cores (the
    # multi-threaded mode frames its output differently); no dictionary, no dict id.
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True,
                                    write_content_size=True, write_dict_id=False)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _encode(value, codec: str, compressor: zstandard.ZstdCompressor) -> bytes:
    if codec == JSON:
        return json.dumps(value, sort_keys=True).encode()
    data = _npy_bytes(value)
    return compressor.compress(data) if codec == NPY_ZST else data


@dataclass(frozen=True)
class ReadRules:
    """What a reader holds a shard to besides decoding it. The default (training, ``pvit
    show``, ``read_shard``) reads whatever the project ever wrote, within the memory
    budget of one clip; ``for_manifest`` (``pvit verify``) holds a shard to its manifest
    and to docs/dataset-format.md as well."""

    clip_bytes: int | None = None  # the budget of one clip; None: the default (module top)
    reason: str = ""               # where clip_bytes comes from, for the error message
    format_version: int | None = None  # 2: every array is .npy.zst (no plain .npy)
    # every zstd frame carries its checksum; every member is a regular file whose name
    # stays inside the directory it is unpacked into (no absolute name, no "..")
    strict: bool = False

    @classmethod
    def for_manifest(cls, manifest: dict) -> "ReadRules":
        spec = manifest.get("spec")
        limit = clip_limit(spec if isinstance(spec, dict) else {})
        version = manifest.get("format_version")
        return cls(clip_bytes=limit[0] if limit else None, reason=limit[1] if limit else "",
                   format_version=version if type(version) is int else None, strict=True)


def clip_limit(spec: dict) -> tuple[int, str] | None:
    """(bytes, why): the .npy bytes of the largest clip ``spec`` (a manifest's ``spec``)
    renders: its frames and resolution, up to ``max(MAX_INSTANCES, max_objects + 1)``
    instances, the optional fields its switches do not turn off, and a .npy header each.
    None when the spec does not give frames and resolution."""
    frames, size = spec.get("frames"), spec.get("resolution")
    if not all(type(v) is int and v > 0 for v in (frames, size)):
        return None
    objects = spec.get("max_objects")
    n = max(MAX_INSTANCES, objects + 1 if type(objects) is int else 0)
    tracks = spec.get(TRACK_SWITCH)   # a count; absent (older specs): none
    q = min(tracks, MAX_TRACKS) if type(tracks) is int and tracks > 0 else 0
    dims = {"T": frames, "H": size, "W": size, "N": n, "A": MAX_ACTORS, "J": MAX_JOINTS,
            "Q": q}
    total = 0
    for field in FIELDS:
        if field.dtype is None or (field.optional and not _switched_on(spec, field.key)):
            continue
        count = math.prod(dims.get(d, d) for d in SHAPES[field.key])
        if count == 0:        # no tracks (Q = 0): the spec writes no such member
            continue
        total += NPY_HEADER_BYTES + count * np.dtype(field.dtype).itemsize
    return total, (f"the largest clip of the manifest's spec: {frames} frames of {size}x{size} "
                   f"px, up to {n} instances")


def _switched_on(spec: dict, key: str) -> bool:
    """Whether the spec's switch lets the renderer write optional field ``key``; a switch
    the spec leaves out allows it (a hand-made spec). The actor fields' switch is the
    recipe and ``max_actors`` (``actor_format.writes_actors``)."""
    if SPEC_SWITCHES[key] == ACTOR_SWITCH:
        return writes_actors(spec)
    return bool(spec.get(SPEC_SWITCHES[key], True))


def _zstd_error(name: str, why) -> FormatError:
    return FormatError(f"{name}: not valid zstd data ({why})")


def _frame_size(data: bytes, name: str, strict: bool) -> int:
    """The content size a member's zstd frame declares, from its header alone; the frame
    must fill the member exactly (nothing cut off, nothing after it)."""
    try:
        size = zstandard.frame_content_size(data)
        params = zstandard.get_frame_parameters(data)
        start = zstandard.frame_header_size(data)
    except zstandard.ZstdError as exc:
        raise _zstd_error(name, exc) from None
    if not 0 <= size <= MAX_MEMBER_BYTES:  # -1: the writer always records the size
        raise _zstd_error(name, f"frame content size {size} is not plausible")
    if strict and not params.has_checksum:
        raise FormatError(f"{name}: zstd frame without a content checksum (the format writes "
                          "one in every frame)")
    # walk the block headers (3 bytes each: last-block bit, type, size) to the frame's end
    end, last = start, False
    while not last and end + 3 <= len(data):
        header = int.from_bytes(data[end:end + 3], "little")
        last, kind, block = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise _zstd_error(name, "reserved block type")
        end += 3 + (1 if kind == 1 else block)   # an RLE block stores its one byte
    end += 4 if params.has_checksum else 0
    if not last or end > len(data):
        raise _zstd_error(name, "the frame is cut short")
    if end < len(data):
        raise _zstd_error(name, f"{len(data) - end} bytes after the frame")
    return size


def _read_header(source, name: str):
    """(shape, fortran_order, dtype, header length) of the .npy bytes ``source`` gives."""
    try:
        version = np.lib.format.read_magic(source)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(source)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(source)
        else:
            raise ValueError(f".npy format version {version} is not read")
    except zstandard.ZstdError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is a format error
        raise FormatError(f"{name}: not a readable .npy ({exc})") from None
    if dtype.hasobject:
        raise FormatError(f"{name}: not a readable .npy (Object arrays cannot be loaded when "
                          "allow_pickle=False)")
    return shape, fortran, dtype, source.tell()


def _drain(source) -> None:
    """Decompress the rest of a frame, discarding it (a damaged frame raises ZstdError)."""
    while source.read(1 << 20):
        pass


def _read_array(data: bytes, codec: str, field: Field, name: str, size: int) -> np.ndarray:
    """One array member, as ``np.load(..., allow_pickle=False)`` reads it; ``size``: its
    .npy size (``_frame_size``, checked against the clip's budget by the caller). The
    header is read first, and must agree with ``size`` before the array is allocated;
    then the array is read straight into its buffer."""
    zst = codec == NPY_ZST
    source = (zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES).stream_reader(data)
              if zst else io.BytesIO(data))
    try:
        try:
            shape, fortran, dtype, header = _read_header(source, name)
            count = math.prod(shape)
            nbytes = count * dtype.itemsize
            if dtype != np.dtype(field.dtype) or len(shape) != field.ndim:
                raise FormatError(f"{name}: expected {np.dtype(field.dtype).name} with "
                                  f"{field.ndim} dims, got "
                                  f"{dtype.name if dtype.isnative else dtype.str} {shape}")
            if zst and header + nbytes != size:
                raise FormatError(f"{name}: its .npy header ({dtype.name} {shape}, "
                                  f"{header + nbytes:,} bytes) disagrees with the frame "
                                  f"content size ({size:,} bytes)")
            if header + nbytes > size:   # np.load's words for a short plain .npy
                raise FormatError(f"{name}: not a readable .npy (EOF: reading array data, "
                                  f"expected {nbytes} bytes got {size - header})")
        except FormatError:
            if zst:
                _drain(source)   # a damaged frame is that, whatever its header says
            raise
        array = np.empty(count, dtype)
        view, filled = memoryview(array).cast("B"), 0
        while filled < nbytes:
            got = source.readinto(view[filled:])
            if not got:
                break
            filled += got
        if zst and (filled < nbytes or source.read(1)):  # read(1): to the end (checksum)
            raise _zstd_error(name, f"the frame holds {header + filled:,} bytes, not {size:,}")
    except zstandard.ZstdError as exc:
        raise _zstd_error(name, exc) from None
    if fortran:
        array.shape = shape[::-1]
        return array.transpose()
    array.shape = shape
    return array


def _decode_json(data: bytes, name: str):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{name}: not valid JSON ({exc})") from None


def _check(field: Field, value) -> object:
    if field.dtype is None:
        return value
    array = np.asarray(value)
    if array.dtype != np.dtype(field.dtype) or array.ndim != field.ndim:
        raise FormatError(f"{field.key}: expected {np.dtype(field.dtype).name} with "
                          f"{field.ndim} dims, got {array.dtype.name} {array.shape}")
    return array


def _get(clip: dict, key: str):
    group, _, name = key.rpartition(".")
    return clip[group].get(name) if group else clip.get(key)


def encode_clip(clip: dict) -> dict:
    """Clip dict -> WebDataset sample (``__key__`` + member name -> bytes)."""
    key = clip["key"]
    if "." in key or "/" in key or not key:
        raise FormatError(f"sample key {key!r} must be non-empty without dots or slashes")
    sample = {"__key__": key}
    compressor = _compressor()
    for field in FIELDS:
        value = _get(clip, field.key)
        if value is None:
            if field.optional:
                continue
            raise FormatError(f"{key}: clip has no {field.key}")
        sample[field.name] = _encode(_check(field, value), field.codec, compressor)
    return sample


def decode_sample(sample: dict, rules: ReadRules | None = None) -> dict:
    """WebDataset sample (member name -> bytes) -> clip dict. Use as the ``.map`` stage
    of a ``wds.WebDataset`` pipeline; never pickles, never touches wds's image decoders.
    Reads format 2 (``.npy.zst``) and format 1 (``.npy``) members alike (``rules``: what
    else to hold the sample to, its memory budget included; see ``ReadRules``)."""
    rules = rules or ReadRules()
    # webdataset lowercases member extensions (K.npy.zst arrives as k.npy.zst); match
    # either way.
    sample = {k if k.startswith("__") else k.lower(): v for k, v in sample.items()}
    key = sample.get("__key__")
    budget, limit = rules.clip_bytes, rules.reason
    if budget is None:
        stored = sum(len(v) for k, v in sample.items()
                     if not k.startswith("__") and isinstance(v, bytes))
        budget = max(DEFAULT_CLIP_BYTES, EXPANSION * stored)
        limit = (f"{EXPANSION}x the {stored:,} bytes the sample stores, at least "
                 f"{DEFAULT_CLIP_BYTES >> 20} MiB, when no spec says more")
    used = 0
    clip: dict = {"key": key, "instances": {}}
    for field in FIELDS:
        codecs = ARRAY_CODECS if field.dtype is not None else (field.codec,)
        found = [(f"{field.member}.{c}", c) for c in codecs
                 if f"{field.member}.{c}".lower() in sample]
        if not found:
            if field.optional:
                continue
            raise FormatError(f"sample {key!r}: missing member {field.name}")
        if len(found) > 1:
            raise FormatError(f"sample {key!r}: both {found[0][0]} and {found[1][0]}")
        name, codec = found[0]
        where, data = f"sample {key!r}: {name}", sample[name.lower()]
        if codec == JSON:
            value = _decode_json(data, where)
        else:
            if codec == NPY and rules.format_version == 2:
                raise FormatError(f"{where}: a plain .npy member in a format 2 dataset (every "
                                  "array is .npy.zst)")
            zst = codec == NPY_ZST
            size = _frame_size(data, where, rules.strict) if zst else len(data)
            if used + size > budget:   # checked before anything is decompressed
                left = (f"{budget - used:,} bytes are left of the {budget:,}" if used
                        else f"{budget:,} bytes")
                raise FormatError(f"{where}: holds {size:,} bytes"
                                  + (" decompressed" if zst else "")
                                  + f"; a clip may hold {left} ({limit})")
            value = _read_array(data, codec, field, where, size)
            used += size
        group, _, attr = field.key.rpartition(".")
        (clip[group] if group else clip)[attr] = _check(field, value)
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
    problem = check_actor_shapes(clip, t) or check_track_shapes(clip, t)
    if problem:
        raise FormatError(problem)


def write_shard(path: Path, clips: Iterable[dict]) -> int:
    """Write clips to ``path`` (a .tar) deterministically; returns the number written.
    The caller renames a temporary path into place (see ``generation.dataset.plan``)."""
    return write_samples(path, (encode_clip(clip) for clip in clips))


def write_samples(path: Path, samples: Iterable[dict]) -> int:
    """``write_shard`` for samples already made by ``encode_clip`` (the render worker
    encodes each clip as it is finished, beside the next scene's render)."""
    import webdataset as wds

    count = 0
    # An open file, not a string: TarWriter would hand a string to webdataset's gopen,
    # which runs a path starting with "pipe:" as a shell command.
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, mode=0o444,
                                               user="", group="") as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    return count


def iter_members(path: str | Path, strict: bool = False) -> Iterator[dict]:
    """The file members of one shard, in order, as webdataset's member dicts
    (``{"fname", "data", "__url__"}``), for ``group_samples``. ``path``: a local path or
    an object URL (``generation.dataset.storage.open_file``). Member names are only
    strings here: nothing is extracted to a path.

    The project's own, not webdataset's ``tar_file_iterator``: that opens the tar with
    ``tarfile`` mode ``r|*``, which decompresses a gzip, bzip2 or xz shard on the fly, so
    a small crafted shard could expand into members of any size (and it appends its file
    object to a read error's message). Here only a plain tar is read (``r:``: a
    compressed one is ``ReadError: invalid header``), and a member whose header claims
    more bytes than the shard holds is ``ReadError: unexpected end of data``, the error a
    short read of it gives, before anything is read (``r:`` reads a member in one call
    of its claimed size: a claim of 100 GB was a ``MemoryError``). So no member costs
    more memory than the shard's size, whatever its headers say.

    Links, directories and other non-files are skipped, and a name is only a key; with
    ``strict`` (``pvit verify``) each is a ``FormatError`` naming the member, and so is
    a name that is absolute or holds a ``..`` component: ``tarfile.extractall`` (Python
    3.11, no filter) would write such a member outside the directory it unpacks into."""
    url = str(path)
    with open_file(path) as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if strict:
                    _check_member(info)
                if not info.isfile():      # directories, links, devices: skipped
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                yield {"fname": info.name, "data": tar.extractfile(info).read(),
                       "__url__": url}


_NOT_FILES = {tarfile.DIRTYPE: "a directory", tarfile.SYMTYPE: "a symbolic link",
              tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
              tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}


def _check_member(info: tarfile.TarInfo) -> None:
    """A member ``pvit verify`` accepts: a regular file whose name, unpacked, stays inside
    the target directory (the writer writes nothing else)."""
    if not info.isfile():
        kind = _NOT_FILES.get(info.type, f"of tar type {info.type!r}")
        raise FormatError(f"member {info.name!r} is {kind}, not a regular file")
    if info.name.startswith("/") or ".." in info.name.split("/"):
        raise FormatError(f"member {info.name!r}: an absolute name or one with '..' (unpacking "
                          "the shard would write it outside the target directory)")


def group_samples(members: Iterable[dict]) -> Iterator[dict]:
    """Member dicts (``iter_members``) -> raw samples (``{"__key__", "__url__",
    "rgb.npy.zst": bytes, ...}``): webdataset's ``group_by_keys``. The key is the member
    name up to the first dot after its last slash (directories included), the field the
    rest; consecutive members of one key make one sample; a name without a dot is
    skipped, and so is a field starting ``__`` (group_by_keys keeps its own entries,
    ``__key__``, ``__url__``, ``__bad__``, in the sample: a member ``KEY.__bad__`` would
    drop its sample unseen). ``lcase=False``: fields keep the case the writer wrote
    (``K.npy.zst``; webdataset's default would make it ``k.npy.zst``). A field twice in
    one sample is a ``FormatError``, one line naming it."""
    from webdataset import tariterators

    last: list[str] = []

    def named(stream: Iterable[dict]) -> Iterator[dict]:
        for member in stream:
            last[:] = [member["fname"]]
            yield member

    def twice(exc: Exception) -> bool:
        # group_by_keys' only error: a field twice in one sample (its message is the
        # member name, then the sample's fields, with (None, None) appended to args)
        key, field = tariterators.base_plus_ext(last[0]) if last else (None, None)
        if not isinstance(exc, ValueError) or field is None:
            raise exc
        raise FormatError(f"sample {key!r}: {field} appears twice") from None

    def key_field(fname: str) -> tuple[str | None, str | None]:
        key, field = tariterators.base_plus_ext(fname)
        return (None, None) if field is not None and field.startswith("__") else (key, field)

    return tariterators.group_by_keys(named(members), keys=key_field, lcase=False,
                                      handler=twice)


def iter_raw_samples(path: str | Path, strict: bool = False) -> Iterator[dict]:
    """The raw samples of one shard (``iter_members`` grouped by ``group_samples``), in
    order; nothing decoded, nothing unpickled."""
    return group_samples(iter_members(path, strict))


def read_shard(path: str | Path, rules: ReadRules | None = None) -> Iterator[dict]:
    """Decoded clips of one shard, in order (``rules``: see ``ReadRules``)."""
    for sample in iter_raw_samples(path, rules is not None and rules.strict):
        yield decode_sample(sample, rules)
