"""The training loop of both stages, as plain functions (Prefect tasks wrap them).

    run_pretrain(cfg)  synthetic shards only, every task head
    run_finetune(cfg)  real clips + synthetic clips mixed in each batch (the joint recipe)

Read top to bottom: ``prepare`` (data, schedule, model arguments, the checkpoint to
resume; ``preflight`` runs the same checks) -> ``_start`` (model: resume > init >
scratch, optimizer, position) -> ``_run_epoch`` per epoch (``_train_step``,
``_log_step``, ``_save_checkpoint``) -> ``_finish`` (final checkpoint, exported weights,
validation) -> summary. A run whose directory holds ``checkpoints/last.pt`` resumes from
it (model, optimizer, schedule position, RNG), so a retried task continues instead of
starting over, and a resumed run matches an uninterrupted one step for step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader

from generation.dataset.index import DatasetIndex
from generation.dataset.shard_format import CLASSES
from generation.dataset.storage import check_writable_dir, write_atomic
from training import distributed
from training.checkpoint import (
    CheckpointError,
    capture_rng,
    check_compatible,
    is_pvit_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from training.config import FinetuneConfig, PretrainConfig
from training.convert import (
    SOURCE_CONVERTERS,
    CheckpointMismatch,
    export_inference,
    image_to_video,
    pretrain_to_finetune,
    read_weights,
)
from training.evaluate import evaluate_model
from training.loader_workers import loader_worker_kwargs
from training.losses import compute_losses
from training.model import PromptonomyViT, create_model
from training.run_files import MetricsLog, plot_loss_curve, write_config, write_summary
from training.run_layout import RunLayout
from training.synthetic_data import (
    SKIPPED_SHARDS,
    SceneTransform,
    synthetic_batches,
    synthetic_index,
)
from training.video_data import (
    VideoClips,
    VideoRecord,
    collate_videos,
    epoch_batches,
    read_records,
    require_decodable,
)

# arguments a checkpoint must share with the model it initialises / resumes
SAME_ARCH = ("variant", "tasks", "prompts_per_task", "tubelet_size", "num_seg_classes")

log = logging.getLogger(__name__)

Progress = Optional[Callable[[dict[str, Any]], None]]  # called with each logged record


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class TrainForward(nn.Module):
    """``forward`` = the model's ``forward_train``, so DDP and torch.compile wrap it."""

    def __init__(self, model: PromptonomyViT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(x)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases, norms, tokens and position tables (timm's convention)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def run_pretrain(cfg: PretrainConfig, *, progress: Progress = None,
                 stop_after: Optional[int] = None) -> dict[str, Any]:
    """Prompt pretraining; returns the summary (also written to ``summary.json``)."""
    return _run("pretrain", cfg, progress, stop_after)


def run_finetune(cfg: FinetuneConfig, *, progress: Progress = None,
                 stop_after: Optional[int] = None) -> dict[str, Any]:
    """Downstream fine-tuning with synthetic batches mixed in; returns the summary.
    ``stop_after`` ends the run after that many optimizer steps without any final
    checkpoint, as a kill would (for resume tests)."""
    return _run("finetune", cfg, progress, stop_after)


# config fields that may change between a run and its resumption (they do not change
# what is computed); any other difference means a different run
RESUME_FREE = {"out", "num_workers", "log_every", "checkpoint_every", "compile", "amp"}


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


class InputError(ValueError):
    """A path or checkpoint named by the config that cannot be used (one line)."""


@dataclass
class RunSetup:
    """What a run is, read and checked before any training: its data, its schedule, the
    model's arguments and the checkpoint it resumes. ``prepare`` builds it; ``preflight``
    and ``_run`` both call it, so they check the same things the same way."""

    stage: str
    cfg: PretrainConfig | FinetuneConfig
    layout: RunLayout
    real_records: list[VideoRecord]  # finetune's train split (else empty)
    num_classes: int  # of the downstream task (0 in pretraining)
    index: Optional[DatasetIndex]  # the synthetic shards (None: no synthetic batches)
    synthetic_bs: int  # synthetic clips per step and process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    model_kwargs: dict[str, Any]  # create_model's arguments besides the name
    resume: Optional[dict[str, Any]]  # this run's last.pt, checked against the config

    @property
    def finetune(self) -> bool:
        return self.stage == "finetune"

    @property
    def schedule(self) -> dict[str, int]:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def prepare(stage: str, cfg: PretrainConfig | FinetuneConfig, world_size: int) -> RunSetup:
    """Read and check what the run needs (records, manifest, resume checkpoint). Raises
    the readers' own errors (``FileNotFoundError``, ``ValueError``s); touches no RNG."""
    finetune = stage == "finetune"
    real_records, num_classes = _real_records(cfg) if finetune else ([], 0)
    synthetic_bs = cfg.synthetic_batch_size if finetune else cfg.batch_size
    index = synthetic_index(cfg.synthetic) if synthetic_bs else None  # the manifest
    if finetune:
        steps_per_epoch = len(epoch_batches(len(real_records), cfg.batch_size, epoch=0,
                                            seed=cfg.seed, shuffle=True,
                                            world_size=world_size))
    else:
        steps_per_epoch = max(1, index.clips // (cfg.batch_size * world_size))
    # segmentation classes from the manifest; no synthetic data: the built-in list (the
    # head is unused then)
    seg_classes = len(index.classes) if index else len(CLASSES)
    model_kwargs = cfg.model_kwargs(num_classes=num_classes, num_seg_classes=seg_classes)
    setup = RunSetup(stage=stage, cfg=cfg, layout=RunLayout(cfg.out),
                     real_records=real_records, num_classes=num_classes, index=index,
                     synthetic_bs=synthetic_bs, steps_per_epoch=steps_per_epoch,
                     total_steps=steps_per_epoch * cfg.epochs,
                     warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                     model_kwargs=model_kwargs, resume=None)
    last = setup.layout.last_checkpoint
    if last.is_file():  # a resume must be of this very model, config and schedule
        resume = load_checkpoint(last)
        check_compatible(resume, cfg.model, model_kwargs, tuple(model_kwargs), last)
        check_resumable(resume, cfg, last)
        if resume["scheduler"] != setup.schedule:
            raise CheckpointError(f"checkpoint: {last} was made with another schedule "
                                  f"{resume['scheduler']}; use a new --out")
        setup.resume = resume
    return setup


def preflight(stage: str, cfg: PretrainConfig | FinetuneConfig) -> None:
    """Check every input the run will read, before any training; raises ``InputError``
    naming the field. The commands call it so bad input exits 2 with one line."""
    try:
        check_writable_dir(cfg.out, "out")
        # bad labels, or a split none of whose videos decode, are bad input like a
        # missing split: found here, before training, so exit 2 like the rest. Under
        # torchrun every rank checks with the world size it will train with.
        setup = prepare(stage, cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if setup.resume is None and cfg.init:
            _initial_weights(cfg, create_model(cfg.model, **setup.model_kwargs),
                             setup.model_kwargs)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc).splitlines()[0]) from None


def _real_records(cfg: FinetuneConfig) -> tuple[list[VideoRecord], int]:
    """The train split's records and its number of classes, once both splits' labels are
    class ids and some of each split's videos decode (else the run would train or score
    nothing, and report it as a result)."""
    records, num_classes = read_records(cfg.data_format, cfg.data_root, cfg.train_split,
                                        cfg.videos_dir)
    require_decodable(records, f"split '{cfg.train_split}' of {cfg.data_root}")
    if cfg.val_split:  # its labels must be classes of the model trained here
        val, _ = read_records(cfg.data_format, cfg.data_root, cfg.val_split, cfg.videos_dir,
                              num_classes=num_classes)
        require_decodable(val, f"split '{cfg.val_split}' of {cfg.data_root}")
    return records, num_classes


def _initial_weights(cfg: PretrainConfig | FinetuneConfig, model: PromptonomyViT,
                     model_kwargs: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """Weights named by ``cfg.init``, read as ``cfg.init_format`` says: a pvit checkpoint
    (pretrain -> finetune), torchvision MViT, VideoMAE (repository or HF) or, by default
    for files without our marker, timm image weights (inflated); None: from scratch."""
    if not cfg.init:
        return None
    if not Path(cfg.init).is_file():
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
        weights = read_weights(cfg.init)
    except CheckpointMismatch:  # its own message says only "KeyError" or the like
        raise CheckpointError(f"init: {cfg.init} is not a checkpoint or weights file "
                              "(a pvit .pt, a torch state dict or .safetensors)") from None
    convert = SOURCE_CONVERTERS.get(fmt or "timm_image", image_to_video)
    try:
        return convert(weights, model)
    except CheckpointMismatch as exc:  # weights of another architecture: name the file
        raise CheckpointError(f"init: {cfg.init} (model {cfg.model}): {exc}") from None


@dataclass
class Training:
    """A run in progress: its parts, and the position a checkpoint saves."""

    setup: RunSetup
    dist: distributed.Dist
    model: PromptonomyViT
    forward: nn.Module  # the model's forward_train, maybe DDP- and compile-wrapped
    optimizer: torch.optim.Optimizer
    metrics: Optional[MetricsLog]  # rank 0 only
    progress: Progress
    step: int = 0  # optimizer steps taken (skipped empty batches count)
    start_epoch: int = 0  # where this process starts (a resume's position)
    start_in_epoch: int = 0
    skipped_videos: set[str] = field(default_factory=set)
    skipped_shards: set[str] = field(default_factory=set)  # bad_shards: skip
    epoch_losses: dict[str, float] = field(default_factory=dict)  # last finished epoch
    sums: dict[str, float] = field(default_factory=dict)  # running loss sums of the epoch
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def loss_names(self) -> list[str]:
        return ["total", *(["action"] if self.setup.finetune else []), *self.model.tasks]


def _start(setup: RunSetup, dist: distributed.Dist, progress: Progress) -> Training:
    """Model (resume > init > scratch), optimizer and position; the seeded RNG is
    consumed by model creation first, then a resume restores its own."""
    cfg, resume = setup.cfg, setup.resume
    model = create_model(cfg.model, **setup.model_kwargs)
    if resume is not None:
        model.load_state_dict(resume["model"])
    else:
        weights = _initial_weights(cfg, model, setup.model_kwargs)
        if weights is not None:
            model.load_state_dict(weights)
    model.to(dist.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    run = Training(setup=setup, dist=dist, model=model, forward=TrainForward(model),
                   optimizer=optimizer, metrics=None, progress=progress)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        run.start_epoch, run.start_in_epoch = resume["epoch"], resume["step_in_epoch"]
        run.skipped_videos = set(resume["skipped"])
        run.skipped_shards = set(resume.get("skipped_shards", []))  # older: none
        # a finished run that is started again trains nothing and reports its last epoch
        run.epoch_losses = dict(resume["epoch_losses"])
        rngs = resume["rng"]  # one per rank of the run that saved it
        restore_rng(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    run.step = run.start_epoch * setup.steps_per_epoch + run.start_in_epoch
    if dist.world_size > 1:
        run.forward = nn.parallel.DistributedDataParallel(
            run.forward, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        run.forward = torch.compile(run.forward)
    if dist.is_main:
        write_config(setup.layout.root, setup.stage, cfg.model_dump(mode="json"))
        run.metrics = MetricsLog(setup.layout.metrics, resume_step=run.step)
    return run


def _run(stage: str, cfg: PretrainConfig | FinetuneConfig, progress: Progress,
         stop_after: Optional[int]) -> dict[str, Any]:
    start_time = time.perf_counter()
    dist = distributed.setup()
    if dist.is_main:
        RunLayout(cfg.out).checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank, reproducibly
    # checked again here: Prefect tasks call run_pretrain/run_finetune without preflight
    setup = prepare(stage, cfg, dist.world_size)
    run = _start(setup, dist, progress)

    stopped = False
    loop_start, first_step = time.perf_counter(), run.step
    for epoch in range(run.start_epoch, cfg.epochs):
        stopped = _run_epoch(run, epoch, stop_after)
        if stopped:
            break
    train_time = time.perf_counter() - loop_start

    _gather_skips(run)
    summary: dict[str, Any] = {
        "stage": stage, "stopped_early": stopped, "train_time_s": train_time,
        # this process's steps only (a resumed run times what it ran)
        "step_time_s": train_time / max(1, run.step - first_step)}
    if not stopped and dist.is_main:
        summary.update(_finish(run))
        summary["wall_time_s"] = time.perf_counter() - start_time
        write_summary(setup.layout.root, summary)
        plot_loss_curve(setup.layout.metrics, setup.layout.loss_curve)
    distributed.barrier(dist)
    return summary


def _run_epoch(run: Training, epoch: int, stop_after: Optional[int]) -> bool:
    """One epoch (or its rest, after a mid-epoch resume: its first steps' data is drawn
    again and not trained on). Returns whether ``stop_after`` ended the run."""
    setup = run.setup
    real_iter, synth_iter = _epoch_iterators(setup, epoch, run.dist)
    replay = run.start_in_epoch if epoch == run.start_epoch else 0
    resumed_mid_epoch = setup.resume is not None and replay > 0
    run.sums = dict(setup.resume["epoch_sums"]) if resumed_mid_epoch else {}
    run.counts = dict(setup.resume["epoch_counts"]) if resumed_mid_epoch else {}
    meter = _Throughput()
    for in_epoch in range(setup.steps_per_epoch):
        real = next(real_iter) if real_iter is not None else None
        synth = next(synth_iter) if synth_iter is not None else None
        if synth is not None:  # found again in a replay: already counted, not warned
            _note_skipped_shards(run, synth.pop(SKIPPED_SHARDS))
        if in_epoch < replay:  # resumed mid-epoch: replay the data, not the step
            continue
        if real is not None:
            run.skipped_videos.update(real["skipped"])
        done = _train_step(run, real, synth)
        if done is None:  # every real video failed and there is no synthetic part
            continue
        values, grad_norm, clips = done
        meter.clips += clips
        for k, v in values.items():
            run.sums[k] = run.sums.get(k, 0.0) + v
            run.counts[k] = run.counts.get(k, 0) + 1
        if run.step % setup.cfg.log_every == 0 or in_epoch == setup.steps_per_epoch - 1:
            _log_step(run, epoch, values, grad_norm, meter)
        if setup.cfg.checkpoint_every and run.step % setup.cfg.checkpoint_every == 0:
            _save_checkpoint(run, epoch, in_epoch + 1)
        if stop_after is not None and run.step >= stop_after:
            return True
    run.epoch_losses = distributed.mean_across(
        run.dist, {k: run.sums[k] / run.counts[k] for k in run.sums}, run.loss_names)
    if run.metrics is not None:
        run.metrics.write({"kind": "epoch", "stage": setup.stage, "epoch": epoch,
                           "step": run.step,
                           **{f"loss/{k}": v for k, v in run.epoch_losses.items()}})
    _save_checkpoint(run, epoch + 1, 0)
    return False


def _train_step(run: Training, real: Optional[dict], synth: Optional[dict]
                ) -> Optional[tuple[dict[str, float], float, int]]:
    """One optimizer step on one batch: (loss values, grad norm, clips), or None when
    the batch holds no clip (the step still counts, so every rank stays in step)."""
    cfg, setup = run.setup.cfg, run.setup
    shuffle = _label_shuffle(cfg, synth, run.step)
    video, targets = _assemble(real, synth, run.dist.device, shuffle)
    if video is None:
        run.step += 1
        return None
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, total_steps=setup.total_steps,
                            warmup_steps=setup.warmup_steps, lr=cfg.lr, min_lr=cfg.min_lr)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if cfg.amp and run.dist.device.type == "cuda" else nullcontext())
    with autocast:
        outputs = run.forward(video)
    outputs = {k: v.float() for k, v in outputs.items()}
    loss, parts = compute_losses(outputs, targets, cfg.loss_weights.model_dump())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = (nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
                 if cfg.grad_clip > 0 else torch.tensor(0.0))
    run.optimizer.step()
    run.step += 1
    values = {"total": loss.item(), **{k: v.item() for k, v in parts.items()}}
    return values, float(grad_norm), video.shape[0]


@dataclass
class _Throughput:
    """Clips trained since the last logged step, and when that was."""

    tick: float = field(default_factory=time.perf_counter)
    clips: int = 0


def _log_step(run: Training, epoch: int, values: dict[str, float], grad_norm: float,
              meter: _Throughput) -> None:
    """A ``kind: step`` line (losses averaged over ranks) and the progress callback."""
    mean = distributed.mean_across(run.dist, values, run.loss_names)
    elapsed = time.perf_counter() - meter.tick
    record = {"kind": "step", "stage": run.setup.stage, "step": run.step, "epoch": epoch,
              "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
              "clips_per_s": meter.clips * run.dist.world_size / max(elapsed, 1e-9),
              **{f"loss/{k}": v for k, v in mean.items()}}
    meter.tick, meter.clips = time.perf_counter(), 0
    if run.metrics is not None:
        run.metrics.write(record)
        if run.progress:
            run.progress({**record, "total_steps": run.setup.total_steps})


def _note_skipped_shards(run: Training, reported: dict[str, str]) -> None:
    """Count the shards a loader skipped (``bad_shards: skip``), warning once each."""
    for url, reason in sorted(reported.items()):
        if url not in run.skipped_shards:
            log.warning("%s; skipping that shard (bad_shards: skip)", reason)
        run.skipped_shards.add(url)


def _save_checkpoint(run: Training, epoch: int, in_epoch: int) -> None:
    """``last.pt``: everything a resume needs to continue as if never stopped (every
    rank's RNG included, gathered on all ranks and written by rank 0)."""
    rng = [capture_rng()]
    if run.dist.world_size > 1:  # every rank's RNG, so each resumes its own dropout stream
        rng = [None] * run.dist.world_size
        torch.distributed.all_gather_object(rng, capture_rng())
    if not run.dist.is_main:
        return
    setup = run.setup
    save_checkpoint(setup.layout.last_checkpoint, {
        "stage": setup.stage, "model_name": setup.cfg.model,
        "model_kwargs": setup.model_kwargs, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": setup.schedule,
        "epoch": epoch, "step_in_epoch": in_epoch, "step": run.step, "rng": rng,
        "config": setup.cfg.model_dump(mode="json"), "skipped": sorted(run.skipped_videos),
        "skipped_shards": sorted(run.skipped_shards),
        "epoch_losses": run.epoch_losses,  # of the last finished epoch (for the summary)
        # a mid-epoch checkpoint carries the epoch's running loss sums
        "epoch_sums": dict(run.sums) if in_epoch else {},
        "epoch_counts": dict(run.counts) if in_epoch else {}})


def _gather_skips(run: Training) -> None:
    """Every rank skipped its own undecodable videos and shards: the union, on all."""
    if run.dist.world_size == 1:
        return
    gathered: list = [None] * run.dist.world_size
    torch.distributed.all_gather_object(
        gathered, (sorted(run.skipped_videos), sorted(run.skipped_shards)))
    run.skipped_videos = set().union(*(videos for videos, _ in gathered))
    run.skipped_shards = set().union(*(shards for _, shards in gathered))


def _epoch_iterators(setup: RunSetup, epoch: int, dist: distributed.Dist
                     ) -> tuple[Optional[Iterator], Optional[Iterator]]:
    """This process's real and synthetic batches of ``epoch`` (None: not in this run)."""
    cfg = setup.cfg
    real_iter = synth_iter = None
    if setup.finetune:
        dataset = VideoClips(setup.real_records, num_frames=cfg.num_frames,
                             img_size=cfg.img_size, stride=cfg.frame_stride,
                             sampling=cfg.sampling, train=True, seed=cfg.seed)
        dataset.epoch = epoch
        batches = epoch_batches(len(setup.real_records), cfg.batch_size, epoch=epoch,
                                seed=cfg.seed, shuffle=True, rank=dist.rank,
                                world_size=dist.world_size)
        # the loader's own generator: creating it must not consume the global RNG
        real_iter = iter(DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                    collate_fn=collate_videos,
                                    **loader_worker_kwargs(cfg.num_workers),
                                    generator=torch.Generator().manual_seed(cfg.seed + epoch)))
    if setup.synthetic_bs:
        scene = SceneTransform(num_frames=cfg.num_frames, img_size=cfg.img_size,
                               label_size=cfg.label_size, depth_max_m=cfg.depth_max_m,
                               pose_slots=cfg.pose_slots, crop_scale=tuple(cfg.crop_scale),
                               flip=cfg.flip, train=True,
                               tasks=tuple(cfg.tasks) if cfg.variant != "vit" else ())
        synth_iter = synthetic_batches(setup.index.urls, scene, batch_size=setup.synthetic_bs,
                                       seed=cfg.seed * 1000 + dist.rank, epoch=epoch,
                                       shuffle_buffer=cfg.shuffle_buffer,
                                       num_workers=cfg.num_workers, world_size=dist.world_size,
                                       bad_shards=cfg.bad_shards)
    return real_iter, synth_iter


def _label_shuffle(cfg, synth: Optional[dict], step: int) -> Optional[torch.Tensor]:
    """The ablation control ``shuffle_synthetic_labels``: a permutation of the synthetic
    clips of this batch whose labels each clip is given (seeded by run seed and step, so
    every run of a seed sees the same pairing); None = labels stay with their clips."""
    if synth is None or not getattr(cfg, "shuffle_synthetic_labels", False):
        return None
    n = synth["video"].shape[0]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    # a derangement would be stricter; a random permutation is what the paper's control
    # does, and at batch sizes >= 8 few clips keep their own labels
    return torch.randperm(n, generator=gen)


def _assemble(real: Optional[dict], synth: Optional[dict], device: torch.device,
              shuffle: Optional[torch.Tensor] = None
              ) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """One model input: real clips first, then synthetic; targets say which is which.
    ``shuffle`` reorders the synthetic targets (not the clips): see ``_label_shuffle``."""
    videos, labels, synthetic = [], [], []
    if real is not None and "video" in real:
        videos.append(real["video"])
        labels.append(real["label"])
        synthetic.append(torch.zeros(len(real["label"]), dtype=torch.bool))
    targets: dict[str, torch.Tensor] = {}
    if synth is not None:
        n = synth["video"].shape[0]
        videos.append(synth["video"])
        labels.append(torch.full((n,), -1, dtype=torch.long))
        synthetic.append(torch.ones(n, dtype=torch.bool))
        # every key besides the clip is some task's target (training/tasks/)
        targets = {k: (v if shuffle is None else v[shuffle]).to(device, non_blocking=True)
                   for k, v in synth.items() if k != "video"}
    if not videos:
        return None, {}
    targets["label"] = torch.cat(labels).to(device)
    targets["synthetic"] = torch.cat(synthetic).to(device)
    return torch.cat(videos).to(device, non_blocking=True), targets


def _finish(run: Training) -> dict[str, Any]:
    """Final checkpoint, exported inference weights, validation accuracy."""
    setup, model, layout = run.setup, run.model, run.setup.layout
    cfg = setup.cfg
    final = layout.final_checkpoint
    write_atomic(final, layout.last_checkpoint.read_bytes())
    inference = export_inference(model)
    write_atomic(layout.inference_weights,
                 save({k: v.contiguous() for k, v in inference.state_dict().items()}))

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    summary: dict[str, Any] = {
        "epochs": cfg.epochs, "steps": run.step, "losses": run.epoch_losses,
        "checkpoint": str(final), "inference_weights": str(layout.inference_weights),
        "params_train": count(model), "params_inference": count(inference),
        "skipped_videos": len(run.skipped_videos), "skipped_paths": sorted(run.skipped_videos),
        "skipped_shards": len(run.skipped_shards),
        "skipped_shard_paths": sorted(run.skipped_shards),
    }
    if setup.finetune and cfg.val_split:
        records, _ = read_records(cfg.data_format, cfg.data_root, cfg.val_split, cfg.videos_dir,
                                  num_classes=model.num_classes)
        result = evaluate_model(inference.to(run.dist.device), records,
                                num_frames=cfg.num_frames, img_size=cfg.img_size,
                                stride=cfg.frame_stride, sampling=cfg.sampling,
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                device=run.dist.device)
        summary.update(top1=result["top1"], top5=result["top5"], val_clips=result["clips"],
                       # per validation clip, in split order: what paired comparisons
                       # between runs (benchmarks/ablation.py) resample
                       val_correct=result["correct"])
        summary["skipped_videos"] += result["skipped_videos"]
        summary["skipped_paths"] = sorted(set(summary["skipped_paths"])
                                          | set(result["skipped_paths"]))
    return summary
