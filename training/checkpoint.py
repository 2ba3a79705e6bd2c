"""Checkpoint files: they rebuild their model and load with ``weights_only``.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects):
model name and arguments, state dicts, the loop position, RNG states and the resolved
stage config (what a training run puts in one, and how it resumes from it:
``training.resume``). Files are written to a temporary name and renamed into place, so
a killed run leaves either the old checkpoint or the new one, never half of one.
A checkpoint may be an object (``s3://bucket/runs/x/checkpoints/last.pt``): it is
written as one PUT and read as bytes through fsspec (``training.files``), then loaded
with ``weights_only=True`` like a local file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from training import files
from training.heads import split_legacy_dense_heads
from training.model import PromptonomyViT, create_model

FORMAT = "pvit-checkpoint/1"
# what every checkpoint of both stages holds, so that readers may index it freely
FIELDS = {"model_name": str, "model_kwargs": dict, "model": dict, "config": dict}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or made for another model."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    data = io.BytesIO()
    torch.save({"format": FORMAT, **state}, data)
    files.write_bytes(path, data.getbuffer())


def _load_marked(path: Path | str) -> dict[str, Any]:
    if not files.is_file(path):
        raise CheckpointError(f"checkpoint: no such file {path}")
    try:
        source = path if isinstance(path, Path) else io.BytesIO(files.read_bytes(path))
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for whatever reason
        raise CheckpointError(f"checkpoint: cannot read {path} ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {path} is not a pvit checkpoint")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pvit checkpoint with all of ``FIELDS`` (an edited or truncated one is named)."""
    state = _load_marked(files.location(path))
    for key, kind in FIELDS.items():
        if not isinstance(state.get(key), kind):
            got = "missing" if key not in state else f"a {type(state[key]).__name__}"
            raise CheckpointError(f"checkpoint: {path} is damaged: '{key}' is {got}, "
                                  f"not a {kind.__name__}")
    # written before the dense heads had one upsampling map per tap (same function)
    state["model"] = split_legacy_dense_heads(state["model"])
    return state


def is_pvit_checkpoint(path: str | Path) -> bool:
    """Our checkpoints are torch files carrying the format marker (not a key guess); a
    damaged one still is one, so ``load_checkpoint`` names what is wrong with it."""
    if files.name(path).endswith(".safetensors"):
        return False
    try:
        _load_marked(files.location(path))
        return True
    except CheckpointError:
        return False


def model_from_checkpoint(state: dict[str, Any], path: str | Path) -> PromptonomyViT:
    """The model a checkpoint describes, with its weights. A checkpoint whose fields
    disagree (edited by hand, or written by other code) fails with one line naming it."""
    name, weights = state["model_name"], state["model"]
    try:
        model = create_model(name, **state["model_kwargs"])
    except Exception as exc:  # noqa: BLE001 - unknown name, argument or value
        raise CheckpointError(f"checkpoint: {path}: cannot build its model {name!r} from its "
                              f"model_kwargs ({type(exc).__name__}: {exc})") from None
    # summed up here: load_state_dict's error lists every key, hundreds of them
    wanted = model.state_dict()
    problems = {
        "missing": [k for k in wanted if k not in weights],
        "unexpected": [k for k in weights if k not in wanted],
        "of another shape": [k for k in wanted if k in weights and getattr(
            weights[k], "shape", None) != wanted[k].shape]}
    found = [f"{len(keys)} {what}, e.g. {keys[0]!r}" for what, keys in problems.items() if keys]
    if found:
        raise CheckpointError(f"checkpoint: {path}: its weights do not fit its own "
                              f"model_name/model_kwargs ({'; '.join(found)})")
    model.load_state_dict(weights)
    return model
