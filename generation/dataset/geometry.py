"""The camera and pose conventions of docs/dataset-format.md, as numpy (float64).

One copy of them for the renderer's point tracks (``generation.render.tracks``) and
for ``pvit verify --labels`` (``generation.dataset.label_checks``): OpenCV cameras (x
right, y down, z forward), K in pixels with pixel ``(u, v)``'s centre at ``(u+0.5,
v+0.5)``, z-depth, world_to_camera 4x4, quaternions w x y z (object -> world).
"""

from __future__ import annotations

import numpy as np

# Relative depth slack of the point-track occlusion test (``occluded``). A visible
# point's depth matches the surface seen around it to ~1e-5 (float32 depth and poses,
# measured on movi clips); 1e-3 (8 mm at 8 m) still hides a point on the far side of a
# 1 m object.
OCCLUSION_TOLERANCE = 1e-3


def pixel_rays(K: np.ndarray, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """[..., 3] camera-frame points at z = 1 through the centres of pixels (v, u)."""
    K = np.asarray(K, dtype=np.float64)
    x = (np.asarray(u, dtype=np.float64) + 0.5 - K[0, 2]) / K[0, 0]
    y = (np.asarray(v, dtype=np.float64) + 0.5 - K[1, 2]) / K[1, 1]
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def camera_points(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] camera-frame points of every pixel of ``depth`` [..., H, W]."""
    h, w = depth.shape[-2:]
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return pixel_rays(K, v, u) * np.asarray(depth, dtype=np.float64)[..., None]


def to_world(points_cam: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """Camera-frame points [..., 3] -> world, for one world_to_camera [4, 4]."""
    w2c = np.asarray(w2c, dtype=np.float64)
    rotation, shift = w2c[:3, :3], w2c[:3, 3]
    return (points_cam - shift) @ rotation          # R^T (p - t), row vectors


def to_camera(points_world: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """World points [..., 3] -> camera frame; ``w2c`` [4, 4] or broadcastable [..., 4, 4]."""
    w2c = np.asarray(w2c, dtype=np.float64)
    return (np.einsum("...ij,...j->...i", w2c[..., :3, :3], points_world) + w2c[..., :3, 3])


def project(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points [..., 3] -> continuous pixel coordinates [..., 2] (x, y): the
    centre of pixel (u, v) is (u+0.5, v+0.5). Points at z <= 0 give non-finite values."""
    K = np.asarray(K, dtype=np.float64)
    z = points_cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = K[0, 0] * points_cam[..., 0] / z + K[0, 2]
        y = K[1, 1] * points_cam[..., 1] / z + K[1, 2]
    bad = ~(z > 0)
    return np.where(bad[..., None], np.nan, np.stack([x, y], axis=-1))


def rotation_matrices(quaternion_wxyz: np.ndarray) -> np.ndarray:
    """[..., 4] unit quaternions (w, x, y, z) -> [..., 3, 3] rotation matrices."""
    q = np.asarray(quaternion_wxyz, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def interior(seg: np.ndarray) -> np.ndarray:
    """[..., H, W] bool: pixels whose 8 neighbours show the same id (not on the image
    border). At an edge a pixel's passes (depth, normal, flow) may come from either
    surface; inside one, every pass is that surface's."""
    seg = np.asarray(seg)
    h, w = seg.shape[-2:]
    inner = np.zeros(seg.shape, dtype=bool)
    centre = seg[..., 1:-1, 1:-1]
    same = np.ones(centre.shape, dtype=bool)
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            same &= seg[..., 1 + dv:h - 1 + dv, 1 + du:w - 1 + du] == centre
    inner[..., 1:-1, 1:-1] = same
    return inner


def carry(points_world: np.ndarray, instance: np.ndarray, frame: np.ndarray,
          position: np.ndarray, quaternion: np.ndarray) -> np.ndarray:
    """[Q, T, 3] world positions, in every frame, of Q surface points given in world
    coordinates at frame ``frame[q]`` on instance index ``instance[q]`` (rows of
    ``position`` [N, T, 3] / ``quaternion`` [N, T, 4]): each point keeps its place in its
    object's frame, so it moves with the object's pose (a static floor does not move)."""
    rotation = rotation_matrices(quaternion)[instance]             # [Q, T, 3, 3]
    origin = np.asarray(position, dtype=np.float64)[instance]      # [Q, T, 3]
    rows = np.arange(len(instance))
    local = np.einsum("qij,qi->qj", rotation[rows, frame], points_world - origin[rows, frame])
    return np.einsum("qtij,qj->qti", rotation, local) + origin


def occluded(xy: np.ndarray, z: np.ndarray, depth: np.ndarray, tolerance: float) -> np.ndarray:
    """[Q, T] bool: a point at pixel position ``xy`` [Q, T, 2] and camera depth ``z``
    [Q, T] is hidden when it is out of the frame (or behind the camera), or when the
    rendered depth [T, H, W] at all four pixel centres around it is nearer than ``z`` by
    more than ``tolerance`` (relative). Four centres, not the nearest one: on a surface
    seen at a grazing angle the depth changes by a large fraction from one pixel to the
    next, and a plane's depth at a point lies between those of the centres around it."""
    t_count, h, w = depth.shape
    x, y = xy[..., 0], xy[..., 1]
    with np.errstate(invalid="ignore"):
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h) & (z > 0)
    x0 = np.clip(np.floor(np.nan_to_num(x) - 0.5), 0, w - 1).astype(np.intp)
    y0 = np.clip(np.floor(np.nan_to_num(y) - 0.5), 0, h - 1).astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    frame = np.broadcast_to(np.arange(t_count), x.shape)
    farthest = np.maximum.reduce([depth[frame, y0, x0], depth[frame, y0, x1],
                                  depth[frame, y1, x0], depth[frame, y1, x1]])
    with np.errstate(invalid="ignore"):
        seen = z <= farthest * (1.0 + tolerance)
    return ~(inside & seen)
