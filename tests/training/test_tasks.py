"""The task registry: every task is one module; config, model, losses, targets and
converters loop over the registry; a new task is one module registered at runtime."""

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from training.config import LossWeights, PretrainConfig
from training.drawn_clips import make_clip
from training.losses import compute_losses
from training.model import create_model
from training.synthetic_data import SceneTransform
from training.tasks import TASKS, default_tasks, get_task, register, target_keys
from training.train import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
BUILTIN = ("depth", "normals", "segmentation", "pose", "boxes")


def test_the_registry_holds_the_papers_five_tasks_and_weights():
    assert tuple(TASKS)[:5] == BUILTIN
    assert {n: get_task(n).weight for n in BUILTIN} == {
        "depth": 0.5, "normals": 0.5, "segmentation": 0.1, "pose": 3.0, "boxes": 0.1}
    assert default_tasks()[:4] == ["depth", "normals", "segmentation", "pose"]
    assert "boxes" not in default_tasks()  # old configs and checkpoints keep their tasks
    with pytest.raises(ValueError, match="unknown 'bogus'"):
        get_task("bogus")


def test_loss_weights_come_from_the_registry_and_yaml_keys_still_work():
    w = LossWeights(depth=2.0)
    assert w.depth == 2.0 and w.boxes == 0.1 and w.pose == 3.0 and w.action == 1.0
    assert set(w.model_dump()) >= {*BUILTIN, "action"}
    cfg = PretrainConfig(model="pvit_test", loss_weights={"segmentation": 0.3})
    assert cfg.loss_weights.segmentation == 0.3
    with pytest.raises(ValidationError, match="unknown task 'dpeth'"):
        LossWeights(dpeth=1.0)
    with pytest.raises(ValidationError, match="boxes: weight"):
        LossWeights(boxes=-1.0)
    with pytest.raises(ValidationError, match="unknown task 'normal'"):
        PretrainConfig(model="pvit_test", tasks=["normal"])


def test_each_task_declares_fields_the_shards_hold_and_fills_its_target_keys(shard_dir):
    from generation.dataset.shard_format import read_shard
    clip = next(read_shard(sorted(shard_dir.glob("*.tar"))[0]))  # a clip as training reads it
    shard_fields = set(clip)
    for name in BUILTIN:
        task = get_task(name)
        assert set(task.fields) <= shard_fields, name
        sample = SceneTransform(num_frames=4, img_size=32, label_size=16, depth_max_m=10.0,
                                pose_slots=3, tasks=(name,))(clip)
        assert set(sample) == {"video", *task.target_keys}, name
    assert target_keys(["pose"]) == ("pose_position", "pose_quaternion", "pose_presence")


def test_compute_losses_scores_each_predicted_task_with_its_own_loss():
    model = create_model("pvit_test", variant="pvit", tasks=list(BUILTIN), num_classes=0,
                         label_size=16, pose_slots=3, num_frames=4, img_size=32,
                         num_seg_classes=len(make_clip("c", 0)["meta"]["classes"]))
    clips = [make_clip(f"c{i}", seed=i, frames=4, size=32) for i in range(2)]
    st = SceneTransform(num_frames=4, img_size=32, label_size=16, depth_max_m=10.0,
                        pose_slots=3, tasks=BUILTIN)
    samples = [st(c) for c in clips]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    out = model.forward_train(batch.pop("video"))
    targets = {**batch, "label": torch.full((2,), -1), "synthetic": torch.ones(2, dtype=bool)}
    weights = LossWeights().model_dump()
    total, parts = compute_losses(out, targets, weights)
    assert set(parts) == set(BUILTIN)
    for name in BUILTIN:  # each part is the task module's own loss on its rows
        assert torch.allclose(parts[name], get_task(name).loss(out[name], targets)), name
    assert torch.allclose(total, sum(weights[n] * parts[n] for n in BUILTIN))


def test_head_keys_stay_task_heads_name_so_old_checkpoints_load():
    keys = create_model("pvit_test", tasks=["depth", "pose"], num_classes=0, label_size=16,
                        pose_slots=3, num_frames=4, img_size=32).state_dict()
    assert "task_heads.depth.upsample.0.weight" in keys
    assert "task_heads.depth.out.weight" in keys
    assert "task_heads.pose.mlp.fc2.weight" in keys


def _task_names_in_ifs(path: Path) -> list[str]:
    """Task names compared against in ``if``/ternary tests of one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.If, ast.IfExp)):
            for sub in ast.walk(node.test):
                if isinstance(sub, ast.Constant) and sub.value in BUILTIN:
                    found.append(f"{path.name}:{sub.lineno} {sub.value}")
    return found


def test_no_task_name_is_tested_in_an_if_outside_its_module():
    files = [p for p in (ROOT / "training").rglob("*.py") if "tasks" not in p.parts]
    hits = [hit for p in files for hit in _task_names_in_ifs(p)]
    assert not hits, hits


TOY_MODULE = '''
"""A toy task: per frame, the mean brightness of the cropped clip."""
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from training.heads import clip_frames
from training.tasks import SyntheticTask


def targets(view):
    return {"brightness": view.crop("rgb").float().mean(dim=(1, 2, 3)) / 255.0}


class Head(torch.nn.Module):
    def __init__(self, ctx):
        super().__init__()
        self.mlp = Mlp(ctx.width, out_features=clip_frames(ctx.taps[0]))

    def forward(self, token):
        return self.mlp(token)


TASK = SyntheticTask(name="brightness", weight=1.0, fields=("rgb",),
                     target_keys=("brightness",), targets=targets, build_head=Head,
                     loss=lambda pred, t: F.mse_loss(pred, t["brightness"]), default=False)
'''


@pytest.fixture
def toy_task(tmp_path):
    path = tmp_path / "toy_brightness.py"
    path.write_text(TOY_MODULE)
    spec = importlib.util.spec_from_file_location("toy_brightness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register(module.TASK)
    yield module.TASK
    TASKS.pop(module.TASK.name)


@pytest.mark.slow
def test_a_toy_task_in_one_new_module_trains(tmp_path, shard_dir, toy_task):
    cfg = PretrainConfig(model="pvit_test", num_frames=4, img_size=32, label_size=16,
                         pose_slots=3, num_workers=0, log_every=1, dropout=0.0, drop_path=0.0,
                         head_dropout=0.0, out=str(tmp_path / "pre"), synthetic=str(shard_dir),
                         tasks=["brightness", "depth"], epochs=8, batch_size=4, lr=2e-3,
                         warmup_epochs=0.5, crop_scale=(1.0, 1.0), flip=False)
    assert cfg.loss_weights.brightness == 1.0  # its default weight, from its module
    summary = run_pretrain(cfg)
    assert {"brightness", "depth"} <= set(summary["losses"])
    rows = [json.loads(line) for line in
            (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert epochs[-1]["loss/brightness"] < 0.5 * epochs[0]["loss/brightness"]
    assert np.isfinite(summary["losses"]["total"])
