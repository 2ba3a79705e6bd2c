import json

import numpy as np
import pytest
import trimesh
import yaml
from pvit_cli import pvit, write_config

from generation.render.assets import (
    DEFAULT_MANIFEST,
    SHAPES,
    _fmt,
    _obj_text,
    build_asset_set,
    canonical_hull,
)


def test_committed_asset_set_is_what_the_builder_writes(tmp_path):
    build_asset_set(tmp_path)
    committed = DEFAULT_MANIFEST.parent
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_collision_hull_bytes_do_not_depend_on_floating_point_or_order(name):
    """What differs between machines, made to differ here: the order Qhull sees the
    points in (which decides its face order and how it splits planar faces) and the
    last bits of every coordinate. The written hull must not change."""
    mesh = SHAPES[name]()
    reference = _obj_text(canonical_hull(mesh))
    rng = np.random.default_rng(0)
    for _ in range(3):
        perm = rng.permutation(len(mesh.vertices))
        inverse = np.argsort(perm)
        vertices = mesh.vertices[perm]
        vertices = vertices + rng.choice([-1, 0, 1], size=vertices.shape) * np.spacing(vertices)
        faces = inverse[mesh.faces][rng.permutation(len(mesh.faces))]
        other = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
        assert _obj_text(canonical_hull(other)) == reference
    hull = trimesh.load(trimesh.util.wrap_as_stream(reference), file_type="obj", process=False)
    assert hull.is_watertight and hull.is_convex
    assert hull.volume == pytest.approx(mesh.convex_hull.volume, rel=1e-6)


def test_written_numbers_hide_last_bit_and_sign_of_zero_residuals():
    assert _fmt(1e-17) == _fmt(-2e-17) == _fmt(0.0) == _fmt(-0.0) == "0"
    assert _fmt(1.0) == _fmt(np.nextafter(1.0, 0)) == "1"
    assert _fmt(0.1234567891) == "0.12345679"


@pytest.mark.blender
def test_kubric_asset_source_loads_every_shape_offline():
    import kubric as kb
    manifest = json.loads(DEFAULT_MANIFEST.read_text())
    with kb.AssetSource.from_manifest(str(DEFAULT_MANIFEST)) as source:
        for asset_id, entry in manifest["assets"].items():
            obj = source.create(asset_id=asset_id)
            assert obj.mass == pytest.approx(entry["kwargs"]["mass"])
            assert obj.metadata["category"] == asset_id
            lo, hi = obj.bounds
            assert (hi > lo).all()
            urdf = obj.simulation_filename
            assert urdf.endswith("object.urdf") and "collision_geometry.obj" in open(urdf).read()


def test_the_process_asset_source_unpacks_once_and_keeps_no_call_state(tmp_path):
    """``asset_source`` returns one source per manifest for the process: each asset is
    unpacked once (the same file for every scene), and one create()'s arguments do not
    become the next one's (Kubric's create updates the manifest entry in place); a new
    version of the manifest gets a new source."""
    import shutil

    from generation.render.asset_cache import asset_source

    shutil.copytree(DEFAULT_MANIFEST.parent, tmp_path / "shapes")
    manifest = tmp_path / "shapes" / "manifest.json"
    source = asset_source(manifest, tmp_path)
    asset_id = sorted(json.loads(manifest.read_text())["assets"])[0]
    named = source.create(asset_id=asset_id, name="scene_one_name", mass=123.0)
    again = source.create(asset_id=asset_id)
    assert asset_source(manifest, tmp_path) is source
    assert named.name == "scene_one_name" and again.name != "scene_one_name"
    assert named.mass == 123.0 and again.mass != 123.0
    assert again.render_filename == named.render_filename
    assert str(tmp_path) in again.render_filename
    data = json.loads(manifest.read_text())
    data["name"] = "edited"
    manifest.write_text(json.dumps(data))
    assert asset_source(manifest, tmp_path) is not source


BAD = [
    ({"generation": {"bogus": 1}}, "generation.bogus: unknown key"),
    ({"generation": {"scenes": -3}}, "generation.scenes"),
    ({"generation": {"scene": {"resolution": 0}}}, "generation.scene.resolution"),
    ({"generation": {"scene": {"assets": ["teapot"]}}}, "unknown asset(s) ['teapot']"),
    ({"generation": {"scene": {"min_objects": 5, "max_objects": 2}}}, "min_objects"),
    ({"generation": {"scene": {"recipe": "nope"}}}, "unknown recipe 'nope'"),
    ({"generation": {"device": "metal"}}, "generation.device"),
    ({"generation": {"workers_per_gpu": 0}}, "generation.workers_per_gpu"),
]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, data, message):
    out = tmp_path / "out"
    data["generation"].setdefault("out", str(out))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    result = pvit("generate", cfg)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--scenes", "-1"], "generation.scenes"),
    (["--resolution", "0"], "generation.scene.resolution"),
    (["--scenes-per-shard", "0"], "generation.scenes_per_shard"),
    (["--device", "gpu"], "generation.device"),
    (["--workers-per-gpu", "0"], "generation.workers_per_gpu"),
])
def test_bad_flags_exit_2(tmp_path, flags, message):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "out")
    result = pvit("generate", cfg, *flags)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_missing_config(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = write_config(tmp_path / "c.yaml", blocker / "out")
    result = pvit("generate", cfg)
    assert result.returncode == 2 and "generation.out" in result.stderr
    result = pvit("generate", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_device_is_not_part_of_the_spec():
    """A device change re-renders nothing (docs/generation.md, "Render devices")."""
    from generation.config import GenerationConfig
    from generation.dataset.plan import plan
    cpu = GenerationConfig(device="cpu", workers_per_gpu=2)
    auto = GenerationConfig()
    assert auto.device == "auto" and auto.workers_per_gpu == 1
    assert [j.spec_hash for j in plan(cpu)] == [j.spec_hash for j in plan(auto)]


def test_an_object_store_out_is_dumped_as_its_url():
    """Prefect's run parameters, the experiment YAML and the deployment form show
    ``s3://b/p``, not the ``s3:/b/p`` a Path makes of it, and it reads back the same."""
    from fastapi.encoders import jsonable_encoder  # what Prefect encodes parameters with

    from generation.config import GenerationConfig
    bucket = GenerationConfig(out="s3://b/p")
    assert bucket.model_dump(mode="json")["out"] == "s3://b/p"
    assert jsonable_encoder(bucket)["out"] == "s3://b/p"
    again = GenerationConfig.model_validate(bucket.model_dump(mode="json"))
    assert again.model_dump(mode="json") == bucket.model_dump(mode="json")
    assert GenerationConfig(out="data/x").model_dump(mode="json")["out"] == "data/x"
