"""Input that training would trip over, or silently get wrong, stops the real ``pvit``
(a subprocess) with one ``error:`` line and exit 2, before any training or scoring."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training.config import FinetuneConfig
from training.evaluate import evaluate_model
from training.train import run_finetune
from training.video_data import read_records

PVIT = shutil.which("pvit", path=str(Path(sys.executable).parent)) or "pvit"
TINY = dict(model="pvit_test", num_frames=4, img_size=32, label_size=16, pose_slots=3,
            num_workers=0, batch_size=3, epochs=1)
# plain fine-tuning: these cases are about the real data, the run dir and the weights
FINETUNE = dict(TINY, variant="vit", synthetic=None, synthetic_ratio=0.0, val_split="",
                frame_stride=3)


@pytest.fixture
def toy(tmp_path, toy_set) -> Path:
    """The list layout of the toy set, with absolute paths, in a root of its own."""
    root = Path(toy_set["list_root"])
    for split in ("train", "validation"):
        lines = (root / f"{split}.txt").read_text().splitlines()
        (tmp_path / f"{split}.txt").write_text("".join(f"{root}/{line}\n" for line in lines))
    return tmp_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, toy_set) -> Path:
    """A real (one-epoch) finetune checkpoint of the toy set."""
    out = tmp_path_factory.mktemp("fine")
    cfg = FinetuneConfig(**FINETUNE, out=str(out), data_root=toy_set["list_root"])
    return Path(run_finetune(cfg)["checkpoint"])


def pvit(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PVIT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:20]
    for text in expected:
        assert text in lines[0], lines[0]


def finetune_file(tmp_path: Path, toy: Path, **overrides) -> Path:
    path = tmp_path / "exp.yaml"
    section = dict(FINETUNE, out=str(tmp_path / "run"), data_root=str(toy), **overrides)
    path.write_text(yaml.safe_dump({"finetune": section}))
    return path


def with_label(toy: Path, name: str, label: str, split: str = "train") -> str:
    """The toy split plus its first video once more with ``label``, as list file ``name``."""
    lines = (toy / f"{split}.txt").read_text().splitlines()
    extra = f"{lines[0].rsplit(maxsplit=1)[0]} {label}"
    (toy / name).write_text("\n".join([*lines, extra]) + "\n")
    return str(toy / name)


# --- the run directory -----------------------------------------------------------------

def test_out_that_is_a_file_is_refused(tmp_path, toy):
    (tmp_path / "taken").write_text("someone's notes\n")
    result = pvit("finetune", finetune_file(tmp_path, toy), "--out", "taken", cwd=tmp_path)
    assert_one_line_error(result, "finetune.out: taken is a file, not a directory")
    assert (tmp_path / "taken").read_text() == "someone's notes\n"


def test_out_on_a_file_system_nobody_may_write_is_refused(tmp_path, toy):
    # /proc takes no new files, not even from root (chmod would not stop root)
    result = pvit("finetune", finetune_file(tmp_path, toy), "--out", "/proc/pvit-test/run",
                  cwd=tmp_path)
    assert_one_line_error(result, "finetune.out: /proc/pvit-test/run is not writable")


def test_pretrain_checks_its_out_too(tmp_path, shard_dir):
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"pretrain": dict(TINY, synthetic=str(shard_dir))}))
    result = pvit("pretrain", exp, "--out", "/proc/pvit-test", cwd=tmp_path)
    assert_one_line_error(result, "pretrain.out: /proc/pvit-test is not writable")


# --- the initial weights -----------------------------------------------------------------

def test_init_that_is_no_weights_file_names_the_field_and_the_file(tmp_path, toy):
    (tmp_path / "notes.txt").write_text("not weights\n")
    result = pvit("finetune", finetune_file(tmp_path, toy), "--init", tmp_path / "notes.txt",
                  cwd=tmp_path)
    assert_one_line_error(
        result, f"finetune.init: {tmp_path / 'notes.txt'} is not a checkpoint or weights file")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["99", "-1"])
def test_a_label_outside_the_classes_names_its_line(tmp_path, toy, label):
    # 6 classes 0..5: 99 would have built a 100-way classifier, -1 left the loss
    split = with_label(toy, "train_bad.txt", label)
    result = pvit("finetune", finetune_file(tmp_path, toy, train_split=split), cwd=tmp_path)
    assert_one_line_error(result, f"finetune.data_root: {split}:13: label {label} is not a "
                                  "class id", "0..6")
    assert not (tmp_path / "run").exists()


def test_a_validation_label_the_model_lacks_is_refused(tmp_path, toy):
    split = with_label(toy, "val_bad.txt", "6", split="validation")
    result = pvit("finetune", finetune_file(tmp_path, toy, val_split=split), cwd=tmp_path)
    assert_one_line_error(result, f"{split}:7: label 6 is not a class id (the model has 6")


def test_labels_json_must_number_its_classes_from_zero(tmp_path, toy_set):
    root = tmp_path / "ssv2"
    shutil.copytree(toy_set["ssv2_root"], root)
    labels = root / "labels" / "labels.json"
    labels.write_text(labels.read_text().replace('"5"', '"6"'))
    with pytest.raises(ValueError, match="classes 0..5, each once"):
        read_records("ssv2", root, "train")


# --- splits where nothing decodes ----------------------------------------------------------

def broken_split(toy: Path, split: str) -> str:
    """``split`` with every video replaced: half by junk bytes, half by nothing."""
    lines = []
    for n, line in enumerate((toy / f"{split}.txt").read_text().splitlines()):
        path = toy / "broken" / f"{n}.mp4"
        if n % 2:
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"\x00" * 512)
        lines.append(f"{path} {line.rsplit(maxsplit=1)[1]}")
    (toy / f"broken_{split}.txt").write_text("\n".join(lines) + "\n")
    return str(toy / f"broken_{split}.txt")


@pytest.mark.parametrize("split, count", [("train", 12), ("validation", 6)])
def test_finetune_on_a_split_where_no_video_decodes_is_refused(tmp_path, toy, split, count):
    field = {"train": "train_split", "validation": "val_split"}[split]
    exp = finetune_file(tmp_path, toy, **{field: broken_split(toy, split)})
    result = pvit("finetune", exp, cwd=tmp_path)
    half = count // 2
    assert_one_line_error(result, f"all {count} videos would be skipped as undecodable",
                          f"{half} no such file", f"{half} no decodable frames")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_evaluate_on_a_split_where_no_video_decodes_is_refused(tmp_path, toy, checkpoint):
    result = pvit("evaluate", checkpoint, "--data-root", toy, "--split",
                  broken_split(toy, "validation"), "--out", tmp_path / "e.json", cwd=tmp_path)
    assert_one_line_error(result, "evaluate.data_root:", "all 6 videos would be skipped")
    assert not (tmp_path / "e.json").exists()


def test_scoring_no_clips_is_an_error_not_zero_accuracy(toy, checkpoint):
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    records, _ = read_records("list", toy, broken_split(toy, "validation"), num_classes=6)
    with pytest.raises(ValueError, match="all 6 videos were skipped"):
        evaluate_model(model, records, num_frames=4, img_size=32, stride=3, sampling="stride")


# --- checkpoints that contradict themselves ---------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(model_name="pvit_tiny"), "weights do not fit its own model_name"),
    (lambda s: s["model_kwargs"].update(num_frames=8), "1 of another shape, e.g. "
                                                       "'pos_embed_temporal'"),
    (lambda s: s["model_kwargs"].update(colour="red"), "unexpected keyword argument 'colour'"),
    (lambda s: s.pop("model"), "is damaged: 'model' is missing"),
])
def test_evaluate_of_an_inconsistent_checkpoint_names_it(tmp_path, toy, checkpoint, edit,
                                                         message):
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    result = pvit("evaluate", tmp_path / "edited.pt", "--data-root", toy, cwd=tmp_path)
    assert_one_line_error(result, f"evaluate.checkpoint: {tmp_path / 'edited.pt'}", message)
