"""One writer per dataset, and nothing replaced or removed without asking (issue 9,
parts 3-4): real ``pvit generate`` runs at the smallest size that still renders."""

import json
import os
import signal
import socket
import subprocess
import time

import psutil
import pytest
from pvit_cli import PVIT, REPO, pvit, write_config

from generation.dataset.lock import LOCK_NAME
from generation.dataset.manifest import MANIFEST_NAME, read_manifest, sha256_file
from generation.dataset.shard_format import read_shard

pytestmark = [pytest.mark.slow, pytest.mark.blender]

SMALL = {"resolution": 32, "frames": 2, "spp": 1, "min_objects": 3, "max_objects": 4}


def config(path, out, spp=1, **generation):
    return write_config(path, out, scene={**SMALL, "spp": spp}, scenes_per_shard=1, workers=1,
                        **generation)


def state(out):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())
            if p.is_file()}


def errors(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def wait_for(predicate, what, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"generate exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def lock_pid(out):
    try:
        return json.loads((out / LOCK_NAME).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def render_worker_for(proc, shard):
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            cmd = " ".join(child.cmdline())
            if "generation.render.worker" in cmd and f".{shard}." in cmd:
                return child
    except psutil.NoSuchProcess:
        pass
    return None


def test_second_writer_exits_2_naming_the_first_which_finishes(tmp_path):
    out = tmp_path / "ds"
    cfg = config(tmp_path / "c.yaml", out, scenes=2)
    first = subprocess.Popen([*PVIT, "generate", str(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: lock_pid(out) == first.pid, "it holds the lock", first)
        # The case: another spec and fewer scenes, started while the first renders.
        second = pvit("generate", cfg, "--spp", 3, "--scenes", 1)
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = errors(second)
        assert f"pid {first.pid} on host {socket.gethostname()}" in line, line
        assert "pvit generate" in line and str(out / LOCK_NAME) in line
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-2000:]
    assert "2 rendered, 0 kept" in err
    assert read_manifest(out)["spec"]["spp"] == 1
    assert not (out / LOCK_NAME).exists()               # released at the end
    assert pvit("verify", out).returncode == 0


def test_spec_change_is_refused_naming_the_fields_and_touching_nothing(tmp_path):
    out = tmp_path / "ds"
    cfg = config(tmp_path / "c.yaml", out, spp=2, scenes=2)
    assert pvit("generate", cfg).returncode == 0
    before, names = state(out), sorted(p.name for p in out.iterdir())

    changed = pvit("generate", cfg, "--spp", 3)
    assert changed.returncode == 2, changed.stderr[-2000:]
    (line,) = errors(changed)
    assert "generation.scene.spp: 2 → 3" in line and "--overwrite" in line, line
    assert "Traceback" not in changed.stderr

    fewer = pvit("generate", cfg, "--scenes", 1)
    assert fewer.returncode == 2
    (line,) = errors(fewer)
    assert "generation.scenes: 2 → 1 (fewer)" in line and "spp" not in line, line

    # The pipeline's generate stage: same refusal, pointing at --force generate.
    piped = pvit("pipeline", config(tmp_path / "p.yaml", out, spp=3, scenes=2))
    assert piped.returncode == 2
    (line,) = errors(piped)
    assert "generation.scene.spp: 2 → 3" in line and "--force generate" in line, line

    assert state(out) == before                          # shards, manifest, logs untouched
    assert sorted(p.name for p in out.iterdir()) == names   # no new file either
    more = pvit("generate", cfg, "--scenes", 3)          # more scenes is no change
    assert more.returncode == 0 and "1 rendered, 2 kept" in more.stderr, more.stderr[-2000:]


def test_kill_during_overwrite_leaves_complete_shards_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "ds"
    cfg = config(tmp_path / "c.yaml", out, scenes=3)
    assert pvit("generate", cfg).returncode == 0
    old = {name: data for name, (_, data) in state(out).items() if name.startswith("shard-")}
    assert len(old) == 3

    # Fewer scenes and another spec, with --overwrite; kill -9 the whole run once shard 0
    # is replaced and shard 1 renders.
    args = [*PVIT, "generate", str(cfg), "--scenes", "2", "--spp", "2", "--overwrite"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def replaced_first():
            manifest = read_manifest(out)
            return bool(manifest and manifest["spec"]["spp"] == 2 and manifest["shards"])
        wait_for(replaced_first, "shard 0 is committed", proc)
        wait_for(lambda: render_worker_for(proc, "shard-000001.tar"), "shard 1 renders", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar"]
    assert sha256_file(out / "shard-000000.tar") == manifest["shards"][0]["sha256"]
    assert (out / "shard-000000.tar").read_bytes() != old["shard-000000.tar"]
    # Every shard is there and complete: the new shard 0, the old 1 and 2 (2 is beyond
    # the new plan: removed only at the end of a successful run).
    for name in ("shard-000001.tar", "shard-000002.tar"):
        assert (out / name).read_bytes() == old[name]
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert len(list(read_shard(out / name))) == 1
    # ...and the manifest says which are still the old spec's.
    assert manifest["replacing"]["spec"]["spp"] == 1
    assert manifest["replacing"]["shards"] == sorted(old)
    assert lock_pid(out) == proc.pid                     # left behind by the kill

    rerun = pvit("generate", cfg, "--scenes", 2, "--spp", 2, "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"removed the stale lock of pvit generate (pid {proc.pid}" in rerun.stderr
    assert "1 rendered, 1 kept" in rerun.stderr
    assert "removed 1 shard (shard-000002.tar) beyond the 2 planned" in rerun.stderr
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar",
                                                           "shard-000001.tar"]
    assert not (out / LOCK_NAME).exists()
    assert pvit("verify", out).returncode == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["spec"]["spp"] == 2
