"""``pvit verify`` on shard directories built with the real writer (no Blender: the
clips are drawn with numpy), damaged the ways disks and killed runs damage them."""

import gzip

import pytest
from pvit_cli import pvit

from generation.dataset.manifest import MANIFEST_NAME, new_manifest, sha256_file, write_json_atomic
from generation.dataset.plan import SHARD_PATTERN
from generation.dataset.shard_format import CLASSES, write_shard
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
