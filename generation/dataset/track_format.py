"""The point-track fields of a clip (``generation.scene.tracks`` > 0; Q = that count).

As TAP-Vid stores them: queries as (t, y, x), positions as (x, y), in pixels whose
centres are at +0.5 (docs/dataset-format.md, "Point tracks"). Computed by
``generation.render.tracks``; shapes here, beside ``shard_format``'s table.
"""

from __future__ import annotations

import numpy as np

# clip key -> shape (Q tracks, T frames), as shard_format.SHAPES writes them.
TRACK_SHAPES = {
    "tracks_query": ("Q", 3), "tracks_2d": ("Q", "T", 2), "tracks_occluded": ("Q", "T"),
    "tracks_instance": ("Q",),
}
# The spec switch: an int, the number of tracks (0: none).
TRACK_SWITCH = "tracks"
MAX_TRACKS = 100_000


def check_track_shapes(clip: dict, frames: int) -> str | None:
    """What is wrong with a decoded clip's track arrays (all or none, one Q, its T
    frames), or None."""
    present = [k for k in TRACK_SHAPES if clip.get(k) is not None]
    if not present:
        return None
    if len(present) != len(TRACK_SHAPES):
        missing = sorted(set(TRACK_SHAPES) - set(present))
        return f"point tracks without {', '.join(missing)}"
    dims = {"Q": clip["tracks_query"].shape[0], "T": frames}
    for key, shape in TRACK_SHAPES.items():
        expected = tuple(dims.get(d, d) for d in shape)
        if clip[key].shape != expected:
            return f"{key}: shape {clip[key].shape} != {expected}"
    return None


def track_ranges(clip: dict) -> list[str]:
    """``pvit verify``'s range problems of a clip's tracks (empty without tracks): query
    frames whole and in the clip, query pixels in the image, known instances, finite
    positions wherever a point is visible, and each point visible at its query."""
    if clip.get("tracks_query") is None:
        return []
    query, xy, hidden = clip["tracks_query"], clip["tracks_2d"], clip["tracks_occluded"]
    t_count, h, w = clip["depth"].shape
    problems = []
    t = query[:, 0]
    if not (np.all(t == np.round(t)) and np.all((t >= 0) & (t < t_count))):
        problems.append("tracks_query frames are not whole frames of the clip")
    elif not np.all((query[:, 1] >= 0) & (query[:, 1] <= h) & (query[:, 2] >= 0)
                    & (query[:, 2] <= w)):
        problems.append("tracks_query points lie outside the image")
    elif hidden[np.arange(len(t)), t.astype(np.intp)].any():
        problems.append("tracks_occluded marks a point occluded at its own query frame")
    if not np.isin(clip["tracks_instance"], clip["instances"]["id"]).all():
        problems.append("tracks_instance has ids with no instance")
    if not np.isfinite(xy[~hidden]).all():
        problems.append("tracks_2d is not finite where the point is visible")
    return problems
