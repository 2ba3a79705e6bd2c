"""``pvit verify --labels``: geometric checks of a clip's labels against each other.

Each check compares two labels that the renderer derives independently (depth and
the floor plane, depth and normals, masks and boxes, ...) and yields its worst residual
and a tolerance; a residual over it is one line, ``<key>: <check>: <what>``. The
tolerances and the residuals measured on clean clips are in docs/dataset-format.md
("Label checks"); each tolerance keeps a margin of at least 6x over the clean residuals,
and each corruption the tests plant (a depth region flipped, ids swapped, K shifted by
1 px or scaled by 2 %, normals transposed, depth stored as ray length, a quaternion off
by 3 degrees, the camera 5 cm off) gives at least one residual 15x over its tolerance.

Only pixels inside a mask (``geometry.interior``: all 8 neighbours show the same
instance) are back-projected: at an edge a pixel's passes may come from either surface.
Actors (``actor_ids``) deform: their pixels are held to their instance's boxes and
classes loosely (any non-background class), and not to rigid motion. Numpy only,
vectorised over pixels; a few Python steps per instance and frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

import numpy as np

from generation.dataset import geometry

# Residual limits; "clean" is the largest residual over 26 clean clips of movi, movi_c,
# movi_e and movi_f (docs/dataset-format.md, "Label checks").
FLOOR_PLANE = 1e-4       # |floor z| / depth; clean 8e-6 (float32 depth)
NORMAL_DEG = 0.5         # median angle (degrees), normals vs normals from depth; clean 0.014
MASK_BOX_PX = 0.5        # a mask pixel centre outside its projected 3D box; clean -0.014
SURFACE = 1.5e-4         # a surface point outside its object's box / depth; clean 1.1e-5
BOX_POSE = 1e-4          # metres: box corners vs the box at the object's pose; clean 5e-7
OBJECT_COORDS = 3e-3     # object coordinates vs the back-projected point, box units; clean 4.4e-4
FLOW_MEDIAN_PX = 0.01    # flow vs the motion of rigid surface points; clean: median 9e-5 px,
FLOW_P95_PX = 0.05       # 95th percentile 2e-4 px
TRACK_PX = 1e-3          # tracks vs their query point carried by its object; clean 4e-6
# Occlusion flags are recomputed with the renderer's own rule and tolerance.
OCCLUSION_TOLERANCE = geometry.OCCLUSION_TOLERANCE


@dataclass
class Scene:
    """One decoded clip and what the checks share (float64, computed once)."""

    clip: dict
    classes: list

    @cached_property
    def K(self) -> np.ndarray:
        return self.clip["K"].astype(np.float64)

    @cached_property
    def w2c(self) -> np.ndarray:
        return self.clip["world_to_camera"].astype(np.float64)

    @cached_property
    def depth(self) -> np.ndarray:
        return self.clip["depth"]

    @cached_property
    def seg(self) -> np.ndarray:
        return self.clip["instance_seg"]

    @cached_property
    def inner(self) -> np.ndarray:
        """Interior pixels with a surface (finite depth, not background)."""
        return geometry.interior(self.seg) & (self.seg > 0) & np.isfinite(self.depth)

    @cached_property
    def camera_points(self) -> np.ndarray:
        """[T, H, W, 3] camera-frame points (inf on the sky)."""
        with np.errstate(invalid="ignore"):
            return geometry.camera_points(self.depth, self.K)

    def world(self, t: int, mask: np.ndarray) -> np.ndarray:
        return geometry.to_world(self.camera_points[t][mask], self.w2c[t])

    @cached_property
    def ids(self) -> np.ndarray:
        return self.clip["instances"]["id"]

    @cached_property
    def index_of(self) -> np.ndarray:
        """Lookup id -> instance row (-1: no instance)."""
        lut = np.full(int(max(self.ids.max(initial=0), self.seg.max(initial=0))) + 1, -1)
        lut[self.ids] = np.arange(len(self.ids))
        return lut

    @cached_property
    def actors(self) -> set:
        return set(np.asarray(self.clip.get("actor_ids", []), dtype=np.int64).tolist())

    @cached_property
    def floor(self) -> int | None:
        """The floor's instance id (category "floor"), or None."""
        if "floor" not in self.classes:
            return None
        rows = np.flatnonzero(self.clip["instances"]["category"] == self.classes.index("floor"))
        return int(self.ids[rows[0]]) if len(rows) else None

    @cached_property
    def rigid_objects(self) -> list[int]:
        """Rows of the instances that are neither the floor nor an actor."""
        return [n for n, i in enumerate(self.ids.tolist())
                if i != self.floor and i not in self.actors]

    @cached_property
    def rotation(self) -> np.ndarray:
        return geometry.rotation_matrices(self.clip["instances"]["quaternion"])

    @cached_property
    def position(self) -> np.ndarray:
        return self.clip["instances"]["position"].astype(np.float64)

    @cached_property
    def box_local(self) -> np.ndarray:
        """[N, T, 8, 3] box corners in each object's frame at its pose."""
        box = self.clip["instances"]["bbox_3d"].astype(np.float64)
        return np.einsum("ntkj,ntji->ntki", box - self.position[:, :, None], self.rotation)

    def local(self, n: int, t: int, world: np.ndarray) -> np.ndarray:
        return (world - self.position[n, t]) @ self.rotation[n, t]


