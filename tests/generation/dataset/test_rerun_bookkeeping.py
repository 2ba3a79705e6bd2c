"""Reruns that cost O(changes) (issue 9): the keep decision reads metadata, not shard
bytes; commits append to a journal instead of rewriting the manifest; a killed run's
journal is folded in; a dataset too large to plan is refused at once. No Blender: the
shards are drawn clips written with the real writer, committed through the real
``prepare`` / ``commit`` / ``compact``."""

import json
import os
import resource
import signal
from pathlib import Path

import pytest
from pvit_cli import pvit, write_config
from pydantic import ValidationError

from generation.config import MAX_SCENES, GenerationConfig, SceneConfig
from generation.dataset import plan as dataset
from generation.dataset.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    WriteError,
    append_journal,
    read_manifest,
    sha256_file,
)
from generation.dataset.shard_format import write_shard
from generation.dataset.verify import verify_dataset
from training.drawn_clips import make_clip

FRAMES, SIZE = 2, 16


def config(out, scenes=6, per_shard=2) -> GenerationConfig:
    return GenerationConfig(out=out, scenes=scenes, scenes_per_shard=per_shard,
                            scene=SceneConfig(frames=FRAMES, resolution=SIZE))


def render(out: Path, job) -> dict:
    """What a render worker would leave: the shard in place, and its record."""
    path = out / job.name
    write_shard(path, [make_clip(key, seed=seed, frames=FRAMES, size=SIZE)
                       for key, seed in zip(job.keys, job.seeds, strict=True)])
    return {"name": job.name, "sha256": sha256_file(path), "samples": len(job.seeds),
            "seeds": job.seeds, "keys": job.keys, "bytes": path.stat().st_size}


def build(out: Path, cfg: GenerationConfig, finish: bool = True, only: int | None = None):
    manifest, todo, done = dataset.prepare(cfg)
    for job in todo[:only]:
        dataset.commit(out, manifest, render(out, job))
    if finish:
        dataset.compact(out, manifest)
    return manifest


def on_disk(out: Path) -> dict:
    """manifest.json as written (read_manifest would fold a journal in)."""
    return json.loads((out / MANIFEST_NAME).read_text())


def test_a_rerun_keeps_shards_without_reading_them_and_verify_still_finds_damage(tmp_path):
    out = tmp_path / "ds"
    cfg = config(out)
    build(out, cfg)
    assert not (out / JOURNAL_NAME).exists()
    assert verify_dataset(out) == {}
    target = out / "shard-000001.tar"

    # Damage that keeps the size, with the mtime put back: only reading the bytes shows it.
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))

    _, todo, done = dataset.prepare(cfg)
    assert todo == [] and len(done) == 3           # kept: decided from size + mtime only
    problems = verify_dataset(out)                 # the full check still names it
    assert "sha256 does not match the manifest" in problems[target.name]
    assert set(problems) - {"dataset"} == {target.name}
    # what the rerun compared: the size and mtime recorded at commit
    record = {s["name"]: s for s in on_disk(out)["shards"]}[target.name]
    assert (record["bytes"], record["mtime_ns"]) == (before.st_size, before.st_mtime_ns)


def test_a_touched_shard_is_hashed_once_and_a_resized_or_changed_one_renders(tmp_path):
    out = tmp_path / "ds"
    cfg = config(out)
    build(out, cfg)
    touched, resized, changed = (out / f"shard-00000{i}.tar" for i in range(3))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    with open(resized, "ab") as f:
        f.write(b"\0" * 512)
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))               # same size, new mtime, other bytes

    _, todo, done = dataset.prepare(cfg)
    assert [job.name for job in done] == [touched.name]
    assert [job.name for job in todo] == [resized.name, changed.name]
    # the touched one's new mtime is recorded: the next rerun does not hash it again
    (record,) = on_disk(out)["shards"]
    assert record["name"] == touched.name
    assert record["mtime_ns"] == touched.stat().st_mtime_ns


def test_the_journal_of_a_killed_run_is_folded_in_by_readers_and_the_next_prepare(tmp_path):
    out = tmp_path / "ds"
    cfg = config(out)
    manifest = build(out, cfg, finish=False, only=2)      # killed after 2 of 3 commits
    assert on_disk(out)["shards"] == []                    # commits did not rewrite it
    with open(out / JOURNAL_NAME, "ab") as f:
        # a journal line of another spec (a compaction killed before removing the
        # journal), then the torn last line of a write the kill cut short
        f.write(json.dumps({"spec_hash": "other", "shard": {
            **manifest["shards"][0], "name": "shard-000002.tar"}}).encode() + b"\n")
        f.write(b'{"spec_hash": "' + manifest["spec_hash"].encode() + b'", "shard": {"na')

    # readers see what was committed, nothing of the torn or foreign lines
    assert [s["name"] for s in read_manifest(out)["shards"]] == ["shard-000000.tar",
                                                                 "shard-000001.tar"]
    problems = verify_dataset(out)
    assert set(problems) == {"shard-000002.tar", "dataset"}
    assert problems["shard-000002.tar"] == ["planned (2 clips) but not in the manifest"]

    _, todo, done = dataset.prepare(cfg)
    assert [job.name for job in done] == ["shard-000000.tar", "shard-000001.tar"]
    assert [job.name for job in todo] == ["shard-000002.tar"]
    assert not (out / JOURNAL_NAME).exists()
    assert [s["name"] for s in on_disk(out)["shards"]] == ["shard-000000.tar",
                                                           "shard-000001.tar"]


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_commit_cost_does_not_grow_with_the_manifest(tmp_path):
    """Bytes this process writes per commit (wchar): flat, not the whole manifest."""
    out = tmp_path / "ds"
    cfg = config(out, scenes=300, per_shard=1)
    manifest, todo, _ = dataset.prepare(cfg)
    written = []
    for job in todo:
        (out / job.name).write_bytes(b"shard bytes")
        record = {"name": job.name, "sha256": "0" * 64, "samples": 1, "seeds": job.seeds,
                  "keys": job.keys, "bytes": 11}
        before = _wchar()
        dataset.commit(out, manifest, record)
        written.append(_wchar() - before)
    assert max(written) < 1024, max(written)               # one journal line
    assert max(written[-20:]) <= 1.1 * max(written[:20]), (written[:20], written[-20:])
    dataset.compact(out, manifest)
    assert len(on_disk(out)["shards"]) == 300 and not (out / JOURNAL_NAME).exists()


def test_a_failed_journal_append_is_one_line_and_leaves_no_torn_line(tmp_path):
    record = {"name": "shard-000000.tar", "sha256": "0" * 64, "samples": 1, "seeds": [1],
              "keys": ["scene0000000"], "bytes": 10}
    append_journal(tmp_path, "h", record)
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 40, old_limit[1]))
    try:
        with pytest.raises(WriteError) as info:
            append_journal(tmp_path, "h", {**record, "name": "shard-000001.tar"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(info.value) == f"cannot write {tmp_path / JOURNAL_NAME}: File too large"
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before


def test_too_many_scenes_is_refused_at_once_with_one_line(tmp_path):
    with pytest.raises(ValidationError, match="at most 10,000,000"):
        GenerationConfig(scenes=MAX_SCENES + 1)
    assert GenerationConfig(scenes=MAX_SCENES).scenes == MAX_SCENES

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds")
    result = pvit("generate", cfg, "--scenes", 1_000_000_000, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {cfg}: generation.scenes: 1000000000 clips is more than one "
        "dataset may hold (at most 10,000,000); split it into several `out` directories"]
    assert not (tmp_path / "ds").exists()
