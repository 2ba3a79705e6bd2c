"""Which checkpoint a run may start from, and what it saves to go on exactly.

A run whose directory holds ``checkpoints/last.pt`` resumes from it (model, optimizer,
schedule position, RNG), so a retried task continues instead of starting over, and a
resumed run matches an uninterrupted one step for step:

    resumable_checkpoint(setup)   this run's last.pt, refused if made by another run
    initial_weights(cfg, ...)     what ``cfg.init`` names, checked against the model
    save_last(...)                the checkpoint dict, every rank's RNG included
    restore(...)                  weights, optimizer, RNG and ``RunState`` from it

The file format (marker, atomic writes, reading) is ``training.checkpoint``'s.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from training import distributed, files
from training.checkpoint import (
    CheckpointError,
    is_pvit_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.config import FinetuneConfig, PretrainConfig
from training.convert import (
    SOURCE_CONVERTERS,
    CheckpointMismatch,
    image_to_video,
    pretrain_to_finetune,
    read_weights,
)
from training.model import PromptonomyViT, list_models, model_family

if TYPE_CHECKING:  # train.py builds the setup and imports this module
    from training.train import RunSetup

# arguments a checkpoint must share with the model it initialises / resumes
SAME_ARCH = ("variant", "tasks", "prompts_per_task", "tubelet_size", "num_seg_classes")

# config fields that may change between a run and its resumption (they do not change
# what is computed); any other difference means a different run
RESUME_FREE = {"out", "num_workers", "log_every", "checkpoint_every", "compile", "amp"}


@dataclass
class RunState:
    """The loop's position and tallies: what a checkpoint holds besides the weights, the
    optimizer, the schedule and the RNG."""

    epoch: int = 0  # the loop stands in this epoch,
    step_in_epoch: int = 0  # after this many of its steps
    step: int = 0  # optimizer steps taken (skipped empty batches count)
    skipped_videos: set[str] = field(default_factory=set)
    skipped_shards: set[str] = field(default_factory=set)  # bad_shards: skip
    epoch_losses: dict[str, float] = field(default_factory=dict)  # last finished epoch
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running loss sums
    epoch_counts: dict[str, int] = field(default_factory=dict)


def check_compatible(state: dict[str, Any], model_name: str, model_kwargs: dict[str, Any],
                     keys: tuple[str, ...], path: str | Path) -> None:
    """Fail with a sentence, not a shape traceback, when ``state`` was made for another
    size or variant (``keys``: which model arguments must agree)."""
    if state["model_name"] != model_name:
        theirs = state["model_name"]
        family = f" ({model_family(theirs)})" if theirs in list_models() else ""
        raise CheckpointError(f"checkpoint: {path} is a {theirs}{family} model, this run "
                              f"builds {model_name} ({model_family(model_name)})")
    for key in keys:
        theirs, ours = state["model_kwargs"].get(key), model_kwargs.get(key)
        if theirs != ours:
            raise CheckpointError(
                f"checkpoint: {path} has {key}={theirs!r}, this run wants {ours!r}")


def check_resumable(state: dict[str, Any], cfg: PretrainConfig | FinetuneConfig,
                    path: Path) -> None:
    """A run resumes only a checkpoint of the very same configuration."""
    ours = cfg.model_dump(mode="json")
    fields = type(cfg).model_fields
    for key in sorted(set(ours) | set(state["config"])):
        if key not in state["config"] and key in fields and \
                ours[key] == fields[key].get_default(call_default_factory=True):
            continue  # a field added since that checkpoint, left at its default
        if key not in RESUME_FREE and state["config"].get(key) != ours.get(key):
            raise CheckpointError(
                f"checkpoint: {path} was made with {key}={state['config'].get(key)!r}, this run "
                f"has {ours.get(key)!r}; use a new --out (or the same config) to resume")


# What ``restore`` reads of a ``last.pt`` besides the model (``checkpoint.FIELDS``); the
# RNG entries are checked one level deeper (a list of one dict per rank).
RESUME_FIELDS = {"optimizer": dict, "scheduler": dict, "epoch": int, "step_in_epoch": int,
                 "rng": list, "skipped": list, "epoch_losses": dict, "epoch_sums": dict,
                 "epoch_counts": dict}
RNG_FIELDS = ("torch", "numpy", "python")


def check_resume_fields(state: dict[str, Any], path: Path) -> None:
    """Refuse, naming the field, a ``last.pt`` that ``restore`` could not read (edited,
    truncated, or written by other code): a KeyError mid-setup otherwise."""
    for key, kind in RESUME_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "missing" if key not in state else f"a {type(value).__name__}"
            raise CheckpointError(f"checkpoint: {path} is damaged: '{key}' is {got}, not a "
                                  f"{kind.__name__}; remove it to start the run again")
    for rng in state["rng"] or [None]:
        if not isinstance(rng, dict) or any(k not in rng for k in RNG_FIELDS):
            raise CheckpointError(f"checkpoint: {path} is damaged: 'rng' lacks "
                                  f"{', '.join(RNG_FIELDS)}; remove it to start the run again")


def resumable_checkpoint(setup: RunSetup) -> Optional[dict[str, Any]]:
    """The run directory's ``last.pt`` (None: there is none), once it is of this very
    model, config and schedule; another run's raises ``CheckpointError``."""
    last = setup.layout.last_checkpoint
    if not files.is_file(last):
        return None
    state = load_checkpoint(last)
    check_resume_fields(state, last)
    check_compatible(state, setup.cfg.model, setup.model_kwargs, tuple(setup.model_kwargs),
                     last)
    check_resumable(state, setup.cfg, last)
    if state["scheduler"] != setup.schedule:
        raise CheckpointError(f"checkpoint: {last} was made with another schedule "
                              f"{state['scheduler']}; use a new --out")
    return state


