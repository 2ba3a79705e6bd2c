"""``pvit verify`` on shard directories built with the real writer (no Blender: the
clips are drawn with numpy), damaged the ways disks and killed runs damage them."""

import gzip
import io
import tarfile

import pytest
import zstandard
from pvit_cli import pvit

from generation.dataset.manifest import MANIFEST_NAME, new_manifest, sha256_file, write_json_atomic
from generation.dataset.plan import SHARD_PATTERN
from generation.dataset.shard_format import CLASSES, encode_clip, read_shard, write_shard
from training.drawn_clips import make_clip

FRAMES, SIZE = 2, 16


def make_dataset(directory, scenes=4, per_shard=2, written=None):
    """A shard directory as ``pvit generate`` leaves it, with ``written`` of the planned
    shards on disk and in the manifest (all by default)."""
    directory.mkdir(parents=True)
    manifest = new_manifest({"frames": FRAMES, "resolution": SIZE}, "spec-hash", list(CLASSES),
                            {"scenes": scenes, "scenes_per_shard": per_shard, "seed": 0})
    starts = list(range(0, scenes, per_shard))
    for index, start in enumerate(starts[:written]):
        name = SHARD_PATTERN.format(index)
        keys = [f"scene{j:07d}" for j in range(start, min(start + per_shard, scenes))]
        write_shard(directory / name, [make_clip(k, seed=i, frames=FRAMES, size=SIZE)
                                       for i, k in enumerate(keys)])
        manifest["shards"].append({"name": name, "sha256": sha256_file(directory / name),
                                   "samples": len(keys), "keys": keys})
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


