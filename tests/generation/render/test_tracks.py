"""Point tracks of a real (tiny) render, checked against reprojection computed here,
independently of ``generation.dataset.geometry`` (pyquaternion, explicit loops)."""

import numpy as np
import pytest
from pyquaternion import Quaternion

from generation.dataset.shard_format import decode_sample, encode_clip
from generation.render.tracks import point_tracks

pytestmark = pytest.mark.blender

TRACK_KEYS = ("tracks_query", "tracks_2d", "tracks_occluded", "tracks_instance")


def world_point(clip, t, y, x):
    """The world point seen at continuous pixel (x, y) of frame t (its pixel's depth)."""
    K, w2c = clip["K"].astype(np.float64), clip["world_to_camera"][t].astype(np.float64)
    z = float(clip["depth"][t, int(y), int(x)])
    cam = np.array([(x - K[0, 2]) / K[0, 0] * z, (y - K[1, 2]) / K[1, 1] * z, z, 1.0])
    return (np.linalg.inv(w2c) @ cam)[:3]


def expected_track(clip, q):
    """(xy [T, 2], z [T]) of track q: its query point held in its object's frame."""
    t, y, x = clip["tracks_query"][q].astype(np.float64)
    t = int(t)
    inst = clip["instances"]
    n = list(inst["id"]).index(clip["tracks_instance"][q])
    pose = [(Quaternion(*inst["quaternion"][n, s].astype(np.float64)).rotation_matrix,
             inst["position"][n, s].astype(np.float64)) for s in range(len(clip["rgb"]))]
    local = pose[t][0].T @ (world_point(clip, t, y, x) - pose[t][1])
    xy, z = [], []
    for s, (rotation, origin) in enumerate(pose):
        world = np.append(rotation @ local + origin, 1.0)
        cam = clip["world_to_camera"][s].astype(np.float64) @ world
        pix = clip["K"].astype(np.float64) @ cam[:3]
        xy.append(pix[:2] / pix[2])
        z.append(cam[2])
    return np.array(xy), np.array(z)


def test_tracks_add_fields_and_change_nothing_else(tracked_clip, rendered_clip):
    """Same scene and seed as ``rendered_clip`` with tracks on: every other label is the
    same bytes (the tracks draw from their own stream of the seed), the tracks round-trip
    through the shard format, and drawing them again gives the same tracks."""
    clip = tracked_clip
    for key in ("rgb", "depth", "instance_seg", "semantic_seg", "normal", "K",
                "world_to_camera", "forward_flow", "object_coordinates"):
        assert np.array_equal(clip[key], rendered_clip[key]), key
    assert not any(key in rendered_clip for key in TRACK_KEYS)
    q, t = len(clip["tracks_query"]), clip["rgb"].shape[0]
    assert clip["tracks_2d"].shape == (q, t, 2) and q == 192
    assert clip["tracks_occluded"].dtype == np.bool_
    again = point_tracks(clip, q, 7)
    back = decode_sample(encode_clip(clip))
    for key in TRACK_KEYS:
        assert np.array_equal(again[key], clip[key], equal_nan=True), key
        assert np.array_equal(back[key], clip[key], equal_nan=True), key
    # half on objects (instances other than the floor), the rest anywhere, floor included
    on_objects = (clip["tracks_instance"] != clip["instances"]["id"][0]).mean()
    assert 0.5 <= on_objects < 1 and (clip["tracks_instance"] == 1).any()


def test_a_track_starts_at_its_query_point_on_its_own_instance(tracked_clip):
    clip = tracked_clip
    query = clip["tracks_query"]
    rows, t = np.arange(len(query)), query[:, 0].astype(int)
    np.testing.assert_allclose(clip["tracks_2d"][rows, t], query[:, [2, 1]], atol=1e-4)
    assert not clip["tracks_occluded"][rows, t].any()
    assert np.array_equal(query[:, 0], t) and np.all(query[:, 1:] % 1 == 0.5)  # pixel centres
    shown = clip["instance_seg"][t, query[:, 1].astype(int), query[:, 2].astype(int)]
    assert np.array_equal(shown, clip["tracks_instance"])


def test_tracks_are_the_reprojection_of_points_moving_with_their_objects(tracked_clip):
    """Every track equals its query point carried with its object's pose and projected
    (for the floor: by the camera's motion alone); the camera moves, and objects move
    beyond what the camera alone would give."""
    clip = tracked_clip
    floor_motion, errors = [], []
    for q in range(len(clip["tracks_query"])):
        xy, _ = expected_track(clip, q)
        errors.append(np.abs(xy - clip["tracks_2d"][q]).max())
        if clip["tracks_instance"][q] == 1:
            floor_motion.append(np.abs(xy[-1] - xy[0]).max())
    # measured (seed 7, 48 px): max 6e-5 px
    assert max(errors) < 1e-3
    assert len(floor_motion) > 20 and np.median(floor_motion) > 0.3


def test_visible_points_show_their_instance_at_their_depth(tracked_clip):
    """Where a track is visible and its pixel lies inside a mask (all 8 neighbours show
    one instance), that mask is the track's own instance, and the rendered depth there is
    the point's depth (to the depth change across one pixel); an occluded point in the
    frame lies behind what its pixel shows (seen or not, everything nearer than it)."""
    from generation.dataset.geometry import interior

    clip = tracked_clip
    seg, depth = clip["instance_seg"], clip["depth"]
    inner = interior(seg)
    h, w = seg.shape[1:]
    checked = hidden = 0
    for q in range(len(clip["tracks_query"])):
        xy, z = expected_track(clip, q)
        for s, ((x, y), zs) in enumerate(zip(xy, z, strict=True)):
            if not (0 <= x < w and 0 <= y < h):
                assert clip["tracks_occluded"][q, s]           # out of the frame
                continue
            u, v = int(x), int(y)
            if clip["tracks_occluded"][q, s]:
                assert depth[s, v, u] < zs * (1 - 1e-3)      # something nearer covers it
                hidden += 1
                continue
            if not inner[s, v, u]:
                continue
            assert seg[s, v, u] == clip["tracks_instance"][q], (q, s)
            around = depth[s, max(v - 1, 0):v + 2, max(u - 1, 0):u + 2]
            assert around.min() * (1 - 1e-3) <= zs <= around.max() * (1 + 1e-3), (q, s)
            checked += 1
    assert checked > 300 and hidden >= 1
