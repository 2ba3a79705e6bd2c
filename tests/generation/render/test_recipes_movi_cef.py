"""The movi_c / movi_e / movi_f recipes: geometric label checks on one tiny real render
of each, HDRI background, textures, the straight camera path, and labels that motion
blur leaves untouched."""

import shutil

import numpy as np
import pytest

from generation.config import SceneConfig
from generation.render.assets import load_manifest
from generation.render.object_assets import OBJECTS_MANIFEST

pytestmark = pytest.mark.blender

SEED = 1            # at 48 px: background visible, objects of several classes in view


def _cfg(recipe: str, **overrides) -> SceneConfig:
    spec = dict(recipe=recipe, resolution=48, frames=3, spp=1, min_objects=3, max_objects=5)
    return SceneConfig(**{**spec, **overrides})


def _render(cfg: SceneConfig, seed: int = SEED) -> tuple[dict, dict]:
    """The clip, and what Blender held when it was rendered (the scene is reset by the
    next render)."""
    import bpy

    from generation.render.scene import render_clip

    clip, _ = render_clip(cfg, seed=seed, key=f"scene{seed:07d}")
    scene = bpy.context.scene
    state = {"images": {i.name: tuple(i.size) for i in bpy.data.images},
             "textured_objects": sorted(o.name for o in bpy.data.objects if o.active_material
                                        and any(n.bl_idname == "ShaderNodeTexImage"
                                                for n in o.active_material.node_tree.nodes)),
             "motion_blur": scene.render.use_motion_blur,
             "aux_motion_blur": scene.view_layers["AuxOutputs"].use_motion_blur}
    return clip, state


@pytest.fixture(scope="module")
def movi_c():
    return _render(_cfg("movi_c"))


@pytest.fixture(scope="module")
def movi_e():
    return _render(_cfg("movi_e", flow=True, object_coordinates=True))


@pytest.fixture(scope="module")
def movi_f():
    return _render(_cfg("movi_f", flow=True, object_coordinates=True))


@pytest.fixture(params=["movi_c", "movi_e", "movi_f"])
def clip(request):
    return request.getfixturevalue(request.param)[0]


def _backproject(depth, K, w2c, v, u):
    z = depth[v, u].astype(np.float64)
    cam = np.stack([(u + 0.5 - K[0, 2]) / K[0, 0] * z, (v + 0.5 - K[1, 2]) / K[1, 1] * z, z,
                    np.ones_like(z)])
    return (np.linalg.inv(w2c.astype(np.float64)) @ cam)[:3].T


def _project(K, w2c, points):
    cam = (w2c.astype(np.float64) @ np.c_[points, np.ones(len(points))].T)[:3]
    uv = (K.astype(np.float64) @ cam)[:2] / cam[2]
    return uv.T, cam[2]


def test_floor_back_projects_onto_z0_with_its_normal(clip):
    for t in range(clip["rgb"].shape[0]):
        v, u = np.nonzero(clip["instance_seg"][t] == 1)
        assert len(v) > 300
        world = _backproject(clip["depth"][t], clip["K"], clip["world_to_camera"][t], v, u)
        assert np.abs(world[:, 2]).max() < 0.02
        expected = clip["world_to_camera"][t, :3, :3] @ np.array([0, 0, 1.0])
        assert np.abs(clip["normal"][t][v, u] - expected).max() < 1e-3


def test_hdri_background_has_infinite_depth_and_id_0(clip):
    background = clip["instance_seg"] == 0
    assert background.any(), "the HDRI should show above the horizon"
    assert np.array_equal(background, np.isinf(clip["depth"]))
    assert not clip["semantic_seg"][background].any()
    assert not clip["normal"][background].any()
    # the background is the HDRI, not a flat colour
    assert clip["rgb"][background].astype(float).std(axis=0).max() > 2.0


def test_masks_lie_inside_projected_boxes_and_centres_on_their_ids(clip):
    inst, K = clip["instances"], clip["K"]
    inside = 0
    for n, obj_id in enumerate(inst["id"][1:], start=1):
        for t in range(clip["rgb"].shape[0]):
            v, u = np.nonzero(clip["instance_seg"][t] == obj_id)
            if len(v) == 0:
                continue
            corners, z = _project(K, clip["world_to_camera"][t], inst["bbox_3d"][n, t])
            assert (z > 0).all()
            lo, hi = corners.min(axis=0) - 1.0, corners.max(axis=0) + 1.0   # 1 px: pixel extent
            assert (u + 0.5 >= lo[0]).all() and (u + 0.5 <= hi[0]).all(), (obj_id, t)
            assert (v + 0.5 >= lo[1]).all() and (v + 0.5 <= hi[1]).all(), (obj_id, t)
            inside += 1
    assert inside >= 3


