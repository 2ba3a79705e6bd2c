"""``pvit generate`` end to end: real Prefect runs, real renders, real shards."""

import os
import signal
import subprocess
import time

import psutil
import pytest
from pvit_cli import PVIT, REPO, pvit, write_config

from generation.dataset.manifest import read_manifest
from generation.dataset.shard_format import read_shard

pytestmark = [pytest.mark.slow, pytest.mark.blender]


def shard_state(directory):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.glob("shard-*.tar")}


def test_generate_verify_show_and_incremental_reruns(tmp_path):
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out)
    first = pvit("generate", cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["versions"]["bpy"].startswith("4.5")
    assert sum(s["samples"] for s in manifest["shards"]) == 4
    clips = [c for s in manifest["shards"] for c in read_shard(out / s["name"])]
    assert [c["key"] for c in clips] == [k for s in manifest["shards"] for k in s["keys"]]
    assert {c["meta"]["seed"] for c in clips} == {x for s in manifest["shards"] for x in s["seeds"]}
    assert not list(out.glob(".*partial"))

    assert pvit("verify", out).returncode == 0
    assert (out / "contact_sheet.png").stat().st_size > 1000   # the flow's artifact image
    sheet = tmp_path / "sheet.png"
    shown = pvit("show", out, "--out", sheet, "--sample", clips[1]["key"])
    assert shown.returncode == 0, shown.stderr
    import cv2
    image = cv2.imread(str(sheet))
    assert image.shape[1] == 5 * 160 and image.shape[0] > 3 * 160   # 5 columns, 3 frames

    # Rerun: nothing rendered, files untouched.
    before = shard_state(out)
    again = pvit("generate", cfg)
    assert again.returncode == 0 and "0 rendered, 2 kept" in again.stderr
    assert shard_state(out) == before

    # More scenes: only the new shard renders.
    more = pvit("generate", cfg, "--scenes", 6)
    assert more.returncode == 0 and "1 rendered, 2 kept" in more.stderr, more.stderr[-1500:]
    after = shard_state(out)
    assert {k: after[k] for k in before} == before and "shard-000002.tar" in after

    # Same spec and seed in a fresh directory (other worker count): byte-identical shards
    # (the first one only, which keeps this serial run short).
    out2 = tmp_path / "ds2"
    fresh = pvit("generate", cfg, "--scenes", 2, "--out", out2, "--workers", 1)
    assert fresh.returncode == 0
    assert shard_state(out2)["shard-000000.tar"][1] == after["shard-000000.tar"][1]

    # A change that affects pixels renders everything again.
    spp = pvit("generate", cfg, "--scenes", 6, "--spp", 2, "--overwrite")
    assert spp.returncode == 0 and "3 rendered, 0 kept" in spp.stderr

    # verify names a corrupted shard and a missing one.
    target = out / "shard-000001.tar"
    data = bytearray(target.read_bytes())
    data[2000] ^= 0xFF
    target.write_bytes(bytes(data))
    (out / "shard-000002.tar").unlink()
    bad = pvit("verify", out)
    assert bad.returncode == 1
    assert "shard-000001.tar: sha256 does not match" in bad.stderr
    assert "shard-000002.tar: missing" in bad.stderr
    assert "shard-000000.tar" not in bad.stderr
    # ...and a rerun repairs exactly those two
    fixed = pvit("generate", cfg, "--scenes", 6, "--spp", 2)
    assert "2 rendered, 1 kept" in fixed.stderr and pvit("verify", out).returncode == 0


def test_crashing_worker_fails_naming_seeds_and_leaves_no_shard(tmp_path):
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out, scenes=2, scenes_per_shard=1, retries=1)
    from generation.config import GenerationConfig
    from generation.dataset.plan import plan
    jobs = plan(GenerationConfig(out=out, scenes=2, scenes_per_shard=1))
    bad_seed = jobs[1].seeds[0]
    env = {**os.environ, "PVIT_CRASH_ON_SEED": str(bad_seed)}
    result = pvit("generate", cfg, env=env)
    assert result.returncode == 1
    assert f"scene seeds [{bad_seed}]" in result.stderr and "shard-000001.tar" in result.stderr
    assert result.stderr.count("exited with code 3") >= 1
    assert (out / "shard-000000.tar").exists()          # the good shard is committed
    assert not (out / "shard-000001.tar").exists()
    assert not list(out.glob(".*partial"))
    assert [s["name"] for s in read_manifest(out)["shards"]] == ["shard-000000.tar"]


def _workers_of(proc):
    try:
        return [c for c in psutil.Process(proc.pid).children(recursive=True)
                if "generation.render.worker" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _wait_for_worker(proc, out, timeout=120):
    """The render workers of ``proc`` once one of them is rendering a shard (its log
    says which device it renders on): the CLI starts workers before their jobs exist
    (generation.render.warm_workers), and killing one of those only makes it start another."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        workers = _workers_of(proc)
        if workers and any("render device:" in log.read_text(errors="replace")
                           for log in (out / "logs").glob("*.log")):
            return workers
        time.sleep(0.2)
    raise AssertionError("no render worker started")


def test_killed_worker_is_retried_and_killed_run_resumes_identically(tmp_path):
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out, scenes=3, scenes_per_shard=1, workers=1,
                       retries=2)
    # 1. kill -9 a render worker: Prefect retries the task and the run completes.
    proc = subprocess.Popen([*PVIT, "generate", str(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_worker(proc, out)[0].kill()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "exited with code -9" in err and "Retry 1/2 will start" in err
    assert pvit("verify", out).returncode == 0
    reference = {k: v[1] for k, v in shard_state(out).items()}
    assert len(reference) == 3

    # 2. kill the whole command mid-run, then rerun: same bytes as uninterrupted.
    out2 = tmp_path / "ds2"
    proc = subprocess.Popen([*PVIT, "generate", str(cfg), "--out", str(out2)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out2 / "shard-000001.tar").exists():
        time.sleep(0.2)
    _wait_for_worker(proc, out2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pvit("verify", out2).returncode in (0, 1)   # whatever is listed is intact
    rerun = pvit("generate", cfg, "--out", out2)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    assert not list(out2.glob(".*partial"))
    assert {k: v[1] for k, v in shard_state(out2).items()} == reference
    assert pvit("verify", out2).returncode == 0
