"""Two processes under torchrun on CPU (gloo): the real DDP path, end to end."""

import json
import socket
import subprocess
import sys

import pytest
import yaml

from training.checkpoint import load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_pretrain(tmp_path, **pretrain) -> None:
    """``pvit pretrain`` of a tiny model under torchrun, 2 gloo processes, into
    ``tmp_path/run``; ``pretrain``: the config keys that differ between the tests."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"pretrain": dict(
        out=str(tmp_path / "run"), model="pvit_test", num_frames=4, img_size=32,
        label_size=16, pose_slots=3, num_workers=0, log_every=1, batch_size=2, **pretrain)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "flows.commands", "pretrain", str(exp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_pretrain_under_torchrun_with_two_gloo_processes(tmp_path, shard_dir):
    _torchrun_pretrain(tmp_path, synthetic=str(shard_dir), epochs=2, checkpoint_every=1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 8 clips / (2 per batch x 2 ranks) = 2 steps an epoch
    assert summary["steps"] == 4
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert len(state["rng"]) == 2  # each rank's RNG, for an exact resume
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_shard_skipped_on_one_rank_is_counted_in_the_summary(tmp_path):
    """bad_shards: skip under torchrun: rank 1 reads shards 1 and 3 (split_by_node), so
    the bad shard 1 reaches rank 0's summary only through the gather across ranks."""
    from test_dataset_contract import _flip_member_byte  # (tests/training is on sys.path)

    from training.drawn_clips import write_shards

    shards = write_shards(tmp_path / "shards", shards=4, clips_per_shard=2, frames=4, size=32)
    _flip_member_byte(shards / "shard-00001.tar", "depth")
    _torchrun_pretrain(tmp_path, synthetic=str(shards), epochs=1, bad_shards="skip")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_shards"] == 1 and summary["steps"] == 2
    assert summary["skipped_shard_paths"][0].endswith("shard-00001.tar")
