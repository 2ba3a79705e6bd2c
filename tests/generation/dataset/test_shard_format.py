import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from generation.dataset import manifest
from generation.dataset import shard_format as sf
from generation.dataset.storage import shard_url

DOCS = Path(__file__).resolve().parents[3] / "docs" / "dataset-format.md"
ARRAYS = ("rgb", "depth", "instance_seg", "semantic_seg", "normal", "K", "world_to_camera")
OPTIONAL = ("forward_flow", "backward_flow", "object_coordinates")


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


def assert_same_bits(a: np.ndarray, b: np.ndarray, name: str) -> None:
    """Equal dtype, shape and bytes: stricter than array_equal (-0.0, NaN payloads)."""
    assert (a.dtype, a.shape) == (b.dtype, b.shape), name
    assert a.tobytes() == b.tobytes(), f"{name} differs"


def assert_clips_equal(a, b):
    assert a["key"] == b["key"]
    # (wds.map re-attaches "__key__" to what decode_sample returns)
    assert set(a) == {k for k in b if not k.startswith("__")}
    for name in (*ARRAYS, *OPTIONAL):
        if name in a:
            assert_same_bits(np.asarray(a[name]), b[name], name)
    assert set(a["instances"]) == set(b["instances"])
    for name in a["instances"]:
        assert_same_bits(np.asarray(a["instances"][name]), b["instances"][name], name)
    assert a["meta"] == b["meta"]


def pipeline_clips(paths, bad=None):
    """The clips of ``paths`` through training's webdataset pipeline (the project's one:
    ``training.synthetic_data.synthetic_dataset``, no transform), as training opens
    them (file: URLs), sorted by key (the pipeline shuffles shards and samples)."""
    from training.synthetic_data import synthetic_dataset

    clips = synthetic_dataset([shard_url(p) for p in paths], None, seed=0, shuffle_buffer=4,
                              split_by_node=False, bad=bad)
    return sorted(clips, key=lambda clip: clip.get("key", ""))


