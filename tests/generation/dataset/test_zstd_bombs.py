"""Crafted shards of under 1 MB whose zstd members expand to gigabytes (issue 24: a 51 KB
shard made `pvit verify` use 2.1 GB; three bombed members in 160 KB, 6.2 GB). Each
reader runs in a subprocess whose address space is capped at its own peak on a clean
dataset plus 300 MB: it must stop with one line naming the shard and the member, never
a MemoryError or a kill."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from pvit_cli import REPO

from generation.dataset import shard_format as sf
from generation.dataset.manifest import MANIFEST_NAME, new_manifest, sha256_file, write_json_atomic
from training.drawn_clips import make_clip

FRAMES, SIZE = 2, 16
HEADROOM = 300 << 20      # what a crafted shard may cost beyond a clean one
GIB2 = 2 << 30

# Runs one reader: `verify DIR`, `show DIR --out PNG` (the CLI) or `train SHARD`
# (training's webdataset pipeline, clip dicts), under RLIMIT_AS (argv[1], 0: none), and
# writes its peak address space (VmPeak) to argv[2].
RUNNER = r"""
import atexit, resource, runpy, sys
limit, peak_file, what, *args = sys.argv[1:]
if int(limit):
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))

def peak():
    status = open("/proc/self/status").read().split("VmPeak:")[1].split()[0]
    open(peak_file, "w").write(str(int(status) * 1024))

atexit.register(peak)
if what == "train":
    from generation.dataset.storage import shard_url
    from training.synthetic_data import ShardDecodeError, synthetic_dataset

    try:
        for clip in synthetic_dataset([shard_url(args[0])], None, seed=0, shuffle_buffer=4,
                                      split_by_node=False):
            del clip
    except ShardDecodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
else:
    sys.argv = ["pvit", what, *args]
    runpy.run_module("flows.cli", run_name="__main__")
"""


def npy_header(dtype, shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def bomb(dtype, shape) -> bytes:
    """One zstd frame (checksum and content size in its header, as the writer's) of a
    .npy of zeros: its header is what the array's dtype and shape make it."""
    header = npy_header(dtype, shape)
    left = int(np.prod(shape)) * np.dtype(dtype).itemsize
    cobj = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj(
        size=len(header) + left)
    out, zeros = [cobj.compress(header)], bytes(1 << 24)
    while left:
        out.append(cobj.compress(zeros[:min(left, len(zeros))]))
        left -= min(left, len(zeros))
    out.append(cobj.flush())
    return b"".join(out)


def frames_of(total, *pixel_shape, itemsize=1) -> tuple:
    """A shape (T, *pixel_shape) of about ``total`` bytes."""
    return (total // (int(np.prod(pixel_shape)) * itemsize), *pixel_shape)


def dataset(directory, members: dict) -> str:
    """A dataset of one shard holding one drawn clip whose members ``members`` replaces,
    with a manifest as `pvit generate` writes it (format 2, the spec's frames and size,
    the shard's sha256): only the shard's contents are crafted."""
    directory.mkdir()
    sample = sf.encode_clip(make_clip("scene0000000", seed=0, frames=FRAMES, size=SIZE))
    sample.update(members)
    sf.write_samples(directory / "shard-000000.tar", [sample])
    manifest = new_manifest({"frames": FRAMES, "resolution": SIZE, "max_objects": 4},
                            "spec-hash", list(sf.CLASSES),
                            {"scenes": 1, "scenes_per_shard": 1, "seed": 0})
    manifest["shards"].append({"name": "shard-000000.tar", "samples": 1,
                               "keys": ["scene0000000"],
                               "sha256": sha256_file(directory / "shard-000000.tar")})
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    assert (directory / "shard-000000.tar").stat().st_size <= 1 << 20
    return str(directory)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bombs")
    return {
        "clean": dataset(root / "clean", {}),
        # one member of 2 GiB (the 51 KB shard)
        "one": dataset(root / "one", {"rgb.npy.zst": bomb(np.uint8, frames_of(
            GIB2, 512, 512, 3))}),
        # three of them (the 160 KB shard)
        "three": dataset(root / "three", {
            "rgb.npy.zst": bomb(np.uint8, frames_of(GIB2, 512, 512, 3)),
            "depth.npy.zst": bomb(np.float32, frames_of(GIB2, 512, 512, itemsize=4)),
            "normal.npy.zst": bomb(np.float32, frames_of(GIB2, 512, 512, 3, itemsize=4))}),
        # members that each fit one clip's budget, but not together
        "budget": dataset(root / "budget", {
            "rgb.npy.zst": bomb(np.uint8, frames_of(sf.DEFAULT_CLIP_BYTES - (4 << 20),
                                                    512, 512, 3)),
            "depth.npy.zst": bomb(np.float32, frames_of(sf.DEFAULT_CLIP_BYTES - (4 << 20),
                                                        512, 512, itemsize=4))}),
    }


def run(what, location, limit, tmp_path):
    """(returncode, stderr, peak address space in bytes) of one reader."""
    peak = tmp_path / f"peak-{what}-{os.path.basename(location)}"
    args = {"verify": [location],
            "show": [location, "--out", str(tmp_path / "sheet.png")],
            "train": [os.path.join(location, "shard-000000.tar")]}[what]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(limit), str(peak), what, *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, done.stderr, int(peak.read_text()) if peak.exists() else None


EXIT = {"verify": 1, "show": 1, "train": 3}   # show: 1 for a bad shard (2: bad input)


@pytest.mark.parametrize("what", ["verify", pytest.param("show", marks=pytest.mark.slow),
                                  pytest.param("train", marks=pytest.mark.slow)])
def test_a_zstd_bomb_is_one_line_within_300_mb_of_a_clean_read(what, datasets, tmp_path):
    code, err, clean_peak = run(what, datasets["clean"], 0, tmp_path)
    assert code == 0 and clean_peak, err
    limit = clean_peak + HEADROOM
    code, err, _ = run(what, datasets["clean"], limit, tmp_path)   # the cap itself is fine
    assert code == 0, err
    for name in ("one", "three", "budget"):
        code, err, _ = run(what, datasets[name], limit, tmp_path)
        assert code == EXIT[what], f"{name}: exit {code}: {err[-3000:]}"
        assert "Traceback" not in err and "MemoryError" not in err, f"{name}: {err[-3000:]}"
        lines = err.strip().splitlines()
        line = lines[0]
        assert line.startswith("bad: shard-000000.tar: " if what == "verify" else "error: ")
        assert "shard-000000.tar" in line and "sample 'scene0000000'" in line, line
        if what == "verify":   # the spec's clip (2 frames of 16x16) is far smaller
            assert "rgb.npy.zst: holds " in line and "; a clip may hold " in line, line
            assert "the largest clip of the manifest's spec: 2 frames of 16x16 px" in line
        elif name == "budget":  # rgb fits the default budget; depth does not, with it
            assert "depth.npy.zst: holds 62,914,688 bytes decompressed; a clip may hold " \
                   "4,194,176 bytes are left of the 67,108,864 " in line, line
        else:
            assert "rgb.npy.zst: holds 2,1" in line and "; a clip may hold 67,108,864 " \
                   "bytes (100x the " in line, line
        if what != "verify":
            assert len(lines) == 1, err
