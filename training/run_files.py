"""How a run's files are written (their names: ``training.run_layout``): the config,
metrics, summary and loss curve. Whole files are written to a temporary name
and renamed into place; ``metrics.jsonl`` is appended line by line. A run on an object
store (``training.files``) writes each file as one object; there is no appending to an
object, so ``metrics.jsonl`` is written whole at each logged line (one small PUT per
``log_every`` steps), and a killed run leaves the lines up to its last write."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import yaml

from generation.dataset.storage import write_atomic
from training import files
from training.run_layout import RunLayout

# matplotlib stays inside plot_loss_curve(), which runs once at the end of a run:
# matplotlib and pyplot take 0.37 s (python -X importtime after training.evaluate, which
# takes 2.4 s and imports this module for write_text_atomic alone) in every process that
# imports training.train or training.evaluate (`pvit evaluate`, each DDP rank).


def write_text_atomic(path: Path | str, text: str) -> None:
    write_atomic(path, text.encode())


def start_run_dir(layout: RunLayout) -> None:
    """Make ``layout.root`` a run directory (its marker): on an object store nothing else
    needs creating."""
    if layout.remote:
        if not files.is_file(layout.marker):
            files.write_bytes(layout.marker, b"")
        return
    Path(layout.checkpoints).mkdir(parents=True, exist_ok=True)
    Path(layout.marker).touch()


def write_config(run_dir: Path, stage: str, config: dict[str, Any]) -> None:
    write_text_atomic(RunLayout(run_dir).config, yaml.safe_dump({stage: config}, sort_keys=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    write_text_atomic(RunLayout(run_dir).summary, text)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or epoch."""

    def __init__(self, path: Path | str, resume_step: int = 0):
        self.path = path
        self.remote = files.remote(path)
        # a resumed run redoes the steps after its checkpoint: drop their old lines
        self.lines: list[str] = []
        if resume_step and files.is_file(path):
            self.lines = [line for line in files.read_bytes(path).decode().splitlines()
                          if line and json.loads(line).get("step", 0) <= resume_step]
        write_text_atomic(path, "".join(line + "\n" for line in self.lines))
        self.pending, self.flushed = False, time.monotonic()

    # An object is replaced whole, never appended to: on a bucket the log is uploaded at
    # most this often (and at every epoch record and flush()), not once per line, which
    # made a long run's uploads grow with the square of its length.
    REMOTE_FLUSH_S = 30.0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.remote:
            self.lines.append(line)
            self.pending = True
            if (record.get("kind") != "step"
                    or time.monotonic() - self.flushed >= self.REMOTE_FLUSH_S):
                self.flush()
            return
        with Path(self.path).open("a") as f:
            f.write(line + "\n")

    def flush(self) -> None:
        """Upload what is not on the bucket yet (the training loop calls it before each
        checkpoint, so a resumed run finds every line up to its checkpoint)."""
        if self.remote and self.pending:
            write_text_atomic(self.path, "".join(x + "\n" for x in self.lines))
            self.pending, self.flushed = False, time.monotonic()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in files.read_bytes(path).decode().splitlines() if line]


def plot_loss_curve(metrics_path: Path | str, png_path: Path | str) -> None:
    """Total and per-task training losses against the optimizer step."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("kind") == "step"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    names = sorted({k[len("loss/"):] for r in rows for k in r if k.startswith("loss/")})
    for name in ["total", *[n for n in names if n != "total"]]:
        pts = [(r["step"], r[f"loss/{name}"]) for r in rows if f"loss/{name}" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=name, linewidth=2 if name == "total" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(png_path, png.getvalue())
