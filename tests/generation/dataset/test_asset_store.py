"""Asset sets by content: a spec names its set by the hash of its bytes, never by a path;
a render machine finds its own copy or the run's upload next to the dataset, or fails
with one line."""

from __future__ import annotations

import shutil

import pytest
import yaml
from pvit_cli import pvit

from generation.config import GenerationConfig, SceneConfig
from generation.dataset import asset_store
from generation.dataset.plan import plan
from generation.render.assets import DEFAULT_MANIFEST
from generation.render.supervisor import RenderError, with_local_assets

SHAPES = DEFAULT_MANIFEST.parent


def copy_set(where):
    shutil.copytree(SHAPES, where)
    return where / "manifest.json"


def test_the_name_is_the_sets_bytes_not_its_path(tmp_path):
    copy = copy_set(tmp_path / "elsewhere")
    here, there = SceneConfig(), SceneConfig(asset_manifest=copy)
    assert here.spec() == there.spec() and here.digest() == there.digest()
    assert here.spec()["asset_manifest"].startswith("sha256:")
    assert str(SHAPES) not in str(here.spec()) and str(tmp_path) not in str(there.spec())
    # an archive is part of the set: other bytes are another set
    archive = copy.parent / "cube.tar.gz"
    archive.write_bytes(archive.read_bytes() + b"\0")
    assert SceneConfig(asset_manifest=copy).spec() != here.spec()


def custom_set(where):
    """A user's own set: the shapes with another description (other bytes)."""
    manifest = copy_set(where)
    manifest.write_text(manifest.read_text().replace('"description": "',
                                                     '"description": "mine: '))
    return manifest


def test_a_render_machine_finds_the_hint_its_own_set_or_the_upload(tmp_path):
    # this checkout's built-in sets, whatever path the submitter had them at
    builtin = SceneConfig().spec()["asset_manifest"]
    assert asset_store.locate(builtin, hint="/opt/elsewhere/manifest.json",
                              known=[DEFAULT_MANIFEST]) == DEFAULT_MANIFEST

    mine = custom_set(tmp_path / "submitter")
    kept = custom_set(tmp_path / "backup")
    (job,) = plan(GenerationConfig(out=tmp_path / "ds", scenes=1,
                                   scene=SceneConfig(asset_manifest=mine)))
    name = job.scene["asset_manifest"]
    assert name != builtin and job.assets == str(mine.resolve())
    # the submitter's path, on the same machine or a shared filesystem
    assert asset_store.locate(name, hint=job.assets) == mine
    # gone, and no copy anywhere: one line naming where it looked, before any worker
    shutil.rmtree(mine.parent)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    with pytest.raises(RenderError) as info:
        with_local_assets(job, asset_store.Location(dataset))
    assert "is not on this machine" in str(info.value) and "\n" not in str(info.value)
    assert "(missing)" in str(info.value) and "(not uploaded)" in str(info.value)
    # the run's upload next to the dataset (once; a second publish writes nothing)
    assert asset_store.publish(dataset, kept) == name
    uploaded = dataset / ".assets" / name.removeprefix("sha256:")
    stamp = (uploaded / "manifest.json").stat().st_mtime_ns
    asset_store.publish(dataset, kept)
    assert (uploaded / "manifest.json").stat().st_mtime_ns == stamp
    local = with_local_assets(job, asset_store.Location(dataset))
    assert local.scene["asset_manifest"] == str(uploaded / "manifest.json")
    # a copy with other bytes under the right name is never used
    archive = uploaded / "cube.tar.gz"
    archive.write_bytes(b"not the cube")
    with pytest.raises(asset_store.AssetSetMissing, match="other bytes"):
        asset_store.locate(name, dataset=dataset)


@pytest.mark.blender
def test_a_rerun_from_another_copy_of_the_same_assets_keeps_every_shard(tmp_path):
    first, second = copy_set(tmp_path / "a"), copy_set(tmp_path / "b")
    config = tmp_path / "exp.yaml"
    out = tmp_path / "ds"

    def generate(assets):
        config.write_text(yaml.safe_dump({"generation": {
            "out": str(out), "scenes": 1, "scenes_per_shard": 1, "retries": 0,
            "scene": {"resolution": 32, "frames": 2, "spp": 1, "min_objects": 1,
                      "max_objects": 1, "asset_manifest": str(assets)}}}))
        return pvit("generate", config)

    made = generate(first)
    assert made.returncode == 0, made.stderr[-2000:]
    shard = (out / "shard-000000.tar").stat().st_mtime_ns
    shutil.rmtree(first.parent)              # the first checkout is gone
    again = generate(second)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 kept" in again.stdout + again.stderr
    assert (out / "shard-000000.tar").stat().st_mtime_ns == shard
