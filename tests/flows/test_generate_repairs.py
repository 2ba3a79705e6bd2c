"""What ``pvit generate`` does to a directory it did not leave in order (issue 12):
fewer scenes, incomplete manifest records, leftovers of killed runs, a full disk, and
failed attempts' logs. Real runs, at the smallest size that still renders."""

import json
import os
import resource
import signal
import subprocess
import time
from contextlib import contextmanager

import psutil
import pytest
from pvit_cli import PVIT, REPO, pvit, write_config

from generation.config import GenerationConfig
from generation.dataset import plan as dataset
from generation.dataset.lock import LOCK_NAME
from generation.dataset.manifest import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    WriteError,
    read_manifest,
    write_json_atomic,
)
from generation.render import supervisor

# Smaller than conftest's TINY_SCENE: these tests render many times on two cores.
SMALL = {"resolution": 32, "frames": 2, "spp": 1, "min_objects": 3, "max_objects": 4}


def small_config(tmp_path, out, **generation):
    return write_config(tmp_path / "c.yaml", out, scene=SMALL, scenes_per_shard=1, workers=1,
                        **generation)


def seeds_of(out, scenes):
    return [job.seeds[0] for job in dataset.plan(GenerationConfig(out=out, scenes=scenes,
                                                                  scenes_per_shard=1))]


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if dataset.SHARD_RE.fullmatch(p.name)}


