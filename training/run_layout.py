"""Where a training run's files live: the one place that spells their names.

    RUN_DIR/.pvit-run                   says the directory is a run of this project
    RUN_DIR/config.yaml                 the resolved stage config
    RUN_DIR/metrics.jsonl               one line per logged step / epoch
    RUN_DIR/summary.json                the run's summary
    RUN_DIR/loss_curve.png
    RUN_DIR/inference.safetensors       exported weights (no task heads)
    RUN_DIR/<stage>.torchrun.log        the pipeline's torchrun output (several processes)
    RUN_DIR/checkpoints/last.pt         resumable state, rewritten as the run goes
    RUN_DIR/checkpoints/final.pt        the finished run
    RUN_DIR/checkpoints/evaluate/       evaluations of this run's checkpoints
        .stage.json                     its stage record (flows.stage_cache)
        eval_<split>.json               of final.pt
        eval_<stem>_<split>.json        of another checkpoint (e.g. last.pt)

Evaluation results have one home, whoever computes them (``pvit evaluate`` without
``--out``, or the pipeline's evaluate stage): ``evaluation_file(checkpoint, split)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
FINAL = "final.pt"
EVALUATE = "evaluate"


@dataclass(frozen=True)
class RunLayout:
    """The files of the run directory ``root`` (nothing is created here)."""

    root: Path

    def __post_init__(self) -> None:  # a str from a config is fine too
        object.__setattr__(self, "root", Path(self.root))

    @property
    def marker(self) -> Path:
        return self.root / ".pvit-run"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def foreign(self) -> str | None:
        """Why ``root`` must not become a run directory, or None. A missing or empty
        directory is fine, and so is one of this project's runs (its marker, or a
        ``checkpoints/last.pt`` of a run from before the marker): the run resumes or
        refuses another config. Hidden entries and torchrun logs are what the pipeline
        writes before the run starts (its stage record, the torchrun config and log).
        Anything else holds someone's files, which the run's config.yaml, summary.json
        and metrics.jsonl would overwrite."""
        if not self.root.exists():
            return None
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        if self.marker.exists() or self.last_checkpoint.is_file():
            return None
        if any(not entry.name.startswith(".") and not entry.name.endswith(".torchrun.log")
               for entry in self.root.iterdir()):
            return (f"{self.root} already holds files that are not a pvit run; choose a new "
                    "or empty directory")
        return None

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def inference_weights(self) -> Path:
        return self.root / "inference.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints / FINAL

    def owned(self, stage: str) -> list[str]:
        """What a run of ``stage`` writes here, relative to the run directory: what a
        stale pipeline stage removes (and nothing else)."""
        return [self.relative(p) for p in (
            self.marker, self.config, self.metrics, self.summary, self.loss_curve,
            self.inference_weights, self.checkpoints, self.torchrun_config(stage),
            self.torchrun_log(stage))]

    def torchrun_config(self, stage: str) -> Path:
        """The stage config the pipeline hands to ``torchrun`` (DDP on one machine)."""
        return self.root / f".{stage}.torchrun.yaml"

    def torchrun_log(self, stage: str) -> Path:
        return self.root / f"{stage}.torchrun.log"

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory (what a stage record lists)."""
        return path.relative_to(self.root).as_posix()


def evaluation_dir(checkpoint: str | Path) -> Path:
    """The directory holding the evaluations of ``checkpoint`` (and their stage record)."""
    return Path(checkpoint).parent / EVALUATE


def evaluation_name(checkpoint: str | Path, split: str) -> str:
    """The result file's name: ``eval_<split>.json`` for a run's final checkpoint, with
    the checkpoint's stem otherwise, so evaluating ``last.pt`` never overwrites it."""
    stem = Path(checkpoint).stem
    return f"eval_{split}.json" if Path(checkpoint).name == FINAL else f"eval_{stem}_{split}.json"


def evaluation_file(checkpoint: str | Path, split: str) -> Path:
    """Where the evaluation of ``checkpoint`` on ``split`` is written by default."""
    return evaluation_dir(checkpoint) / evaluation_name(checkpoint, split)
