"""``pvit actions``: the humanoid action set, rendered for real (one actor per clip, the
motion is the label), written as videos that fine-tuning and evaluation read in both
layouts; a rerun renders and writes nothing."""

from __future__ import annotations

import json

import pytest
import yaml
from pvit_cli import pvit

from training.video_data import decode_video, read_records

pytestmark = [pytest.mark.slow, pytest.mark.blender]

SECTION = {"actions": ["walk", "punch"], "train_per_class": 2, "validation_per_class": 1,
           "test_per_class": 1, "scenes_per_shard": 4,
           # the source domain renders in a fraction of heldout's time (its HDRI world);
           # heldout clips are tested in tests/generation/render/test_humanoid.py
           "scene": {"resolution": 32, "frames": 4, "spp": 1, "max_objects": 1,
                     "domain": "source"}}


@pytest.fixture(scope="module")
def action_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("actions")
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump({"humanoid_actions": {"out": str(root / "set"),
                                                           **SECTION}}))
    return {"root": root, "config": config, "first": pvit("actions", config)}


def test_the_set_holds_each_motion_in_fixed_splits_as_decodable_videos(action_set):
    first, out = action_set["first"], action_set["root"] / "set"
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 classes, 4 train, 2 validation, 2 test clips" in first.stdout + first.stderr
    for layout in ("list", "ssv2"):
        counts = {}
        for split in ("train", "validation", "test"):
            records, classes = read_records(layout, out / "set" / layout, split)
            assert classes == 2
            counts[split] = sorted(r.label for r in records)
            for record in records:
                frames = decode_video(record.path)
                assert frames.shape == (4, 32, 32, 3) and frames.std() > 1   # real pixels
        assert counts == {"train": [0, 0, 1, 1], "validation": [0, 1], "test": [0, 1]}
    labels = json.loads((out / "set" / "ssv2" / "labels" / "labels.json").read_text())
    assert labels == {"walk": "0", "punch": "1"}
    # each class is a dataset of its own, verifiable like any other
    for action in ("walk", "punch"):
        checked = pvit("verify", out / "render" / action, "--labels")
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_rerun_renders_and_writes_nothing(action_set):
    out = action_set["root"] / "set"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = pvit("actions", action_set["config"])
    assert again.returncode == 0, again.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p.name != ".stage.json"} == \
        {p: t for p, t in before.items() if p.name != ".stage.json"}


def test_bad_sections_are_refused_before_any_render(tmp_path):
    someone = tmp_path / "mine"
    someone.mkdir()
    (someone / "notes.txt").write_text("keep")
    cases = {
        "foreign": ({"out": str(someone), **SECTION}, "not a pvit stage output"),
        "motion": ({**SECTION, "actions": ["walk", "moonwalk"]}, "unknown ['moonwalk']"),
        "crowd": ({**SECTION, "scene": {"max_actors": 2}}, "one actor"),
    }
    for name, (section, message) in cases.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"humanoid_actions": section}))
        result = pvit("actions", config)
        assert result.returncode == 2, name
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, name
    assert (someone / "notes.txt").read_text() == "keep" and len(list(someone.iterdir())) == 1
