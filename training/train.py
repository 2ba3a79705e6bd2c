"""The training loop of both stages, as plain functions (Prefect tasks wrap them).

    run_pretrain(cfg)  synthetic shards only, every task head
    run_finetune(cfg)  real clips + synthetic clips mixed in each batch (the joint recipe)

Read top to bottom: setup -> data -> model (resume > init > scratch) -> optimizer ->
one loop -> summary. A run whose directory holds ``checkpoints/last.pt`` resumes from
it (model, optimizer, schedule position, RNG), so a retried task continues instead of
starting over, and a resumed run matches an uninterrupted one step for step.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from generation.locations import check_writable_dir
from generation.shard_format import CLASSES
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
from training.synthetic_data import SceneTransform, synthetic_batches, synthetic_index
from training.tasks import target_keys
from training.video_data import (
    VideoClips,
    VideoRecord,
    collate_videos,
    epoch_batches,
    read_records,
    require_decodable,
)

# the target keys of the built-in tasks, as samples carry them (training/tasks/)
SCENE_KEYS = target_keys()
# arguments a checkpoint must share with the model it initialises / resumes
SAME_ARCH = ("variant", "tasks", "prompts_per_task", "tubelet_size", "num_seg_classes")

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
    for key in sorted(set(ours) | set(state["config"])):
        if key not in RESUME_FREE and state["config"].get(key) != ours.get(key):
            raise CheckpointError(
                f"checkpoint: {path} was made with {key}={state['config'].get(key)!r}, this run "
                f"has {ours.get(key)!r}; use a new --out (or the same config) to resume")


class InputError(ValueError):
    """A path or checkpoint named by the config that cannot be used (one line)."""


def preflight(stage: str, cfg: PretrainConfig | FinetuneConfig) -> None:
    """Check every input the run will read, before any training; raises ``InputError``
    naming the field. The commands call it so bad input exits 2 with one line."""
    try:
        check_writable_dir(cfg.out, "out")
        num_classes = 0
        if stage == "finetune":
            # bad labels, or a split none of whose videos decode, are bad input like a
            # missing split: found here, before training, so exit 2 like the rest
            _, num_classes = _real_records(cfg)
        classes = CLASSES  # no synthetic data: the built-in list (the head is unused)
        if stage == "pretrain" or cfg.synthetic_batch_size:
            classes = synthetic_index(cfg.synthetic).classes  # the manifest is the contract
        kwargs = cfg.model_kwargs(num_classes=num_classes, num_seg_classes=len(classes))
        last = Path(cfg.out) / "checkpoints" / "last.pt"
        if last.is_file():  # a resume must be of this very model and config
            state = load_checkpoint(last)
            check_compatible(state, cfg.model, kwargs, tuple(kwargs), last)
            check_resumable(state, cfg, last)
        elif cfg.init:
            _initial_weights(cfg, create_model(cfg.model, **kwargs), kwargs)
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


def _run(stage: str, cfg: PretrainConfig | FinetuneConfig, progress: Progress,
         stop_after: Optional[int]) -> dict[str, Any]:
    start_time = time.perf_counter()
    dist = distributed.setup()
    device = dist.device
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout differs per rank, reproducibly

    # --- data -----------------------------------------------------------------------
    finetune = stage == "finetune"
    num_classes, real_records = 0, []
    if finetune:
        # checked again here: Prefect tasks call run_finetune without the preflight
        real_records, num_classes = _real_records(cfg)
    synthetic_bs = cfg.synthetic_batch_size if finetune else cfg.batch_size
    index = synthetic_index(cfg.synthetic) if synthetic_bs else None
    urls = index.urls if index else []
    if finetune:
        steps_per_epoch = len(epoch_batches(len(real_records), cfg.batch_size, epoch=0,
                                            seed=cfg.seed, shuffle=True,
                                            world_size=dist.world_size))
    else:
        steps_per_epoch = max(1, index.clips // (cfg.batch_size * dist.world_size))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    scene = SceneTransform(num_frames=cfg.num_frames, img_size=cfg.img_size,
                           label_size=cfg.label_size, depth_max_m=cfg.depth_max_m,
                           pose_slots=cfg.pose_slots, crop_scale=tuple(cfg.crop_scale),
                           flip=cfg.flip, train=True,
                           tasks=tuple(cfg.tasks) if cfg.variant != "vit" else ())

    # --- model: resume > init > scratch ----------------------------------------------
    seg_classes = len(index.classes) if index else len(CLASSES)  # from the manifest
    model_kwargs = cfg.model_kwargs(num_classes=num_classes, num_seg_classes=seg_classes)
    model = create_model(cfg.model, **model_kwargs)
    last = ckpt_dir / "last.pt"
    resume = load_checkpoint(last) if last.is_file() else None
    if resume is not None:
        check_compatible(resume, cfg.model, model_kwargs, tuple(model_kwargs), last)
        check_resumable(resume, cfg, last)
        model.load_state_dict(resume["model"])
    else:
        weights = _initial_weights(cfg, model, model_kwargs)
        if weights is not None:
            model.load_state_dict(weights)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    start_epoch = start_in_epoch = 0
    skipped: set[str] = set()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if resume["scheduler"] != {"total_steps": total_steps, "warmup_steps": warmup_steps}:
            raise CheckpointError(f"checkpoint: {last} was made with another schedule "
                                  f"{resume['scheduler']}; use a new --out")
        start_epoch, start_in_epoch = resume["epoch"], resume["step_in_epoch"]
        skipped = set(resume["skipped"])
        rngs = resume["rng"]  # one per rank of the run that saved it
        restore_rng(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
    step = start_epoch * steps_per_epoch + start_in_epoch

    forward: nn.Module = TrainForward(model)
    if dist.world_size > 1:
        forward = nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda"
                else nullcontext())
    weights = cfg.loss_weights.model_dump()
    loss_names = ["total", *(["action"] if finetune else []), *model.tasks]

    if dist.is_main:
        write_config(run_dir, stage, cfg.model_dump(mode="json"))
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step)

    sums: dict[str, float] = {}  # running loss sums of the current epoch
    counts: dict[str, int] = {}

    def save(path: Path, epoch: int, in_epoch: int) -> None:
        rng = [capture_rng()]
        if dist.world_size > 1:  # every rank's RNG, so each resumes its own dropout stream
            rng = [None] * dist.world_size
            torch.distributed.all_gather_object(rng, capture_rng())
        if dist.is_main:
            save_checkpoint(path, {
                "stage": stage, "model_name": cfg.model, "model_kwargs": model_kwargs,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": {"total_steps": total_steps, "warmup_steps": warmup_steps},
                "epoch": epoch, "step_in_epoch": in_epoch, "step": step,
                "rng": rng, "config": cfg.model_dump(mode="json"), "skipped": sorted(skipped),
                "epoch_losses": epoch_losses,  # of the last finished epoch (for the summary)
                # a mid-epoch checkpoint carries the epoch's running loss sums
                "epoch_sums": dict(sums) if in_epoch else {},
                "epoch_counts": dict(counts) if in_epoch else {}})

    # --- the loop ----------------------------------------------------------------------
    # a finished run that is started again trains nothing and reports its last epoch
    epoch_losses: dict[str, float] = dict(resume["epoch_losses"]) if resume else {}
    stopped = False
    loop_start, first_step = time.perf_counter(), step
    for epoch in range(start_epoch, cfg.epochs):
        real_iter, synth_iter = _epoch_iterators(cfg, finetune, real_records, urls, scene,
                                                 synthetic_bs, epoch, dist)
        skip = start_in_epoch if epoch == start_epoch else 0
        resumed_mid_epoch = resume is not None and skip > 0
        sums = dict(resume["epoch_sums"]) if resumed_mid_epoch else {}
        counts = dict(resume["epoch_counts"]) if resumed_mid_epoch else {}
        tick, clips_since = time.perf_counter(), 0
        for in_epoch in range(steps_per_epoch):
            real = next(real_iter) if real_iter is not None else None
            synth = next(synth_iter) if synth_iter is not None else None
            if in_epoch < skip:  # resumed mid-epoch: replay the data, not the step
                continue
            if real is not None:
                skipped.update(real["skipped"])
            shuffle = _label_shuffle(cfg, synth, step)
            video, targets = _assemble(real, synth, device, shuffle)
            if video is None:  # every real video failed and there is no synthetic part
                step += 1
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps,
                                    lr=cfg.lr, min_lr=cfg.min_lr)
            with autocast:
                outputs = forward(video)
            outputs = {k: v.float() for k, v in outputs.items()}
            loss, parts = compute_losses(outputs, targets, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            step += 1
            clips_since += video.shape[0]
            values = {"total": loss.item(), **{k: v.item() for k, v in parts.items()}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            if step % cfg.log_every == 0 or in_epoch == steps_per_epoch - 1:
                mean = distributed.mean_across(dist, values, loss_names)
                elapsed = time.perf_counter() - tick
                record = {"kind": "step", "stage": stage, "step": step, "epoch": epoch,
                          "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                          "clips_per_s": clips_since * dist.world_size / max(elapsed, 1e-9),
                          **{f"loss/{k}": v for k, v in mean.items()}}
                tick, clips_since = time.perf_counter(), 0
                if dist.is_main:
                    metrics.write(record)
                    if progress:
                        progress({**record, "total_steps": total_steps})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(last, epoch, in_epoch + 1)
            if stop_after is not None and step >= stop_after:
                stopped = True
                break
        if stopped:
            break
        epoch_losses = distributed.mean_across(
            dist, {k: sums[k] / counts[k] for k in sums}, loss_names)
        if dist.is_main:
            metrics.write({"kind": "epoch", "stage": stage, "epoch": epoch, "step": step,
                           **{f"loss/{k}": v for k, v in epoch_losses.items()}})
        save(last, epoch + 1, 0)

    train_time = time.perf_counter() - loop_start
    if dist.world_size > 1:  # every rank skipped its own undecodable videos
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, sorted(skipped))
        skipped = set().union(*gathered)
    summary: dict[str, Any] = {
        "stage": stage, "stopped_early": stopped, "train_time_s": train_time,
        # this process's steps only (a resumed run times what it ran)
        "step_time_s": train_time / max(1, step - first_step)}
    if not stopped and dist.is_main:
        summary.update(_finish(stage, cfg, model, run_dir, ckpt_dir, last, epoch_losses,
                               skipped, step, dist, device))
        summary["wall_time_s"] = time.perf_counter() - start_time
        write_summary(run_dir, summary)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    distributed.barrier(dist)
    return summary


def _epoch_iterators(cfg, finetune, real_records, urls, scene, synthetic_bs, epoch, dist
                     ) -> tuple[Optional[Iterator], Optional[Iterator]]:
    real_iter = synth_iter = None
    if finetune:
        dataset = VideoClips(real_records, num_frames=cfg.num_frames, img_size=cfg.img_size,
                             stride=cfg.frame_stride, sampling=cfg.sampling, train=True,
                             seed=cfg.seed)
        dataset.epoch = epoch
        batches = epoch_batches(len(real_records), cfg.batch_size, epoch=epoch, seed=cfg.seed,
                                shuffle=True, rank=dist.rank, world_size=dist.world_size)
        # the loader's own generator: creating it must not consume the global RNG
        real_iter = iter(DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                    collate_fn=collate_videos,
                                    **loader_worker_kwargs(cfg.num_workers),
                                    generator=torch.Generator().manual_seed(cfg.seed + epoch)))
    if synthetic_bs:
        synth_iter = synthetic_batches(urls, scene, batch_size=synthetic_bs,
                                       seed=cfg.seed * 1000 + dist.rank, epoch=epoch,
                                       shuffle_buffer=cfg.shuffle_buffer,
                                       num_workers=cfg.num_workers, world_size=dist.world_size)
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


def _finish(stage, cfg, model, run_dir, ckpt_dir, last, epoch_losses, skipped, step, dist,
            device) -> dict[str, Any]:
    """Final checkpoint, exported inference weights, validation accuracy."""
    final = ckpt_dir / "final.pt"
    shutil.copyfile(last, final.with_name("final.pt.tmp"))
    final.with_name("final.pt.tmp").replace(final)
    inference = export_inference(model)
    tmp = run_dir / "inference.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in inference.state_dict().items()}, str(tmp))
    tmp.replace(run_dir / "inference.safetensors")
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    summary: dict[str, Any] = {
        "epochs": cfg.epochs, "steps": step, "losses": epoch_losses,
        "checkpoint": str(final), "inference_weights": str(run_dir / "inference.safetensors"),
        "params_train": count(model), "params_inference": count(inference),
        "skipped_videos": len(skipped), "skipped_paths": sorted(skipped),
    }
    if stage == "finetune" and cfg.val_split:
        records, _ = read_records(cfg.data_format, cfg.data_root, cfg.val_split, cfg.videos_dir,
                                  num_classes=model.num_classes)
        result = evaluate_model(inference.to(device), records, num_frames=cfg.num_frames,
                                img_size=cfg.img_size, stride=cfg.frame_stride,
                                sampling=cfg.sampling, batch_size=cfg.batch_size,
                                num_workers=cfg.num_workers, device=device)
        summary.update(top1=result["top1"], top5=result["top5"], val_clips=result["clips"],
                       # per validation clip, in split order: what paired comparisons
                       # between runs (benchmarks/ablation.py) resample
                       val_correct=result["correct"])
        summary["skipped_videos"] += result["skipped_videos"]
        summary["skipped_paths"] = sorted(set(summary["skipped_paths"])
                                          | set(result["skipped_paths"]))
    return summary
