"""The PViTObjects set (pybullet_data meshes): deterministic build, real units,
convex-decomposition collision geometry, textures kept."""

import json
import tarfile

import numpy as np

from generation.render.assets import load_manifest
from generation.render.object_assets import OBJECTS_MANIFEST, SOURCES, build_object_set


def test_committed_object_set_is_what_the_builder_writes(tmp_path):
    manifest = build_object_set(tmp_path / "a")
    again = build_object_set(tmp_path / "b")
    committed = OBJECTS_MANIFEST.parent
    for name in sorted(p.name for p in committed.iterdir()):
        built = (manifest.parent / name).read_bytes()
        assert built == (again.parent / name).read_bytes(), name
        assert built == (committed / name).read_bytes(), f"{name}: differs from assets/objects"


def test_objects_carry_category_real_size_mass_and_their_own_collision(tmp_path):
    manifest = load_manifest(OBJECTS_MANIFEST)
    assert sorted(manifest["assets"]) == sorted(SOURCES)
    for asset_id, entry in manifest["assets"].items():
        source = SOURCES[asset_id]
        lo, hi = np.array(entry["kwargs"]["bounds"])
        assert np.isclose((hi - lo).max(), source.size_m, rtol=1e-6), asset_id
        assert entry["kwargs"]["mass"] == source.mass_kg
        assert entry["metadata"]["category"] == source.category
        with tarfile.open(OBJECTS_MANIFEST.parent / f"{asset_id}.tar.gz") as tar:
            names = set(tar.getnames())
            collision = tar.extractfile(f"{asset_id}/collision_geometry.obj").read().decode()
            data = json.loads(tar.extractfile(f"{asset_id}/data.json").read())
            if source.texture:
                assert f"{asset_id}/material.mtl" in names
                obj = tar.extractfile(f"{asset_id}/visual_geometry.obj").read().decode()
                assert obj.startswith("mtllib material.mtl") and "\nvt " in obj
        parts = collision.count("\no part") + collision.startswith("o part")
        if source.collision:        # the source's decomposition, part for part
            assert parts > 1, asset_id
        else:
            assert parts == 1, asset_id
        # centre of mass at the origin: the inertia tensor is symmetric positive definite
        inertia = np.array(data["inertia"])
        assert np.allclose(inertia, inertia.T) and np.linalg.eigvalsh(inertia).min() > 0
