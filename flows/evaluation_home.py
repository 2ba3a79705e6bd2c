"""A checkpoint's evaluation home as a stage: ``pvit evaluate`` without ``--out`` and the
pipeline's evaluate stage both write there, keyed and recorded by ``flows.stage_cache``,
so either finds the other's result up to date. No Prefect import (the CLI's evaluate
command uses it too)."""

from __future__ import annotations

from typing import Any

from flows import stage_cache
from training import files
from training.checkpoint import CheckpointError
from training.config import EvaluateConfig
from training.evaluate import score, write_result
from training.run_layout import evaluation_dir, evaluation_name


def evaluation_key(cfg: EvaluateConfig) -> str:
    """The stage key of evaluating ``cfg.checkpoint`` as ``cfg`` says: its settings, the
    checkpoint's content (not its path: ``runs/x/...`` and ``/abs/runs/x/...`` are one
    file) and the training code's version. ``pvit evaluate`` and the pipeline's stage
    both key by it, so either finds the other's result up to date."""
    section = cfg.model_dump(mode="json", exclude={"checkpoint", "out"})
    return stage_cache.stage_key("evaluate", section,
                                 {"checkpoint": stage_cache.file_key(cfg.checkpoint)},
                                 stage_cache.code_version("training"))


def run_evaluate_in_home(cfg: EvaluateConfig, key: str | None = None) -> dict[str, Any]:
    """``run_evaluate`` into the checkpoint's evaluation home, recorded as a stage
    (``key``: default ``evaluation_key(cfg)``).

    The directory holds the results of several splits and checkpoints, written by
    ``pvit evaluate`` and by the pipeline; so a stale record does not clear it (each
    result file is rewritten whole, to a temporary name then renamed). A directory there
    that is not a stage directory is someone else's: ``ForeignDirectory``, nothing
    written. The record is started once the scores exist, so bad input leaves nothing."""
    if not cfg.checkpoint:
        raise CheckpointError("checkpoint: none given")
    home = evaluation_dir(cfg.checkpoint)
    if problem := stage_cache.foreign(home):
        raise stage_cache.ForeignDirectory(f"out: {problem}")
    files.check_writable(home, "out")  # before the evaluation, not after it
    key = key or evaluation_key(cfg)
    result = score(cfg)
    name = evaluation_name(cfg.checkpoint, cfg.split)
    stage_cache.begin(home, key, clear_files=False)
    write_result(files.join(home, name), result)
    stage_cache.finish(home, key, result, [name])
    return result
