"""``swarmnet plot``: series read from metrics.jsonl, the mean curve, and a PNG written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from swarmnet.ui.commands import plot_command
from swarmnet.ui.plots import load_series, mean_curve

pytestmark = pytest.mark.timeout(60)


def write_run(root: Path, peers: int = 3, records: int = 20) -> None:
    for p in range(peers):
        lines = [json.dumps({"event": "start", "time": 1000.0})]
        for k in range(1, records + 1):
            lines.append(json.dumps({
                "time": 1000.0 + p + k, "elapsed": float(k), "step": 10 * k, "epoch": k / 4, "loss": (p + 1) / k,
                "lr": 0.1, "clock": k, "interactions": 2 * k, "bytes_in": 1000 * k, "bytes_out": 3000 * k,
                "staleness_s": 0.01, "consensus": 1.0 / k,
            }))
        (root / f"peer{p}").mkdir(parents=True)
        (root / f"peer{p}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_series_share_one_wall_clock(tmp_path: Path) -> None:
    write_run(tmp_path)
    series = load_series(tmp_path)
    assert [s.name for s in series] == ["peer0", "peer1", "peer2"]
    assert series[0].wall[0] == pytest.approx(1.0) and series[2].wall[0] == pytest.approx(3.0)
    assert np.allclose(series[1].bytes_per_interaction, 2000.0)


def test_rows_edited_by_hand_read_as_missing_values_not_as_errors(tmp_path: Path) -> None:
    """A JSON row whose fields are not numbers, or a line that is JSON but not a row: before
    2026-12-07, a traceback from float() or from `in` on a number."""
    write_run(tmp_path, peers=1, records=3)
    with open(tmp_path / "peer0" / "metrics.jsonl", "a") as fh:
        fh.write('{"time": 1, "step": 5, "loss": "x"}\n{"time": "a", "step": [1], "loss": true}\n5\n[1, 2]\n')
    (series,) = load_series(tmp_path)
    assert len(series.loss) == 5 and np.isnan(series.loss[3:]).all() and np.isnan(series.step[4])
    assert np.isfinite(series.loss[:3]).all()


def test_mean_curve_over_the_common_range() -> None:
    xs = [np.array([0.0, 10.0]), np.array([5.0, 20.0])]
    ys = [np.array([0.0, 10.0]), np.array([1.0, 1.0])]
    grid, mean = mean_curve(xs, ys, points=6)
    assert grid[0] == 5.0 and grid[-1] == 10.0
    assert mean[0] == pytest.approx((5.0 + 1.0) / 2) and mean[-1] == pytest.approx((10.0 + 1.0) / 2)
    assert len(mean_curve([np.array([0.0, 1.0]), np.array([2.0, 3.0])], ys)[0]) == 0


def test_plot_command_writes_a_png(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    app = typer.Typer()
    app.command("plot")(plot_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    empty = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing")])
    assert empty.exit_code == 2