def write_format1_shard(path, clips):
    """A format 1 shard as the old writer made it, built with tarfile + np.save only."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for clip in clips:
            members = {f"{n}.npy": clip[n] for n in ARRAYS + OPTIONAL if n in clip}
            members.update({f"inst_{n}.npy": v for n, v in clip["instances"].items()})
            for name in sorted(members):
                buf = io.BytesIO()
                np.save(buf, members[name], allow_pickle=False)
                add_member(tar, f"{clip['key']}.{name}", buf.getvalue())
            add_member(tar, f"{clip['key']}.meta.json", json.dumps(clip["meta"]).encode())


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def docs_reader():
    """The reading example of docs/dataset-format.md, as a function of the shard path."""
    text = DOCS.read_text()
    section = text[text.index("## Reading a shard without this project"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"DIR/shard-000000.tar"' in code and len(code.splitlines()) <= 20

    def read(path):
        scope = {}
        # the example ends by picking scene0000000's depth; the shard may not hold it
        exec(code.replace('"DIR/shard-000000.tar"', repr(str(path)))
             .split("depth = clips")[0], scope)
        return scope["clips"]
    return read


def assert_docs_read_the_clip(members: dict, clip: dict):
    for name in (*ARRAYS, *OPTIONAL):
        if name in clip:
            assert_same_bits(clip[name], members[name], name)
    for name, value in clip["instances"].items():
        assert_same_bits(value, members[f"inst_{name}"], name)
    assert members["meta"] == clip["meta"]


def test_round_trip_is_lossless(tmp_path):
    clips = [make_clip(f"scene{i:07d}", seed=i) for i in range(3)]
    assert sf.write_shard(tmp_path / "s.tar", clips) == 3
    back = list(sf.read_shard(tmp_path / "s.tar"))
    assert len(back) == 3
    for a, b in zip(clips, back, strict=True):
        assert_clips_equal(a, b)
    assert back[0]["instance_seg"][0, 0, 1] == 300
    assert np.isinf(back[0]["depth"][0, 0, 0])


def test_the_training_pipeline_yields_the_clips(tmp_path):
    clips = [make_clip(f"scene{i:07d}", seed=i) for i in range(4)]
    sf.write_shard(tmp_path / "a.tar", clips[:2])
    sf.write_shard(tmp_path / "b.tar", clips[2:])
    got = pipeline_clips([tmp_path / "a.tar", tmp_path / "b.tar"])
    assert [c["key"] for c in got] == [c["key"] for c in clips]
    for a, b in zip(clips, got, strict=True):
        assert_clips_equal(a, b)
    # the raw samples keep the member names as written (K.npy.zst, not k.npy.zst)
    raw = next(sf.iter_raw_samples(tmp_path / "a.tar"))
    assert raw["__key__"] == "scene0000000" and "K.npy.zst" in raw
    assert raw["__url__"] == str(tmp_path / "a.tar")


def test_same_clips_give_the_same_bytes(tmp_path):
    clips = [make_clip(seed=3)]
    sf.write_shard(tmp_path / "a.tar", clips)
    sf.write_shard(tmp_path / "b.tar", clips)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_members_are_named_by_their_codec(tmp_path):
    sf.write_shard(tmp_path / "s.tar", [make_clip()])
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = sorted(tar.getnames())
    expected = sorted(f"scene0000001.{f.name}" for f in sf.FIELDS if not f.optional)
    assert names == expected
    assert "scene0000001.depth.npy.zst" in names and "scene0000001.meta.json" in names
    assert manifest.FORMAT_VERSION == sf.FORMAT_VERSION == 2


def test_the_documented_reader_reads_every_field(tmp_path):
    """docs/dataset-format.md's example (tarfile + numpy + zstandard) gives every array
    exactly, for format 2 and format 1 shards."""
    read = docs_reader()
    clip = make_clip()
    clip["forward_flow"] = np.random.default_rng(1).normal(size=(2, 6, 5, 2)).astype(np.float32)
    sf.write_shard(tmp_path / "v2.tar", [clip])
    write_format1_shard(tmp_path / "v1.tar", [clip])
    for name in ("v2.tar", "v1.tar"):
        members = read(tmp_path / name)
        assert list(members) == ["scene0000001"]
        assert_docs_read_the_clip(members["scene0000001"], clip)


def test_the_zstd_tool_unpacks_a_member_to_its_npy(tmp_path):
    """Members are plain zstd frames: the command line tool gives back the .npy file."""
    clip = make_clip()
    data = sf.encode_clip(clip)["depth.npy.zst"]
    (tmp_path / "depth.npy.zst").write_bytes(data)
    subprocess.run(["zstd", "-q", "-d", str(tmp_path / "depth.npy.zst")], check=True)
    assert_same_bits(np.load(tmp_path / "depth.npy", allow_pickle=False), clip["depth"], "d")


def test_format1_shards_are_still_read(tmp_path):
    clips = [make_clip(f"scene{i:07d}", seed=i) for i in range(2)]
    write_format1_shard(tmp_path / "old.tar", clips)
    for a, b in zip(clips, sf.read_shard(tmp_path / "old.tar"), strict=True):
        assert_clips_equal(a, b)
    for a, b in zip(clips, pipeline_clips([tmp_path / "old.tar"]), strict=True):
        assert_clips_equal(a, b)


def test_compression_is_pinned():
    """Level, threads, checksum and content size are fixed in the frame header, so no
    machine default (cores, zstd's own defaults) can change the bytes."""
    data = sf.encode_clip(make_clip())["rgb.npy.zst"]
    params = zstandard.get_frame_parameters(data)
    assert params.has_checksum and params.dict_id == 0
    assert params.content_size == len(sf._npy_bytes(make_clip()["rgb"]))
    assert sf.ZSTD_LEVEL == 9


def test_bad_clips_are_rejected(tmp_path):
    with pytest.raises(sf.FormatError, match="key"):
        sf.encode_clip(make_clip(key="scene.1"))
    clip = make_clip()
    clip["instance_seg"] = clip["instance_seg"].astype(np.uint8)  # the lossy cast
    with pytest.raises(sf.FormatError, match="instance_seg"):
        sf.encode_clip(clip)
    clip = make_clip()
    del clip["normal"]
    with pytest.raises(sf.FormatError, match="no normal"):
        sf.encode_clip(clip)


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "garbage"])
def test_corrupt_compressed_member_is_one_line_naming_it(damage):
    sample = sf.encode_clip(make_clip())
    data = bytearray(sample["normal.npy.zst"])
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) // 2:]
    elif damage == "append":
        data += b"\0\0\0\0"
    else:
        data = bytearray(b"not zstd at all")
    sample["normal.npy.zst"] = bytes(data)
    with pytest.raises(sf.FormatError) as err:
        sf.decode_sample(sample)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("sample 'scene0000001': normal.npy.zst: not valid zstd data")


