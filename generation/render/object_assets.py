"""The offline object set ``PViTObjects``: real meshes that ship with pybullet
(``pybullet_data``, zlib license), packed like ``assets/shapes`` into Kubric's
``AssetSource`` format (one ``<id>.tar.gz`` per asset next to ``manifest.json``).

Per asset the archive holds ``visual_geometry.obj`` (the render mesh, with its UVs,
``material.mtl`` and the source's texture file where it has one), ``collision_geometry.obj``
(the source's convex decomposition where it ships one, e.g. ``duck_vhacd.obj``, each
part rebuilt by ``assets.canonical_hull``; else the canonical convex hull of the mesh;
PyBullet loads an OBJ of several ``o`` parts as a compound of convex hulls),
``object.urdf`` and ``data.json``.

Units: metres and kilograms at the object's real size (``REAL_SIZE_M``, its largest
extent; ``REAL_MASS_KG``). Centre of mass and inertia come from the collision geometry
(closed convex parts, unlike most render meshes) at the uniform density that gives the
real mass. Recipes rescale objects to the size their scenes are viewed at
(``recipes/movi_c.py``).

Byte-identical across machines as ``assets.py`` makes the shapes: every number written
through ``assets._fmt`` (1 nm, 8 significant digits), hull parts canonical and sorted,
textures copied byte for byte, tar/gzip metadata fixed. ``python -m
generation.render.object_assets`` rebuilds the committed ``assets/objects``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generation.dataset.storage import write_atomic
from generation.render.assets import (
    DEFAULT_MANIFEST,
    FRICTION,
    RESTITUTION,
    _canonical_float,
    _deterministic_targz,
    _fmt,
    _trimesh,
    _urdf,
    canonical_hull,
    manifest_entry,
)

OBJECTS_SET_NAME = "PViTObjects"
OBJECTS_SET_VERSION = "1"
OBJECTS_MANIFEST = Path(__file__).resolve().parents[2] / "assets" / "objects" / "manifest.json"


@dataclass(frozen=True)
class Source:
    """One object of pybullet_data: its files (relative to the package's data folder),
    its class, and its real size and mass."""
    visual: str
    category: str
    size_m: float                    # largest extent of the real object
    mass_kg: float
    collision: str | None = None     # the source's convex decomposition, if any
    texture: str | None = None       # the texture its .mtl names (copied as is)
    # the source URDF's mesh scale (jenga's block is a unit cube scaled by the URDF)
    mesh_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)


# Sizes and masses of the real things (a rubber duck, a size-5 football, a 2x4 LEGO
# brick...): plausible figures, not measurements. GIF textures (textured_sphere) are
# left out: Blender does not read GIF.
SOURCES: dict[str, Source] = {
    "duck": Source("duck.obj", "duck", 0.10, 0.03, collision="duck_vhacd.obj",
                   texture="duckCM.png"),
    "soccer_ball": Source("soccerball.obj", "soccer_ball", 0.22, 0.43, texture="colors16.png"),
    "jenga_block": Source("jenga/jenga.obj", "jenga_block", 0.075, 0.015,
                          texture="jenga/jenga.png", mesh_scale=(0.15, 0.05, 0.03)),
    "domino": Source("domino/domino.obj", "domino", 0.05, 0.01, texture="domino/domino.jpg"),
    "teddy_bear": Source("teddy2_VHACD_CHs.obj", "teddy_bear", 0.30, 0.25,
                         collision="teddy2_VHACD_CHs.obj"),
    "bunny": Source("bunny.obj", "bunny", 0.15, 0.6),
    "mug": Source("objects/mug.obj", "mug", 0.12, 0.35, collision="objects/mug_col.obj"),
    "lego_brick": Source("lego/lego.obj", "lego_brick", 0.032, 0.0025,
                         collision="lego/lego_vhacd.obj"),
}

MTL = """newmtl textured
Kd 1 1 1
Ks 0.2 0.2 0.2
Ns 100
d 1
illum 2
map_Kd {texture}
"""


def pybullet_data_dir() -> Path:
    import pybullet_data
    return Path(pybullet_data.getDataPath())


def _load(path: Path, mesh_scale) -> "trimesh.Trimesh":  # noqa: F821
    mesh = _trimesh().load(path, force="mesh", process=False)
    mesh.apply_transform(np.diag([*mesh_scale, 1.0]))
    return mesh


def _collision_parts(source: Source, visual, data: Path) -> list:
    """The source's convex parts (disjoint pieces of its decomposition OBJ), in the
    visual mesh's units; the visual mesh itself where there is no decomposition."""
    if source.collision is None:
        return [visual]
    mesh = _load(data / source.collision, source.mesh_scale)
    return list(mesh.split(only_watertight=False))


def _textured_obj(mesh, uv: np.ndarray | None) -> str:
    """Wavefront OBJ with positions, UVs (if any) and triangles, written by hand as
    ``assets._obj_text`` is: bytes independent of the trimesh version."""
    lines = [f"v {_fmt(x)} {_fmt(y)} {_fmt(z)}" for x, y, z in mesh.vertices]
    if uv is None:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in mesh.faces]
        return "\n".join(lines) + "\n"
    lines = ["mtllib material.mtl", "usemtl textured"] + lines
    lines += [f"vt {_fmt(u)} {_fmt(v)}" for u, v in uv]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in mesh.faces]
    return "\n".join(lines) + "\n"


