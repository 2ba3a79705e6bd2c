"""The dataset manifest is training's contract (generation/dataset/index.py): training
reads what ``manifest.json`` lists, sizes the segmentation head from its ``classes``,
refuses a dataset without a manifest or with a listed shard missing, ignores unlisted
shards with a warning, and stops on a shard that does not decode with one line naming
the shard and the member, or (``bad_shards: skip``) skips it, warns and counts it.
Through the real ``pvit pretrain`` (a subprocess)."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from generation.dataset.index import DatasetError, open_dataset, write_index
from generation.dataset.shard_format import CLASSES, write_shard
from training.drawn_clips import make_clip, write_shards

PVIT = shutil.which("pvit", path=str(Path(sys.executable).parent)) or "pvit"
REPO = Path(__file__).resolve().parents[2]
TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, batch_size=2, epochs=1)


def pretrain(tmp_path: Path, shards: Path, *flags: str, **overrides
             ) -> subprocess.CompletedProcess:
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"pretrain": dict(TINY, out=str(tmp_path / "run"),
                                                    synthetic=str(shards), **overrides)}))
    return subprocess.run([PVIT, "pretrain", str(exp), *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_shards(tmp_path / "shards", shards=2, clips_per_shard=2, frames=4, size=32)


def test_the_index_is_what_the_manifest_lists(shards):
    index = open_dataset(shards)
    assert [Path(u).name for u in index.urls] == ["shard-00000.tar", "shard-00001.tar"]
    assert all(u.startswith("file:///") for u in index.urls)
    assert index.clips == 4 and index.classes == CLASSES
    assert {"rgb", "depth", "semantic_seg", "instances"} <= set(index.fields)


def test_a_dataset_without_a_manifest_is_refused(tmp_path, shards):
    (shards / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="has no manifest.json"):
        open_dataset(shards)
    result = pretrain(tmp_path, shards)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and f"{shards} has no manifest.json" in lines[0], result.stderr
    assert lines[0].startswith("error: pretrain.synthetic: ")


def test_a_listed_shard_that_is_missing_is_refused_naming_it(tmp_path, shards):
    (shards / "shard-00001.tar").unlink()
    result = pretrain(tmp_path, shards)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "shard-00001.tar is listed in the manifest but missing" \
        in lines[0], result.stderr


def test_a_truncated_shard_is_refused_before_training_from_its_size(tmp_path, shards):
    path = shards / "shard-00000.tar"
    path.write_bytes(path.read_bytes()[:4096])
    result = pretrain(tmp_path, shards)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "shard-00000.tar has 4096 bytes" in lines[0], result.stderr


def test_unlisted_shards_are_ignored_with_a_warning(tmp_path, shards):
    # a copy under another name, and a shard of clips that no manifest lists
    shutil.copy(shards / "shard-00000.tar", shards / "other.tar")
    write_shard(shards / "shard-00009.tar", [make_clip("stray0000", seed=9, frames=4, size=32)])
    warnings = []
    index = open_dataset(shards, warn=warnings.append)
    assert [Path(u).name for u in index.urls] == ["shard-00000.tar", "shard-00001.tar"]
    assert len(warnings) == 1 and "ignoring 2 shard file(s)" in warnings[0]
    assert "other.tar" in warnings[0] and "shard-00009.tar" in warnings[0]
    result = pretrain(tmp_path, shards)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "other.tar" in result.stderr and "ignoring" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2            # 4 listed clips / batch 2: the copies unseen


def _flip_member_byte(path: Path, field: str) -> str:
    """Damage the member of ``field`` of the first sample in place (same size, so only
    decoding can tell); returns the member's name."""
    with tarfile.open(path) as tar:
        info = next(i for i in tar if i.name.split(".", 1)[1].startswith(f"{field}."))
    data = bytearray(path.read_bytes())
    data[info.offset_data] ^= 0xFF          # the .npy / zstd magic
    path.write_bytes(bytes(data))
    return info.name


