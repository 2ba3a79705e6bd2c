"""Point tracks (TAP-Vid / Kubric point-tracking style), from a clip's own labels.

Query points are drawn on visible surfaces: a pixel inside one instance's mask (all 8
neighbours show it, so its depth is that surface's) at a frame of the clip. The pixel's
centre is back-projected through depth, K and world_to_camera, held in its object's
frame (``instances.position``/``quaternion`` at the query frame), carried to every
frame with the object's pose, and projected. A point is occluded where it leaves the
frame or something nearer covers it (``geometry.occluded``, ``geometry.OCCLUSION_TOLERANCE``).

Pure numpy; called by ``scene._clip_from_render`` when ``SceneConfig.tracks`` > 0.
"""

from __future__ import annotations

import numpy as np

from generation.dataset import geometry

# The draws of the tracks come from their own stream of the scene's seed: the recipe's
# draws (np.random.RandomState(seed)) are untouched, so tracks=0 renders the same bytes.
RNG_STREAM = 0x747261636B      # "track"
# Half of the queries lie on objects (not the first instance, the floor), so that small
# objects get tracks; the rest anywhere a query may lie (floor included).
OBJECT_SHARE = 0.5


def point_tracks(clip: dict, count: int, seed: int) -> dict:
    """The clip's ``count`` tracks: ``tracks_query`` [Q, 3] (t, y, x) float32 pixels,
    ``tracks_2d`` [Q, T, 2] (x, y) float32 pixels (NaN behind the camera),
    ``tracks_occluded`` [Q, T] bool, ``tracks_instance`` [Q] uint16 (the instance id)."""
    rng = np.random.default_rng([seed, RNG_STREAM])
    t, v, u = _draw_queries(clip, count, rng)
    instance_seg = clip["instance_seg"]
    ids = clip["instances"]["id"]
    instance = np.argmax(ids[None, :] == instance_seg[t, v, u][:, None], axis=1)
    points = _query_points(clip, t, v, u)
    xy, z = project_tracks(clip, points, instance, t)
    hidden = geometry.occluded(xy, z, clip["depth"], geometry.OCCLUSION_TOLERANCE)
    return {"tracks_query": np.stack([t, v + 0.5, u + 0.5], axis=-1).astype(np.float32),
            "tracks_2d": xy.astype(np.float32),
            "tracks_occluded": hidden,
            "tracks_instance": ids[instance].astype(np.uint16)}


def _query_points(clip: dict, t: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """World points [Q, 3] seen at pixels (v, u) of frames t."""
    cam = geometry.pixel_rays(clip["K"], v, u) * clip["depth"][t, v, u][:, None]
    w2c = clip["world_to_camera"].astype(np.float64)
    return np.einsum("qji,qj->qi", w2c[t, :3, :3], cam - w2c[t, :3, 3])


def project_tracks(clip: dict, points: np.ndarray, instance: np.ndarray,
                   frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xy [Q, T, 2], camera z [Q, T]) of world points [Q, 3] seen at ``frame`` on
    instance index ``instance``, carried with their objects' poses to every frame."""
    inst = clip["instances"]
    world = geometry.carry(points, instance, frame, inst["position"], inst["quaternion"])
    cam = geometry.to_camera(world, clip["world_to_camera"][None].astype(np.float64))
    return geometry.project(cam, clip["K"]), cam[..., 2]


def _draw_queries(clip: dict, count: int, rng: np.random.Generator):
    """(t, v, u) of ``count`` query pixels; ``OBJECT_SHARE`` of them on objects when
    any is seen. Actors (``actor_ids``) deform, so a point on one does not move with its
    pose: no query lies on them."""
    seg = clip["instance_seg"]
    ids = clip["instances"]["id"]
    rigid = np.setdiff1d(ids, np.asarray(clip.get("actor_ids", []), dtype=ids.dtype))
    allowed = (geometry.interior(seg) & np.isin(seg, rigid) & np.isfinite(clip["depth"]))
    anywhere = np.flatnonzero(allowed)
    if len(anywhere) == 0:
        raise ValueError("no surface to put point tracks on (every pixel is background "
                         "or an edge)")
    on_objects = anywhere[seg.reshape(-1)[anywhere] != ids[0]]
    n_objects = int(round(count * OBJECT_SHARE)) if len(on_objects) else 0
    picks = [_choose(rng, on_objects, n_objects), _choose(rng, anywhere, count - n_objects)]
    flat = np.sort(np.concatenate(picks))
    return np.unravel_index(flat, seg.shape)


def _choose(rng: np.random.Generator, pool: np.ndarray, size: int) -> np.ndarray:
    if size == 0:
        return pool[:0]
    return pool[rng.choice(len(pool), size=size, replace=len(pool) < size)]
