"""Training plots of a finished or running swarm, drawn from its peers' ``metrics.jsonl`` files.

Four panels: loss per peer and mean versus local steps, the same versus wall time, consensus
distance versus wall time, and bytes moved per interaction versus steps. Rendered with
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from swarmnet.errors import ConfigError
from swarmnet.peer.checkpoint import write_atomic
from swarmnet.peer.metrics import read_metrics


@dataclass(frozen=True, slots=True)
class PeerSeries:
    """One peer's training records as arrays (records with a ``loss`` only)."""

    name: str
    step: np.ndarray
    wall: np.ndarray
    """Seconds since the earliest peer of the run started (a common clock for all peers)."""
    loss: np.ndarray
    consensus: np.ndarray
    bytes_per_interaction: np.ndarray


def load_series(run_dir: Path) -> list[PeerSeries]:
    """Every ``<run_dir>/<peer>/metrics.jsonl`` with at least one loss record, sorted by name."""
    runs = {}
    for path in sorted(run_dir.glob("*/metrics.jsonl")):
        records = [r for r in read_metrics(path) if "loss" in r]
        if records:
            runs[path.parent.name] = records
    starts = [float(r["time"]) - float(r["elapsed"]) for records in runs.values() for r in records[:1]
              if isinstance(r.get("time"), (int, float)) and isinstance(r.get("elapsed"), (int, float))]
    origin = min(starts) if starts else None
    return [_series(name, records, origin) for name, records in runs.items()]


def _number(value: Any) -> float:
    """A metrics field as a float; NaN where it is missing or not a number (a hand-edited row)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _series(name: str, records: list[dict[str, Any]], origin: float | None) -> PeerSeries:
    def col(key: str) -> np.ndarray:
        return np.array([_number(r.get(key)) for r in records])

    traffic = col("bytes_in") + col("bytes_out")
    interactions = col("interactions")
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(interactions > 0, traffic / interactions, math.nan)
    wall = col("time") - origin if origin is not None else col("elapsed")
    return PeerSeries(name=name, step=col("step"), wall=wall, loss=col("loss"),
                      consensus=col("consensus"), bytes_per_interaction=per)


def mean_curve(xs: list[np.ndarray], ys: list[np.ndarray], points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Mean of several curves on a common grid over the x range all of them cover
    (linear interpolation). Empty arrays when they share no range."""
    usable = [(x, y) for x, y in zip(xs, ys) if len(x) and np.isfinite(y).any()]
    if not usable:
        return np.array([]), np.array([])
    lo = max(float(np.nanmin(x)) for x, _ in usable)
    hi = min(float(np.nanmax(x)) for x, _ in usable)
    if hi < lo:
        return np.array([]), np.array([])
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    stacked = []
    for x, y in usable:
        keep = np.isfinite(x) & np.isfinite(y)
        order = np.argsort(x[keep])
        stacked.append(np.interp(grid, x[keep][order], y[keep][order]))
    return grid, np.mean(stacked, axis=0)


def plot_run(run_dir: Path, output: Path) -> Path:
    """Draw the four panels for ``run_dir`` into ``output`` (PNG, ``.png`` appended when missing) and
    return the path written; raises FileNotFoundError when no peer has written a loss record yet,
    and ConfigError when a metrics file cannot be read (an OSError is then the output's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if output.suffix.lower() != ".png":
        output = output.with_name(output.name + ".png")
    try:
        series = load_series(run_dir)
    except OSError as exc:  # not the output's: say so, or it reads as a write that failed
        raise ConfigError(f"cannot read {exc.filename or run_dir} ({exc.strerror or exc}); each "
                          "<peer>/metrics.jsonl under the run directory must be a readable file") from None
    if not series:
        raise FileNotFoundError(f"no */metrics.jsonl with loss records under {run_dir}")
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (by_step, by_time), (consensus, traffic) = axes
    many = len(series) > 10
    for s in series:
        label = None if many else s.name
        by_step.plot(s.step, s.loss, lw=0.8, alpha=0.5, label=label)
        by_time.plot(s.wall, s.loss, lw=0.8, alpha=0.5, label=label)
        consensus.plot(s.wall, s.consensus, lw=0.8, alpha=0.7, label=label)
        traffic.plot(s.step, s.bytes_per_interaction, lw=0.8, alpha=0.7, label=label)
    for ax, xs in ((by_step, [s.step for s in series]), (by_time, [s.wall for s in series])):
        gx, gy = mean_curve(xs, [s.loss for s in series])
        if len(gx):
            ax.plot(gx, gy, color="black", lw=2, label="mean")
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="small", ncol=2)
    by_step.set(title="loss vs local steps", xlabel="local step")
    by_time.set(title="loss vs wall time", xlabel="seconds since the first peer started")
    consensus.set(title="consensus distance (EMA of ||Q(C_j) - C_i|| / sqrt 2)", xlabel="seconds since the first peer started",
                  ylabel="consensus distance")
    traffic.set(title="bytes per interaction (in + out, cumulative)", xlabel="local step", ylabel="bytes")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run_dir} ({len(series)} peers)")
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    write_atomic(output, png.getbuffer(), private=False)  # whole or not at all: never an empty file on a full disk
    return output
