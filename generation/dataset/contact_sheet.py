"""``pvit show``: a contact sheet a person can look at.

One row per frame (a few frames), columns RGB | depth | instance seg | semantic seg |
normals, then flow and point tracks when the clip has them, each tile upscaled to at
least 128 px with nearest neighbour so label edges stay crisp.

Flow is ``forward_flow`` in the usual colour wheel (hue: direction, brightness:
length over the clip's longest motion). Tracks are drawn on a dimmed copy of the RGB
at the upscaled size: one colour per track, a filled dot where the point is seen and a
line back through its last ``TRAIL`` seen positions; occluded points are left out.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import cv2
import numpy as np

from generation.dataset.manifest import MANIFEST_NAME, name_problem, read_manifest
from generation.dataset.shard_format import FormatError, read_shard
from generation.dataset.storage import Location, write_atomic

COLUMNS = ("rgb", "depth", "instance", "semantic", "normal")
TRAIL = 3          # earlier frames a track's trail goes back through


def columns(clip: dict) -> tuple[str, ...]:
    """The sheet's columns for this clip: the fixed ones, then what it carries."""
    return COLUMNS + (("flow",) if "forward_flow" in clip else ()) \
        + (("tracks",) if "tracks_2d" in clip else ())


def _palette(n: int, seed: int) -> np.ndarray:
    colours = np.random.RandomState(seed).randint(40, 256, size=(max(n, 1), 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def tiles(clip: dict, t: int) -> list[np.ndarray]:
    depth = clip["depth"][t]
    finite = np.isfinite(depth)
    lo, hi = (depth[finite].min(), depth[finite].max()) if finite.any() else (0.0, 1.0)
    d8 = np.zeros(depth.shape, np.uint8)
    d8[finite] = (255 * (1 - (depth[finite] - lo) / max(hi - lo, 1e-6))).astype(np.uint8)
    depth_rgb = cv2.applyColorMap(d8, cv2.COLORMAP_VIRIDIS)[..., ::-1]
    depth_rgb[~finite] = 0
    inst = _palette(int(clip["instance_seg"].max()) + 1, 1)[clip["instance_seg"][t]]
    sem = _palette(len(clip["meta"].get("classes", [])) + 1, 2)[clip["semantic_seg"][t]]
    normal = ((clip["normal"][t] + 1) * 127.5).clip(0, 255).astype(np.uint8)
    normal[clip["instance_seg"][t] == 0] = 0
    out = [clip["rgb"][t], depth_rgb, inst, sem, normal]
    if "forward_flow" in clip:
        out.append(flow_tile(clip["forward_flow"], t))
    return out


def flow_tile(flow: np.ndarray, t: int) -> np.ndarray:
    """Frame ``t`` of a ``[T,H,W,2]`` flow as colour: hue the direction, value the
    length over the whole clip's longest (so frames compare), 0 black."""
    dx, dy = flow[t, ..., 0].astype(np.float32), flow[t, ..., 1].astype(np.float32)
    magnitude, angle = cv2.cartToPolar(dx, dy, angleInDegrees=True)
    longest = float(np.max(np.hypot(flow[..., 0], flow[..., 1]))) or 1.0
    hsv = np.stack([angle / 2, np.full_like(angle, 255),
                    np.clip(255 * magnitude / longest, 0, 255)], axis=-1).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def tracks_tile(clip: dict, t: int, scale: int) -> np.ndarray:
    """Frame ``t``'s RGB, dimmed and upscaled ``scale`` times, with the tracks seen in
    it as dots and their trails through the frames before (occluded points left out)."""
    image = cv2.resize(clip["rgb"][t], None, fx=scale, fy=scale,
                       interpolation=cv2.INTER_NEAREST)
    image = np.ascontiguousarray((image * 0.6).astype(np.uint8))
    points, hidden = clip["tracks_2d"], clip["tracks_occluded"]
    colours = _palette(len(points) + 1, 3)[1:]
    radius = max(1, scale // 2)
    for q in range(len(points)):
        seen = [s for s in range(max(0, t - TRAIL), t + 1)
                if not hidden[q, s] and np.all(np.isfinite(points[q, s]))]
        if t not in seen:
            continue
        # pixel (u, v)'s centre (u + 0.5, v + 0.5) is k (u + 0.5) upscaled k times, the
        # centre of upscaled pixel k (u + 0.5) - 0.5 (OpenCV draws on pixel centres)
        path = np.round(points[q, seen] * scale - 0.5).astype(np.int32)
        colour = tuple(int(c) for c in colours[q])
        cv2.polylines(image, [path.reshape(-1, 1, 2)], False, colour, 1, cv2.LINE_AA)
        cv2.circle(image, tuple(int(c) for c in path[-1]), radius, colour, -1, cv2.LINE_AA)
    return image


def contact_sheet(clip: dict, max_frames: int = 4, min_tile: int = 128) -> np.ndarray:
    """RGB uint8 image of the sheet."""
    t_count = clip["rgb"].shape[0]
    frames = np.unique(np.linspace(0, t_count - 1, min(max_frames, t_count)).round().astype(int))
    h = clip["rgb"].shape[1]
    scale = max(1, int(np.ceil(min_tile / h)))
    names = columns(clip)
    rows = []
    for t in frames:
        row = [cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
               for tile in tiles(clip, t)]
        if "tracks" in names:
            row.append(tracks_tile(clip, t, scale))
        rows.append(np.concatenate(row, axis=1))
    sheet = np.concatenate(rows, axis=0)
    header = np.full((24, sheet.shape[1], 3), 255, np.uint8)
    tile_w = sheet.shape[1] // len(names)
    for i, name in enumerate(names):
        cv2.putText(header, name, (i * tile_w + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, sheet], axis=0)


def find_clip(directory, key: str | None) -> dict:
    """The clip ``key`` (default: the first) of a dataset (a path or an object URL)."""
    where = Location(directory)
    manifest = read_manifest(where)
    listing = where.join(MANIFEST_NAME)
    if manifest is None or not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        raise ValueError(f"no shards listed in {listing}")
    for index, record in enumerate(manifest["shards"]):
        if not isinstance(record, dict):
            raise FormatError(f"{listing}: shard record {index} is not an object")
        if problem := name_problem(record.get("name")):
            raise FormatError(f"{listing}: shard record {index} {problem}")
        keys = record.get("keys")
        if key is not None and not (isinstance(keys, list) and key in keys):
            continue
        name = record["name"]
        try:
            for clip in read_shard(where.local / name if where.local else where.join(name)):
                if key is None or clip["key"] == key:
                    return clip
        except FormatError as exc:
            raise FormatError(f"{where.join(name)}: {exc}") from None
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise FormatError(f"{where.join(name)}: cannot be read as a shard "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                              ) from None
    raise ValueError(f"sample {key!r} not found in {directory}")


def _check_target(out: Path) -> None:
    if out.is_dir():
        raise ValueError(f"{out} is a directory: give the path of the PNG to write")


def save_sheet(sheet: np.ndarray, out: Path) -> Path:
    """Write ``sheet`` to ``out`` through a temporary file renamed into place; any
    failure (full disk, unwritable or odd target) is a ``ValueError`` and leaves no
    temporary file behind."""
    out = Path(out)
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode(".png", sheet[..., ::-1])
        if not ok:
            raise ValueError(f"could not write {out}")
        write_atomic(out, png.tobytes())
    except (OSError, cv2.error) as exc:
        raise ValueError(f"could not write {out}: {getattr(exc, 'strerror', None) or exc}"
                         ) from exc
    return out


def sheet_png(sheet: np.ndarray, max_bytes: int) -> bytes:
    """PNG bytes of ``sheet``, halved in size until they fit ``max_bytes`` (an image
    embedded in a Prefect artifact is stored in the database and sent to every UI)."""
    image = np.ascontiguousarray(sheet[..., ::-1])
    while True:
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if not ok:
            raise ValueError("could not encode the contact sheet as PNG")
        if buf.nbytes <= max_bytes or min(image.shape[:2]) <= 32:
            return buf.tobytes()
        image = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)


def write_contact_sheet(directory: Path, out: Path, key: str | None = None) -> Path:
    _check_target(Path(out))                  # before reading any shard
    return save_sheet(contact_sheet(find_clip(directory, key)), out)


# The sheet ``pvit generate`` leaves in a dataset, and the record that says it wrote it
# (the sheet's sha256): a file of that name it did not write is a user's, never replaced.
SHEET_NAME = "contact_sheet.png"
SHEET_RECORD = ".contact_sheet.sha256"


def store_sheet(where: Location, sheet: np.ndarray) -> str | None:
    """Write ``sheet`` as ``SHEET_NAME`` in the dataset ``where`` (a directory or an
    object prefix), unless a file of that name is there that this project did not write
    (its sha256 is not the one ``SHEET_RECORD`` holds). Returns None when written, else
    why it was kept. Write failures raise ``OSError``/``ValueError``."""
    try:
        current = where.read_bytes(SHEET_NAME)
    except FileNotFoundError:
        current = None
    known: list[str] = []
    if current is not None:
        try:
            known = where.read_bytes(SHEET_RECORD).decode().split()
        except (FileNotFoundError, UnicodeDecodeError):
            pass
        if hashlib.sha256(current).hexdigest() not in known:
            return f"{where.join(SHEET_NAME)} is not one pvit wrote: kept as it is"
    png = sheet_png(sheet, 1 << 30)
    # the record first, naming the new sheet and the one still there: a failure between
    # the two writes leaves a sheet the record still names as ours
    new = hashlib.sha256(png).hexdigest()
    old = [hashlib.sha256(current).hexdigest()] if current is not None else []
    where.write_bytes(SHEET_RECORD, ("\n".join([new, *old]) + "\n").encode())
    where.write_bytes(SHEET_NAME, png)
    return None
