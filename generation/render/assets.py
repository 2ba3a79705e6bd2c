"""The offline asset set: simple shapes built with trimesh, packed the way Kubric's
``AssetSource`` expects (one ``<id>.tar.gz`` per asset next to a JSON manifest).

Nothing here downloads anything. ``build_asset_set(out_dir)`` writes byte-identical
archives on every machine (fixed tar metadata, gzip mtime 0, and canonical geometry:
see ``canonical_hull``), so the committed ``assets/shapes`` set can be checked against
a rebuild in tests.

Each archive holds ``visual_geometry.obj`` (render mesh, Z up, centred on the centre
of mass), ``collision_geometry.obj`` (its convex hull, what PyBullet collides with),
``object.urdf`` (mass and inertia for PyBullet) and ``data.json`` (the same
properties as the manifest entry).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from generation.dataset.storage import write_atomic

if TYPE_CHECKING:
    import trimesh

# trimesh stays inside _trimesh(): it pulls in scipy and networkx (0.4 s, python -X
# importtime after flows.cli), every `pvit` command imports this module (generation.config
# reads DEFAULT_MANIFEST; `pvit --help` takes 0.33 s), and only building the asset set
# needs it.


def _trimesh():
    import trimesh
    return trimesh


ASSET_SET_NAME = "PViTShapes"
ASSET_SET_VERSION = "1"
DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "assets" / "shapes" / "manifest.json"

# Density of a hard rubber-ish solid (kg/m^3); masses follow from the volume so that
# big objects are heavy, as in Kubric's KuBasic set.
DENSITY = 1000.0

# name -> builder of a mesh of roughly unit extent (the recipe scales it).
SHAPES: dict[str, Callable[[], trimesh.Trimesh]] = {
    "cube": lambda: _trimesh().creation.box(extents=(2.0, 2.0, 2.0)),
    "sphere": lambda: _trimesh().creation.icosphere(subdivisions=3, radius=1.0),
    "cylinder": lambda: _trimesh().creation.cylinder(radius=1.0, height=2.0, sections=32),
    "cone": lambda: _trimesh().creation.cone(radius=1.0, height=2.0, sections=32),
    "torus": lambda: _trimesh().creation.torus(major_radius=0.75, minor_radius=0.3,
                                            major_sections=32, minor_sections=16),
    "capsule": lambda: _trimesh().creation.capsule(height=1.2, radius=0.6, count=(16, 16)),
    "icosahedron": lambda: _trimesh().creation.icosahedron(),
    "pyramid": lambda: _trimesh().Trimesh(
        vertices=[(-1, -1, -0.7), (1, -1, -0.7), (1, 1, -0.7), (-1, 1, -0.7), (0, 0, 1.3)],
        faces=[(0, 2, 1), (0, 3, 2), (0, 1, 4), (1, 2, 4), (2, 3, 4), (3, 0, 4)]),
}

# Physical properties per shape (PyBullet); rubber-like defaults.
FRICTION = 0.5
RESTITUTION = 0.5

URDF = """<?xml version="1.0"?>
<robot name="{name}">
  <link name="base">
    <contact>
      <lateral_friction value="{friction}"/>
      <restitution value="{restitution}"/>
    </contact>
    <inertial>
      <origin xyz="0 0 0" rpy="0 0 0"/>
      <mass value="{mass}"/>
      <inertia ixx="{ixx}" ixy="{ixy}" ixz="{ixz}" iyy="{iyy}" iyz="{iyz}" izz="{izz}"/>
    </inertial>
    <visual>
      <geometry><mesh filename="visual_geometry.obj"/></geometry>
    </visual>
    <collision>
      <geometry><mesh filename="collision_geometry.obj"/></geometry>
    </collision>
  </link>
</robot>
"""


def _fmt(x: float) -> str:
    """Fixed formatting, so that archives are byte-identical across machines: a
    last-bit difference in their floating point (numpy's SIMD sums, BLAS kernels) is
    rounded away, and so is the sign of a residual such as ``0 - 1e-17`` left by
    centring a symmetric mesh (``-1e-17`` on one machine, ``2e-17`` on another).
    Rounding to a nanometre first, then 8 significant digits; ``+ 0.0`` turns -0 into 0."""
    return f"{round(float(x), 9) + 0.0:.8g}"


def _canonical_float(x: float) -> float:
    """``x`` as ``_fmt`` writes it (what goes into JSON, like what goes into OBJ/URDF)."""
    return float(_fmt(x))


def _facet_loop(faces: np.ndarray) -> list[int]:
    """Boundary of a planar convex polygon given as triangles with a consistent
    winding, in that winding order (each directed edge whose reverse is not in the set
    is a boundary edge; they chain into one loop)."""
    edges = {(int(a), int(b)) for tri in faces for a, b in zip(tri, np.roll(tri, -1), strict=True)}
    following = {a: b for a, b in edges if (b, a) not in edges}
    loop = [min(following)]
    while following[loop[-1]] != loop[0]:
        loop.append(following[loop[-1]])
    return loop


def canonical_hull(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The convex hull of ``mesh`` in a form that does not depend on the machine.

    Qhull's output order, and how it splits a planar face (a cylinder's cap, a cube's
    side) into triangles, depend on the machine's floating point; so the hull is
    rebuilt from what is unique about it: its vertices, sorted by their written
    coordinates, and its planar facets, each fanned from its smallest vertex in its
    outward winding, faces sorted."""
    hull = mesh.convex_hull
    coords = np.array([[_canonical_float(v) for v in row] for row in hull.vertices])
    order = np.lexsort(coords.T[::-1])           # sort by x, then y, then z
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    faces = rank[hull.faces]
    in_facet = np.zeros(len(faces), dtype=bool)
    polygons = []
    for facet in hull.facets:
        in_facet[facet] = True
        polygons.append(_facet_loop(faces[facet]))
    polygons += [list(map(int, tri)) for tri in faces[~in_facet]]
    triangles = []
    for loop in polygons:
        start = loop.index(min(loop))
        loop = loop[start:] + loop[:start]
        triangles += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
    return _trimesh().Trimesh(vertices=coords[order], faces=sorted(triangles), process=False)


def _obj_text(mesh: trimesh.Trimesh) -> str:
    """Plain Wavefront OBJ (positions and triangles only, no materials), written by hand
    so its bytes do not depend on the trimesh version."""
    lines = [f"v {_fmt(x)} {_fmt(y)} {_fmt(z)}" for x, y, z in mesh.vertices]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in mesh.faces]
    return "\n".join(lines) + "\n"