@dataclass
class Residual:
    """A check's worst residual, its limit, and the line that says what it is."""

    value: float
    limit: float
    what: str

    @property
    def bad(self) -> bool:
        return not self.value <= self.limit      # NaN is bad too


def check_labels(clip: dict, classes: list) -> list[str]:
    """One line per failing check of ``clip``: ``<key>: <check>: <what>``."""
    scene = Scene(clip, list(classes))
    return [f"{clip['key']}: {name}: {r.what}" for name, r in residuals(scene) if r.bad]


def residuals(scene: Scene) -> Iterator[tuple[str, Residual]]:
    """(check name, its worst residual) for every check that applies to the clip."""
    for name, check in CHECKS:
        found = check(scene)
        if found is not None:
            yield name, found


def _worst(items) -> Residual | None:
    """The residual furthest over (or nearest to) its limit, relative to the limit."""
    items = [r for r in items if r is not None]
    return max(items, key=lambda r: np.inf if np.isnan(r.value) else r.value / r.limit,
               default=None)


def floor_plane(scene: Scene) -> Residual | None:
    """Floor pixels back-projected through depth, K and world_to_camera lie on z = 0."""
    if scene.floor is None:
        return None
    found = []
    for t in range(len(scene.depth)):
        mask = scene.inner[t] & (scene.seg[t] == scene.floor)
        if not mask.any():
            continue
        off = np.abs(scene.world(t, mask)[:, 2]) / scene.depth[t][mask]
        i = int(np.argmax(off))
        found.append(Residual(float(off[i]), FLOOR_PLANE,
                              f"frame {t}: a floor pixel back-projects "
                              f"{off[i] * scene.depth[t][mask][i]:.3g} m off the plane z = 0 at "
                              f"depth {scene.depth[t][mask][i]:.3g} m ({off[i]:.2g} x depth; "
                              f"tolerance {FLOOR_PLANE:g} x depth)"))
    return _worst(found)


def normals(scene: Scene) -> Residual | None:
    """Normals agree with the normals of the surface that depth gives: central
    differences of the camera-frame points, inside masks; the median angle per clip."""
    p = scene.camera_points
    with np.errstate(invalid="ignore"):
        across = p[:, 1:-1, 2:] - p[:, 1:-1, :-2]
        down = p[:, 2:, 1:-1] - p[:, :-2, 1:-1]
        n = np.cross(across, down)
    mask = scene.inner[:, 1:-1, 1:-1]
    n = n[mask]
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n *= -np.sign(np.einsum("ij,ij->i", n, p[:, 1:-1, 1:-1][mask]))[:, None]  # face the camera
    stored = scene.clip["normal"][:, 1:-1, 1:-1][mask].astype(np.float64)
    if len(n) == 0:
        return None
    angle = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", n, stored), -1, 1)))
    median = float(np.median(angle))
    return Residual(median, NORMAL_DEG, f"normals differ from those of the depth surface by "
                    f"{median:.3g} degrees (median over {len(angle)} pixels; tolerance "
                    f"{NORMAL_DEG:g})")