def test_corrupt_npy_inside_a_good_frame_is_a_format_error():
    sample = sf.encode_clip(make_clip())
    sample["depth.npy.zst"] = zstandard.ZstdCompressor().compress(b"not an npy")
    with pytest.raises(sf.FormatError, match="depth.npy.zst: not a readable .npy"):
        sf.decode_sample(sample)
    del sample["depth.npy.zst"]
    with pytest.raises(sf.FormatError, match="missing member depth.npy.zst"):
        sf.decode_sample(sample)


def test_a_field_stored_twice_is_refused():
    sample = sf.encode_clip(make_clip())
    sample["depth.npy"] = sf._npy_bytes(make_clip()["depth"])
    with pytest.raises(sf.FormatError, match="both depth.npy.zst and depth.npy"):
        sf.decode_sample(sample)


def test_pickled_npy_is_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    sample = sf.encode_clip(make_clip())
    sample["K.npy.zst"] = zstandard.ZstdCompressor().compress(buf.getvalue())
    with pytest.raises(sf.FormatError, match="K.npy.zst"):
        sf.decode_sample(sample)
    sample = sf.encode_clip(make_clip())   # format 1 member
    del sample["K.npy.zst"]
    sample["K.npy"] = buf.getvalue()
    with pytest.raises(sf.FormatError, match="K.npy"):
        sf.decode_sample(sample)


# --- crafted shards: the same one-line error from every reader, bounded memory -------
def read_both(path):
    """(read_shard's keys or error, training's pipeline's keys or error), one line each."""
    from training.synthetic_data import ShardDecodeError

    results = []
    for read in (lambda: list(sf.read_shard(path)), lambda: pipeline_clips([path])):
        try:
            results.append([clip["key"] for clip in read()])
        except (sf.FormatError, tarfile.TarError, ShardDecodeError) as exc:
            assert "\n" not in str(exc)
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def crafted_shard(path, members):
    """A tar of ``(name, bytes)`` members, in the order given."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)


def shard_members(clips):
    return [(f"{clip['key']}.{name}", data) for clip in clips
            for name, data in sorted(sf.encode_clip(clip).items()) if name != "__key__"]


def test_a_compressed_shard_is_not_expanded(tmp_path):
    """A gzip tar is refused like any file that is not a plain tar: a small shard
    never inflates into members larger than itself (webdataset's reader would inflate
    it)."""
    sf.write_shard(tmp_path / "s.tar", [make_clip()])
    import gzip
    (tmp_path / "z.tar").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    shard, training = read_both(tmp_path / "z.tar")
    assert shard == "ReadError: invalid header"
    assert training.startswith("ShardDecodeError: synthetic: shard file://")
    assert training.endswith("z.tar does not decode at its first member: invalid header")


@pytest.mark.parametrize("claimed", [10**6, 10**12])
def test_a_member_claiming_more_than_the_shard_holds_is_refused(tmp_path, claimed):
    """Its header's size is checked against the shard's before anything is read (a
    claim of 10**12 bytes used to be a MemoryError)."""
    info = tarfile.TarInfo("scene0000001.rgb.npy.zst")
    info.size = claimed
    (tmp_path / "s.tar").write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    shard, training = read_both(tmp_path / "s.tar")
    assert shard == "ReadError: unexpected end of data"
    assert training.endswith("s.tar does not decode at its first member: "
                             "unexpected end of data")


def test_a_field_twice_in_a_sample_is_one_line_naming_it(tmp_path):
    members = shard_members([make_clip()])
    crafted_shard(tmp_path / "s.tar", members[:3] + [members[1]] + members[3:])
    shard, training = read_both(tmp_path / "s.tar")
    assert shard == "FormatError: sample 'scene0000001': depth.npy.zst appears twice"
    assert training.endswith("s.tar does not decode after member scene0000001.depth.npy.zst: "
                             "sample 'scene0000001': depth.npy.zst appears twice")
    # skip mode: a marker in the shard's place, not a crash
    marker, = pipeline_clips([tmp_path / "s.tar"], bad={})
    assert "appears twice" in marker["__reason__"]


def test_member_names_only_group_members(tmp_path):
    """Names are strings: a directory in one is part of the key, nothing is extracted,
    a name without a field (or a field of webdataset's own, ``__bad__``) is skipped,
    links and directories are skipped."""
    clips = [make_clip("scene0000001"), make_clip("scene0000002", seed=1)]
    members = shard_members(clips)
    crafted_shard(tmp_path / "s.tar",
                  [("junk", b"x"), ("scene0000001.__bad__", b"1"), *members[:14],
                   ("../d/scene0000002.x", b"")] + [(f"../d/{n}", d) for n, d in members[14:]])
    with tarfile.open(tmp_path / "s.tar", "a") as tar:
        link = tarfile.TarInfo("scene0000003.rgb.npy.zst")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    shard, training = read_both(tmp_path / "s.tar")
    assert shard == ["scene0000001", "../d/scene0000002"]      # in the shard's order
    assert training == sorted(shard)
    assert not (tmp_path.parent / "d").exists()


# --- real renders (Blender): the format must be exact on what the renderer makes ------
@pytest.mark.blender
def test_real_render_round_trips_bit_for_bit(rendered_clip, tmp_path):
    """Every field of a real clip (flow and object coordinates included) comes back with
    the same dtype, shape and bits, through the writer, webdataset and the docs' code."""
    clip = rendered_clip
    assert all(name in clip for name in OPTIONAL)
    sf.write_shard(tmp_path / "s.tar", [clip])
    assert_clips_equal(clip, next(sf.read_shard(tmp_path / "s.tar")))
    assert_clips_equal(clip, pipeline_clips([tmp_path / "s.tar"])[0])
    assert_docs_read_the_clip(docs_reader()(tmp_path / "s.tar")[clip["key"]], clip)
    # and the members are compressed: every big array is stored smaller than its .npy
    with tarfile.open(tmp_path / "s.tar") as tar:
        sizes = {m.name.split(".", 1)[1]: m.size for m in tar}
    for name in ("rgb", "depth", "normal", "instance_seg", "semantic_seg"):
        assert sizes[f"{name}.npy.zst"] < 0.8 * len(sf._npy_bytes(clip[name])), name


@pytest.mark.blender
def test_real_render_gives_the_same_bytes_twice(rendered_clip, tmp_path):
    sf.write_shard(tmp_path / "a.tar", [rendered_clip])
    sf.write_shard(tmp_path / "b.tar", [rendered_clip])
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert sf.encode_clip(rendered_clip) == sf.encode_clip(rendered_clip)
    # and in a fresh process (its own zstd contexts, hash seed and thread defaults)
    code = ("import sys; from generation.dataset import shard_format as sf; "
            "sf.write_shard(sys.argv[2], sf.read_shard(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.tar"), str(tmp_path / "c.tar")],
                   check=True, cwd=Path(__file__).resolve().parents[3])
    assert (tmp_path / "c.tar").read_bytes() == (tmp_path / "a.tar").read_bytes()


