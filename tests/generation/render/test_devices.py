"""Render device selection (generation/render/devices.py): auto/cpu/cuda/optix, GPU pinning.

This machine has no GPU: ``auto`` must resolve to CPU, ``cuda``/``optix`` must be
refused before rendering, and the pinning is checked through the real worker's
environment (its log names the CUDA_VISIBLE_DEVICES it got)."""

import json

import pytest
from pvit_cli import pvit, write_config

from generation.render import devices

# What these tests expect of "this machine" holds only where no NVIDIA GPU is visible.
no_gpu_here = pytest.mark.skipif(bool(devices.visible_gpus()), reason="a GPU is visible")


def test_auto_prefers_optix_then_cuda_then_cpu():
    assert devices.resolve("auto", {"optix": [], "cuda": []}) == "cpu"
    assert devices.resolve("auto", {}) == "cpu"
    assert devices.resolve("auto", {"optix": [], "cuda": ["H200"]}) == "cuda"
    assert devices.resolve("auto", {"optix": ["H200"], "cuda": ["H200"]}) == "optix"
    assert devices.resolve("cuda", {"cuda": ["H200"]}) == "cuda"
    assert devices.resolve("cpu", {}) == "cpu"


@pytest.mark.parametrize("kind,name", [("cuda", "CUDA"), ("optix", "OptiX")])
def test_missing_gpu_kind_is_one_line_naming_it(kind, name):
    with pytest.raises(devices.DeviceError) as err:
        devices.resolve(kind, {"optix": [], "cuda": []} if kind == "cuda" else {"cuda": ["x"]})
    message = str(err.value)
    assert "\n" not in message and kind in message and f"no {name} device" in message


def test_visible_gpus_follow_cuda_visible_devices():
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_workers_are_pinned_to_one_gpu_each_shared_workers_per_gpu():
    gpus = ["0", "1"]
    pins = [devices.worker_env("cuda", i, 1, gpus)["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert pins == ["0", "1", "0", "1"]
    pins = [devices.worker_env("auto", i, 2, gpus)["CUDA_VISIBLE_DEVICES"] for i in range(6)]
    assert pins == ["0", "0", "1", "1", "0", "0"]
    # cpu (or no GPU at all) hides every GPU from the worker
    assert devices.worker_env("cpu", 1, 1, gpus) == {"CUDA_VISIBLE_DEVICES": ""}
    assert devices.worker_env("auto", 1, 1, []) == {"CUDA_VISIBLE_DEVICES": ""}


@no_gpu_here
@pytest.mark.blender
def test_blender_here_sees_no_gpu_so_auto_is_cpu():
    found = devices.probe()          # real Cycles preferences, in this process
    assert found == {"optix": [], "cuda": []}
    assert devices.preflight("auto") == "cpu"
    assert devices.preflight("cpu") == "cpu"
    # even with (made-up) GPU ids visible, Blender is asked and finds no CUDA device
    assert devices.preflight("auto", gpus=["0"]) == "cpu"
    with pytest.raises(devices.DeviceError, match="cuda requested"):
        devices.preflight("cuda", gpus=["0"])


@no_gpu_here
@pytest.mark.parametrize("flag", ["cuda", "optix"])
def test_generate_with_a_missing_gpu_exits_2_before_rendering(tmp_path, flag):
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out, scenes=1, scenes_per_shard=1)
    proc = pvit("generate", cfg, "--device", flag)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: generation.device: " + flag), lines
    assert not out.exists()          # refused before the dataset was touched


def test_unknown_device_exits_2(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "ds", scenes=1)
    proc = pvit("generate", cfg, "--device", "tpu")
    assert proc.returncode == 2 and "generation.device" in proc.stderr


def _worker_pins(out):
    logs = sorted((out / "logs").glob("*.log"))
    return [next(line for line in log.read_text().splitlines()
                 if line.startswith("render device:")) for log in logs]


@pytest.mark.slow
@pytest.mark.blender
def test_cpu_device_renders_and_records_the_device(tmp_path):
    from generation.config import GenerationConfig
    from generation.dataset.plan import plan
    from generation.render.supervisor import render_shard

    cfg = GenerationConfig.model_validate({
        "out": str(tmp_path), "scenes": 1, "scenes_per_shard": 1, "device": "cpu",
        "scene": {"resolution": 32, "frames": 2, "spp": 2, "min_objects": 3,
                  "max_objects": 3}})
    record = render_shard(plan(cfg)[0], tmp_path, threads=1, device="cpu")
    assert record["device"] == "cpu" and (tmp_path / record["name"]).is_file()
    assert _worker_pins(tmp_path) == [
        "render device: cpu (requested cpu; CUDA_VISIBLE_DEVICES=)"]


@no_gpu_here
@pytest.mark.slow
@pytest.mark.blender
def test_auto_pins_each_worker_to_one_visible_gpu_and_falls_back_to_cpu(tmp_path):
    """Two (made-up) GPU ids visible: each shard's worker sees exactly one of them;
    Blender finds no CUDA device behind them, so auto renders on the CPU and says so."""
    import os
    out = tmp_path / "ds"
    cfg = write_config(tmp_path / "c.yaml", out, scenes=2, scenes_per_shard=1, workers=1,
                       scene={"resolution": 32, "frames": 2, "spp": 2, "max_objects": 3})
    proc = pvit("generate", cfg, "--workers-per-gpu", "1",
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "5,7"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "render device: cpu (auto)" in proc.stderr
    assert _worker_pins(out) == [
        "render device: cpu (requested auto; CUDA_VISIBLE_DEVICES=5)",
        "render device: cpu (requested auto; CUDA_VISIBLE_DEVICES=7)"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["device"] for s in manifest["shards"]] == ["cpu", "cpu"]
