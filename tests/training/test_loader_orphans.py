"""After ``kill -9`` of a training process, its DataLoader fork server, workers and
resource tracker end too (issue 24: ~1.2 GB of them stayed alive indefinitely)."""

import subprocess
import sys
import time

import psutil
import pytest
import yaml
from pvit_cli import REPO


@pytest.mark.slow
def test_loader_processes_die_with_a_killed_training_process(tmp_path, shard_dir):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"pretrain": dict(
        model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
        num_workers=1, batch_size=2, epochs=100, out=str(tmp_path / "run"),
        synthetic=str(shard_dir))}))
    trainer = subprocess.Popen([sys.executable, "-m", "flows.cli", "pretrain", str(config)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        me = psutil.Process(trainer.pid)
        deadline = time.monotonic() + 180
        workers = []
        while time.monotonic() < deadline and trainer.poll() is None:
            family = me.children(recursive=True)
            # a DataLoader worker: a child of the fork server, itself the trainer's child
            workers = [p for p in family if p.ppid() != trainer.pid]
            if workers:
                break
            time.sleep(0.2)
        assert workers, "no DataLoader worker started"
        family = me.children(recursive=True)
        assert any("forkserver" in " ".join(p.cmdline()) for p in family)
        trainer.kill()                                   # SIGKILL: no cleanup of its own
        trainer.wait()
        _, alive = psutil.wait_procs(family, timeout=20)
        survivors = [" ".join(p.cmdline())[:80] for p in alive]
        for p in alive:                                  # leave nothing behind either way
            p.kill()
        assert not survivors, survivors
    finally:
        if trainer.poll() is None:
            trainer.kill()