@pytest.mark.blender
def test_a_damaged_member_of_a_real_shard_is_one_line_naming_it(rendered_clip, tmp_path):
    """A flipped byte inside depth.npy.zst on disk: reading stops with one line naming
    the member (a FormatError, which ``pvit verify`` reports for the shard)."""
    path = tmp_path / "s.tar"
    sf.write_shard(path, [rendered_clip])
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{rendered_clip['key']}.depth.npy.zst")
    raw = bytearray(path.read_bytes())
    raw[info.offset_data + info.size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(sf.FormatError, match=r"scene0000007'?: depth\.npy\.zst: not valid"):
        list(sf.read_shard(path))
    with pytest.raises(sf.FormatError) as err:
        list(sf.read_shard(path))
    assert "\n" not in str(err.value)   # what `pvit verify` prints after "bad: <shard>: "


# --- bounded decoding, and the rules `pvit verify` adds (issue 24) -------------------
def test_the_shape_table_covers_every_array_field():
    arrays = {f.key: f for f in sf.FIELDS if f.dtype is not None}
    assert set(sf.SHAPES) == set(arrays)
    for key, shape in sf.SHAPES.items():
        assert len(shape) == arrays[key].ndim, key
    assert set(sf.SPEC_SWITCHES) == {f.key for f in sf.FIELDS if f.optional}


def test_arrays_read_exactly_as_np_load_reads_them(tmp_path):
    """Same dtype, shape, bits, strides and flags as np.load, for format 2 and format 1
    members, and for a Fortran-ordered .npy (which the writer never writes)."""
    clip = make_clip()
    clip["forward_flow"] = np.random.default_rng(1).normal(size=(2, 6, 5, 2)).astype(np.float32)
    sample = sf.encode_clip(clip)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(clip["depth"]), allow_pickle=False)
    sample["depth.npy.zst"] = zstandard.ZstdCompressor(write_checksum=True).compress(
        buf.getvalue())
    decoded = sf.decode_sample(sample)
    for name in (*ARRAYS, "forward_flow"):
        data = sample[f"{name}.npy.zst"]
        want = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)),
                       allow_pickle=False)
        got = decoded[name]
        assert_same_bits(want, got, name)
        assert want.strides == got.strides and want.flags == got.flags, name
    write_format1_shard(tmp_path / "old.tar", [clip])
    (old,) = sf.read_shard(tmp_path / "old.tar")
    assert_clips_equal(clip, old)
    assert old["rgb"].flags.writeable and old["rgb"].flags.owndata


