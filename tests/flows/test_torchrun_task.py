"""The pipeline's training task launches torchrun when a stage asks for several
processes per node (2 gloo processes on CPU here)."""

import json

import pytest

from training.config import PretrainConfig
from training.drawn_clips import write_shards

pytestmark = pytest.mark.slow


def test_pretrain_flow_launches_torchrun(tmp_path, monkeypatch):
    from flows.train import pretrain

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    shards = write_shards(tmp_path / "shards")
    cfg = PretrainConfig(out=str(tmp_path / "run"), synthetic=str(shards), model="pvit_test",
                         num_frames=4, img_size=32, label_size=16, pose_slots=3, num_workers=0,
                         log_every=1, batch_size=2, epochs=2, nproc_per_node=2)
    summary = pretrain(cfg)
    # 8 clips / (2 per batch x 2 ranks) = 2 steps an epoch: the ranks split the data
    assert summary["steps"] == 4
    assert (tmp_path / "run" / "pretrain.torchrun.log").is_file()
    record = json.loads((tmp_path / "run" / ".stage.json").read_text())
    assert record["status"] == "done"
    again = pretrain(cfg)                     # cached: no second launch
    assert again == record["summary"]