def mask_in_box(scene: Scene) -> Residual | None:
    """Each object's mask lies inside its projected 3D box (its corners' bounding
    rectangle in the image, ``MASK_BOX_PX`` beyond it allowed)."""
    found = []
    box = scene.clip["instances"]["bbox_3d"]
    for t in range(len(scene.depth)):
        for n, obj in enumerate(scene.ids.tolist()):
            if obj == scene.floor:
                continue
            v, u = np.nonzero(scene.seg[t] == obj)
            cam = geometry.to_camera(box[n, t].astype(np.float64), scene.w2c[t])
            if len(v) == 0 or not (cam[:, 2] > 0).all():   # a corner behind the camera
                continue
            xy = geometry.project(cam, scene.K)
            lo, hi = xy.min(axis=0), xy.max(axis=0)
            out = np.max([lo[0] - (u.min() + 0.5), (u.max() + 0.5) - hi[0],
                          lo[1] - (v.min() + 0.5), (v.max() + 0.5) - hi[1]])
            found.append(Residual(float(out), MASK_BOX_PX,
                                  f"frame {t}: instance {obj}'s mask reaches {out:.3g} px "
                                  f"beyond its projected 3D box (tolerance {MASK_BOX_PX:g} px)"))
    return _worst(found)


def surface_in_box(scene: Scene) -> Residual | None:
    """Each rigid object's surface, back-projected, lies inside its 3D box at its pose
    (``SURFACE`` x depth beyond it allowed): what ties depth, K and the camera to the
    objects' poses in 3D."""
    found = []
    for t in range(len(scene.depth)):
        for n in scene.rigid_objects:
            mask = scene.inner[t] & (scene.seg[t] == scene.ids[n])
            if not mask.any():
                continue
            local = scene.local(n, t, scene.world(t, mask))
            lo, hi = scene.box_local[n, t].min(axis=0), scene.box_local[n, t].max(axis=0)
            out = np.maximum(lo - local, local - hi).max(axis=1) / scene.depth[t][mask]
            i = int(np.argmax(out))
            found.append(Residual(float(out[i]), SURFACE,
                                  f"frame {t}: a pixel of instance {scene.ids[n]} back-projects "
                                  f"{out[i] * scene.depth[t][mask][i]:.3g} m outside its 3D box "
                                  f"(tolerance {SURFACE:g} x depth)"))
    return _worst(found)


def box_pose(scene: Scene) -> Residual | None:
    """bbox_3d is the object's own box at its position and quaternion: in the object's
    frame the corners form an axis-aligned box (corner i: x = hi if i&1, ...) that stays
    the same in every frame."""
    rows = scene.rigid_objects
    if not rows:
        return None
    local = scene.box_local[rows]
    lo, hi = local[:, :, 0], local[:, :, 7]
    bits = (np.arange(8)[:, None] >> np.arange(3)) & 1                 # [8, 3]
    expected = np.where(bits.astype(bool), hi[:, :, None], lo[:, :, None])
    off = np.maximum(np.abs(local - expected).max(axis=(1, 2, 3)),
                     np.abs(local - local[:, :1]).max(axis=(1, 2, 3)))
    i = int(np.argmax(off))
    return Residual(float(off[i]), BOX_POSE,
                    f"instance {scene.ids[rows[i]]}'s bbox_3d is {off[i]:.3g} m away from its "
                    f"box at its position and quaternion (tolerance {BOX_POSE:g} m)")


