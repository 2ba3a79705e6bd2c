"""From Kubric's render layers and scene to this project's labels (pure numpy).

Conventions (see ``docs/dataset-format.md``): OpenCV cameras (x right, y down,
z forward), intrinsics in pixels, z-depth in metres, normals as unit vectors in
the camera frame, quaternions w x y z.
"""

from __future__ import annotations

import numpy as np
from pyquaternion import Quaternion

# Blender cameras look down -z with y up; OpenCV cameras look down +z with y down.
BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0])
# Blender writes this Z value where a ray hits nothing (the sky).
SKY_Z = 1e9


def intrinsics_pixels(focal_length_mm: float, sensor_width_mm: float, width: int,
                      height: int) -> np.ndarray:
    """Pinhole K in pixels for a Blender camera whose sensor fits the image width."""
    f = focal_length_mm / sensor_width_mm * width
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]],
                    dtype=np.float32)


def world_to_camera(position: np.ndarray, quaternion_wxyz: np.ndarray) -> np.ndarray:
    """4x4 world -> OpenCV camera transform of a Blender camera pose."""
    rotation = Quaternion(*quaternion_wxyz).rotation_matrix @ BLENDER_TO_OPENCV  # cam -> world
    out = np.eye(4)
    out[:3, :3] = rotation.T
    out[:3, 3] = -rotation.T @ np.asarray(position, dtype=np.float64)
    return out.astype(np.float32)


def depth_from_z(z: np.ndarray) -> np.ndarray:
    """Blender's Z pass already is z-depth (distance to the camera plane); only the
    sky value becomes +inf so nobody mistakes it for a surface."""
    depth = z.astype(np.float32).copy()
    depth[~(depth < SKY_Z)] = np.inf
    return depth


def normals_to_camera(normal_world: np.ndarray, w2c: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World-space Normal pass -> unit normals in the OpenCV camera frame (0 off-mask)."""
    n = normal_world.astype(np.float64) @ w2c[:3, :3].T.astype(np.float64)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-12), 0.0)
    n[~mask] = 0.0
    return n.astype(np.float32)


def box_corners(bounds: np.ndarray, scale: np.ndarray, position: np.ndarray,
                quaternion_wxyz: np.ndarray) -> np.ndarray:
    """The 8 world corners of an object's oriented bounding box (x fastest)."""
    lo, hi = np.asarray(bounds, dtype=np.float64) * np.asarray(scale, dtype=np.float64)
    corners = np.array([[x, y, z] for z in (lo[2], hi[2]) for y in (lo[1], hi[1])
                        for x in (lo[0], hi[0])])
    rotation = Quaternion(*quaternion_wxyz).rotation_matrix
    return (corners @ rotation.T + np.asarray(position)).astype(np.float32)


def remap_ids(kubric_seg: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Kubric's segmentation (index into scene.assets + 1) -> our ids via a lookup table."""
    seg = np.asarray(kubric_seg)
    seg = np.where(seg < len(lookup), seg, 0)
    return lookup[seg]


def visibility(instance_seg: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[N,T] fraction of each frame's pixels showing each instance."""
    t = instance_seg.shape[0]
    flat = instance_seg.reshape(t, -1)
    return np.stack([(flat == i).mean(axis=1) for i in ids], axis=0).astype(np.float32)
