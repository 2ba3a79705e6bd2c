"""Typed configs of the training stages: ``pretrain``, ``finetune`` and ``evaluate``.

Each is one section of the experiment YAML (``configs/demo.yaml``). Unknown keys are
rejected, every default says where it comes from, and the checks that involve more than
one field live in one validator per class (their messages start with the field's
name). ``flows.experiment.load_experiment`` reads the file and applies overrides; only
factories (``training.model``, ``training.train``) read these objects; layers take
plain arguments.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from generation.dataset.storage import dataset_path

# training.tasks and training.model (the registries the validators read) stay inside
# _task_registry() and _check_shared(): they import torch (2.4 s, python -X importtime
# after flows.cli), and every `pvit` command imports this module (flows.experiment; `pvit
# --help` takes 0.33 s) while only validating a training section needs them.

Variant = Literal["vit", "mt", "pvit"]
DataFormat = Literal["ssv2", "list"]
Sampling = Literal["stride", "segments"]
# what training does with a synthetic shard that fails to decode mid-run: stop with one
# line naming it, or skip it (warned, counted in the summary) and go on with the rest
BadShards = Literal["stop", "skip"]
# where ``init`` came from (one converter each, training/convert.py); None: a pvit
# checkpoint when the file carries our format marker, else timm image weights
InitFormat = Literal["pvit", "timm_image", "torchvision_mvit", "videomae", "videomae_hf"]

# descriptions (the CLI's help) of the fields that several sections declare
RUN_DIR = "run directory: config.yaml, metrics.jsonl, checkpoints"
INIT_FORMAT = "format of init; unset: pvit for a pvit checkpoint, else timm_image"
DATA_FORMAT = ("layout of the data set; ssv2: labels/*.json + videos/<id>.webm, list: "
               "`path label` lines")


def _task_registry() -> Any:
    import training.tasks

    return training.tasks


class LossWeights(BaseModel):
    """Per-task loss weights, one key per registered task (``training.tasks``), plus
    ``action``; defaults are the paper's, declared by each task's module (depth 0.5,
    normals 0.5, segmentation 0.1, pose 3.0, boxes 0.1)."""

    # the task keys are not declared here: the registry fills them (see _fill)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    action: float = Field(1.0, ge=0)  # downstream cross-entropy

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        tasks = _task_registry().TASKS
        data = dict(data or {})
        unknown = sorted(set(data) - set(tasks) - {"action"})
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}, choose from "
                             f"{['action', *tasks]}")
        for name, task in tasks.items():
            value = data.setdefault(name, task.weight)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0 <= value < math.inf):
                raise ValueError(f"{name}: weight {value!r} is not a finite number >= 0")
            data[name] = float(value)
        return data


class _TrainStage(BaseModel):
    """Fields shared by the two training stages."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = Field("runs/pretrain", description=RUN_DIR)
    seed: int = Field(0, ge=0, lt=2**32)  # torch, numpy and python RNGs all take it
    # --- model ---
    model: str = Field("pvit_tiny", description=(
        "a registered model (training/model.py): pvit_test, pvit_tiny, pvit_small, pvit_base, "
        "mvitv2_s (the paper's backbone), videomae_vit_s, videomae_vit_b"))
    variant: Variant = Field("pvit", description="vit: no prompts or heads, mt: task heads on "
                             "CLS, pvit: task prompts; pretraining takes mt or pvit")
    num_frames: int = Field(16, ge=1, le=1024)  # the paper's 16x4 clips
    img_size: int = Field(224, ge=16, le=4096)  # the paper's 224 crops
    tubelet_size: int = Field(2, ge=1)  # frames per patch (2x16x16 tubelets)
    # registered names (training/tasks/); default: every task marked default (all but boxes)
    tasks: list[str] = Field(default_factory=lambda: _task_registry().default_tasks())
    prompts_per_task: int = Field(1, ge=1)  # the paper uses one token per task
    label_size: int = Field(56, ge=4)  # dense heads predict maps of this size (pixels)
    pose_slots: int = Field(8, ge=1)  # object slots of the pose head (max objects/scene)
    depth_max_m: float = Field(20.0, gt=0)  # depth clipped here (background is +inf)
    dropout: float = Field(0.5, ge=0, lt=1)  # before the classifier, as the paper
    drop_path: float = Field(0.1, ge=0, lt=1)
    head_dropout: float = Field(0.1, ge=0, lt=1)  # inside the task heads (paper: dropout)
    loss_weights: LossWeights = Field(default_factory=LossWeights)
    # --- data ---
    synthetic: Optional[str] = Field("data/synthetic", description=(
        "shard directory written by `pvit generate` (finetune: mixed into batches)"))
    shuffle_buffer: int = Field(64, ge=1)  # clips held by the webdataset sample shuffle
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random-resized-crop area range
    flip: bool = True  # random horizontal flip (normals' x and poses are mirrored too)
    num_workers: int = Field(2, ge=0)
    bad_shards: BadShards = "stop"  # a shard that does not decode: stop | skip (and count)
    # --- optimisation ---
    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(8, ge=1)  # per process; synthetic and real each
    lr: float = Field(1.5e-4, gt=0)  # AdamW peak learning rate
    min_lr: float = Field(1e-6, ge=0)  # end of the cosine
    weight_decay: float = Field(1e-4, ge=0)  # the paper's 1e-4
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables
    amp: bool = True  # bf16 autocast, CUDA only (ignored on CPU)
    compile: bool = False  # torch.compile the model
    # processes the pipeline's training task starts with torchrun on its machine;
    # None = one per visible GPU (1 without CUDA). Plain `pvit pretrain|finetune` runs
    # one process unless started under torchrun itself.
    nproc_per_node: Optional[int] = Field(None, ge=1, le=64)
    log_every: int = Field(10, ge=1)  # steps between metrics.jsonl lines
    checkpoint_every: int = Field(0, ge=0)  # steps between mid-epoch checkpoints; 0: epochs only

    @field_validator("synthetic", mode="before")
    @classmethod
    def _check_synthetic(cls, value: Any) -> Any:
        # a run parameter: refuse schemes (pipe:...) before anything opens the shards
        return str(dataset_path(value)) if value else value

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, value: list[str]) -> list[str]:
        names = _task_registry().task_names()
        for name in value:
            if name not in names:
                raise ValueError(f"unknown task '{name}', choose from {names}")
        return value

    @model_validator(mode="after")
    def _check_shared(self) -> "_TrainStage":
        from training.model import list_models  # the registry is the source of truth

        if self.model not in list_models():
            raise ValueError(f"model: unknown '{self.model}', choose from {list_models()}")
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames: {self.num_frames} is not a multiple of "
                f"tubelet_size {self.tubelet_size}")
        if self.crop_scale[0] > self.crop_scale[1] or not 0 < self.crop_scale[0] <= 1:
            raise ValueError(f"crop_scale: {self.crop_scale} is not 0 < min <= max <= 1")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} is above lr {self.lr}")
        if self.variant != "vit" and not self.tasks:
            raise ValueError(f"tasks: variant '{self.variant}' needs at least one synthetic task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: duplicate entries in {self.tasks}")
        if self.init_format and not self.init:
            raise ValueError(f"init_format: '{self.init_format}' names the format of init, "
                             "which is not set")
        return self

    def model_kwargs(self, num_classes: int, num_seg_classes: int) -> dict[str, Any]:
        """Arguments of ``create_model`` besides the name; stored in checkpoints."""
        return dict(
            variant=self.variant, num_frames=self.num_frames, img_size=self.img_size,
            tubelet_size=self.tubelet_size, num_classes=num_classes,
            tasks=list(self.tasks) if self.variant != "vit" else [],
            prompts_per_task=self.prompts_per_task, label_size=self.label_size,
            pose_slots=self.pose_slots, num_seg_classes=num_seg_classes,
            drop_rate=self.dropout, drop_path_rate=self.drop_path,
            head_drop_rate=self.head_dropout)


