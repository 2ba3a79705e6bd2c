"""The training loop of both stages, as plain functions (Prefect tasks wrap them).

    run_pretrain(cfg)  synthetic shards only, every task head
    run_finetune(cfg)  real clips + synthetic clips mixed in each batch (the joint recipe)

``_run`` reads top to bottom: setup (``prepare``: data, schedule, model arguments, the
checkpoint to resume, the same checks ``preflight`` runs; then model, optimizer and
position), one loop over epochs and their steps (learning rate ``lr_at(step)``, the
step, logging, periodic checkpoint, the epoch's end), and ``_finish`` (final checkpoint,
exported weights, validation) -> summary. What a checkpoint holds and how a run resumes
from it (bit-identical to an uninterrupted run) is ``training.resume``'s.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save
from torch import nn
from torch.utils.data import DataLoader

from generation.dataset.index import DatasetIndex
from generation.dataset.shard_format import CLASSES
from generation.dataset.storage import WriteError, write_atomic
from training import distributed, files
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import FinetuneConfig, PretrainConfig
from training.convert import export_inference
from training.evaluate import evaluate_model
from training.loader_workers import loader_worker_kwargs
from training.losses import compute_losses
from training.model import PromptonomyViT, create_model
from training.resume import (
    RunState,
    initial_weights,
    restore,
    resumable_checkpoint,
    save_last,
)
from training.run_files import (
    MetricsLog,
    plot_loss_curve,
    start_run_dir,
    write_config,
    write_summary,
)
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


class InputError(ValueError):
    """A path or checkpoint named by the config that cannot be used (one line)."""


class NonFiniteLoss(RuntimeError):
    """The loss became inf or nan: the run stops there (one line naming the step), its
    last checkpoint left as it was, instead of training on and reporting nan."""


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
    seg_classes = _seg_classes(cfg, index)
    model_kwargs = cfg.model_kwargs(num_classes=num_classes, num_seg_classes=seg_classes)
    setup = RunSetup(stage=stage, cfg=cfg, layout=RunLayout(cfg.out),
                     real_records=real_records, num_classes=num_classes, index=index,
                     synthetic_bs=synthetic_bs, steps_per_epoch=steps_per_epoch,
                     total_steps=steps_per_epoch * cfg.epochs,
                     warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                     model_kwargs=model_kwargs, resume=None)
    setup.resume = resumable_checkpoint(setup)
    return setup


def _seg_classes(cfg: PretrainConfig | FinetuneConfig, index) -> int:
    """Segmentation classes: the manifest's. Without synthetic data the head is unused:
    a pvit checkpoint to start from decides (its weights then load: a checkpoint
    pretrained on a dataset with more categories was refused), else the built-in list."""
    if index:
        return len(index.classes)
    if not cfg.init:
        return len(CLASSES)
    try:        # one read (a pvit checkpoint is marked; is_pvit_checkpoint reads it too)
        kwargs = load_checkpoint(cfg.init).get("model_kwargs") or {}
    except CheckpointError:     # none, another format (timm, VideoMAE...) or damaged:
        return len(CLASSES)     # initial_weights reads it as what it is, or says why not
    return int(kwargs.get("num_seg_classes", len(CLASSES)))


def preflight(stage: str, cfg: PretrainConfig | FinetuneConfig) -> None:
    """Check every input the run will read, before any training; raises ``InputError``
    naming the field. The commands call it so bad input exits 2 with one line."""
    try:
        files.check_writable(cfg.out, "out")    # a directory, or a bucket that answers
        if problem := RunLayout(cfg.out).foreign():
            raise InputError(f"out: {problem}")
        # bad labels, or a split none of whose videos decode, are bad input like a
        # missing split: found here, before training, so exit 2 like the rest. Under
        # torchrun every rank checks with the world size it will train with.
        setup = prepare(stage, cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if setup.resume is None and cfg.init:
            initial_weights(cfg, create_model(cfg.model, **setup.model_kwargs),
                             setup.model_kwargs)
    except (FileNotFoundError, ValueError, WriteError) as exc:  # WriteError: a store down
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


def _run(stage: str, cfg: PretrainConfig | FinetuneConfig, progress: Progress,
         stop_after: Optional[int]) -> dict[str, Any]:
    start_time = time.perf_counter()
    dist = distributed.setup()
    if dist.is_main:    # only rank 0 writes the run's files, here or on a bucket
        start_run_dir(RunLayout(cfg.out))
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank, reproducibly
    # checked again here: Prefect tasks call run_pretrain/run_finetune without preflight
    setup = prepare(stage, cfg, dist.world_size)

    # model (resume > init > scratch), optimizer and position; creating the model consumes
    # the seeded RNG first, then a resume restores its own
    model = create_model(cfg.model, **setup.model_kwargs)
    if setup.resume is None:
        weights = initial_weights(cfg, model, setup.model_kwargs)
        if weights is not None:
            model.load_state_dict(weights)
    model.to(dist.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    state = (restore(setup, model, optimizer, dist.rank) if setup.resume is not None
             else RunState())
    forward: nn.Module = TrainForward(model)
    if dist.world_size > 1:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    metrics = None  # rank 0 writes the run's files
    if dist.is_main:
        write_config(setup.layout.root, stage, cfg.model_dump(mode="json"))
        metrics = MetricsLog(setup.layout.metrics, resume_step=state.step)
    loss_names = ["total", *(["action"] if setup.finetune else []), *model.tasks]
    amp = cfg.amp and dist.device.type == "cuda"  # bf16 autocast

    stopped = False
    loop_start, first_step = time.perf_counter(), state.step
    # a run resumed mid-epoch draws that epoch's first batches again without training on
    # them, so the rest of the epoch sees the data an uninterrupted run would
    start_epoch, replay = state.epoch, state.step_in_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if epoch > start_epoch:  # the resumed epoch goes on with its saved loss sums
            state.epoch_sums, state.epoch_counts = {}, {}
        real_iter, synth_iter = _epoch_iterators(setup, epoch, dist)
        tick, clips = time.perf_counter(), 0  # throughput since the last logged step
        for in_epoch in range(setup.steps_per_epoch):
            real = next(real_iter) if real_iter is not None else None
            synth = next(synth_iter) if synth_iter is not None else None
            if synth is not None:  # bad_shards: skip, warned once each (a replay finds
                # the skipped ones again: already counted, not warned)
                for url, reason in sorted(synth.pop(SKIPPED_SHARDS).items()):
                    if url not in state.skipped_shards:
                        log.warning("%s; skipping that shard (bad_shards: skip)", reason)
                    state.skipped_shards.add(url)
            if epoch == start_epoch and in_epoch < replay:
                continue
            if real is not None:
                state.skipped_videos.update(real["skipped"])
            video, targets = _assemble(real, synth, dist.device,
                                       _label_shuffle(cfg, synth, state.step))
            if video is None:  # every real video failed and there is no synthetic part:
                state.step += 1  # the step still counts, so every rank stays in step
                continue

            # the step
            lr = lr_at(state.step, total_steps=setup.total_steps,
                       warmup_steps=setup.warmup_steps, lr=cfg.lr, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
                outputs = forward(video)
            outputs = {k: v.float() for k, v in outputs.items()}
            loss, parts = compute_losses(outputs, targets, cfg.loss_weights.model_dump())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            state.step += 1
            state.epoch, state.step_in_epoch = epoch, in_epoch + 1
            values = {"total": loss.item(), **{k: v.item() for k, v in parts.items()}}
            if not math.isfinite(values["total"]):
                bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
                raise NonFiniteLoss(f"{stage}: the loss is not finite at step {state.step} "
                                    f"(epoch {epoch}): {bad}; lower lr or check the data")
            clips += video.shape[0]
            for k, v in values.items():
                state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v
                state.epoch_counts[k] = state.epoch_counts.get(k, 0) + 1

            # logging: losses averaged over ranks (every rank takes part), written by rank 0
            if state.step % cfg.log_every == 0 or in_epoch == setup.steps_per_epoch - 1:
                mean = distributed.mean_across(dist, values, loss_names)
                elapsed = time.perf_counter() - tick
                record = {"kind": "step", "stage": stage, "step": state.step, "epoch": epoch,
                          "lr": lr, "grad_norm": float(grad_norm),
                          "clips_per_s": clips * dist.world_size / max(elapsed, 1e-9),
                          **{f"loss/{k}": v for k, v in mean.items()}}
                tick, clips = time.perf_counter(), 0
                if metrics is not None:
                    metrics.write(record)
                    if progress:
                        progress({**record, "total_steps": setup.total_steps})
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                if metrics is not None:
                    metrics.flush()
                save_last(setup, dist, model, optimizer, state)
            # for resume tests: ends the run as a kill would, without a final checkpoint
            if stop_after is not None and state.step >= stop_after:
                stopped = True
                break
        if stopped:
            break

        # the epoch's end: its mean losses, and a checkpoint at the next epoch's start
        state.epoch_losses = distributed.mean_across(
            dist, {k: state.epoch_sums[k] / state.epoch_counts[k] for k in state.epoch_sums},
            loss_names)
        if metrics is not None:
            metrics.write({"kind": "epoch", "stage": stage, "epoch": epoch, "step": state.step,
                           **{f"loss/{k}": v for k, v in state.epoch_losses.items()}})
        state.epoch, state.step_in_epoch = epoch + 1, 0
        save_last(setup, dist, model, optimizer, state)
    train_time = time.perf_counter() - loop_start

    _gather_skips(state, dist)
    summary: dict[str, Any] = {
        "stage": stage, "stopped_early": stopped, "train_time_s": train_time,
        # this process's steps only (a resumed run times what it ran)
        "step_time_s": train_time / max(1, state.step - first_step)}
    if not stopped and dist.is_main:
        summary.update(_finish(setup, dist, model, state))
        summary["wall_time_s"] = time.perf_counter() - start_time
        write_summary(setup.layout.root, summary)
        plot_loss_curve(setup.layout.metrics, setup.layout.loss_curve)
    distributed.barrier(dist)
    return summary


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


def _gather_skips(state: RunState, dist: distributed.Dist) -> None:
    """Every rank skipped its own undecodable videos and shards: the union, on all."""
    if dist.world_size == 1:
        return
    gathered: list = [None] * dist.world_size
    torch.distributed.all_gather_object(
        gathered, (sorted(state.skipped_videos), sorted(state.skipped_shards)))
    state.skipped_videos = set().union(*(videos for videos, _ in gathered))
    state.skipped_shards = set().union(*(shards for _, shards in gathered))


def _finish(setup: RunSetup, dist: distributed.Dist, model: PromptonomyViT,
            state: RunState) -> dict[str, Any]:
    """Final checkpoint, exported inference weights, validation accuracy."""
    cfg, layout = setup.cfg, setup.layout
    final = layout.final_checkpoint
    files.copy(layout.last_checkpoint, final)
    inference = export_inference(model)
    write_atomic(layout.inference_weights,
                 save({k: v.contiguous() for k, v in inference.state_dict().items()}))

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    summary: dict[str, Any] = {
        "epochs": cfg.epochs, "steps": state.step, "losses": state.epoch_losses,
        "checkpoint": str(final), "inference_weights": str(layout.inference_weights),
        "params_train": count(model), "params_inference": count(inference),
        "skipped_videos": len(state.skipped_videos),
        "skipped_paths": sorted(state.skipped_videos),
        "skipped_shards": len(state.skipped_shards),
        "skipped_shard_paths": sorted(state.skipped_shards),
    }
    if setup.finetune and cfg.val_split:
        records, _ = read_records(cfg.data_format, cfg.data_root, cfg.val_split, cfg.videos_dir,
                                  num_classes=model.num_classes)
        result = evaluate_model(inference.to(dist.device), records,
                                num_frames=cfg.num_frames, img_size=cfg.img_size,
                                stride=cfg.frame_stride, sampling=cfg.sampling,
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                device=dist.device)
        summary.update(top1=result["top1"], top5=result["top5"], val_clips=result["clips"],
                       # per validation clip, in split order: what paired comparisons
                       # between runs (benchmarks/ablation.py) resample
                       val_correct=result["correct"])
        summary["skipped_videos"] += result["skipped_videos"]
        summary["skipped_paths"] = sorted(set(summary["skipped_paths"])
                                          | set(result["skipped_paths"]))
    return summary
