import io
import json
import tarfile

import numpy as np
import pytest

from generation import shard_format as sf


def make_clip(key="scene0000001", t=2, h=6, w=5, n=3, seed=0):
    rng = np.random.default_rng(seed)
    normal = rng.normal(size=(t, h, w, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    depth = rng.uniform(1, 10, size=(t, h, w)).astype(np.float32)
    depth[0, 0, 0] = np.inf  # sky
    inst = rng.integers(0, n + 1, size=(t, h, w)).astype(np.uint16)
    inst[0, 0, 1] = 300  # ids over 255 must survive (Kubric's PNGs wrapped them)
    return {
        "key": key,
        "rgb": rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8),
        "depth": depth, "instance_seg": inst,
        "semantic_seg": rng.integers(0, 10, size=(t, h, w)).astype(np.uint8),
        "normal": normal, "K": np.array([[50, 0, 2.5], [0, 50, 3], [0, 0, 1]], np.float32),
        "world_to_camera": np.tile(np.eye(4, dtype=np.float32), (t, 1, 1)),
        "instances": {
            "id": np.arange(1, n + 1, dtype=np.uint16),
            "category": np.arange(n, dtype=np.int32),
            "position": rng.normal(size=(n, t, 3)).astype(np.float32),
            "quaternion": np.tile(np.array([1, 0, 0, 0], np.float32), (n, t, 1)),
            "bbox_3d": rng.normal(size=(n, t, 8, 3)).astype(np.float32),
            "visibility": rng.uniform(size=(n, t)).astype(np.float32),
        },
        "meta": {"seed": seed, "classes": list(sf.CLASSES)},
    }


def assert_clips_equal(a, b):
    assert a["key"] == b["key"]
    for name in ("rgb", "depth", "instance_seg", "semantic_seg", "normal", "K", "world_to_camera"):
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name])
    for name in a["instances"]:
        np.testing.assert_array_equal(a["instances"][name], b["instances"][name])
    assert a["meta"] == b["meta"]


def test_round_trip_is_lossless(tmp_path):
    clips = [make_clip(f"scene{i:07d}", seed=i) for i in range(3)]
    assert sf.write_shard(tmp_path / "s.tar", clips) == 3
    back = list(sf.read_shard(tmp_path / "s.tar"))
    assert len(back) == 3
    for a, b in zip(clips, back, strict=True):
        assert_clips_equal(a, b)
    assert back[0]["instance_seg"][0, 0, 1] == 300
    assert np.isinf(back[0]["depth"][0, 0, 0])


def test_plain_tarfile_and_numpy_read_the_same_arrays(tmp_path):
    """What docs/dataset-format.md promises: no webdataset needed to read a shard."""
    clip = make_clip()
    sf.write_shard(tmp_path / "s.tar", [clip])
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
        assert all(n.startswith("scene0000001.") for n in names)
        depth = np.load(io.BytesIO(tar.extractfile("scene0000001.depth.npy").read()),
                        allow_pickle=False)
        ids = np.load(io.BytesIO(tar.extractfile("scene0000001.inst_id.npy").read()),
                      allow_pickle=False)
        meta = json.loads(tar.extractfile("scene0000001.meta.json").read())
    np.testing.assert_array_equal(depth, clip["depth"])
    np.testing.assert_array_equal(ids, clip["instances"]["id"])
    assert meta == clip["meta"]


def test_webdataset_pipeline_yields_clips(tmp_path):
    clips = [make_clip(f"scene{i:07d}", seed=i) for i in range(4)]
    sf.write_shard(tmp_path / "a.tar", clips[:2])
    sf.write_shard(tmp_path / "b.tar", clips[2:])
    got = list(sf.webdataset_pipeline([tmp_path / "a.tar", tmp_path / "b.tar"]))
    assert [c["key"] for c in got] == [c["key"] for c in clips]
    for a, b in zip(clips, got, strict=True):
        assert_clips_equal(a, b)


def test_same_clips_give_the_same_bytes(tmp_path):
    clips = [make_clip(seed=3)]
    sf.write_shard(tmp_path / "a.tar", clips)
    sf.write_shard(tmp_path / "b.tar", clips)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_bad_clips_are_rejected(tmp_path):
    with pytest.raises(sf.FormatError, match="key"):
        sf.encode_clip(make_clip(key="scene.1"))
    clip = make_clip()
    clip["instance_seg"] = clip["instance_seg"].astype(np.uint8)  # the lossy cast
    with pytest.raises(sf.FormatError, match="instance_seg"):
        sf.encode_clip(clip)


def test_corrupt_member_is_a_format_error():
    sample = sf.encode_clip(make_clip())
    sample["depth.npy"] = b"not an npy"
    with pytest.raises(sf.FormatError, match="depth"):
        sf.decode_sample(sample)
    del sample["depth.npy"]
    with pytest.raises(sf.FormatError, match="missing member depth.npy"):
        sf.decode_sample(sample)


def test_pickled_npy_is_refused():
    sample = sf.encode_clip(make_clip())
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    sample["K.npy"] = buf.getvalue()
    with pytest.raises(sf.FormatError, match="K"):
        sf.decode_sample(sample)
