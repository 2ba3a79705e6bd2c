"""Datasets on an object store, against a real S3 API server on 127.0.0.1 (moto's server
mode, started and stopped here, as the s3fs project tests itself): the storage module,
the manifest journal, the dataset lock, the rerun's keep check, ``pvit verify`` on a
bucket, and (slow, real Blender) the whole chain through the CLI."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from pvit_cli import REPO, TINY_SCENE, pvit

from generation.config import GenerationConfig
from generation.dataset import plan as dataset
from generation.dataset.lock import LockError, acquire, release
from generation.dataset.manifest import (
    JOURNAL_PREFIX,
    MANIFEST_NAME,
    append_journal,
    compact,
    journal_exists,
    new_manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from generation.dataset.shard_format import CLASSES, write_shard
from generation.dataset.storage import Location, WriteError, filesystem
from training.drawn_clips import make_clip

BUCKET = "pvit-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free port of 127.0.0.1, with a bucket; the environment that
    points botocore (here and in subprocesses) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from generation.dataset import storage
    storage._filesystems.clear()
    filesystem("s3").clear_instance_cache()
    storage._filesystems.clear()
    filesystem("s3").mkdir(BUCKET)
    try:
        yield {**os.environ, **env}
    finally:
        storage._filesystems.clear()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def prefix(s3_env, request):
    """A fresh ``s3://`` prefix per test."""
    return f"s3://{BUCKET}/{request.node.name[:40].replace('[', '-').replace(']', '')}"


def test_writes_are_whole_objects_listed_with_size_and_etag(prefix, tmp_path):
    where = Location(prefix)
    where.makedirs()
    where.write_bytes("a.json", b"one")
    where.write_bytes("sub/b.json", b"two")
    assert where.read_bytes("a.json") == b"one"
    listing = where.listing()
    assert set(listing) == {"a.json"}                    # files directly under it only
    assert listing["a.json"].size == 3 and listing["a.json"].etag
    assert set(where.listing("sub")) == {"b.json"}
    before = listing["a.json"].etag
    where.write_bytes("a.json", b"uno")                  # same size, new bytes: new ETag
    after = where.meta("a.json")
    assert after.size == 3 and after.etag != before

    local = tmp_path / "shard.tar"
    local.write_bytes(b"x" * 10_000)
    meta = where.upload(local, "shard-000000.tar")
    assert meta.size == 10_000 and where.read_bytes("shard-000000.tar") == local.read_bytes()
    where.delete("a.json")
    assert where.meta("a.json") is None and not where.exists("a.json")
    where.delete("a.json")                               # gone already: no error


def test_a_write_that_fails_names_the_object_and_leaves_nothing(s3_env, tmp_path):
    where = Location("s3://no-such-bucket/ds")
    with pytest.raises(WriteError) as info:
        where.makedirs()
    assert "no such bucket 'no-such-bucket'" in str(info.value)
    with pytest.raises(WriteError) as info:
        where.write_bytes("manifest.json", b"{}")
    assert str(info.value).startswith("cannot write s3://no-such-bucket/ds/manifest.json")
    assert "\n" not in str(info.value)