def lying_frame(npy: bytes, claimed: int) -> bytes:
    """A checksummed zstd frame of ``npy`` whose header claims ``claimed`` bytes (a
    4-byte content size field, patched)."""
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(npy + bytes(1 << 20)))
    end = zstandard.frame_header_size(bytes(frame))
    assert zstandard.frame_content_size(bytes(frame)) == len(npy) + (1 << 20)
    frame[end - 4:end] = claimed.to_bytes(4, "little")
    return bytes(frame)


def test_a_member_is_held_to_the_clip_budget_before_it_is_decompressed():
    sample = sf.encode_clip(make_clip())
    # a frame claiming 3 GB: refused from its header (decompressing would need 3 GB)
    sample["depth.npy.zst"] = lying_frame(sf._npy_bytes(make_clip()["depth"]), 3 << 30)
    with pytest.raises(sf.FormatError) as err:
        sf.decode_sample(sample)
    left = (64 << 20) - len(sf._npy_bytes(make_clip()["rgb"]))   # rgb is read first
    assert str(err.value) == (
        "sample 'scene0000001': depth.npy.zst: holds 3,221,225,472 bytes decompressed; a "
        f"clip may hold {left:,} bytes are left of the 67,108,864 (100x the "
        f"{sum(len(v) for k, v in sample.items() if k != '__key__'):,} bytes the sample "
        "stores, at least 64 MiB, when no spec says more)")
    # with a spec: the largest clip it renders
    limit = sf.clip_limit({"frames": 2, "resolution": 6, "max_objects": 3})
    rules = sf.ReadRules(clip_bytes=limit[0], reason=limit[1])
    sample["depth.npy.zst"] = lying_frame(sf._npy_bytes(make_clip()["depth"]), 60 << 20)
    with pytest.raises(sf.FormatError, match=r"depth.npy.zst: holds 62,914,560 bytes "
                       r"decompressed; a clip may hold [\d,]+ bytes are left of the "
                       r"[\d,]+ \(the largest clip of the manifest's spec: 2 frames of "
                       r"6x6 px, up to 1024 instances\)"):
        sf.decode_sample(sample, rules)


def test_a_header_that_disagrees_with_its_size_is_refused_before_allocating():
    """A .npy header claiming 10**12 elements: refused from the header, never allocated
    (np.load allocates what the header says first)."""
    sample = sf.encode_clip(make_clip())
    huge = npy_header(np.float32, (10**4, 10**4, 10**4))
    sample["depth.npy.zst"] = sf._compressor().compress(huge + bytes(64))
    with pytest.raises(sf.FormatError, match=r"^sample 'scene0000001': depth.npy.zst: its "
                       r"\.npy header \(float32 \(10000, 10000, 10000\), "
                       r"4,000,000,000,128 bytes\) disagrees with the frame content size "
                       r"\(192 bytes\)$"):
        sf.decode_sample(sample)
    del sample["depth.npy.zst"]
    sample["depth.npy"] = huge + bytes(64)          # format 1: the member's own length
    with pytest.raises(sf.FormatError, match=r"depth.npy: not a readable .npy \(EOF: "
                       r"reading array data, expected 4000000000000 bytes got 64\)"):
        sf.decode_sample(sample)


