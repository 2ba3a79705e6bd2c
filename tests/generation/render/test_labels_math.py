"""Camera and label conventions, checked without Blender."""

import numpy as np
from pyquaternion import Quaternion

from generation.render import labels


def look_at_blender_quat(position, target):
    """Blender camera looking from position at target (-z forward, y up)."""
    forward = np.asarray(target, float) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0, 0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rot = np.stack([right, up, -forward], axis=1)   # columns: camera x, y, z in world
    return Quaternion(matrix=rot).elements


def test_world_to_camera_is_opencv():
    position = np.array([0.0, -10.0, 5.0])
    w2c = labels.world_to_camera(position, look_at_blender_quat(position, [0, 0, 0]))
    target = w2c @ np.array([0, 0, 0, 1.0])
    assert abs(target[0]) < 1e-5 and abs(target[1]) < 1e-5
    assert np.isclose(target[2], np.linalg.norm(position), atol=1e-4)   # z forward
    above = w2c @ np.array([0, 0, 1.0, 1.0])
    assert above[1] < 0     # y down: a point above the target is higher in the image
    right = w2c @ np.array([1.0, 0, 0, 1.0])
    assert right[0] > 0     # x right (camera looks along +y, so world +x is to its right)


def test_intrinsics_project_the_principal_ray_to_the_centre():
    K = labels.intrinsics_pixels(35.0, 32.0, 64, 48)
    assert np.isclose(K[0, 0], 35 / 32 * 64) and K[0, 0] == K[1, 1]
    uvw = K @ np.array([0, 0, 2.0])
    assert np.allclose(uvw[:2] / uvw[2], [32, 24])


def test_depth_marks_sky_as_inf_and_keeps_metres():
    z = np.array([[1.5, 1e10], [3.0, 7.25]], np.float32)
    d = labels.depth_from_z(z)
    assert d.dtype == np.float32 and np.isinf(d[0, 1]) and d[1, 1] == np.float32(7.25)


def test_normals_rotate_into_camera_frame_and_are_unit():
    position = np.array([0.0, -10.0, 10.0])
    w2c = labels.world_to_camera(position, look_at_blender_quat(position, [0, 0, 0]))
    up = np.zeros((2, 2, 3), np.float32)
    up[..., 2] = 2.0                                    # unnormalised world +z
    mask = np.array([[True, True], [True, False]])
    n = labels.normals_to_camera(up, w2c, mask)
    expected = w2c[:3, :3] @ np.array([0, 0, 1.0])
    assert np.allclose(n[0, 0], expected, atol=1e-6)
    assert np.isclose(np.linalg.norm(n[0, 0]), 1)
    assert np.all(n[1, 1] == 0)
    assert n[0, 0, 1] < 0 and n[0, 0, 2] < 0            # floor faces up (-y) and the camera (-z)


def test_box_corners_rotate_with_the_object():
    bounds = np.array([[-1, -2, -3], [1, 2, 3.0]])
    quarter = Quaternion(axis=[0, 0, 1], angle=np.pi / 2).elements
    corners = labels.box_corners(bounds, [0.5, 0.5, 0.5], [10, 0, 0], quarter)
    assert corners.shape == (8, 3)
    assert np.allclose(corners.min(0), [9, -0.5, -1.5])
    assert np.allclose(corners.max(0), [11, 0.5, 1.5])


def test_visibility_and_id_remap():
    kubric = np.array([[[0, 3], [5, 3]]])              # asset index + 1
    lookup = np.array([0, 0, 0, 2, 0, 1], np.uint16)   # asset 3 -> id 2, asset 5 -> id 1
    ids = labels.remap_ids(kubric, lookup)
    assert ids.tolist() == [[[0, 2], [1, 2]]]
    vis = labels.visibility(ids, np.array([1, 2], np.uint16))
    assert np.allclose(vis[:, 0], [0.25, 0.5])
