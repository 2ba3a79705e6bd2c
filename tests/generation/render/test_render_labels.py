"""Geometric checks of the labels of a real (tiny) Blender render."""

import numpy as np
import pytest

from generation.dataset.shard_format import CLASSES, decode_sample, encode_clip

pytestmark = pytest.mark.blender


def backproject(depth, K, w2c, v, u):
    z = depth[v, u].astype(np.float64)
    x = (u + 0.5 - K[0, 2]) / K[0, 0] * z
    y = (v + 0.5 - K[1, 2]) / K[1, 1] * z
    cam = np.stack([x, y, z, np.ones_like(z)])
    return (np.linalg.inv(w2c.astype(np.float64)) @ cam)[:3].T


def test_floor_pixels_backproject_onto_the_floor_plane(rendered_clip):
    clip = rendered_clip
    for t in range(clip["rgb"].shape[0]):
        v, u = np.nonzero(clip["instance_seg"][t] == 1)
        assert len(v) > 100, "the floor should fill much of the frame"
        world = backproject(clip["depth"][t], clip["K"], clip["world_to_camera"][t], v, u)
        # The floor's top face is z = 0 (pixel centres sample it exactly).
        assert np.abs(world[:, 2]).max() < 0.02
        assert np.abs(world[:, :2]).max() < 20.0


def test_floor_normals_match_the_floor_in_camera_frame(rendered_clip):
    clip = rendered_clip
    for t in range(clip["rgb"].shape[0]):
        expected = clip["world_to_camera"][t, :3, :3] @ np.array([0, 0, 1.0])
        normals = clip["normal"][t][clip["instance_seg"][t] == 1]
        assert np.abs(normals - expected).max() < 1e-3
        assert np.allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-4)


def test_projected_object_centres_fall_on_their_own_ids(rendered_clip):
    clip = rendered_clip
    inst = clip["instances"]
    K, checked = clip["K"], 0
    for n, obj_id in enumerate(inst["id"][1:], start=1):       # skip the floor
        for t in range(clip["rgb"].shape[0]):
            if inst["visibility"][n, t] < 0.01:
                continue
            p = clip["world_to_camera"][t] @ np.append(inst["position"][n, t], 1.0)
            u, v = (K @ p[:3])[:2] / p[2]
            seg = clip["instance_seg"][t]
            if not (0 <= int(v) < seg.shape[0] and 0 <= int(u) < seg.shape[1]):
                continue
            # An occluder may cover the centre; require the id within one pixel unless
            # the centre's pixel shows a nearer object.
            window = seg[max(0, int(v) - 1):int(v) + 2, max(0, int(u) - 1):int(u) + 2]
            here = seg[int(v), int(u)]
            if here != obj_id:
                assert obj_id in window or clip["depth"][t][int(v), int(u)] < p[2], \
                    f"object {obj_id} frame {t}: centre pixel shows {here}"
            checked += 1
    assert checked >= 3


def test_label_types_ranges_and_consistency(rendered_clip):
    clip = rendered_clip
    t, h, w, _ = clip["rgb"].shape
    assert (t, h, w) == (3, 48, 48)
    assert clip["instance_seg"].dtype == np.uint16 and clip["depth"].dtype == np.float32
    ids = set(clip["instances"]["id"].tolist())
    assert set(np.unique(clip["instance_seg"]).tolist()) - {0} <= ids
    fg = clip["instance_seg"] > 0
    assert np.all(np.isfinite(clip["depth"][fg])) and np.all(clip["depth"][fg] > 0)
    # semantic = category of the instance under the pixel
    cat = np.concatenate([[0], clip["instances"]["category"]])
    assert np.array_equal(clip["semantic_seg"], cat[clip["instance_seg"]])
    assert clip["instances"]["category"][0] == CLASSES.index("floor")
    names = clip["meta"]["instance_names"]
    for name, c in zip(names[1:], clip["instances"]["category"][1:], strict=True):
        assert name.endswith(CLASSES[c])
    # objects move (physics) and the visible fractions add up to the covered area
    pos = clip["instances"]["position"][1:]
    assert np.abs(pos[:, -1] - pos[:, 0]).max() > 0.01
    covered = fg.reshape(t, -1).mean(axis=1)
    assert np.allclose(clip["instances"]["visibility"].sum(axis=0), covered, atol=1e-6)
    # each oriented box contains its object's centre of mass: in the box's own edge
    # coordinates (corner 0 + a*x_edge + b*y_edge + c*z_edge) all of a, b, c are in [0, 1]
    box = clip["instances"]["bbox_3d"].astype(np.float64)
    edges = np.stack([box[..., 1, :] - box[..., 0, :], box[..., 2, :] - box[..., 0, :],
                      box[..., 4, :] - box[..., 0, :]], axis=-1)
    rel = clip["instances"]["position"] - box[..., 0, :]
    coords = np.linalg.solve(edges, rel[..., None])[..., 0]
    assert coords.min() > 0 and coords.max() < 1