def _hull_obj(parts: list) -> str:
    """Convex parts as one OBJ, one ``o`` group each, parts sorted by their text."""
    texts = []
    for part in parts:
        lines = [f"v {_fmt(x)} {_fmt(y)} {_fmt(z)}" for x, y, z in part.vertices]
        texts.append((lines, part.faces))
    texts.sort(key=lambda t: t[0])
    out, offset = [], 0
    for i, (lines, faces) in enumerate(texts):
        out.append(f"o part{i:03d}")
        out += lines
        out += [f"f {a + 1 + offset} {b + 1 + offset} {c + 1 + offset}" for a, b, c in faces]
        offset += len(lines)
    return "\n".join(out) + "\n"


def object_properties(asset_id: str, data: Path | None = None):
    """(visual mesh, its UVs or None, canonical collision parts, properties) of one
    asset at its real size, centred on its centre of mass."""
    source, data = SOURCES[asset_id], data or pybullet_data_dir()
    trimesh = _trimesh()
    visual = _load(data / source.visual, source.mesh_scale)
    uv = getattr(visual.visual, "uv", None) if source.texture else None
    raw_parts = _collision_parts(source, visual, data)
    scale = source.size_m / float(visual.extents.max())
    hulls = [canonical_hull(p.copy().apply_scale(scale)) for p in raw_parts]
    solid = trimesh.util.concatenate(hulls)         # closed parts: volume integrals add up
    centre = solid.center_mass
    visual.apply_scale(scale)
    visual.apply_translation(-centre)
    parts = [canonical_hull(h.copy().apply_translation(-centre)) for h in hulls]
    solid = trimesh.util.concatenate(parts)
    solid.density = source.mass_kg / solid.volume
    lo, hi = visual.bounds
    c = _canonical_float
    props = {
        "id": asset_id,
        "category": source.category,
        "mass": c(source.mass_kg),
        "friction": FRICTION,
        "restitution": RESTITUTION,
        "bounds": [[c(v) for v in lo], [c(v) for v in hi]],
        "volume": c(solid.volume),
        "is_convex": len(parts) == 1 and bool(visual.is_convex),
        "inertia": [[c(v) for v in row] for row in solid.moment_inertia],
        "textured": source.texture is not None,
        "source": f"pybullet_data/{source.visual}",
    }
    return visual, uv, parts, props


def _archive(asset_id: str, data: Path) -> tuple[bytes, dict]:
    visual, uv, parts, props = object_properties(asset_id, data)
    files = {
        f"{asset_id}/visual_geometry.obj": _textured_obj(visual, uv).encode(),
        f"{asset_id}/collision_geometry.obj": _hull_obj(parts).encode(),
        f"{asset_id}/object.urdf": _urdf(props).encode(),
        f"{asset_id}/data.json": json.dumps(props, indent=2, sort_keys=True).encode(),
    }
    texture = SOURCES[asset_id].texture
    if texture is not None:
        name = "texture" + Path(texture).suffix.lower()
        files[f"{asset_id}/material.mtl"] = MTL.format(texture=name).encode()
        files[f"{asset_id}/{name}"] = (data / texture).read_bytes()
    entry = manifest_entry(props)
    entry["metadata"].update(textured=props["textured"], source=props["source"])
    return _deterministic_targz(files), entry


def build_object_set(out_dir: Path, data: Path | None = None) -> Path:
    """Write every object's archive and ``manifest.json`` into ``out_dir``; returns the
    manifest path."""
    out_dir, data = Path(out_dir), data or pybullet_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = {}
    for asset_id in SOURCES:
        archive, assets[asset_id] = _archive(asset_id, data)
        write_atomic(out_dir / f"{asset_id}.tar.gz", archive)
    manifest = {"name": OBJECTS_SET_NAME, "version": OBJECTS_SET_VERSION,
                "description": "Real meshes from pybullet_data (zlib license) at real size "
                               "in metres (built by generation/render/object_assets.py).",
                "assets": assets}
    path = out_dir / "manifest.json"
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


# Asset sets by name: ``generation.scene.asset_manifest`` may name one instead of a
# path (``asset_manifest: objects``); any other value is a path to a Kubric manifest.
ASSET_SETS = {"shapes": DEFAULT_MANIFEST, "objects": OBJECTS_MANIFEST}


if __name__ == "__main__":
    print(build_object_set(OBJECTS_MANIFEST.parent))
