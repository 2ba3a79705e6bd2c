"""The whole pipeline on a cluster with no shared filesystem, on one machine (issue 25,
item 9), as docs/deployment.md ("A cluster on one machine, step by step") walks a user
through it:

- a moto S3 server (``tests/moto_s3.py``) is the only storage the "machines" share;
- a real ``prefect server start`` (``tests/flows/prefect_deployment.py``);
- ``dask scheduler`` and two ``dask worker`` processes (one thread each) on 127.0.0.1,
  each started from its own empty directory with its own TMPDIR, HOME and PREFECT_HOME
  and, where the machine allows ``unshare --mount --map-root-user``, its own mount
  namespace in which the client's directory and the other worker's are hidden under an
  empty tmpfs: a worker cannot read what the client (or the other worker) wrote;
- ``pvit pipeline`` at tiny size with every stage's ``out`` on the bucket, rendering
  through the scheduler.

Then: everything is in the bucket and ``pvit verify`` passes; nothing but scratch is
left on local disk; a rerun computes nothing and its pipeline run ends Cached on the
server; a second dataset of the same spec, whose Dask worker is killed (kill -9, the
whole process tree, as a machine dies) mid-render, comes out byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from moto_s3 import keys, running_s3
from pvit_cli import PVIT

pytestmark = [pytest.mark.slow, pytest.mark.blender]

BUCKET = "pvit-cluster"
DATA = f"s3://{BUCKET}/data/synth"
KILLED = f"s3://{BUCKET}/data/synth-killed"
RUNS = f"s3://{BUCKET}/runs"
DASK = str(Path(sys.executable).with_name("dask"))
START_S = 120
TRAIN = dict(model="pvit_test", num_frames=2, img_size=32, label_size=16, pose_slots=4,
             num_workers=0, log_every=1, batch_size=2, epochs=1, lr=1e-3)
# Files of a dataset or a run: none of them may be left on a machine's disk.
PRODUCTS = (".tar", ".pt", ".safetensors", "manifest.json", ".stage.json", "metrics.jsonl",
            "summary.json", "loss_curve.png", "contact_sheet.png", ".pvit-run")
# What each machine may hold after a run, by path relative to it, and why; anything else
# (and any of PRODUCTS anywhere) is a leak. The working directories stay empty.
CLIENT_KEEPS = ("tmp/pvit-mirror-",       # the node's copy of the toy action set (OpenCV)
                "home/.prefect/storage/",  # Prefect's persisted flow results (small JSON)
                "home/.cache/matplotlib/")  # matplotlib's font cache (the loss curve)
WORKER_KEEPS = ("tmp/pvit-logs/",          # render worker logs stay on the render node
                "tmp/dask-scratch-space/",  # dask's worker directory (--local-directory)
                "home/.config/blender/")   # Blender's extension cache


def experiment(path: Path, dask_address: str) -> Path:
    path.write_text(yaml.safe_dump({
        "generation": {"out": DATA, "scenes": 4, "scenes_per_shard": 2, "workers": 2,
                       "retries": 1, "task_runner": "dask", "dask_address": dask_address,
                       "scene": {"resolution": 32, "frames": 2, "spp": 4, "min_objects": 3,
                                 "max_objects": 4}},
        "toy_actions": {"out": f"{RUNS}/toy", "clips_per_class": 3, "val_per_class": 1,
                        "size": 32, "frames": 8},
        "pretrain": dict(TRAIN, out=f"{RUNS}/pre"),
        "finetune": dict(TRAIN, out=f"{RUNS}/fine", frame_stride=3),
        "evaluate": {"spatial_crops": 1, "temporal_clips": 1, "batch_size": 4,
                     "num_workers": 0, "out": f"{RUNS}/eval/eval_validation.json"},
    }))
    return path


class Machine:
    """A "machine": an empty working directory, TMPDIR and HOME of its own."""

    def __init__(self, root: Path, name: str):
        self.root = root / name
        self.cwd, self.tmp, self.home = (self.root / d for d in ("cwd", "tmp", "home"))
        for d in (self.cwd, self.tmp, self.home):
            d.mkdir(parents=True)

    def env(self, base: dict) -> dict:
        # nothing of the test process's own Prefect home or scratch leaks in
        env = {k: v for k, v in base.items()
               if not k.startswith(("PREFECT_HOME", "PVIT_", "PYTEST_")) and k != "TMPDIR"}
        return {**env, "TMPDIR": str(self.tmp), "HOME": str(self.home),
                "PREFECT_HOME": str(self.home / ".prefect")}

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def hiding_prefix(hidden: list[Path]) -> tuple[list[str], str | None]:
    """The command prefix that runs a process in a mount namespace of its own with
    ``hidden`` under empty tmpfs mounts, or ``[]`` and why not where the machine does not
    allow it (the test then runs without that part)."""
    if not shutil.which("unshare"):
        return [], "no unshare(1)"
    script = "".join(f'mount -t tmpfs -o size=1m pvit-hidden "{d}" && ' for d in hidden)
    prefix = ["unshare", "--mount", "--map-root-user", "sh", "-c", script + 'exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return [], f"unshare --mount not allowed: {probe.stderr.strip()[:200]}"
    return prefix, None


class Cluster:
    """Processes in their own process groups, each logging to a file, all stopped
    (with every descendant) by ``stop_all``."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], machine: Machine, env: dict) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(args, cwd=machine.cwd, env=env, stdout=sink,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-tail:]}"
                         for _, log in self.started)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """kill -9 of ``proc``, its process group and every descendant (noted first: a
        render worker may run in a session of its own), as when its machine dies."""
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=10)

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):
            self.kill(proc)