def test_an_endpoint_that_refuses_connections_is_named_not_a_missing_bucket(tmp_path):
    # issue 24: generate said "no such bucket" when the endpoint was down
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
           "PVIT_STORE_RETRY_S": "1"}   # retried for 1 s, then one line
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"generation": {"scene": TINY_SCENE}}))
    result = pvit("generate", config, "--out", f"s3://{BUCKET}/ds", env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # one notice while it retries, then the error's one line (issue 25: no traceback)
    *notices, error = lines
    assert len(notices) == 1 and notices[0].endswith("retrying for up to 1 s"), lines
    assert error.startswith("error: ") and "cannot reach the store" in error, lines
    assert "Could not connect to the endpoint URL" in error and "no such bucket" not in error
    assert "(retried for 1 s, PVIT_STORE_RETRY_S)" in error
    # a reader too: the outage is named (exit 1), not read as "no manifest"
    show = pvit("show", f"s3://{BUCKET}/ds", "--out", tmp_path / "s.png", env=env)
    *notices, error = [line for line in show.stderr.splitlines() if line.strip()]
    assert show.returncode == 1 and len(notices) == 1, show.stderr[-2000:]
    assert error.startswith(f"error: s3://{BUCKET}/ds: cannot reach the store"), error


def test_exclusive_create_refuses_the_second_writer(prefix):
    where = Location(prefix)
    assert where.create_bytes("lock", b"first")
    assert not where.create_bytes("lock", b"second")
    assert where.read_bytes("lock") == b"first"


def test_the_journal_is_one_object_per_commit_folded_by_readers_and_compaction(prefix):
    manifest = new_manifest({"frames": 2}, "h1", list(CLASSES), {"scenes": 4,
                                                                 "scenes_per_shard": 2})
    write_manifest(prefix, manifest)
    append_journal(prefix, "h1", {"name": "shard-000001.tar", "samples": 2})
    append_journal(prefix, "h1", {"name": "shard-000000.tar", "samples": 2})
    append_journal(prefix, "other", {"name": "shard-000009.tar", "samples": 2})  # not ours
    assert len(Location(prefix).listing(JOURNAL_PREFIX)) == 3
    folded = read_manifest(prefix)
    assert [s["name"] for s in folded["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert json.loads(Location(prefix).read_bytes(MANIFEST_NAME))["shards"] == []
    compact(prefix, manifest)
    assert not journal_exists(prefix)
    stored = json.loads(Location(prefix).read_bytes(MANIFEST_NAME))
    assert [s["name"] for s in stored["shards"]] == ["shard-000000.tar", "shard-000001.tar"]


HOLD = """
import sys, time
from generation.dataset.lock import acquire
acquire(sys.argv[1], owner="holder")
print("held", flush=True)
time.sleep(60)
"""


def test_the_lock_object_refuses_a_second_writer_and_a_dead_ones_is_recovered(prefix, s3_env):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, prefix], cwd=REPO, env=s3_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError) as info:
            acquire(prefix, owner="second")
        message = str(info.value)
        assert f"is being written by holder (pid {holder.pid}" in message
        assert "\n" not in message
        stored = json.loads(Location(prefix).read_bytes(".pvit.lock"))
        assert {"owner", "host", "pid", "started"} <= set(stored)
    finally:
        holder.kill()
        holder.wait()
    warnings = []
    acquire(prefix, owner="third", warn=warnings.append)      # its pid is gone: stale
    assert len(warnings) == 1 and "took over the stale lock of holder" in warnings[0]
    assert json.loads(Location(prefix).read_bytes(".pvit.lock"))["owner"] == "third"
    release(prefix)
    assert not Location(prefix).exists(".pvit.lock")


def _tiny_config(prefix, scenes=4):
    return GenerationConfig(out=prefix, scenes=scenes, scenes_per_shard=2,
                            scene={**TINY_SCENE, "frames": 2, "resolution": 16})


def _commit_drawn_shards(cfg, tmp_path):
    """What render tasks do for ``cfg`` (on an object store), with drawn clips: each
    shard written locally, uploaded, then committed to the journal."""
    manifest, todo, done = dataset.prepare(cfg)
    where = Location(cfg.out)
    for job in todo:
        local = tmp_path / job.name
        write_shard(local, [make_clip(k, seed=s % 1000, frames=2, size=16)
                            for k, s in zip(job.keys, job.seeds, strict=True)])
        record = {"name": job.name, "sha256": sha256_file(local), "samples": len(job.seeds),
                  "seeds": job.seeds, "keys": job.keys, "bytes": local.stat().st_size}
        record["etag"] = where.upload(local, job.name).etag
        dataset.commit(cfg.out, manifest, record)
    dataset.compact(cfg.out, manifest)
    return todo, done


def test_a_rerun_keeps_objects_from_size_and_etag_and_renders_a_replaced_one(prefix, tmp_path):
    cfg = _tiny_config(prefix)
    todo, done = _commit_drawn_shards(cfg, tmp_path)
    assert len(todo) == 2 and not done
    manifest, todo, done = dataset.prepare(cfg)
    assert not todo and len(done) == 2
    assert all(s["etag"] for s in manifest["shards"])

    where = Location(prefix)
    data = bytearray(where.read_bytes("shard-000001.tar"))
    data[-2000] ^= 0xFF                                  # same size, other bytes
    where.write_bytes("shard-000001.tar", bytes(data))
    manifest, todo, done = dataset.prepare(cfg)
    assert [job.name for job in todo] == ["shard-000001.tar"]
    assert [job.name for job in done] == ["shard-000000.tar"]


def test_verify_on_a_bucket_names_the_corrupted_object(prefix, tmp_path, s3_env):
    cfg = _tiny_config(prefix)
    _commit_drawn_shards(cfg, tmp_path)
    ok = pvit("verify", prefix, env=s3_env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.startswith(f"ok: {prefix}")
    sheet = pvit("show", prefix, "--out", tmp_path / "sheet.png", "--sample", "scene0000003",
                 env=s3_env)
    assert sheet.returncode == 0 and (tmp_path / "sheet.png").stat().st_size > 0, sheet.stderr
    where = Location(prefix)
    where.write_bytes("shard-000000.tar", where.read_bytes("shard-000000.tar")[:3000])
    bad = pvit("verify", prefix, env=s3_env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert any(line.startswith("bad: shard-000000.tar: sha256 does not match") for line in lines)
    assert not any("shard-000001.tar" in line for line in lines), lines

    empty = pvit("verify", f"s3://{BUCKET}/nothing-here", env=s3_env)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
    assert "no manifest.json" in empty.stderr


def test_training_streams_the_listed_objects_of_a_bucket(prefix, tmp_path):
    from generation.dataset.index import DatasetError, open_dataset
    from training.synthetic_data import SceneTransform, synthetic_dataset

    cfg = _tiny_config(prefix)
    _commit_drawn_shards(cfg, tmp_path)
    where = Location(prefix)
    where.write_bytes("other.tar", where.read_bytes("shard-000000.tar"))   # unlisted copy
    warnings = []
    index = open_dataset(prefix, warn=warnings.append)
    assert index.urls == [f"{prefix}/shard-000000.tar", f"{prefix}/shard-000001.tar"]
    assert index.clips == 4 and len(warnings) == 1 and "other.tar" in warnings[0]
    transform = SceneTransform(num_frames=2, img_size=16, label_size=8, depth_max_m=10.0,
                               pose_slots=3, train=False)
    samples = list(synthetic_dataset(index.urls, transform, seed=0, shuffle_buffer=2,
                                     split_by_node=False))
    assert len(samples) == 4 and samples[0]["video"].shape == (3, 2, 16, 16)

    where.delete("shard-000001.tar")
    with pytest.raises(DatasetError, match="shard-000001.tar is listed in the manifest but"):
        open_dataset(prefix)


@pytest.mark.slow
@pytest.mark.blender
def test_generate_to_a_bucket_rerun_verify_and_pretrain_from_it(prefix, tmp_path, s3_env):
    """The chain through the real CLI: generate into s3:// -> a rerun renders nothing ->
    verify passes -> a corrupted object is named -> pretrain streams the bucket."""
    scene = {**TINY_SCENE, "resolution": 32, "frames": 2, "spp": 1}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "generation": {"out": prefix, "scenes": 2, "scenes_per_shard": 1, "workers": 2,
                       "retries": 0, "scene": scene},
        "pretrain": {"model": "pvit_test", "num_frames": 4, "img_size": 32,
                     "label_size": 16, "pose_slots": 3, "num_workers": 0, "batch_size": 2,
                     "epochs": 1, "out": str(tmp_path / "pre"), "synthetic": prefix}}))
    env = {**s3_env, "PVIT_SCRATCH": str(tmp_path / "scratch")}
    first = pvit("generate", config, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "(2 rendered, 0 kept)" in first.stderr
    where = Location(prefix)
    names = set(where.listing())
    assert {"manifest.json", "shard-000000.tar", "shard-000001.tar"} <= names
    assert not where.exists(".pvit.lock") and not where.listing(JOURNAL_PREFIX)
    assert not list((tmp_path / "scratch").glob("pvit-shard-*"))   # scratch cleaned up

    again = pvit("generate", config, env=env)
    assert again.returncode == 0 and "(0 rendered, 2 kept)" in again.stderr, again.stderr

    assert pvit("verify", prefix, env=env).returncode == 0
    pre = pvit("pretrain", config, env=env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert (tmp_path / "pre" / "checkpoints" / "final.pt").is_file()

    data = bytearray(where.read_bytes("shard-000001.tar"))
    data[len(data) // 2] ^= 0xFF
    where.write_bytes("shard-000001.tar", bytes(data))
    bad = pvit("verify", prefix, env=env)
    assert bad.returncode == 1, bad.stderr
    assert "bad: shard-000001.tar: sha256 does not match the manifest" in bad.stderr


def _lock_object(where, **holder):
    where.write_bytes(".pvit.lock", json.dumps(holder).encode())


def test_a_lease_of_another_host_is_refused_while_fresh_and_taken_over_once_expired(prefix):
    # issue 25: the object-store lock had no expiry; another host's needed --break-lock
    where = Location(prefix)
    where.makedirs()
    other = {"owner": "far run", "host": "render-node-7", "pid": 4242, "started": "then",
             "token": "far"}
    _lock_object(where, **other, lease_s=60)
    with pytest.raises(LockError, match=r"far run \(pid 4242 on host render-node-7.*lease "
                                        r"fresh.*--break-lock"):
        acquire(prefix)
    _lock_object(where, **other, lease_s=1)
    time.sleep(2.2)             # the store's last-modified time has 1 s resolution
    warnings = []
    acquire(prefix, warn=warnings.append)
    try:
        assert len(warnings) == 1 and "took over the stale lock of far run" in warnings[0]
        assert "lease expired" in warnings[0]
        assert json.loads(where.read_bytes(".pvit.lock"))["pid"] == os.getpid()
    finally:
        release(prefix)
    assert not where.exists(".pvit.lock")


def test_a_renewed_lease_outlives_its_length_and_a_killed_holder_s_expires(prefix, s3_env):
    """The holder (in another pid namespace where the machine allows it: the same host
    name, pids that mean nothing here, as with docker --network host) renews a 2 s lease;
    after 5 s a second writer is still refused; once the holder is killed its lease
    expires and is taken over."""
    from test_lock_holder import new_pid_namespace, start_holder
    try:
        namespace = new_pid_namespace()
    except pytest.skip.Exception:
        namespace = []          # the lease alone, the holder in this namespace
    env = {**s3_env, "PVIT_LOCK_LEASE_S": "2"}
    holder = start_holder(prefix, namespace, env=env)
    try:
        first = json.loads(Location(prefix).read_bytes(".pvit.lock"))
        time.sleep(5)
        with pytest.raises(LockError, match="being written by holder .*lease fresh"):
            acquire(prefix, owner="second")
        renewed = json.loads(Location(prefix).read_bytes(".pvit.lock"))
        assert renewed["token"] == first["token"] and renewed["renewed"] > first["renewed"]
    finally:
        holder.kill()
        holder.wait()
    warnings = []
    deadline = time.monotonic() + 10
    while True:
        try:
            acquire(prefix, owner="third", warn=warnings.append)
            break
        except LockError:
            assert namespace, "a dead holder of this namespace is recovered at once"
            assert time.monotonic() < deadline
            time.sleep(0.5)
    try:
        why = "lease expired" if namespace else "no longer running"
        assert len(warnings) == 1 and why in warnings[0], warnings
    finally:
        release(prefix)


def test_a_render_machine_without_the_asset_set_fetches_the_runs_upload(prefix, tmp_path,
                                                                        monkeypatch):
    """Assets by content on a bucket: the run uploads its set once next to the dataset;
    a machine that lacks it (no hint, no built-in copy) fetches it into its cache, checks
    its bytes, and uses the cached copy from then on."""
    import shutil

    from generation.dataset import asset_store
    from generation.render.assets import DEFAULT_MANIFEST

    mine = tmp_path / "mine"
    shutil.copytree(DEFAULT_MANIFEST.parent, mine)
    manifest = mine / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"description": "', '"description": "x'))
    name = asset_store.publish(prefix, manifest)
    assert Location(prefix).exists(f".assets/{name.removeprefix('sha256:')}/manifest.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.rmtree(mine)
    found = asset_store.locate(name, hint=str(manifest), dataset=prefix)
    assert found.is_relative_to(tmp_path / "cache") and asset_store.digest(found) == name
    assert asset_store.locate(name, dataset=prefix) == found