def test_semantic_class_and_visibility_follow_the_instances(clip):
    inst = clip["instances"]
    cat = np.concatenate([[0], inst["category"]])
    assert np.array_equal(clip["semantic_seg"], cat[clip["instance_seg"]])
    classes = clip["meta"]["classes"]
    for name, c in zip(clip["meta"]["instance_names"][1:], inst["category"][1:], strict=True):
        assert name.endswith("_" + classes[c])
    t = clip["rgb"].shape[0]
    flat = clip["instance_seg"].reshape(t, -1)
    for n, obj_id in enumerate(inst["id"]):
        assert np.allclose(inst["visibility"][n], (flat == obj_id).mean(axis=1), atol=1e-7)


def test_movi_c_uses_the_object_set_with_its_textures_and_the_hdri(movi_c):
    clip, state = movi_c
    assert SceneConfig(recipe="movi_c").asset_manifest == OBJECTS_MANIFEST
    classes = clip["meta"]["classes"]
    assert {"duck", "mug", "teddy_bear"} <= set(classes)
    hdri = [size for name, size in state["images"].items() if name.endswith(".exr")]
    assert hdri == [(1024, 512)]
    # every textured asset in the scene imported with its image, and the image loaded
    assets = load_manifest(OBJECTS_MANIFEST)["assets"]
    textured = [n for n in clip["meta"]["instance_names"][1:]
                if assets[n.split("_", 1)[1]]["metadata"]["textured"]]
    assert textured and len(state["textured_objects"]) == len(textured)
    assert all(min(size) > 0 for name, size in state["images"].items()
               if name.startswith("texture"))


def test_movi_e_camera_moves_on_a_straight_line_looking_at_the_centre(movi_e):
    clip, _ = movi_e
    w2c = clip["world_to_camera"].astype(np.float64)
    centres = np.array([-m[:3, :3].T @ m[:3, 3] for m in w2c])
    step = np.diff(centres, axis=0)
    assert np.linalg.norm(step[0]) > 0.1
    np.testing.assert_allclose(step[1], step[0], atol=1e-4)      # straight, constant speed
    for m, c in zip(w2c, centres, strict=True):                  # optical axis through 0
        axis = m[2, :3]
        to_centre = -c / np.linalg.norm(c)
        assert np.dot(axis, to_centre) > 1 - 1e-5
    names = clip["meta"]["instance_names"]
    assert len(names) - 1 >= 10            # 10-20 static (a few may find no spot) + 1-3 thrown


def test_movi_e_static_objects_start_at_rest_on_the_floor(movi_e):
    clip, _ = movi_e
    inst = clip["instances"]
    position = inst["position"][1:]
    # most hold still (a thrown object may knock one over; measured seeds 1-3: 9 of 13+)
    still = np.linalg.norm(position[:, -1] - position[:, 0], axis=-1) < 0.02
    assert still.mean() > 0.6
    lowest = inst["bbox_3d"][1:, 0, :, 2].min(axis=-1)
    assert np.median(lowest[still]) < 0.3


def test_movi_f_blurs_rgb_only_labels_equal_movi_e(movi_e, movi_f):
    (sharp, sharp_state), (blurred, state) = movi_e, movi_f
    assert state["motion_blur"] and not state["aux_motion_blur"]
    assert not sharp_state["motion_blur"]
    assert not np.array_equal(sharp["rgb"], blurred["rgb"])
    for key in ("depth", "instance_seg", "semantic_seg", "normal", "K", "world_to_camera",
                "forward_flow", "backward_flow", "object_coordinates"):
        assert np.array_equal(sharp[key], blurred[key]), key
    for key, value in sharp["instances"].items():
        assert np.array_equal(blurred["instances"][key], value), key


def test_same_seed_same_bytes_movi_c():
    from generation.dataset.shard_format import encode_clip

    cfg = _cfg("movi_c", resolution=32, frames=2, max_objects=3)
    first, second = _render(cfg, seed=5)[0], _render(cfg, seed=5)[0]
    assert encode_clip(first) == encode_clip(second)


def test_spec_hash_names_the_asset_set_by_its_bytes_not_its_path(tmp_path):
    copy = tmp_path / "objects"
    shutil.copytree(OBJECTS_MANIFEST.parent, copy)
    named = SceneConfig(recipe="movi_c", asset_manifest="objects")
    elsewhere = SceneConfig(recipe="movi_c", asset_manifest=copy / "manifest.json")
    assert named.digest() == elsewhere.digest() == SceneConfig(recipe="movi_c").digest()
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + "\n")
    assert SceneConfig(recipe="movi_c", asset_manifest=copy / "manifest.json").digest() \
        != named.digest()