def initial_weights(cfg: PretrainConfig | FinetuneConfig, model: PromptonomyViT,
                    model_kwargs: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """Weights named by ``cfg.init``, read as ``cfg.init_format`` says: a pvit checkpoint
    (pretrain -> finetune), torchvision MViT, VideoMAE (repository or HF) or, by default
    for files without our marker, timm image weights (inflated); None: from scratch."""
    if not cfg.init:
        return None
    if not files.is_file(cfg.init):     # a local file or an object (s3://, gs://)
        raise CheckpointError(f"init: no such file {cfg.init}")
    fmt = cfg.init_format
    if is_pvit_checkpoint(cfg.init):
        if fmt not in (None, "pvit"):
            raise CheckpointError(f"init: {cfg.init} is a pvit checkpoint, not init_format "
                                  f"'{fmt}'")
        state = load_checkpoint(cfg.init)
        check_compatible(state, cfg.model, model_kwargs, SAME_ARCH, cfg.init)
        return pretrain_to_finetune(state["model"], model)
    if fmt == "pvit":
        raise CheckpointError(f"init: {cfg.init} is not a pvit checkpoint (init_format 'pvit')")
    try:
        weights = read_weights(files.local_copy(cfg.init))
    except CheckpointMismatch:  # its own message says only "KeyError" or the like
        raise CheckpointError(f"init: {cfg.init} is not a checkpoint or weights file "
                              "(a pvit .pt, a torch state dict or .safetensors)") from None
    convert = SOURCE_CONVERTERS.get(fmt or "timm_image", image_to_video)
    try:
        return convert(weights, model)
    except CheckpointMismatch as exc:  # weights of another architecture: name the file
        raise CheckpointError(f"init: {cfg.init} (model {cfg.model}): {exc}") from None


def save_last(setup: RunSetup, dist: distributed.Dist, model: PromptonomyViT,
              optimizer: torch.optim.Optimizer, state: RunState) -> None:
    """``last.pt``: everything a resume needs to continue as if never stopped (every
    rank's RNG included, gathered on all ranks and written by rank 0)."""
    rng = [capture_rng()]
    if dist.world_size > 1:  # every rank's RNG, so each resumes its own dropout stream
        rng = [None] * dist.world_size
        torch.distributed.all_gather_object(rng, capture_rng())
    if not dist.is_main:
        return
    mid_epoch = state.step_in_epoch > 0
    save_checkpoint(setup.layout.last_checkpoint, {
        "stage": setup.stage, "model_name": setup.cfg.model,
        "model_kwargs": setup.model_kwargs, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": setup.schedule,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "step": state.step,
        "rng": rng, "config": setup.cfg.model_dump(mode="json"),
        "skipped": sorted(state.skipped_videos),
        "skipped_shards": sorted(state.skipped_shards),
        "epoch_losses": state.epoch_losses,  # of the last finished epoch (for the summary)
        # a mid-epoch checkpoint carries the epoch's running loss sums
        "epoch_sums": dict(state.epoch_sums) if mid_epoch else {},
        "epoch_counts": dict(state.epoch_counts) if mid_epoch else {}})


def restore(setup: RunSetup, model: PromptonomyViT, optimizer: torch.optim.Optimizer,
            rank: int) -> RunState:
    """Put weights, optimizer and this rank's RNG back as ``setup.resume`` saved them, and
    return the loop's position and tallies."""
    saved = setup.resume
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    rngs = saved["rng"]  # one per rank of the run that saved it
    restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    epoch, in_epoch = saved["epoch"], saved["step_in_epoch"]
    return RunState(
        epoch=epoch, step_in_epoch=in_epoch, step=epoch * setup.steps_per_epoch + in_epoch,
        skipped_videos=set(saved["skipped"]),
        skipped_shards=set(saved.get("skipped_shards", [])),  # older checkpoints: none
        # a finished run that is started again trains nothing and reports its last epoch
        epoch_losses=dict(saved["epoch_losses"]),
        epoch_sums=dict(saved["epoch_sums"]) if in_epoch else {},
        epoch_counts=dict(saved["epoch_counts"]) if in_epoch else {})


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