class PretrainConfig(_TrainStage):
    """Prompt pretraining on synthetic shards: all heads, no downstream task."""

    init: Optional[str] = Field(None, description="initial weights: a video checkpoint (see "
                                "init_format), image timm weights, or none (scratch)")
    init_format: Optional[InitFormat] = Field(None, description=INIT_FORMAT)

    @model_validator(mode="after")
    def _check_pretrain(self) -> "PretrainConfig":
        if self.variant == "vit":
            raise ValueError(
                "variant: 'vit' has no synthetic heads, so there is nothing to pretrain")
        if not self.synthetic:
            raise ValueError("synthetic: pretraining needs a shard directory")
        return self


class FinetuneConfig(_TrainStage):
    """Downstream training with synthetic batches mixed in (the paper's joint recipe)."""

    out: str = Field("runs/finetune", description=RUN_DIR)
    init: Optional[str] = Field(None, description=(
        "initial weights: a pretrain checkpoint (.pt), a video checkpoint (see init_format), "
        "image timm weights (.safetensors/.pth), or none (scratch)"))
    init_format: Optional[InitFormat] = Field(None, description=INIT_FORMAT)
    data_format: DataFormat = Field("list", description=DATA_FORMAT)
    data_root: Optional[str] = Field(None, description="root of the downstream data set "
                                     "(required)")
    videos_dir: str = "videos"  # SSv2 only: the folder of <id>.webm under data_root
    train_split: str = "train"  # ssv2: labels/<split>.json; list: <data_root>/<split>.txt
    val_split: str = "validation"  # evaluated after the last epoch ("" skips it)
    sampling: Sampling = "stride"  # stride: frame_stride apart; segments: one per segment (SSv2)
    frame_stride: int = Field(4, ge=1)  # the paper's 16x4
    # synthetic clips per real clip in a batch; the paper's supplement uses 64+64 (1.0)
    synthetic_ratio: float = Field(1.0, ge=0, le=3)  # the paper caps synthetic at 3x real
    lr: float = Field(7e-5, gt=0)  # the paper's SSv2 learning rate
    # the paper's control (benchmarks/ablation.py pvit_shuffled): each synthetic clip is
    # trained on another clip's labels, so label statistics stay and meaning goes
    shuffle_synthetic_labels: bool = False

    @model_validator(mode="after")
    def _check_finetune(self) -> "FinetuneConfig":
        if not self.data_root:
            raise ValueError("data_root: fine-tuning needs a downstream data set")
        if self.synthetic_ratio > 0 and self.variant != "vit" and not self.synthetic:
            raise ValueError("synthetic: synthetic_ratio > 0 needs a shard directory")
        return self

    @property
    def synthetic_batch_size(self) -> int:
        """Synthetic clips per step; 0 when they would carry no loss (variant vit)."""
        if self.variant == "vit" or not self.synthetic:
            return 0
        return round(self.batch_size * self.synthetic_ratio)


class EvaluateConfig(BaseModel):
    """Top-1/top-5 of a checkpoint on a downstream split, single and multi-view."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint: Optional[str] = None  # a finetune checkpoint (.pt); set by the command
    data_format: DataFormat = Field("list", description=DATA_FORMAT)
    data_root: Optional[str] = Field(None, description="root of the downstream data set "
                                     "(required)")
    videos_dir: str = "videos"
    split: str = Field("validation", description="split to evaluate")
    # left/centre/right, as the paper's 3 at test
    spatial_crops: int = Field(3, ge=1, le=3, description="crops per clip, 1 or 3")
    temporal_clips: int = Field(2, ge=1, description="clips per video, spread evenly over it "
                                "(multi-view)")
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    # unset: training.run_layout.evaluation_file
    out: Optional[str] = Field(None, description=(
        "result JSON; unset: the run's evaluation home, CHECKPOINT_DIR/evaluate/, shared "
        "with the pipeline"))

    @model_validator(mode="after")
    def _check(self) -> "EvaluateConfig":
        if not self.data_root:
            raise ValueError("data_root: evaluation needs a downstream data set")
        return self
