import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.toy_actions import draw_clip, write_toy_actions
from training.video_data import (
    Skipped,
    VideoClips,
    collate_videos,
    decode_video,
    epoch_batches,
    read_list,
    read_records,
    read_ssv2,
    sample_indices,
    ssv2_label,
)


def test_ssv2_label_is_the_template_without_brackets():
    assert ssv2_label("Putting [something] onto [something]") == "Putting something onto something"


def test_both_layouts_read_the_same_clips_and_labels(toy_set):
    ssv2, classes = read_ssv2(toy_set["ssv2_root"], "train")
    lst, num_classes = read_records("list", toy_set["list_root"], "train")
    assert len(classes) == num_classes == 6
    assert [Path(r.path).stem for r in ssv2] == [Path(r.path).stem for r in lst]
    assert [r.label for r in ssv2] == [r.label for r in lst]
    assert ssv2[0].path.endswith(".webm") and lst[0].path.endswith(".mp4")


@pytest.mark.parametrize("fmt", ["ssv2", "list"])
def test_real_videos_decode_into_model_clips(toy_set, fmt):
    root = toy_set[f"{fmt}_root"]
    records, _ = read_records(fmt, root, "validation")
    assert decode_video(records[0].path).shape == (16, 48, 48, 3)
    train = VideoClips(records, num_frames=4, img_size=32, stride=2, train=True)
    assert train[0]["video"].shape == (3, 4, 32, 32)
    views = VideoClips(records, num_frames=4, img_size=32, stride=2, sampling="segments",
                       train=False, temporal_clips=2, spatial_crops=3)
    assert views[0]["video"].shape == (6, 3, 4, 32, 32)


def test_undecodable_videos_are_skipped_and_named(toy_set, tmp_path):
    records, _ = read_records("list", toy_set["list_root"], "train")
    (tmp_path / "broken.webm").write_bytes(b"not a video at all")
    lst = tmp_path / "mixed.txt"
    lst.write_text(f"{records[0].path} 0\n{tmp_path / 'broken.webm'} 1\n"
                   f"{tmp_path / 'gone.mp4'} 2\n")
    mixed, _ = read_records("list", tmp_path, str(lst))
    dataset = VideoClips(mixed, num_frames=4, img_size=32, stride=2)
    assert isinstance(dataset[1], Skipped) and isinstance(dataset[2], Skipped)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_videos)))
    assert batch["video"].shape[0] == 1 and batch["label"].tolist() == [0]
    assert sorted(Path(p).name for p in batch["skipped"]) == ["broken.webm", "gone.mp4"]


def test_missing_split_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.json"):
        read_ssv2(tmp_path, "train")


@pytest.mark.parametrize("labels, split, message", [
    ('["a", "b"]', '[]', "must map each template"),
    ('{"a": "0"}', '{"id": 1}', "must be a list of videos"),
    ('{"a": "0"}', '[{"id": 1}]', "entry 0 is not an object with an 'id' and a 'template'"),
    ('{"a": "0"}', '["x"]', "entry 0 is not an object"),
    ('{"a": "0"}', '[{"id": "../../etc/passwd", "template": "a"}]', "not a file name"),
    ('{"a": "0"}', '[{"id": "..", "template": "a"}]', "not a file name"),
    ('{"a": 0,\n "b" 1}', '[]', "labels.json:2: not valid JSON"),
    (b'{"\xff": 0}', '[]', "is not UTF-8 text"),
])
def test_a_malformed_ssv2_layout_is_one_line_naming_the_file(tmp_path, labels, split, message):
    # issue 24: a list labels.json, entries without a template, or bad bytes were
    # tracebacks (KeyError, AttributeError, UnicodeDecodeError)
    (tmp_path / "labels").mkdir()
    write = lambda path, data: (path.write_bytes(data) if isinstance(data, bytes)  # noqa: E731
                                else path.write_text(data))
    write(tmp_path / "labels" / "labels.json", labels)
    write(tmp_path / "labels" / "train.json", split)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_ssv2(tmp_path, "train")


def test_a_list_file_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"a.mp4 0\n\xff\xfe 1\n")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_list(tmp_path, "train")