def shape_properties(name: str) -> tuple[trimesh.Trimesh, trimesh.Trimesh, dict]:
    """(visual mesh, collision mesh, properties) of one shape, centred on its centre of mass."""
    mesh = SHAPES[name]()
    mesh.fix_normals()
    mesh.apply_translation(-mesh.center_mass)
    collision = canonical_hull(mesh)
    mesh.density = DENSITY
    inertia = mesh.moment_inertia
    lo, hi = mesh.bounds
    c = _canonical_float
    props = {
        "id": name,
        "category": name,
        "mass": c(mesh.mass),
        "friction": FRICTION,
        "restitution": RESTITUTION,
        "bounds": [[c(v) for v in lo], [c(v) for v in hi]],
        "volume": c(mesh.volume),
        "is_convex": bool(mesh.is_convex),
        "inertia": [[c(v) for v in row] for row in inertia],
    }
    return mesh, collision, props


def _urdf(props: dict) -> str:
    inertia = np.asarray(props["inertia"])
    return URDF.format(
        name=props["id"], friction=_fmt(props["friction"]), restitution=_fmt(props["restitution"]),
        mass=_fmt(props["mass"]), ixx=_fmt(inertia[0, 0]), ixy=_fmt(inertia[0, 1]),
        ixz=_fmt(inertia[0, 2]), iyy=_fmt(inertia[1, 1]), iyz=_fmt(inertia[1, 2]),
        izz=_fmt(inertia[2, 2]))


def _deterministic_targz(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        # Kubric's AssetSource wants the folder itself as a member.
        for folder in sorted({name.split("/")[0] for name in files}):
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def manifest_entry(props: dict) -> dict:
    """Kubric ``AssetSource`` entry: ``{asset_dir}`` is replaced by the unpacked folder."""
    return {
        "asset_type": "FileBasedObject",
        "kwargs": {
            "bounds": props["bounds"],
            "mass": props["mass"],
            "friction": props["friction"],
            "restitution": props["restitution"],
            "render_filename": "{asset_dir}/visual_geometry.obj",
            "simulation_filename": "{asset_dir}/object.urdf",
            # The OBJ is already Z-up, like PyBullet's URDF: import it unrotated.
            "render_import_kwargs": {"forward_axis": "Y", "up_axis": "Z"},
        },
        "metadata": {"category": props["category"], "volume": props["volume"],
                     "is_convex": props["is_convex"]},
    }


def build_asset_set(out_dir: Path) -> Path:
    """Write every shape's archive and ``manifest.json`` into ``out_dir``; returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = {}
    for name in SHAPES:
        mesh, collision, props = shape_properties(name)
        files = {
            f"{name}/visual_geometry.obj": _obj_text(mesh).encode(),
            f"{name}/collision_geometry.obj": _obj_text(collision).encode(),
            f"{name}/object.urdf": _urdf(props).encode(),
            f"{name}/data.json": json.dumps(props, indent=2, sort_keys=True).encode(),
        }
        write_atomic(out_dir / f"{name}.tar.gz", _deterministic_targz(files))
        assets[name] = manifest_entry(props)
    manifest = {"name": ASSET_SET_NAME, "version": ASSET_SET_VERSION,
                "description": "Offline primitive shapes for PViT scene recipes (built by "
                               "generation/render/assets.py with trimesh).",
                "assets": assets}
    path = out_dir / "manifest.json"
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_manifest(path: Path) -> dict:
    """Read a Kubric-style asset manifest; raises ValueError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"asset manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"asset manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(manifest.get("assets"), dict) or not manifest["assets"]:
        raise ValueError(f"asset manifest {path} has no 'assets' mapping")
    return manifest


if __name__ == "__main__":
    print(build_asset_set(DEFAULT_MANIFEST.parent))
