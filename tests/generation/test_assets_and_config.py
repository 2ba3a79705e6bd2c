import json

import pytest
import yaml
from conftest import pvit, write_config

from generation.assets import DEFAULT_MANIFEST, build_asset_set


def test_committed_asset_set_is_what_the_builder_writes(tmp_path):
    build_asset_set(tmp_path)
    committed = DEFAULT_MANIFEST.parent
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


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


BAD = [
    ({"generation": {"bogus": 1}}, "generation.bogus: unknown key"),
    ({"generation": {"scenes": -3}}, "generation.scenes"),
    ({"generation": {"scene": {"resolution": 0}}}, "generation.scene.resolution"),
    ({"generation": {"scene": {"assets": ["teapot"]}}}, "unknown asset(s) ['teapot']"),
    ({"generation": {"scene": {"min_objects": 5, "max_objects": 2}}}, "min_objects"),
    ({"generation": {"scene": {"recipe": "nope"}}}, "unknown recipe 'nope'"),
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
