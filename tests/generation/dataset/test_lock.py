"""The dataset lock and the spec comparison, without rendering (issue 9, parts 3-4)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from pvit_cli import REPO, pvit, write_config

from generation.config import GenerationConfig, SceneConfig
from generation.dataset import lock as dataset_lock
from generation.dataset import spec_change
from generation.dataset.lock import LOCK_NAME, LockError, acquire, release
from generation.dataset.lock import dataset_lock as lock
from generation.dataset.manifest import new_manifest, renderer_fingerprint, write_json_atomic

HOLD = """
import sys, time
from generation.dataset.lock import acquire
acquire(sys.argv[1], owner="test holder")
print("held", flush=True)
if sys.argv[2] == "die":
    import os; os._exit(0)          # as after kill -9: the lock file stays, the flock goes
time.sleep(60)
"""


def holder(out, mode):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = holder(tmp_path, "hold")
    try:
        with pytest.raises(LockError) as info:
            acquire(tmp_path)
        message = str(info.value)
        assert "\n" not in message
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert "test holder" in message and "--break-lock" not in message
        # a live lock on this host is never broken, even when asked
        with pytest.raises(LockError):
            acquire(tmp_path, break_lock=True)
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_dead_process_is_recovered_with_a_warning(tmp_path):
    proc = holder(tmp_path, "die")
    proc.wait()
    assert (tmp_path / LOCK_NAME).is_file()
    warnings = []
    with lock(tmp_path, warn=warnings.append):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert {"owner", "started"} <= set(info)
    assert len(warnings) == 1 and f"stale lock of test holder (pid {proc.pid}" in warnings[0]
    assert not (tmp_path / LOCK_NAME).exists()          # released on exit
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_live_process_named_by_a_lock_it_does_not_hold_keeps_the_lock(tmp_path):
    # issue 24: such a lock was removed as "that process is no longer running"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / LOCK_NAME
        path.write_text(json.dumps({"owner": "someone", "host": socket.gethostname(),
                                    "pid": sleeper.pid, "started": "now"}))
        with pytest.raises(LockError, match=f"pid {sleeper.pid} .* is running but does not "
                                            "hold it"):
            acquire(tmp_path)
        assert path.is_file()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unreadable_lock_nobody_holds_is_recovered_and_a_held_one_is_named(tmp_path):
    # issue 24: a garbage lock read "being written by ? (pid ? ...)" and was never recovered
    (tmp_path / LOCK_NAME).write_bytes(b"\x00garbage")
    warnings = []
    acquire(tmp_path, warn=warnings.append)
    release(tmp_path)
    assert len(warnings) == 1 and "unreadable lock file that no process holds" in warnings[0]
    proc = holder(tmp_path, "hold")     # a live holder's flock...
    try:
        (tmp_path / LOCK_NAME).write_bytes(b"\x00garbage")   # ...on a file gone unreadable
        # (written in place: the same inode, still flocked by the holder)
        with pytest.raises(LockError, match="an unknown run .its lock file is unreadable."):
            acquire(tmp_path)
    finally:
        proc.kill()
        proc.wait()


def test_another_hosts_lock_needs_break_lock(tmp_path):
    other = {"owner": "pvit generate", "host": "render-node-7", "pid": 4242,
             "started": "2025-01-01T00:00:00+0000"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(LockError, match="pid 4242 on host render-node-7.*--break-lock"):
        acquire(tmp_path)
    warnings = []
    acquire(tmp_path, break_lock=True, warn=warnings.append)
    try:
        assert "--break-lock removed the lock of pvit generate (pid 4242" in warnings[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        release(tmp_path)


def test_lock_is_reentrant_in_one_process_and_released_on_failure(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with lock(tmp_path):
            with lock(tmp_path):          # the flow inside the CLI's hold
                pass
            assert (tmp_path / LOCK_NAME).is_file()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists() and not dataset_lock._held


def _dataset(tmp_path, scene, **dataset):
    cfg = GenerationConfig(out=tmp_path, scenes=4, scenes_per_shard=2, scene=scene)
    info = {"scenes": 4, "scenes_per_shard": 2, "seed": 0, **dataset}
    manifest = new_manifest(scene.spec(), scene.digest(), [], info)
    write_json_atomic(tmp_path / "manifest.json", manifest)
    return cfg, manifest


def test_spec_changes_are_named_field_by_field(tmp_path):
    old_scene = SceneConfig(spp=2, resolution=32)
    cfg, manifest = _dataset(tmp_path, old_scene)
    new = cfg.model_copy(update={"scene": SceneConfig(spp=3, resolution=32)})
    assert spec_change.changes(manifest, cfg) == []
    assert spec_change.changes(manifest, new) == ["generation.scene.spp: 2 → 3"]
    fewer = cfg.model_copy(update={"scenes": 2, "seed": 1})
    assert spec_change.changes(manifest, fewer) == ["generation.seed: 0 → 1",
                                                    "generation.scenes: 4 → 2 (fewer)"]
    assert spec_change.changes(manifest, cfg.model_copy(update={"scenes": 9})) == []
    manifest["renderer"] = {**renderer_fingerprint(), "code": "0123456789abcdef"}
    manifest["spec_hash"] = "x"
    code = renderer_fingerprint()["code"]
    assert spec_change.changes(manifest, cfg) == [
        f"renderer.code (code that makes clips): 0123456789abcdef → {code}"]


def test_check_refuses_only_when_shards_would_be_lost(tmp_path):
    cfg, _ = _dataset(tmp_path, SceneConfig(spp=2))
    new = cfg.model_copy(update={"scene": SceneConfig(spp=3)})
    spec_change.check(new)                          # no shard on disk: nothing to lose
    (tmp_path / "shard-000000.tar").write_bytes(b"old")
    with pytest.raises(spec_change.SpecChanged) as info:
        spec_change.check(new)
    assert "\n" not in str(info.value)
    assert "holds 1 shard made with another spec (generation.scene.spp: 2 → 3)" \
        in str(info.value) and "--overwrite" in str(info.value)
    spec_change.check(new.model_copy(update={"overwrite": True}))


def test_shard_files_no_manifest_accounts_for_are_never_rendered_over(tmp_path):
    """A directory with shard-NNNNNN.tar files but no readable manifest (someone else's
    shards, or a lost manifest) is refused like a changed spec: nothing is replaced or
    removed without --overwrite."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"their shard")
    (out / "shard-000009.tar").write_bytes(b"another")
    cfg = write_config(tmp_path / "c.yaml", out)
    result = pvit("generate", cfg)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "holds 2 shards" in lines[0] and "no readable manifest.json" in lines[0]
    assert "--overwrite" in lines[0]
    assert (out / "shard-000000.tar").read_bytes() == b"their shard"
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000009.tar"]
    gen = GenerationConfig(out=out)
    (out / "manifest.json").write_text("{ not json")    # a corrupted manifest: the same
    with pytest.raises(spec_change.SpecChanged):
        spec_change.check(gen)
    spec_change.check(gen.model_copy(update={"overwrite": True}))
