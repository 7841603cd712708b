"""Metric sinks behind one interface, so the training loop has no `if wandb:` branches, and the plot.

    MetricSink.log(step, {name: value})  ->  metrics.jsonl (one object per step), TensorBoard, W&B

`NullSink` is the null object (ranks other than 0, W&B off); `PrefixSink` names a sweep member's
keys in a shared W&B run; `plot_curves` draws metrics.jsonl as training_curves.png.
"""
from __future__ import annotations

import json
import math
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from saelab import plots
from saelab.errors import UsageError

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    """Accepts everything, writes nothing (ranks other than 0, disabled loggers)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """`metrics.jsonl`: one JSON object per log step. On resume, lines past `resume_step` (written
    by the killed run after its last checkpoint) are dropped, so the file reads as one clean run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        self._fh = open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """TensorBoard event files under `log_dir` (the default metrics viewer)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._w.add_scalar(k, v, step)

    def close(self) -> None:
        self._w.close()


class WandbSink:
    """Weights & Biases; offline unless WANDB_MODE is set or an API key is configured."""

    def __init__(self, project: str, name: str, config: dict[str, Any], out: Path):
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb needs the wandb package, which is not installed. "
                             "Install it with: pip install 'saelab[wandb]'") from None
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self._run = wandb.init(project=project, name=name, config=config, dir=str(out), mode=mode)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class PrefixSink:
    """Forward to a shared sink with keys prefixed (one W&B run for a whole sweep); closes nothing."""

    def __init__(self, sink: MetricSink, prefix: str):
        self.sink, self.prefix = sink, prefix

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.sink.log(step, {self.prefix + k: v for k, v in metrics.items()})

    def close(self) -> None:
        pass


class MultiSink:
    """Fan out to several sinks; a sink keyed by run name only sees that run's metrics."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training curves (loss, FVU, L0, dead fraction; validation points where present) as a PNG."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return
    panels = [("loss", "val_loss"), ("fvu", "val_fvu"), ("l0", "val_l0"), ("dead_frac", "val_dead_frac")]
    fig, axes = plots.figure(9, 6, rows=2, cols=2)
    for ax, (train_key, val_key) in zip(axes.flat, panels):
        for key, style in ((train_key, "-"), (val_key, "o-")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=key, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(train_key)
        ax.legend(fontsize=8)
    plots.save(fig, png_path)
