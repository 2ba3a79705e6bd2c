"""``pvit verify --labels`` on a real (tiny) render: it passes the clip as rendered, and
names each corruption planted in a copy of it, one line per clip and check."""

import copy

import numpy as np
import pytest
from pvit_cli import pvit
from pyquaternion import Quaternion

from generation.dataset.label_checks import Scene, check_labels, residuals
from generation.dataset.manifest import MANIFEST_NAME, new_manifest, sha256_file, write_json_atomic
from generation.dataset.shard_format import CLASSES, write_shard
from generation.dataset.verify import verify_dataset

pytestmark = pytest.mark.blender

# The tracked_clip fixture's spec (tests/conftest.py), as a manifest records it.
SPEC = {"recipe": "movi", "resolution": 48, "frames": 3, "spp": 4, "min_objects": 4,
        "max_objects": 6, "flow": True, "object_coordinates": True, "tracks": 192}


def flip_depth_region(clip):
    depth = clip["depth"][1]
    depth[12:36, 12:36] = depth[12:36, 12:36][::-1].copy()


def swap_two_ids(clip):
    """The two instances covering most of frame 1 (the floor and an object) trade ids."""
    seg = clip["instance_seg"][1]
    first, second = clip["instances"]["id"][np.argsort(-clip["instances"]["visibility"][:, 1])[:2]]
    swapped = seg.copy()
    swapped[seg == first], swapped[seg == second] = second, first
    clip["instance_seg"][1] = swapped


def shift_K(clip):
    clip["K"][0, 2] += 1.0          # the hard one: x moves along the (level) camera x axis


def scale_K(clip):
    clip["K"][:2, :2] *= 1.02


def transpose_normals(clip):
    clip["normal"] = np.ascontiguousarray(clip["normal"][..., [1, 0, 2]])


def ray_length_depth(clip):
    K, (h, w) = clip["K"], clip["depth"].shape[1:]
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x, y = (u + 0.5 - K[0, 2]) / K[0, 0], (v + 0.5 - K[1, 2]) / K[1, 1]
    clip["depth"] = (clip["depth"] * np.sqrt(1 + x * x + y * y)).astype(np.float32)


def turn_quaternion(clip):
    """The most visible object's orientation, 3 degrees off about the vertical."""
    inst = clip["instances"]
    n = int(np.argmax(inst["visibility"][1:].sum(axis=1))) + 1
    turn = Quaternion(axis=[0, 0, 1], degrees=3)
    for t in range(inst["quaternion"].shape[1]):
        q = turn * Quaternion(*inst["quaternion"][n, t].astype(np.float64))
        inst["quaternion"][n, t] = q.elements.astype(np.float32)


def move_camera(clip):
    clip["world_to_camera"][:, 0, 3] += 0.05    # 5 cm along the camera's (level) x axis


# corruption -> the checks that must name it (others may too)
PLANTED = {
    "scene0000001": (flip_depth_region, {"floor_plane", "tracks"}),
    "scene0000002": (swap_two_ids, {"semantic", "visibility", "mask_in_box"}),
    "scene0000003": (shift_K, {"surface_in_box", "object_coordinates", "tracks"}),
    "scene0000004": (scale_K, {"floor_plane", "surface_in_box"}),
    "scene0000005": (transpose_normals, {"normals"}),
    "scene0000006": (ray_length_depth, {"floor_plane", "normals"}),
    "scene0000007": (turn_quaternion, {"box_pose", "object_coordinates"}),
    "scene0000008": (move_camera, {"surface_in_box", "object_coordinates"}),
}


def planted_dataset(directory, clips):
    directory.mkdir()
    write_shard(directory / "shard-000000.tar", clips)
    manifest = new_manifest(SPEC, "spec-hash", list(CLASSES),
                            {"scenes": len(clips), "scenes_per_shard": len(clips), "seed": 0})
    manifest["shards"].append({"name": "shard-000000.tar",
                               "sha256": sha256_file(directory / "shard-000000.tar"),
                               "samples": len(clips), "keys": [c["key"] for c in clips]})
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return directory


def test_a_fresh_render_passes_every_check(tracked_clip, rendered_clip, tmp_path):
    """Every check applies to the tracked clip (flow, object coordinates, tracks on),
    and its residuals stay below a tenth of their tolerances."""
    names = set()
    for name, found in residuals(Scene(tracked_clip, list(CLASSES))):
        names.add(name)
        assert found.value <= 0.2 * found.limit or found.limit == 0 and found.value == 0, \
            (name, found.what)
    assert names == {"floor_plane", "normals", "mask_in_box", "surface_in_box", "box_pose",
                     "object_coordinates", "semantic", "visibility", "flow", "tracks"}
    assert check_labels(rendered_clip, list(CLASSES)) == []
    clean = planted_dataset(tmp_path / "clean", [{**tracked_clip, "key": "scene0000000"}])
    assert verify_dataset(clean, labels=True) == {}


def test_each_planted_corruption_is_one_line_per_clip_and_check(tracked_clip, tmp_path):
    clips = [{**tracked_clip, "key": "scene0000000"}]
    for key, (plant, _) in PLANTED.items():
        clip = copy.deepcopy(tracked_clip)
        plant(clip)
        clips.append({**clip, "key": key})
    directory = planted_dataset(tmp_path / "planted", clips)
    assert verify_dataset(directory) == {}      # the format is fine: only labels are off
    result = pvit("verify", "--labels", directory)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    named: dict[str, list[str]] = {}
    for line in lines:
        assert line.count(": ") >= 4, lines
        bad, shard, key, check, what = line.split(": ", 4)
        assert (bad, shard) == ("bad", "shard-000000.tar") and what, line
        named.setdefault(key, []).append(check)
    assert "scene0000000" not in named
    for key, (plant, expected) in PLANTED.items():
        assert expected <= set(named.get(key, [])), (plant.__name__, named.get(key))
        assert len(named[key]) == len(set(named[key])), named[key]   # one line per check