def test_a_shard_that_does_not_decode_stops_training_naming_shard_and_member(tmp_path, shards):
    member = _flip_member_byte(shards / "shard-00001.tar", "depth")
    result = pretrain(tmp_path, shards)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    key, suffix = member.split(".", 1)      # clip01000, depth.npy(.zst)
    assert "shard-00001.tar" in lines[0] and key in lines[0] and suffix in lines[0], lines[0]


def test_a_shard_that_is_not_a_tar_stops_training_naming_it(tmp_path, shards):
    path = shards / "shard-00000.tar"
    data = bytearray(path.read_bytes())
    data[100:200] = bytes(100)              # the first header's checksum no longer matches
    path.write_bytes(bytes(data))
    result = pretrain(tmp_path, shards)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and "shard file://" in lines[0] and "shard-00000.tar" in lines[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_shards_skip_trains_on_the_other_shards_and_counts_the_bad_one(
        tmp_path, shards, num_workers):
    # with 2 workers the bad shard is the only one of its worker: the count must reach
    # the training process from a worker that then ends
    _flip_member_byte(shards / "shard-00001.tar", "depth")
    result = pretrain(tmp_path, shards, "--set", "pretrain.bad_shards=skip",
                      num_workers=num_workers)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "skipping that shard" in line]
    assert len(warnings) == 1 and "shard-00001.tar" in warnings[0], result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["skipped_shards"] == 1 and summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [Path(p).name for p in saved["skipped_shard_paths"]] == ["shard-00001.tar"]


def test_bad_shards_skip_still_stops_when_no_shard_decodes(tmp_path, shards):
    for name in ("shard-00000.tar", "shard-00001.tar"):
        _flip_member_byte(shards / name, "rgb")
    result = pretrain(tmp_path, shards, bad_shards="skip")
    assert result.returncode == 1, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and "no shard left that decodes" in lines[0], result.stderr[-3000:]
    assert "2 skipped" in lines[0] and "shard-0000" in lines[0]


def test_bad_shards_is_checked_like_any_key(tmp_path, shards):
    result = pretrain(tmp_path, shards, "--set", "pretrain.bad_shards=sometimes")
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "pretrain.bad_shards" in lines[0], result.stderr


def test_a_run_that_skips_a_shard_resumes_on_the_same_batches(tmp_path):
    """Killed mid-epoch 2 and resumed, a skip-mode run ends with the weights of an
    uninterrupted one: the bad shard fails at the same point of every replay."""
    import torch

    from training.checkpoint import load_checkpoint
    from training.config import PretrainConfig
    from training.train import run_pretrain

    data = write_shards(tmp_path / "three", shards=3, clips_per_shard=2, frames=4, size=32)
    _flip_member_byte(data / "shard-00001.tar", "normal")

    def cfg(name):
        return PretrainConfig(**dict(TINY, out=str(tmp_path / name), synthetic=str(data),
                                     epochs=2, checkpoint_every=1, bad_shards="skip",
                                     log_every=1))
    full = run_pretrain(cfg("full"))
    run_pretrain(cfg("killed"), stop_after=4)       # 3 steps an epoch: mid-epoch 2
    resumed = run_pretrain(cfg("killed"))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert resumed["losses"] == full["losses"]
    assert full["skipped_shards"] == resumed["skipped_shards"] == 1
    assert resumed["skipped_shard_paths"] == full["skipped_shard_paths"]


def _extra_category_shards(directory: Path) -> Path:
    """Drawn clips whose objects are of an 11th class, 'gizmo', as a user's asset
    manifest with a new category gives (render_scene.class_list appends it)."""
    classes = [*CLASSES, "gizmo"]
    directory.mkdir(parents=True)
    for s in range(2):
        clips = []
        for i in range(2):
            clip = make_clip(f"gizmo{s}{i:03d}", seed=10 * s + i, frames=4, size=32)
            objects = clip["semantic_seg"] > 1
            clip["semantic_seg"][objects] = len(CLASSES)
            clip["instances"]["category"][1:] = len(CLASSES)
            clip["meta"]["classes"] = classes
            clips.append(clip)
        write_shard(directory / f"shard-{s:06d}.tar", clips)
    write_index(directory, [f"shard-{s:06d}.tar" for s in range(2)], classes)
    return directory