def test_stride_and_segment_sampling():
    idx = sample_indices(100, 16, stride=4, sampling="stride", rng=None)
    assert np.all(np.diff(idx) == 4) and idx[0] == (100 - 61) // 2
    first, last = (sample_indices(100, 16, stride=4, sampling="stride", rng=None, clip_index=i,
                                  num_clips=2) for i in (0, 1))
    assert first[0] == 0 and last[-1] == 99
    seg = sample_indices(32, 8, stride=4, sampling="segments", rng=None)
    assert seg.tolist() == [2, 6, 10, 14, 18, 22, 26, 30]  # segment middles
    short = sample_indices(10, 16, stride=4, sampling="stride", rng=np.random.default_rng(0))
    assert short.max() == 9  # a short video repeats its last frame
    rand = sample_indices(32, 8, stride=4, sampling="segments", rng=np.random.default_rng(0))
    assert np.all((rand // 4) == np.arange(8))  # one frame inside each segment


def test_epoch_batches_keep_ranks_in_lockstep():
    ranks = [epoch_batches(10, 2, epoch=0, seed=0, shuffle=True, rank=r, world_size=3)
             for r in range(3)]
    assert len({len(b) for b in ranks}) == 1
    covered = {i for b in ranks for batch in b for i in batch}
    assert covered == set(range(10))
    assert epoch_batches(10, 4, epoch=1, seed=0, shuffle=True) != \
        epoch_batches(10, 4, epoch=2, seed=0, shuffle=True)


def test_toy_actions_are_deterministic_and_classes_differ(tmp_path):
    a = draw_clip(0, np.random.default_rng(5))
    b = draw_clip(0, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    summary = write_toy_actions(tmp_path / "toy", clips_per_class=2, val_per_class=1, size=32,
                                frames=8)
    labels = json.loads((Path(summary["ssv2_root"]) / "labels" / "labels.json").read_text())
    assert sorted(labels.values(), key=int) == [str(i) for i in range(6)]
    assert summary["train_clips"] == summary["validation_clips"] == 6
    assert not (tmp_path / "toy.tmp").exists()


def _write_mjpeg(path, frames, size):
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for t in range(frames):
        frame = np.stack([np.add.outer(ramp, ramp * 0) / 2 + t * 3,
                          np.add.outer(ramp * 0, ramp) / 2, np.full((size, size), 60.0)],
                         axis=-1)
        writer.write(frame.clip(0, 255).astype(np.uint8))
    writer.release()
    return path


@pytest.mark.parametrize("train", [True, False])
def test_a_video_too_large_to_hold_gives_the_same_clips(tmp_path, monkeypatch, train):
    from training import video_data
    from training.video_data import VideoClips, VideoRecord
    path = _write_mjpeg(tmp_path / "v.avi", frames=12, size=96)
    clips = VideoClips([VideoRecord(str(path), 0)], num_frames=4, img_size=32, stride=2,
                       train=train, flip=True, temporal_clips=2, spatial_crops=3)
    held = clips[0]["video"]
    monkeypatch.setattr(video_data, "MAX_DECODED_BYTES", 0)   # decoded twice, none held
    assert video_data.open_video(str(path)).frames is None
    assert torch.equal(clips[0]["video"], held)


@pytest.mark.slow
def test_decoding_a_huge_video_holds_only_the_sampled_frames(tmp_path):
    # issue 24: a 4 MB MJPEG of 40 frames at 4096^2 made finetune use 4.75 GB
    import subprocess
    import sys
    script = ("import resource, sys; from training.video_data import VideoClips, VideoRecord; "
              "clips = VideoClips([VideoRecord(sys.argv[1], 0)], num_frames=4, img_size=32, "
              "train=False); assert clips[0]['video'].shape[0] == 1; "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")

    def peak_kb(path):
        return int(subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                                   capture_output=True, text=True).stdout.split()[-1])

    small = peak_kb(_write_mjpeg(tmp_path / "small.avi", frames=40, size=64))
    from training.video_data import MAX_DECODED_BYTES
    big = _write_mjpeg(tmp_path / "big.avi", frames=80, size=2048)   # 1 GB decoded
    assert big.stat().st_size < 16 << 20
    # what decoding may hold at once (MAX_DECODED_BYTES), and a little more; decoding it
    # whole held 2 GB (the frames, then their stacked copy)
    bound_kb = (MAX_DECODED_BYTES + (128 << 20)) >> 10
    assert peak_kb(big) - small < bound_kb, "more than the decode budget over a tiny video"
