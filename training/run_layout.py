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

RUN_DIR may be an object-store prefix (``s3://bucket/runs/x``): then every name here is
a URL string (a ``Path`` would collapse ``s3://`` to ``s3:/``), and the files are read
and written through ``training.files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training import files

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
FINAL = "final.pt"
EVALUATE = "evaluate"


@dataclass(frozen=True)
class RunLayout:
    """The files of the run directory ``root`` (nothing is created here): ``Path``s for a
    local directory, URL strings for an object-store prefix."""

    root: Path | str

    def __post_init__(self) -> None:  # a str from a config is fine too
        object.__setattr__(self, "root", files.location(self.root))

    @property
    def remote(self) -> bool:
        return isinstance(self.root, str)

    def _at(self, *names: str) -> Path | str:
        return files.join(self.root, *names)

    @property
    def marker(self) -> Path | str:
        return self._at(".pvit-run")

    @property
    def config(self) -> Path | str:
        return self._at("config.yaml")

    def foreign(self) -> str | None:
        """Why ``root`` must not become a run directory, or None. A missing or empty
        directory is fine, and so is one of this project's runs (its marker, or a
        ``checkpoints/last.pt`` of a run from before the marker): the run resumes or
        refuses another config. Hidden entries and torchrun logs are what the pipeline
        writes before the run starts (its stage record, the torchrun config and log).
        Anything else holds someone's files, which the run's config.yaml, summary.json
        and metrics.jsonl would overwrite. On an object store, the same for its keys."""
        if self.remote:
            return self._foreign_objects()
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

    def _foreign_objects(self) -> str | None:
        from generation.dataset.storage import Location
        where = Location(self.root)
        names = [key[len(where.root) + 1:] for key in where.fs.find(where.root)]
        top = {n.split("/", 1)[0] for n in names}
        if ".pvit-run" in top or f"{CHECKPOINTS}/{LAST}" in names:
            return None
        if any(not n.startswith(".") and not n.endswith(".torchrun.log") for n in top):
            return (f"{self.root} already holds objects that are not a pvit run; choose a "
                    "new or empty prefix")
        return None

    @property
    def metrics(self) -> Path | str:
        return self._at("metrics.jsonl")

    @property
    def summary(self) -> Path | str:
        return self._at("summary.json")

    @property
    def loss_curve(self) -> Path | str:
        return self._at("loss_curve.png")

    @property
    def inference_weights(self) -> Path | str:
        return self._at("inference.safetensors")

    @property
    def checkpoints(self) -> Path | str:
        return self._at(CHECKPOINTS)

    @property
    def last_checkpoint(self) -> Path | str:
        return self._at(CHECKPOINTS, LAST)

    @property
    def final_checkpoint(self) -> Path | str:
        return self._at(CHECKPOINTS, FINAL)

    def owned(self, stage: str) -> list[str]:
        """What a run of ``stage`` writes here, relative to the run directory: what a
        stale pipeline stage removes (and nothing else)."""
        return [self.relative(p) for p in (
            self.marker, self.config, self.metrics, self.summary, self.loss_curve,
            self.inference_weights, self.checkpoints, self.torchrun_config(stage),
            self.torchrun_log(stage))]

    def torchrun_config(self, stage: str) -> Path | str:
        """The stage config the pipeline hands to ``torchrun`` (DDP on one machine)."""
        return self._at(f".{stage}.torchrun.yaml")

    def torchrun_log(self, stage: str) -> Path | str:
        return self._at(f"{stage}.torchrun.log")

    def relative(self, path: Path | str) -> str:
        """``path`` relative to the run directory (what a stage record lists)."""
        if self.remote:
            return str(path)[len(self.root) + 1:]
        return Path(path).relative_to(self.root).as_posix()


def evaluation_dir(checkpoint: str | Path) -> Path | str:
    """The directory holding the evaluations of ``checkpoint`` (and their stage record)."""
    return files.join(files.parent(checkpoint), EVALUATE)


def evaluation_name(checkpoint: str | Path, split: str) -> str:
    """The result file's name: ``eval_<split>.json`` for a run's final checkpoint, with
    the checkpoint's stem otherwise, so evaluating ``last.pt`` never overwrites it."""
    name = files.name(checkpoint)
    stem = Path(name).stem
    return f"eval_{split}.json" if name == FINAL else f"eval_{stem}_{split}.json"


def evaluation_file(checkpoint: str | Path, split: str) -> Path | str:
    """Where the evaluation of ``checkpoint`` on ``split`` is written by default."""
    return files.join(evaluation_dir(checkpoint), evaluation_name(checkpoint, split))