@contextmanager
def full_filesystem(where):
    """A real full disk: a small tmpfs at ``where``, filled to the last block. Needs root
    (mount); skipped where that is not allowed."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory):
    with open(directory / "filler", "wb", buffering=0) as f:   # unbuffered: close can't fail
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


# -- write_json_atomic / commit on a full disk (no render) ---------------------------

def test_manifest_commit_on_full_disk_raises_one_line_and_leaves_no_temp(tmp_path):
    with full_filesystem(tmp_path / "disk") as disk:
        out = disk / "ds"
        out.mkdir()
        manifest = {"dataset": {"scenes": 1, "scenes_per_shard": 1}, "shards": []}
        write_json_atomic(out / MANIFEST_NAME, manifest)
        before = (out / MANIFEST_NAME).read_text()
        fill(disk)
        record = {"name": "shard-000000.tar", "sha256": "0" * 64, "samples": 1, "seeds": [1],
                  "keys": ["scene0000000"], "bytes": 10}
        with pytest.raises(WriteError) as info:
            dataset.commit(out, manifest, record)
        # a commit appends to the manifest's journal (manifest.json is left alone)
        journal = out / JOURNAL_NAME
        assert str(info.value) == f"cannot write {journal}: No space left on device"
        assert isinstance(info.value, OSError)
        assert (out / MANIFEST_NAME).read_text() == before      # the old one is intact
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]   # no empty journal


def test_write_json_atomic_removes_its_temp_when_the_write_fails(tmp_path):
    # Portable variant (no mount needed): a file-size limit fails the write like a full
    # disk would (EFBIG instead of ENOSPC).
    path = tmp_path / MANIFEST_NAME
    write_json_atomic(path, {"shards": []})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, old_limit[1]))
    try:
        with pytest.raises(WriteError, match=f"cannot write {path}: File too large"):
            write_json_atomic(path, {"shards": ["x" * 200]})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert json.loads(path.read_text()) == {"shards": []}
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]


def test_error_line_quotes_the_cause_not_the_noise_after_it():
    banner = ("I0000 00:00:1796161247.036135 5490 port.cc:153] oneDNN custom operations "
              "are on.")
    log = ("WARNING: All log messages before absl::InitializeLog() is called are written\n"
           "Traceback (most recent call last):\n"
           '  File "render_worker.py", line 50, in main\n'
           '    raise RuntimeError("first")\n'
           "RuntimeError: first\n"
           "Traceback (most recent call last):\n"
           '  File "shard_format.py", line 175, in write_shard\n'
           "    sink.write(encode_clip(clip))\n"
           "OSError: [Errno 28] No space left on device\n"
           f"{banner}\n\n")
    assert supervisor.error_line(log) == "OSError: [Errno 28] No space left on device"
    assert supervisor.error_line(f"{banner}\nFatal Python error: Segmentation fault\n{banner}\n") \
        == "Fatal Python error: Segmentation fault"
    assert supervisor.error_line(f"starting\n{banner}\n") == banner
    assert supervisor.error_line("\n") is None


# -- real runs -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.blender
def test_full_disk_is_one_error_line_without_traceback_or_temp_file(tmp_path):
    with full_filesystem(tmp_path / "disk") as disk:
        out = disk / "ds"
        cfg = small_config(tmp_path, out, scenes=1)
        fill(disk)
        result = pvit("generate", cfg)
        assert result.returncode == 1, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        # the first file a run writes is its dataset lock
        assert errors == [f"error: cannot write {out / LOCK_NAME}: No space left on device"]
        assert "Traceback" not in result.stderr
        assert list(out.iterdir()) == []          # no 0-byte temporary lock or manifest


@pytest.mark.slow
@pytest.mark.blender
def test_lowering_the_scene_count_names_what_it_removes_and_only_after_rendering(tmp_path):
    out = tmp_path / "ds"
    cfg = small_config(tmp_path, out, scenes=3)
    first = pvit("generate", cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    original = shard_bytes(out)
    (out / "shard-old.tar").write_bytes(b"a user's file, not ours")

    # Fewer scenes and a new spec; shard 0's render fails: shard 2 must still be there.
    crash = {**os.environ, "PVIT_CRASH_ON_SEED": str(seeds_of(out, 1)[0])}
    failed = pvit("generate", cfg, "--scenes", 2, "--spp", 2, "--overwrite", env=crash)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert ("2 shards (shard-000000.tar, shard-000001.tar) will be rendered again and "
            "replaced (the scene spec or renderer changed)") in failed.stderr
    assert ("1 shard (shard-000002.tar) beyond the 2 planned will be removed once those are "
            "rendered") in failed.stderr
    assert (out / "shard-000002.tar").read_bytes() == original["shard-000002.tar"]
    assert (out / "shard-000000.tar").read_bytes() == original["shard-000000.tar"]

    # Once every planned shard is rendered, the extra one goes, with a line naming it.
    fixed = pvit("generate", cfg, "--scenes", 2, "--spp", 2)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "1 rendered, 1 kept" in fixed.stderr
    assert "removed 1 shard (shard-000002.tar) beyond the 2 planned" in fixed.stderr
    assert sorted(shard_bytes(out)) == ["shard-000000.tar", "shard-000001.tar"]

    # The case: nothing to render, so the extra shard goes at once, named.
    fewer = pvit("generate", cfg, "--scenes", 1, "--spp", 2, "--overwrite")
    assert fewer.returncode == 0 and "0 rendered, 1 kept" in fewer.stderr, fewer.stderr[-2000:]
    assert "removed 1 shard (shard-000001.tar) beyond the 1 planned" in fewer.stderr
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-old.tar"]


def _render_worker(proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "generation.render.worker" in " ".join(child.cmdline()):
                    return child
        except psutil.NoSuchProcess:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"generate exited ({proc.returncode}) before rendering: "
                                 + proc.stderr.read()[-2000:])
        time.sleep(0.2)
    raise AssertionError("no render worker started")


@pytest.mark.slow
@pytest.mark.blender
def test_incomplete_record_renders_again_and_killed_runs_leave_nothing(tmp_path):
    out = tmp_path / "ds"
    cfg = small_config(tmp_path, out, scenes=2)
    assert pvit("generate", cfg).returncode == 0
    kept = (out / "shard-000000.tar").read_bytes()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["shards"][1]["seeds"], manifest["shards"][1]["sha256"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))

    # The incomplete record means "not done": only shard 1 renders. Kill the run while it
    # does; its job file is in the dataset's directory, not the system temp dir.
    proc = subprocess.Popen([*PVIT, "generate", str(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        job_file = _render_worker(proc).cmdline()[-1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert os.path.dirname(job_file) == str(out)
    assert os.path.basename(job_file).startswith(".shard-000001.tar.")
    stray = out / ".manifest.json.4242.tmp"          # as a full disk used to leave
    stray.write_bytes(b"")
    mine = [out / "notes.partial", out / ".shard-draft.partial"]   # not the project's
    for path in mine:
        path.write_text("keep me")
    assert os.path.exists(job_file)
    assert [p.is_dir() for p in out.glob(".shard-000001.tar.*.scratch")] == [True]  # Blender's

    rerun = pvit("generate", cfg)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 rendered, 1 kept" in rerun.stderr
    assert not os.path.exists(job_file) and not stray.exists()
    assert all(path.read_text() == "keep me" for path in mine)
    assert not list(out.glob(".shard-0*"))
    assert (out / "shard-000000.tar").read_bytes() == kept
    assert {"seeds", "sha256"} <= set(read_manifest(out)["shards"][1])
    assert pvit("verify", out).returncode == 0


@pytest.mark.slow
@pytest.mark.blender
def test_each_failed_attempt_keeps_its_log_and_the_error_quotes_the_exception(tmp_path):
    out = tmp_path / "ds"
    cfg = small_config(tmp_path, out, scenes=1, retries=1)
    seed = seeds_of(out, 1)[0]
    env = {**os.environ, "PVIT_RAISE_ON_SEED": str(seed)}
    result = pvit("generate", cfg, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    message = f"RuntimeError: injected failure on seed {seed}"
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and message in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["shard-000000.attempt-1.log", "shard-000000.attempt-2.log"]
    for name in logs:
        assert message in (out / "logs" / name).read_text()
    assert "(log: " + str(out / "logs" / "shard-000000.attempt-2.log") + ")" in error[0]