def test_optional_outputs_and_shard_round_trip(rendered_clip):
    clip = rendered_clip
    oc = clip["object_coordinates"]
    fg = clip["instance_seg"] > 1
    assert oc.min() >= 0 and oc.max() <= 1 and oc[fg].std() > 0.05
    assert clip["forward_flow"].shape == clip["rgb"].shape[:3] + (2,)
    back = decode_sample(encode_clip(clip))
    np.testing.assert_array_equal(back["depth"], clip["depth"])
    np.testing.assert_array_equal(back["object_coordinates"], oc)


@pytest.mark.slow
def test_worker_without_tensorflow_renders_what_kubric_with_it_renders(rendered_clip, tmp_path):
    """The render worker gives Kubric an fsspec stand-in for tf.io.gfile instead of
    importing TensorFlow; its shard holds exactly the clip rendered in this process,
    where Kubric runs on the real TensorFlow. The worker renders that scene second of
    three: a scene after the first is reset without resetting Blender's preferences and
    add-ons (``Blender45.clear_and_reset_blender_scene``), and must come out the same as
    a process's first scene, rendered alone."""
    import json
    import subprocess
    import sys

    from generation.config import SceneConfig
    from generation.dataset.shard_format import read_shard

    cfg = SceneConfig(resolution=48, frames=3, spp=4, min_objects=4, max_objects=6,
                      object_coordinates=True, flow=True)   # the fixture's spec
    job = {"scene": cfg.model_dump(mode="json"), "seeds": [3, 7, 11],
           "keys": ["scene0000003", "scene0000007", "scene0000011"],
           "out": str(tmp_path / "s.tar"), "device": "cpu"}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "generation.render.worker",
                           str(tmp_path / "job.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "oneDNN" not in proc.stderr and "TensorFlow" not in proc.stderr  # never loaded
    first, clip, _ = list(read_shard(tmp_path / "s.tar"))
    assert first["key"] == "scene0000003" and not np.array_equal(first["rgb"], clip["rgb"])
    assert clip["key"] == "scene0000007"
    for key in ("rgb", "depth", "instance_seg", "semantic_seg", "normal", "K",
                "world_to_camera", "forward_flow", "backward_flow", "object_coordinates"):
        assert np.array_equal(clip[key], rendered_clip[key]), key
    for key, value in rendered_clip["instances"].items():
        assert np.array_equal(clip["instances"][key], value), key


def test_a_scene_finished_beside_the_next_ones_render_keeps_its_bytes(rendered_clip):
    """``render_clips(overlap=True)`` (the default) reads scene 7's passes back,
    computes its labels and encodes it on a thread while Blender renders scene 3: the
    sample is byte for byte the fixture's clip, rendered alone."""
    from generation.config import SceneConfig
    from generation.dataset.shard_format import encode_clip
    from generation.render.scene import render_clips

    cfg = SceneConfig(resolution=48, frames=3, spp=4, min_objects=4, max_objects=6,
                      object_coordinates=True, flow=True)   # the fixture's spec
    (beside, _), (after, _) = render_clips(cfg, [7, 3], ["scene0000007", "scene0000003"],
                                            overlap=True, device="cpu")
    assert after["__key__"] == "scene0000003"
    assert beside == encode_clip(rendered_clip)


def test_an_object_with_no_free_spot_is_left_out_and_the_seed_still_renders():
    """Seed 402 at the default object counts draws a 10th shape that Kubric cannot place
    without overlap in 100 tries (``RuntimeError('Failed to place')``, which failed every
    retry of its shard). The recipe leaves it out: nine shapes, ids and masks agree,
    Blender holds no trace of it, and the seed renders the same bytes twice."""
    import bpy

    from generation.config import SceneConfig
    from generation.render.scene import render_clip

    cfg = SceneConfig(resolution=32, frames=2, spp=1)
    assert cfg.max_objects == 10
    clip, _ = render_clip(cfg, seed=402, key="scene0000402")
    names = clip["meta"]["instance_names"]
    assert names[0] == "floor" and len(names) == 10
    assert [n[:5] for n in names[1:]] == [f"obj{i:02d}" for i in range(9)]
    assert not any(o.name.startswith("obj09") for o in bpy.data.objects)
    ids = set(clip["instances"]["id"].tolist())
    assert set(np.unique(clip["instance_seg"]).tolist()) <= ids | {0}
    again, _ = render_clip(cfg, seed=402, key="scene0000402")
    assert encode_clip(again) == encode_clip(clip)


def _interior(seg, obj_id):
    """Pixels whose 3x3 neighbourhood all shows instance ``obj_id``: at an edge a pixel's
    passes (depth, flow) can come from either surface."""
    same = seg == obj_id
    pad = np.pad(seg, 1, mode="edge")
    h, w = seg.shape
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            same &= pad[1 + dv:1 + dv + h, 1 + du:1 + du + w] == seg
    return same


def _quat_matrix(q):
    from pyquaternion import Quaternion
    return Quaternion(*np.asarray(q, dtype=np.float64)).rotation_matrix


def _flow_errors(clip, s_of_t, flow_key):
    """Per-pixel errors (px) of ``clip[flow_key]`` against the analytic motion of the
    surface point seen at each interior pixel of frame t to frame s_of_t(t): floor pixels
    (static) moved by the cameras alone, object pixels also by their object's pose change
    (``inst_position`` / ``inst_quaternion``). Returns two dicts, "floor" and "objects"
    -> per pixel: the error, and the motion (the floor's whole flow; an object's motion
    beyond what the camera's alone would give)."""
    K = clip["K"].astype(np.float64)
    w2c = clip["world_to_camera"].astype(np.float64)
    inst = clip["instances"]
    frames = clip["rgb"].shape[0]
    errors = {"floor": [], "objects": []}
    magnitude = {"floor": [], "objects": []}
    for t in range(frames):
        s = s_of_t(t)
        if not 0 <= s < frames:
            continue
        seg = clip["instance_seg"][t]
        for n, obj_id in enumerate(inst["id"]):
            v, u = np.nonzero(_interior(seg, obj_id) & np.isfinite(clip["depth"][t]))
            if len(v) == 0:
                continue
            world = backproject(clip["depth"][t], K, w2c[t], v, u)
            static = world
            if n > 0:       # the object's rigid motion from frame t to frame s
                r_t = _quat_matrix(inst["quaternion"][n, t])
                r_s = _quat_matrix(inst["quaternion"][n, s])
                local = (world - inst["position"][n, t].astype(np.float64)) @ r_t
                world = local @ r_s.T + inst["position"][n, s].astype(np.float64)
            cam = (w2c[s] @ np.c_[world, np.ones(len(world))].T)[:3]
            expected = (K @ cam)[:2] / cam[2] - np.stack([u + 0.5, v + 0.5])
            got = clip[flow_key][t][v, u].T.astype(np.float64)
            key = "floor" if n == 0 else "objects"
            errors[key].append(np.linalg.norm(got - expected, axis=0))
            cam_static = (w2c[s] @ np.c_[static, np.ones(len(static))].T)[:3]
            own = (K @ cam)[:2] / cam[2] - (K @ cam_static)[:2] / cam_static[2]
            magnitude[key].append(np.linalg.norm(expected if n == 0 else own, axis=0))
    return ({k: np.concatenate(v) if v else np.zeros(0) for k, v in errors.items()},
            {k: np.concatenate(v) if v else np.zeros(0) for k, v in magnitude.items()})


@pytest.mark.parametrize("flow_key, step", [("forward_flow", 1), ("backward_flow", -1)])
def test_flow_is_the_motion_of_static_and_moving_surface_points(rendered_clip, flow_key, step):
    """``forward_flow[t]`` (``backward_flow[t]``) at pixel (u, v) is the displacement
    (dx, dy) in pixels, x right and y down, of the surface point seen there in frame t to
    where frame t+1 (t-1) sees it. Static floor points move by the camera's motion alone
    (back-project with depth, K, world_to_camera[t]; project with world_to_camera[t±1]);
    object points also by their object's pose change. The flow to a frame outside the
    clip is 0."""
    clip = rendered_clip
    errors, magnitude = _flow_errors(clip, lambda t: t + step, flow_key)
    # the camera moves (so the floor's flow is not ~0) and objects move on their own
    assert len(errors["floor"]) > 500 and np.median(magnitude["floor"]) > 0.3
    assert len(errors["objects"]) > 20 and np.percentile(magnitude["objects"], 90) > 0.3
    # measured (seed 7, 48 px): median 3.4e-5 px (floor) and 6e-5 px (objects), max 1.4e-4
    for key in ("floor", "objects"):
        assert np.median(errors[key]) <= 0.05, (key, np.median(errors[key]))
        assert np.percentile(errors[key], 95) <= 0.01, (key, np.percentile(errors[key], 95))
    boundary = clip[flow_key][-1 if step > 0 else 0]
    assert boundary.dtype == np.float32 and not boundary.any()