def npy_header(dtype, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def test_clip_limit_is_the_largest_clip_of_the_spec():
    from training.drawn_clips import make_clip as drawn

    spec = {"frames": 3, "resolution": 8, "max_objects": 2, "flow": True,
            "object_coordinates": False}
    limit, why = sf.clip_limit(spec)
    assert why == ("the largest clip of the manifest's spec: 3 frames of 8x8 px, up to 1024 "
                   "instances")
    clip = drawn("scene0000000", seed=0, frames=3, size=8)
    clip["forward_flow"] = clip["backward_flow"] = np.zeros((3, 8, 8, 2), np.float32)
    sample = sf.encode_clip(clip)
    sizes = sum(zstandard.frame_content_size(v) for k, v in sample.items()
                if k.endswith(".npy.zst"))
    assert sizes <= limit
    sf.decode_sample(sample, sf.ReadRules(clip_bytes=limit, reason=why))
    per_pixel = 3 * 8 * 8 * (3 + 4 + 2 + 1 + 12 + 8 + 8)
    instances = 1024 * (2 + 4 + 3 * 4 * (3 + 4 + 24 + 1))
    assert limit == per_pixel + instances + 3 * 16 * 4 + 9 * 4 + 15 * sf.NPY_HEADER_BYTES
    # a switch left out (a hand-made spec) allows the field; switched off, it does not
    assert sf.clip_limit({**spec, "object_coordinates": None})[0] == limit
    del spec["object_coordinates"]
    assert sf.clip_limit(spec)[0] == limit + 3 * 8 * 8 * 12 + sf.NPY_HEADER_BYTES
    assert sf.clip_limit({"resolution": 8}) is None and sf.clip_limit({}) is None


def test_verify_rules_refuse_unsummed_frames_and_plain_npy_in_format_2():
    """What docs/dataset-format.md rules out; the default reader (training, show) reads
    both, as before."""
    sample = sf.encode_clip(make_clip())
    unsummed = dict(sample)
    unsummed["K.npy.zst"] = zstandard.ZstdCompressor().compress(sf._npy_bytes(make_clip()["K"]))
    with pytest.raises(sf.FormatError, match=r"^sample 'scene0000001': K.npy.zst: zstd frame "
                       r"without a content checksum \(the format writes one in every frame\)$"):
        sf.decode_sample(unsummed, sf.ReadRules(strict=True))
    plain = dict(sample)
    del plain["K.npy.zst"]
    plain["K.npy"] = sf._npy_bytes(make_clip()["K"])
    with pytest.raises(sf.FormatError, match=r"^sample 'scene0000001': K.npy: a plain .npy "
                       r"member in a format 2 dataset \(every array is .npy.zst\)$"):
        sf.decode_sample(plain, sf.ReadRules(format_version=2))
    for readable in (unsummed, plain):
        assert_clips_equal(make_clip(), sf.decode_sample(readable))
        assert_clips_equal(make_clip(), sf.decode_sample(readable, sf.ReadRules(
            format_version=1)))


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "hardlink", "directory"])
def test_strict_members_are_regular_files_with_names_inside_the_target(tmp_path, kind):
    members = shard_members([make_clip()])
    path = tmp_path / "s.tar"
    depth = next(i for i, (name, _) in enumerate(members) if name.endswith(".depth.npy.zst"))
    if kind == "parent":
        members[depth] = (f"a/../../{members[depth][0]}", members[depth][1])
    elif kind == "absolute":
        members[depth] = (f"/{members[depth][0]}", members[depth][1])
    crafted_shard(path, members)
    if kind in ("symlink", "hardlink", "directory"):
        with tarfile.open(path, "a") as tar:
            info = tarfile.TarInfo("scene0000001.x")
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "directory": tarfile.DIRTYPE}[kind]
            info.linkname = "../../etc/passwd"
            tar.addfile(info)
    with pytest.raises(sf.FormatError) as err:
        list(sf.iter_members(path, strict=True))
    message = {
        "parent": "member 'a/../../scene0000001.depth.npy.zst': an absolute name or one "
                  "with '..' (unpacking the shard would write it outside the target "
                  "directory)",
        "absolute": "member '/scene0000001.depth.npy.zst': an absolute name or one with "
                    "'..' (unpacking the shard would write it outside the target directory)",
        "symlink": "member 'scene0000001.x' is a symbolic link, not a regular file",
        "hardlink": "member 'scene0000001.x' is a hard link, not a regular file",
        "directory": "member 'scene0000001.x' is a directory, not a regular file",
    }[kind]
    assert str(err.value) == message
    assert len(list(sf.iter_members(path))) == len(members)   # the default: as before