def bad_lines(result):
    """verify's report: every line is one problem, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("bad: ") for line in lines), result.stderr
    return lines


def test_every_damaged_shard_is_one_line_and_the_others_are_still_checked(tmp_path):
    out = tmp_path / "ds"
    manifest = make_dataset(out, scenes=12, per_shard=2)
    ok = pvit("verify", out)
    assert ok.returncode == 0 and ok.stderr.startswith("ok:"), ok.stderr

    first = out / "shard-000001.tar"
    first.write_bytes(first.read_bytes()[:5000])               # truncated (full disk)
    (out / "shard-000002.tar").write_bytes(b"")                # zero bytes
    header = bytearray((out / "shard-000003.tar").read_bytes())
    header[100] ^= 0xFF                                        # first tar header: bad checksum
    (out / "shard-000003.tar").write_bytes(bytes(header))
    packed = out / "shard-000005.tar"                          # gzipped: not expanded
    packed.write_bytes(gzip.compress(packed.read_bytes()))
    del manifest["shards"][4]["sha256"]                        # a hand-edited manifest
    write_json_atomic(out / MANIFEST_NAME, manifest)

    result = pvit("verify", out)
    assert result.returncode == 1
    lines = bad_lines(result)
    text = "\n".join(lines)
    assert "shard-000000.tar" not in text
    assert "bad: shard-000001.tar: does not decode after 0 samples: unexpected end of data" in lines
    assert "bad: shard-000002.tar: does not decode after 0 samples: empty file" in lines
    assert "bad: shard-000003.tar: does not decode after 0 samples: bad checksum" in lines
    assert "bad: shard-000005.tar: does not decode after 0 samples: invalid header" in lines
    assert "bad: shard-000004.tar: manifest record has no sha256" in lines
    for name in ("shard-000001.tar", "shard-000002.tar", "shard-000003.tar", "shard-000005.tar"):
        assert f"bad: {name}: sha256 does not match the manifest" in lines
    assert "bad: dataset: 10 of 12 planned clips are missing or in damaged shards" in lines


def test_an_incomplete_dataset_names_the_shards_never_written(tmp_path):
    """A killed run (or a full disk) left 1 of 3 planned shards; what is there is intact."""
    out = tmp_path / "ds"
    make_dataset(out, scenes=5, per_shard=2, written=1)
    result = pvit("verify", out)
    assert result.returncode == 1
    assert bad_lines(result) == [
        "bad: shard-000001.tar: planned (2 clips) but not in the manifest",
        "bad: shard-000002.tar: planned (1 clip) but not in the manifest",
        "bad: dataset: 3 of 5 planned clips are missing or in damaged shards",
    ]


def test_tar_files_the_manifest_does_not_list_are_reported(tmp_path):
    """Training reads every ``*.tar`` of the directory, not only ``shard-*.tar``."""
    out = tmp_path / "ds"
    make_dataset(out)
    write_shard(out / "other.tar", [make_clip("scene9999999", seed=9, frames=FRAMES, size=SIZE)])
    (out / "notes.txt").write_text("not a shard")
    result = pvit("verify", out)
    assert result.returncode == 1
    assert bad_lines(result) == ["bad: other.tar: shard file is not listed in the manifest"]


@pytest.mark.parametrize("location, message", [
    ("nowhere", "no such directory"),
    ("file", "not a directory"),
    ("empty", "no manifest.json"),
    ("pipe:touch PWNED;w", "scheme 'pipe:' is not supported"),
    ("https://example.com/shards", "scheme 'https:' is not supported"),
])
def test_a_path_that_is_not_a_dataset_is_bad_input(tmp_path, location, message):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    result = pvit("verify", location, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert not (tmp_path / "PWNED").exists()


def crafted_dataset(directory, shards: list[list], format_version=2):
    """A dataset of shards made of the given members, in order: ``(name, bytes)`` or a
    ``tarfile.TarInfo`` (a link, a directory); one sample ``scene000000N`` per shard, and
    a manifest as `pvit generate` writes it (right sha256, sample count and keys)."""
    directory.mkdir(parents=True)
    manifest = new_manifest({"frames": FRAMES, "resolution": SIZE}, "spec-hash", list(CLASSES),
                            {"scenes": len(shards), "scenes_per_shard": 1, "seed": 0})
    manifest["format_version"] = format_version
    for index, members in enumerate(shards):
        name = SHARD_PATTERN.format(index)
        with tarfile.open(directory / name, "w", format=tarfile.GNU_FORMAT) as tar:
            for member in members:
                if isinstance(member, tarfile.TarInfo):
                    tar.addfile(member)
                    continue
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
        manifest["shards"].append({"name": name, "sha256": sha256_file(directory / name),
                                   "samples": 1, "keys": [f"scene{index:07d}"]})
    write_json_atomic(directory / MANIFEST_NAME, manifest)


def clip_members(index, **replace):
    """The members of drawn clip ``scene000000<index>`` as the writer writes them, with
    ``replace`` (field name -> (new field name, bytes)) swapped in."""
    key = f"scene{index:07d}"
    sample = encode_clip(make_clip(key, seed=index, frames=FRAMES, size=SIZE))
    members = {name: data for name, data in sample.items() if name != "__key__"}
    for old, (new, data) in replace.items():
        del members[old]
        members[new] = data
    return [(f"{key}.{name}", members[name]) for name in sorted(members)]


def test_verify_holds_each_shard_to_the_documented_format(tmp_path):
    """What docs/dataset-format.md rules out is one line naming the shard and the member:
    a name `tarfile.extractall` would write outside its target (absolute, or with
    ``..``), a member that is not a regular file, a zstd frame without its checksum, and
    a plain .npy in a format 2 dataset."""
    link = tarfile.TarInfo("scene0000003.rgb.npy.zst")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    depth = clip_members(4)[1][1]
    assert zstandard.get_frame_parameters(depth).has_checksum
    unsummed = zstandard.ZstdCompressor(level=3).compress(
        zstandard.ZstdDecompressor().decompress(depth))
    out = tmp_path / "ds"
    crafted_dataset(out, [
        clip_members(0),
        [(f"../escape/{name}", data) for name, data in clip_members(1)],
        [(f"/tmp/escape/{name}", data) for name, data in clip_members(2)],
        clip_members(3) + [link],
        clip_members(4, **{"depth.npy.zst": ("depth.npy.zst", unsummed)}),
        clip_members(5, **{"depth.npy.zst": ("depth.npy", zstandard.ZstdDecompressor()
                                             .decompress(depth))}),
    ])
    result = pvit("verify", out)
    assert result.returncode == 1
    lines = bad_lines(result)
    assert not [line for line in lines if "shard-000000.tar" in line], lines
    escape = ("an absolute name or one with '..' (unpacking the shard would write it outside "
              "the target directory)")
    for line in [
        "bad: shard-000001.tar: does not decode after 0 samples: member "
        f"'../escape/scene0000001.K.npy.zst': {escape}",
        "bad: shard-000002.tar: does not decode after 0 samples: member "
        f"'/tmp/escape/scene0000002.K.npy.zst': {escape}",
        "bad: shard-000003.tar: does not decode after 0 samples: member "
        "'scene0000003.rgb.npy.zst' is a symbolic link, not a regular file",
        "bad: shard-000004.tar: does not decode after 0 samples: sample 'scene0000004': "
        "depth.npy.zst: zstd frame without a content checksum (the format writes one in "
        "every frame)",
        "bad: shard-000005.tar: does not decode after 0 samples: sample 'scene0000005': "
        "depth.npy: a plain .npy member in a format 2 dataset (every array is .npy.zst)",
    ]:
        assert line in lines, "\n".join(lines)
    # training reads them as before: names are only keys there, and nothing is extracted
    assert [clip["key"] for clip in read_shard(out / "shard-000001.tar")] == \
        ["../escape/scene0000001"]
    assert [clip["key"] for clip in read_shard(out / "shard-000003.tar")] == ["scene0000003"]


def test_a_format1_dataset_still_verifies(tmp_path):
    """Plain .npy members are what format 1 is: verify passes them there."""
    def plain(index):
        members = clip_members(index)
        return [(name[:-4], zstandard.ZstdDecompressor().decompress(data))
                if name.endswith(".npy.zst") else (name, data) for name, data in members]

    out = tmp_path / "ds"
    crafted_dataset(out, [plain(0), plain(1)], format_version=1)
    result = pvit("verify", out)
    assert result.returncode == 0 and result.stderr.startswith("ok:"), result.stderr


def _claim(directory, **dataset):
    import json
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["dataset"].update(dataset)
    path.write_text(json.dumps(manifest).replace('"INF"', "Infinity"))


def test_a_manifest_claiming_a_huge_plan_is_checked_from_what_it_lists(tmp_path):
    # issue 24: `scenes: 1000000000` built one entry per planned shard (MemoryError)
    from generation.dataset.verify import verify_dataset
    make_dataset(tmp_path / "a", scenes=4, per_shard=2, written=1)
    _claim(tmp_path / "a", scenes=1_000_000_000, scenes_per_shard=1)
    problems = verify_dataset(tmp_path / "a")
    assert any("claims 1,000,000,000 clips" in p for p in problems["manifest"]), problems
    # within the bound: the first missing shards by name, then one line counting the rest
    make_dataset(tmp_path / "b", scenes=4, per_shard=2, written=1)
    _claim(tmp_path / "b", scenes=10_000_000, scenes_per_shard=1)
    problems = verify_dataset(tmp_path / "b")
    assert len(problems) <= 13, sorted(problems)[:20]
    assert any("9,999,989 more planned shards" in p for p in problems["dataset"]), problems


def test_an_infinite_plan_and_a_record_naming_a_path_outside_are_one_line_each(tmp_path):
    make_dataset(tmp_path / "ds", scenes=4, per_shard=2)
    _claim(tmp_path / "ds", scenes="INF")
    import json
    path = tmp_path / "ds" / MANIFEST_NAME
    manifest = json.loads(path.read_text().replace("Infinity", '"INF"'))
    manifest["shards"].append({"name": "../../etc/passwd", "sha256": "0", "samples": 1})
    path.write_text(json.dumps(manifest).replace('"INF"', "Infinity"))
    result = pvit("verify", tmp_path / "ds")
    assert result.returncode == 1
    lines = bad_lines(result)
    assert any("no valid `dataset` record" in line for line in lines), lines
    assert any("not a file of the dataset's directory" in line for line in lines), lines
