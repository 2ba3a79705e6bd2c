"""Bookkeeping at scale: what a run costs per committed shard, and what a rerun with
nothing changed costs, at 1,000 and 10,000 shards. Measures the manifest, journal and
keep decision (``generation.dataset.plan.prepare`` / ``commit`` / ``compact``), not rendering:

- one tiny shard (1 drawn clip, 2 frames of 16 px) is written with the real writer
  (``generation.dataset.shard_format.write_shard`` via ``training.drawn_clips``) and copied
  under every planned name (its clip keys are shard 0's: a bookkeeping benchmark,
  not a dataset ``pvit verify`` would pass);
- ``commit_s_per_shard_N``: a first ``prepare`` on the empty directory plans N
  shards of one clip; then for each shard the file is copied into place (not timed)
  and ``dataset.commit`` records it (timed): the mean over the N commits. Also the
  journal bytes each commit appends (flat = O(1)) and the end of run ``compact``;
- ``rerun_s_N``: ``prepare`` again with the same config (nothing to render), in the
  same warm process (imports done: a cold ``pvit`` process adds its own start-up); the
  median of 3 (``rerun_s_min_N`` the fastest);
- ``rerun_bytes_read_10k``: bytes read from shard files during that ``prepare``,
  counted by wrapping every way Python code here opens a file (``builtins.open``,
  ``io.open``, ``os.open``, ``tarfile``'s ``bltn_open``): opens of a ``shard-*.tar``
  are counted and reads through the returned file objects summed. As a cross-check,
  ``rerun_rchar_10k`` is ``rchar`` of ``/proc/self/io`` over the same call (every
  byte any read syscall of this process returned: manifest, config, code), to
  compare with the dataset's ``dataset_bytes_10k``. (``read_bytes`` of /proc is not
  used: the shards were just written, so they are in the page cache and would show 0
  whether read or not.)
- with ``--cli``, also the whole ``pvit generate`` command on the 10k dataset
  (``cli_rerun_s_10k``: Python start-up, Prefect's temporary server, the flow run,
  its artifacts).

The last line is one JSON object.

    .venv/bin/python benchmarks/scale.py [--sizes 1000 10000] [--cli]
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENE = {"resolution": 16, "frames": 2}


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


class _Counting:
    """A file object that adds what is read through it to ``counter``."""

    def __init__(self, f, counter: dict):
        self._f, self._counter = f, counter

    def read(self, *args):
        data = self._f.read(*args)
        self._counter["bytes"] += len(data)
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._counter["bytes"] += n or 0
        return n

    def readline(self, *args):
        data = self._f.readline(*args)
        self._counter["bytes"] += len(data)
        return data

    def __iter__(self):
        for line in self._f:
            self._counter["bytes"] += len(line)
            yield line

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def count_shard_reads():
    """Counts opens of shard files and the bytes read through them (see the docstring)."""
    from generation.dataset.plan import SHARD_RE
    counter = {"opens": 0, "bytes": 0}
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open
    real_tar_open = tarfile.bltn_open

    def is_shard(file) -> bool:
        return isinstance(file, (str, bytes, os.PathLike)) and bool(
            SHARD_RE.fullmatch(os.path.basename(os.fsdecode(file))))

    def wrap(opener):
        def counting_open(file, *args, **kwargs):
            f = opener(file, *args, **kwargs)
            if is_shard(file):
                counter["opens"] += 1
                return _Counting(f, counter)
            return f
        return counting_open

    def counting_os_open(path, *args, **kwargs):
        if is_shard(path):
            counter["opens"] += 1    # raw descriptors: counted as opens (none expected)
        return real_os_open(path, *args, **kwargs)

    builtins.open = io.open = tarfile.bltn_open = wrap(real_open)
    os.open = counting_os_open
    try:
        yield counter
    finally:
        builtins.open, io.open, os.open = real_open, real_io_open, real_os_open
        tarfile.bltn_open = real_tar_open


def template_shard(directory: Path) -> Path:
    from generation.dataset.shard_format import write_shard
    from training.drawn_clips import make_clip
    path = directory / "template.tar"
    write_shard(path, [make_clip("scene0000000", seed=0, frames=SCENE["frames"],
                                 size=SCENE["resolution"])])
    return path


def measure(n: int, root: Path, template: Path) -> dict:
    from generation.config import GenerationConfig, SceneConfig
    from generation.dataset import plan as dataset
    from generation.dataset.manifest import JOURNAL_NAME, MANIFEST_NAME, sha256_file

    out = root / f"ds-{label(n)}"
    cfg = GenerationConfig(out=out, scenes=n, scenes_per_shard=1, scene=SceneConfig(**SCENE))
    digest, size = sha256_file(template), template.stat().st_size
    t0 = time.perf_counter()
    manifest, todo, done = dataset.prepare(cfg)
    first_prepare_s = time.perf_counter() - t0
    assert len(todo) == n and not done
    commit_s, written = [], []
    for job in todo:
        shutil.copyfile(template, out / job.name)
        record = {"name": job.name, "sha256": digest, "samples": len(job.seeds),
                  "seeds": job.seeds, "keys": job.keys, "bytes": size,
                  "worker_seconds": 0.0, "render_seconds": 0.0}
        t0 = time.perf_counter()
        written.append(dataset.commit(out, manifest, record))
        commit_s.append(time.perf_counter() - t0)
    journal_bytes = (out / JOURNAL_NAME).stat().st_size
    t0 = time.perf_counter()
    dataset.compact(out, manifest)
    compact_s = time.perf_counter() - t0

    rerun_runs = []
    for _ in range(3):    # the median of 3: other work shares these cores
        rchar0 = rchar()
        with count_shard_reads() as reads:
            t0 = time.perf_counter()
            _, todo, done = dataset.prepare(cfg)
            rerun_runs.append(time.perf_counter() - t0)
        rerun_rchar = rchar() - rchar0
        assert not todo and len(done) == n, (len(todo), len(done))
    rerun_s = sorted(rerun_runs)[1]
    tenth = max(1, n // 10)
    return {
        f"commit_s_per_shard_{label(n)}": round(sum(commit_s) / n, 6),
        f"commit_s_first_tenth_{label(n)}": round(sum(commit_s[:tenth]) / tenth, 6),
        f"commit_s_last_tenth_{label(n)}": round(sum(commit_s[-tenth:]) / tenth, 6),
        f"commit_bytes_written_max_{label(n)}": max(written),
        f"journal_bytes_{label(n)}": journal_bytes,
        f"compact_s_{label(n)}": round(compact_s, 3),
        f"manifest_bytes_{label(n)}": (out / MANIFEST_NAME).stat().st_size,
        f"first_prepare_s_{label(n)}": round(first_prepare_s, 3),
        f"rerun_s_{label(n)}": round(rerun_s, 3),
        f"rerun_s_min_{label(n)}": round(min(rerun_runs), 3),
        f"rerun_bytes_read_{label(n)}": reads["bytes"],
        f"rerun_shard_opens_{label(n)}": reads["opens"],
        f"rerun_rchar_{label(n)}": rerun_rchar,
        f"dataset_bytes_{label(n)}": n * size,
    }


def cli_rerun(n: int, root: Path) -> dict:
    """The whole ``pvit generate`` command on the dataset ``measure`` built."""
    import yaml
    config = root / "scale.yaml"
    config.write_text(yaml.safe_dump({"generation": {
        "out": str(root / f"ds-{label(n)}"), "scenes": n, "scenes_per_shard": 1,
        "scene": SCENE}}))
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "flows.cli", "generate", str(config)],
                            cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    assert result.returncode == 0 and f"0 rendered, {n} kept" in result.stderr, \
        result.stderr[-2000:]
    return {f"cli_rerun_s_{label(n)}": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--cli", action="store_true",
                        help="also time the whole `pvit generate` rerun on the largest size")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = template_shard(root)
        for n in args.sizes:
            figures.update(measure(n, root, template))
            print(json.dumps({k: v for k, v in figures.items() if k.endswith(label(n))}),
                  flush=True)
        if args.cli:
            figures.update(cli_rerun(max(args.sizes), root))
    small, large = label(min(args.sizes)), label(max(args.sizes))
    if small != large:
        figures["commit_ratio"] = round(figures[f"commit_s_per_shard_{large}"]
                                        / figures[f"commit_s_per_shard_{small}"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