def object_coordinates(scene: Scene) -> Residual | None:
    """Object coordinates (when stored) are the back-projected surface point's place in
    its object's box at the object's pose."""
    coords = scene.clip.get("object_coordinates")
    if coords is None:
        return None
    found = []
    for t in range(len(scene.depth)):
        for n in scene.rigid_objects:
            mask = scene.inner[t] & (scene.seg[t] == scene.ids[n])
            if not mask.any():
                continue
            local = scene.local(n, t, scene.world(t, mask))
            lo, hi = scene.box_local[n, t].min(axis=0), scene.box_local[n, t].max(axis=0)
            off = np.abs((local - lo) / (hi - lo) - coords[t][mask]).max()
            found.append(Residual(float(off), OBJECT_COORDS,
                                  f"frame {t}: instance {scene.ids[n]}'s object coordinates are "
                                  f"{off:.3g} (box units) from its back-projected surface "
                                  f"(tolerance {OBJECT_COORDS:g})"))
    return _worst(found)


def semantics(scene: Scene) -> Residual | None:
    """semantic_seg is the category of the instance at every pixel (0 on background);
    an actor's pixels may show any class but background (its body parts)."""
    category = np.zeros(len(scene.index_of), dtype=np.int64)
    category[scene.ids] = scene.clip["instances"]["category"]
    expected = category[scene.seg]
    wrong = scene.clip["semantic_seg"] != expected
    if scene.actors:
        actor = np.isin(scene.seg, list(scene.actors))
        wrong = np.where(actor, scene.clip["semantic_seg"] == 0, wrong)
    count = int(wrong.sum())
    what = "every pixel shows its instance's category"
    if count:
        t, v, u = (int(i[0]) for i in np.nonzero(wrong))
        shown, want = int(scene.clip["semantic_seg"][t, v, u]), int(expected[t, v, u])
        what = (f"{count} pixels show another class than their instance's category, first "
                f"frame {t} pixel (x={u}, y={v}): instance {int(scene.seg[t, v, u])}, class "
                f"{shown} ({_name(scene, shown)}), category {want} ({_name(scene, want)})")
    return Residual(float(count), 0.0, what)


def _name(scene: Scene, c: int) -> str:
    return scene.classes[c] if 0 <= c < len(scene.classes) else "?"


def visibility(scene: Scene) -> Residual | None:
    """inst_visibility is each instance's share of the frame's pixels."""
    t_count, h, w = scene.seg.shape
    counts = np.stack([np.bincount(scene.seg[t].ravel(), minlength=len(scene.index_of))
                       for t in range(t_count)])[:, scene.ids].T / (h * w)
    off = np.abs(scene.clip["instances"]["visibility"] - counts) * (h * w)   # in pixels
    n, t = np.unravel_index(int(np.argmax(off)), off.shape)
    return Residual(float(off[n, t]), 0.5,
                    f"frame {t}: instance {scene.ids[n]}'s visibility is "
                    f"{scene.clip['instances']['visibility'][n, t]:.6g}, its mask covers "
                    f"{counts[n, t]:.6g} of the frame")


def flow(scene: Scene) -> Residual | None:
    """forward/backward flow equal the image motion of the rigid surface points seen
    inside masks (the floor by the camera's motion, objects also by their pose change)."""
    found = []
    for key, step in (("forward_flow", 1), ("backward_flow", -1)):
        if scene.clip.get(key) is None:
            continue
        errors = [_flow_errors(scene, scene.clip[key], t, t + step)
                  for t in range(len(scene.depth)) if 0 <= t + step < len(scene.depth)]
        errors = np.concatenate(errors) if errors else np.zeros(0)
        if len(errors) == 0:
            continue
        median, p95 = float(np.median(errors)), float(np.percentile(errors, 95))
        what = (f"{key} differs from the motion of rigid surface points by {median:.3g} px "
                f"(median) and {p95:.3g} px (95th percentile) over {len(errors)} pixels "
                f"(tolerance {FLOW_MEDIAN_PX:g} and {FLOW_P95_PX:g} px)")
        found += [Residual(median, FLOW_MEDIAN_PX, what), Residual(p95, FLOW_P95_PX, what)]
    return _worst(found)


