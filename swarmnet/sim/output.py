"""Writing simulation curves: CSV and JSON lines per run, one PNG per sweep, a summary JSON.

A curve is a list of points (dicts of floats) as :meth:`Engine.observe` returns them. Column
order is fixed for the common keys and alphabetical for task-specific ones, so files of
different runs line up.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from swarmnet import jsonsafe

LEADING = (
    "nodes",
    "draws",
    "interactions",
    "parallel_time",
    "time",
    "node_steps",
    "loss_node",
    "loss_mean",
    "consensus",
    "bits_mean",
    "bits_max",
    "clock_sum",
    "clock_dev",
    "clock_spread",
)


COUNTS = frozenset({"nodes", "draws", "interactions", "node_steps"})
"""Columns that count things: written as integers (the engine keeps every point's values as floats)."""


def _cell(key: str, value: float) -> float | int | None:
    """A point's value as the files hold it: counts as integers, non-finite values as None."""
    if not math.isfinite(value):
        return None
    return int(value) if key in COUNTS else value


def columns(points: Sequence[Mapping[str, float]]) -> list[str]:
    keys: set[str] = set()
    for point in points:
        keys.update(point)
    return [k for k in LEADING if k in keys] + sorted(keys - set(LEADING))


@contextlib.contextmanager
def _replacing(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A file that replaces ``path`` once written in full: a full disk leaves no truncated
    curve behind (a sibling temporary file, removed on failure; created under the umask)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open(mode, newline="" if "b" not in mode else None) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # a failed write() names no file: say which one it was
        raise


def write_csv(path: Path, points: Sequence[Mapping[str, float]]) -> None:
    names = columns(points)
    with _replacing(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for point in points:
            writer.writerow({k: _csv_cell(k, point[k]) if k in point else "" for k in names})


def write_jsonl(path: Path, points: Sequence[Mapping[str, float]], meta: Mapping[str, Any]) -> None:
    """First line: ``{"run": meta}``; then one point per line (NaN written as null)."""
    with _replacing(path) as fh:
        fh.write(jsonsafe.dumps({"run": dict(meta)}, default=str) + "\n")
        for point in points:
            fh.write(json.dumps({k: _cell(k, v) for k, v in point.items()}) + "\n")


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    """Strict JSON: a diverged run's NaN figures are written as null (jq and JavaScript refuse NaN)."""
    with _replacing(path) as fh:
        fh.write(jsonsafe.dumps(summary, indent=2, default=str) + "\n")


def _csv_cell(key: str, value: float) -> str:
    """repr keeps every float's digits; NaN and inf stay as Python spells them."""
    return repr(value) if not math.isfinite(value) else repr(_cell(key, value))


def plot(
    path: Path, runs: Sequence[tuple[str, int, Sequence[Mapping[str, float]]]], title: str
) -> None:
    """Two panels versus interactions per node: loss of node 0 (solid) and of the mean model
    (dashed, thin), and the consensus distance. One colour per node count; the mini-batch
    baseline (algorithm ``minibatch``) dotted. Log y axes; non-positive values are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax_loss, ax_cons) = plt.subplots(1, 2, figsize=(12, 4.6))
    node_counts = sorted({nodes for _, nodes, _ in runs})
    cmap = plt.get_cmap("viridis")
    for algorithm, nodes, points in runs:
        colour = cmap(0.9 * node_counts.index(nodes) / max(1, len(node_counts) - 1))
        xs = [p["time"] for p in points]
        label = f"{algorithm} n={nodes}"
        node_loss = _positive([p.get("loss_node", math.nan) for p in points])
        if algorithm == "minibatch":
            ax_loss.plot(
                xs,
                node_loss,
                color=colour,
                lw=1.3,
                ls=":",
                label=f"mini-batch n={nodes} (batch n·B)",
            )
            continue
        ax_loss.plot(xs, node_loss, color=colour, lw=1.2, label=label)
        ax_loss.plot(
            xs,
            _positive([p.get("loss_mean", math.nan) for p in points]),
            color=colour,
            lw=0.7,
            ls="--",
            alpha=0.7,
        )
        ax_cons.plot(
            xs,
            _positive([p.get("consensus", math.nan) for p in points]),
            color=colour,
            lw=1.1,
            label=label,
        )
    ax_loss.set(
        yscale="log",
        xlabel="interactions per node (= local SGD steps per node for PopSGD)",
        ylabel="loss: node 0 (solid), mean model (dashed)",
        title=title,
    )
    ax_cons.set(
        yscale="log",
        xlabel="interactions per node",
        ylabel="consensus distance sqrt(Gamma / n)",
        title=consensus_title(runs),
    )
    for ax in (ax_loss, ax_cons):
        ax.grid(True, which="both", alpha=0.25)
    ax_loss.legend(fontsize=7, ncol=2)
    if ax_cons.lines:
        ax_cons.legend(fontsize=7)
    fig.tight_layout()
    try:
        with _replacing(path, "wb") as fh:
            fig.savefig(fh, dpi=110, format="png")
    finally:
        plt.close(fig)


def consensus_title(runs: Sequence[tuple[str, int, Sequence[Mapping[str, float]]]]) -> str:
    """The consensus panel's title, naming the runs whose distance is always zero (a log axis
    cannot draw them: n = 1, PopSGD at n = 2), whichever the algorithm."""
    zero = [(algorithm, nodes) for algorithm, nodes, points in runs if algorithm != "minibatch"
            and not any(p.get("consensus", math.nan) > 0 for p in points)]
    if not zero:
        return "consensus distance"
    algorithms = list(dict.fromkeys(algorithm for algorithm, _ in zero))
    which = "; ".join(f"{a} n=" + ", ".join(str(n) for b, n in zero if b == a) for a in algorithms)
    return f"consensus distance (always zero, not drawn: {which})"


def _positive(values: Sequence[float]) -> list[float]:
    return [v if v > 0 else math.nan for v in values]