def wait_for(what: str, ready, cluster: Cluster, timeout: float = START_S, poll=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(poll)
    pytest.fail(f"{what} not ready after {timeout:.0f}s:\n{cluster.logs()}")


def scheduler_address(scheduler_file: Path) -> str | None:
    try:
        return json.loads(scheduler_file.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def worker_count(address: str) -> int:
    from distributed import Client
    with Client(address, timeout=10) as client:
        return len(client.scheduler_info()["workers"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_server):
    # prefect_server: a real `prefect server start` (the suite's own when it runs one,
    # tests/flows/conftest.py), the "Prefect machine" every other one reports to
    root = tmp_path_factory.mktemp("cluster")
    client = Machine(root, "client")
    workers = [Machine(root, f"worker-{n}") for n in "ab"]
    scheduler = Machine(root, "scheduler")
    procs = Cluster(root)
    server_env = prefect_server
    with running_s3(BUCKET) as s3_env:
        base = {**s3_env, "PREFECT_API_URL": server_env["PREFECT_API_URL"],
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            scheduler_file = scheduler.root / "scheduler.json"
            procs.start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                        scheduler, scheduler.env(base))
            address = wait_for("dask scheduler", lambda: scheduler_address(scheduler_file),
                               procs)
            hidden = {}
            for worker in workers:
                others = [client.root, *(w.root for w in workers if w is not worker)]
                prefix, why_not = hiding_prefix(others)
                hidden[worker.root.name] = why_not or others
                procs.start(worker.root.name, [
                    *prefix, DASK, "worker", address, "--nthreads", "1", "--nworkers", "1",
                    "--no-dashboard", "--host", "127.0.0.1", "--name", worker.root.name,
                    "--local-directory", str(worker.tmp)], worker, worker.env(base))
            wait_for("2 dask workers", lambda: worker_count(address) == 2, procs)
            yield {"root": root, "client": client, "workers": workers, "procs": procs,
                   "address": address, "env": client.env(base), "hidden": hidden,
                   "api": server_env["PREFECT_API_URL"]}
        finally:
            procs.stop_all()


def pvit(cluster, *args) -> subprocess.CompletedProcess:
    client = cluster["client"]
    return subprocess.run([*PVIT, *map(str, args)], cwd=client.cwd, env=cluster["env"],
                          capture_output=True, text=True, timeout=600)


def check(result: subprocess.CompletedProcess, cluster) -> str:
    assert result.returncode == 0, (f"{result.args[3:]} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n"
                                    f"{cluster['procs'].logs()}")
    return result.stdout + result.stderr


def objects(url: str) -> dict[str, tuple]:
    """Every object under ``url`` with its ETag and time: a rewritten object has a new
    time even with the same bytes (the store's clock has whole seconds; a rerun takes
    several)."""
    from generation.dataset.storage import Location
    where = Location(url)
    where.fs.invalidate_cache()
    return {key[len(where.root) + 1:]: (info["ETag"], info["LastModified"])
            for key, info in where.fs.find(where.root, detail=True).items()}


def shard_bytes(url: str) -> dict[str, bytes]:
    from generation.dataset.storage import Location
    where = Location(url)
    return {name: where.fs.cat_file(f"{where.root}/{name}")
            for name in sorted(keys(url)) if name.startswith("shard-")}


def pipeline_runs(api: str, out: str) -> list[dict]:
    """The ``pipeline`` flow's top-level runs on dataset ``out``, oldest first, as the
    server's API (and so its UI) has them. (``generation.out`` is a ``Path``: the run's
    parameters show ``s3:/bucket/...``, hence the canonical form.)"""
    from generation.dataset.storage import canonical
    response = httpx.post(f"{api}/flow_runs/filter", timeout=30, json={
        "flows": {"name": {"any_": ["pipeline"]}}, "sort": "EXPECTED_START_TIME_ASC"})
    response.raise_for_status()
    return [r for r in response.json() if r["parent_task_run_id"] is None
            and canonical(r["parameters"]["config"]["generation"]["out"]) == out]


def leftovers(cluster, killed: str = "") -> dict[str, list[str]]:
    """Each machine's files outside what it may keep (``CLIENT_KEEPS``, ``WORKER_KEEPS``),
    and any dataset or run file (``PRODUCTS``) wherever it is; on the ``killed`` worker,
    its shard scratch too (its process could not remove it; the next render worker
    there sweeps it)."""
    found = {}
    machines = [(cluster["client"], CLIENT_KEEPS),
                *((worker, WORKER_KEEPS) for worker in cluster["workers"])]
    for machine, keeps in machines:
        names = [str(p.relative_to(machine.root)) for p in machine.files()]
        if machine.root.name == killed:
            names = [n for n in names if not n.startswith("tmp/pvit-shard-")]
        found[machine.root.name] = sorted(
            n for n in names if not n.startswith(keeps) or n.endswith(PRODUCTS)
            or "/manifest.journal/" in n)
    return {where: names for where, names in found.items() if names}


@pytest.fixture(scope="module")
def first_run(cluster):
    config = experiment(cluster["root"] / "exp.yaml", cluster["address"])
    started = time.monotonic()
    result = pvit(cluster, "pipeline", config)
    seconds = time.monotonic() - started
    output = check(result, cluster)
    return {"config": config, "output": output, "seconds": seconds, "objects": objects(
        f"s3://{BUCKET}")}


def test_the_pipeline_writes_every_stage_to_the_bucket_and_nothing_local(cluster, first_run):
    print(f"first pipeline run: {first_run['seconds']:.1f} s; hidden from workers: "
          f"{cluster['hidden']}")
    held = keys(f"s3://{BUCKET}")
    data = {k[len("data/synth/"):] for k in held if k.startswith("data/synth/")}
    assert {"shard-000000.tar", "shard-000001.tar", "manifest.json"} <= data
    assert not any(k.startswith(("manifest.journal/", ".render-records/", ".pvit.lock"))
                   for k in data), sorted(data)
    for run in ("pre", "fine"):
        assert {".stage.json", "summary.json", "metrics.jsonl", "config.yaml",
                "checkpoints/final.pt", "inference.safetensors"} <= keys(f"{RUNS}/{run}"), run
    assert {".stage.json", "set/.toy_actions", "set/list/train.txt"} <= keys(f"{RUNS}/toy")
    assert "checkpoints/evaluate/.stage.json" in keys(f"{RUNS}/fine")
    evaluation = json.loads(_read(f"{RUNS}/eval/eval_validation.json"))
    assert 0 <= evaluation["top1"] <= 100 and evaluation["checkpoint"] == \
        f"{RUNS}/fine/checkpoints/final.pt"
    # no noise from Prefect's exit against a real server (flows/cli.py main)
    assert "Still processing items" not in first_run["output"]
    # the summary names the copy where it is (a URL, not a Path's s3:/)
    assert f"result    {RUNS}/eval/eval_validation.json" in first_run["output"]

    verified = pvit(cluster, "verify", DATA)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"ok: {DATA} holds every planned shard" in verified.stdout + verified.stderr

    assert leftovers(cluster) == {}
    # the workers rendered (their logs are on their own disks), the client did not
    for worker in cluster["workers"]:
        assert list((worker.tmp / "pvit-logs").rglob("*.log")), worker.root.name
    assert not (cluster["client"].tmp / "pvit-logs").exists()


def test_a_worker_cannot_see_the_clients_files(cluster, first_run):
    """Asked through Dask, as a task would: each worker's view of the client's directory
    (and of the other worker's) is an empty tmpfs, where the machine allows it."""
    from distributed import Client

    client, workers = cluster["client"], cluster["workers"]
    reasons = {why for why in cluster["hidden"].values() if isinstance(why, str)}
    if reasons:
        pytest.skip(f"workers share the client's mounts here: {reasons.pop()}")
    assert sorted(os.listdir(client.root)) == ["cwd", "home", "tmp"]
    assert os.listdir(client.tmp)                 # the client has files there (the mirror)
    with Client(cluster["address"], timeout=30) as dask:
        seen = dask.run(lambda paths: {p: os.listdir(p) for p in paths},
                        [str(client.root), *(str(w.root) for w in workers)])
    assert len(seen) == 2
    for view in seen.values():
        own = [p for p, names in view.items() if names]
        assert len(own) == 1 and own[0] != str(client.root), view   # only its own


def _read(url: str) -> bytes:
    from training import files
    return files.read_bytes(url)


def test_a_rerun_computes_nothing_and_ends_cached(cluster, first_run):
    started = time.monotonic()
    again = pvit(cluster, "pipeline", first_run["config"])
    print(f"cached pipeline rerun: {time.monotonic() - started:.1f} s")
    output = check(again, cluster)
    assert "up to date" in output
    # no object written, rewritten or removed: nothing rendered, trained or evaluated
    assert objects(f"s3://{BUCKET}") == first_run["objects"]
    runs = pipeline_runs(cluster["api"], DATA)
    assert [r["state"]["name"] for r in runs[-2:]] == ["Completed", "Cached"], \
        [(r["name"], r["state"]) for r in runs]
    assert leftovers(cluster) == {}


def test_a_killed_worker_still_gives_a_byte_identical_dataset(cluster, first_run):
    procs, workers = cluster["procs"], cluster["workers"]
    client = cluster["client"]
    proc = subprocess.Popen([*PVIT, "generate", str(first_run["config"]), "--out", KILLED],
                            cwd=client.cwd, env=cluster["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # a shard's render has started on a worker once its scratch directory exists
        def rendering():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"generate ended before any render:\n{out}\n{err[-5000:]}")
            return [w for w in workers if list(w.tmp.glob("pvit-shard-*"))]
        victim = wait_for("a render", rendering, procs, poll=0.02)[0]
        victim_proc = next(p for p, log in procs.started if log.stem == victim.root.name)
        procs.kill(victim_proc)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            Cluster.kill(proc)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}\n{procs.logs()}"
    # it died mid-shard: the shard's scratch, which its process removes once the shard is
    # uploaded or failed, is still there (the next render worker's sweep removes it)
    assert list(victim.tmp.glob("pvit-shard-*")), sorted(p.name for p in victim.tmp.iterdir())
    assert leftovers(cluster, killed=victim.root.name) == {}
    assert shard_bytes(KILLED) == shard_bytes(DATA)
    assert len(shard_bytes(KILLED)) == 2
    verified = pvit(cluster, "verify", KILLED)
    assert verified.returncode == 0, verified.stdout + verified.stderr