def test_an_extra_category_sizes_the_segmentation_head(tmp_path):
    shards = _extra_category_shards(tmp_path / "gizmos")
    assert open_dataset(shards).classes[-1] == "gizmo"
    result = pretrain(tmp_path, shards)
    assert result.returncode == 0, result.stderr[-3000:]
    import torch
    state = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True,
                       map_location="cpu")
    shapes = [tuple(v.shape) for k, v in state["model"].items()
              if "seg" in k and k.endswith("weight")]
    assert shapes and shapes[-1][0] == len(CLASSES) + 1, shapes


def test_finetuning_without_synthetic_clips_loads_a_checkpoint_of_more_categories(tmp_path,
                                                                                 toy_set):
    """No shards to size the segmentation head from (``synthetic_ratio: 0``): it takes the
    pretrained checkpoint's size, so that checkpoint loads (the built-in 10 classes made
    ``init`` refuse a checkpoint pretrained on 11)."""
    import torch

    from training.config import FinetuneConfig, PretrainConfig
    from training.train import run_finetune, run_pretrain
    shards = _extra_category_shards(tmp_path / "gizmos")
    pre = run_pretrain(PretrainConfig(**TINY, out=str(tmp_path / "pre"), synthetic=str(shards)))
    summary = run_finetune(FinetuneConfig(**TINY, out=str(tmp_path / "fine"),
                                          init=pre["checkpoint"], synthetic=None,
                                          synthetic_ratio=0.0, data_root=toy_set["list_root"],
                                          frame_stride=3, val_split=""))
    assert set(summary["losses"]) == {"total", "action"}
    state = torch.load(tmp_path / "fine" / "checkpoints" / "final.pt", weights_only=True,
                       map_location="cpu")
    assert state["model_kwargs"]["num_seg_classes"] == len(CLASSES) + 1


@pytest.mark.slow
@pytest.mark.blender
def test_a_rendered_dataset_with_a_user_category_trains(tmp_path):
    """A user asset manifest that files the cube under a new category: the rendered
    dataset's manifest lists 11 classes, the clips use class 10, and pretraining on it
    runs (with the built-in 10-class head the targets would be out of range)."""
    assets = tmp_path / "assets"
    assets.mkdir()
    builtin = json.loads((REPO / "assets/shapes/manifest.json").read_text())
    cube = builtin["assets"]["cube"]
    cube["metadata"]["category"] = "gizmo"
    (assets / "manifest.json").write_text(json.dumps({**builtin, "assets": {"cube": cube}}))
    shutil.copy(REPO / "assets/shapes/cube.tar.gz", assets / "cube.tar.gz")
    out = tmp_path / "ds"
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({
        "generation": {"out": str(out), "scenes": 2, "scenes_per_shard": 1, "workers": 2,
                       "retries": 0,
                       "scene": {"resolution": 32, "frames": 2, "spp": 1, "min_objects": 2,
                                 "max_objects": 3,
                                 "asset_manifest": str(assets / "manifest.json")}},
        "pretrain": dict(TINY, out=str(tmp_path / "run"), synthetic=str(out))}))
    gen = subprocess.run([PVIT, "generate", str(exp)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert gen.returncode == 0, gen.stderr[-3000:]
    index = open_dataset(out)
    assert index.classes == (*CLASSES, "gizmo")
    from generation.dataset.shard_format import read_shard
    seen = set()
    for url in index.urls:
        for clip in read_shard(url):
            seen |= set(np.unique(clip["semantic_seg"]).tolist())
    assert len(CLASSES) in seen                     # the new class is in the labels
    result = subprocess.run([PVIT, "pretrain", str(exp)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