def _flow_errors(scene: Scene, flow_field: np.ndarray, t: int, s: int) -> np.ndarray:
    rigid = np.isin(scene.seg[t], scene.ids[[n for n in range(len(scene.ids))
                                             if int(scene.ids[n]) not in scene.actors]])
    mask = scene.inner[t] & rigid
    v, u = np.nonzero(mask)
    n = scene.index_of[scene.seg[t][mask]]
    world = scene.world(t, mask)
    local = np.einsum("qi,qij->qj", world - scene.position[n, t], scene.rotation[n, t])
    moved = np.einsum("qij,qj->qi", scene.rotation[n, s], local) + scene.position[n, s]
    xy = geometry.project(geometry.to_camera(moved, scene.w2c[s]), scene.K)
    expected = xy - np.stack([u + 0.5, v + 0.5], axis=-1)
    return np.linalg.norm(flow_field[t][mask] - expected, axis=-1)


def tracks(scene: Scene) -> Residual | None:
    """Point tracks are their query points carried with their objects' poses: the query
    pixel shows the track's instance, every position is the reprojection, and the
    occlusion flags follow the depth (``geometry.occluded``)."""
    clip = scene.clip
    if clip.get("tracks_query") is None or len(clip["tracks_query"]) == 0:
        return None
    query = clip["tracks_query"]
    t = query[:, 0].astype(np.intp)
    v, u = query[:, 1].astype(np.intp), query[:, 2].astype(np.intp)
    shown = scene.seg[t, v, u]
    wrong = np.flatnonzero(shown != clip["tracks_instance"])
    if len(wrong):
        q = int(wrong[0])
        return Residual(np.inf, TRACK_PX, f"{len(wrong)} query points lie on another instance "
                        f"than their tracks_instance, first track {q}: instance "
                        f"{int(shown[q])}, not {int(clip['tracks_instance'][q])}")
    n = scene.index_of[shown]
    cam = geometry.pixel_rays(scene.K, v, u) * scene.depth[t, v, u][:, None].astype(np.float64)
    world = np.einsum("qji,qj->qi", scene.w2c[t, :3, :3], cam - scene.w2c[t, :3, 3])
    moved = geometry.carry(world, n, t, scene.position, clip["instances"]["quaternion"])
    moved_cam = geometry.to_camera(moved, scene.w2c[None])
    xy = geometry.project(moved_cam, scene.K)
    with np.errstate(invalid="ignore"):
        off = np.nan_to_num(np.abs(xy - clip["tracks_2d"]).max(axis=-1), nan=np.inf)
    off[np.isnan(xy).all(-1) & np.isnan(clip["tracks_2d"]).all(-1)] = 0.0   # both behind
    hidden = geometry.occluded(xy, moved_cam[..., 2], scene.depth, OCCLUSION_TOLERANCE)
    flips = int((hidden != clip["tracks_occluded"]).sum())
    q, s = np.unravel_index(int(np.argmax(off)), off.shape)
    if flips and off[q, s] <= TRACK_PX:
        return Residual(np.inf, TRACK_PX, f"{flips} occlusion flags differ from the depth "
                        "test (a point is occluded where all four pixel centres around it "
                        f"are nearer by more than {OCCLUSION_TOLERANCE:g} x its depth)")
    return Residual(float(off[q, s]), TRACK_PX,
                    f"track {q} frame {s} lies {off[q, s]:.3g} px from its query point "
                    f"carried with instance {int(clip['tracks_instance'][q])}'s pose "
                    f"(tolerance {TRACK_PX:g} px)")


CHECKS: tuple[tuple[str, Callable[[Scene], Residual | None]], ...] = (
    ("floor_plane", floor_plane),
    ("normals", normals),
    ("mask_in_box", mask_in_box),
    ("surface_in_box", surface_in_box),
    ("box_pose", box_pose),
    ("object_coordinates", object_coordinates),
    ("semantic", semantics),
    ("visibility", visibility),
    ("flow", flow),
    ("tracks", tracks),
)
