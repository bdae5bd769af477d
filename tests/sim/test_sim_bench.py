"""The throughput benchmark runs end to end at a tiny size and reports stable keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmnet.bench import sim

pytestmark = pytest.mark.timeout(60)


def test_bench_reports_both_paths_and_their_ratio(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    figures = sim.run(
        nodes=300,
        dim=6,
        batch=4,
        interactions=6000,
        naive_interactions=400,
        rounds=2,
        json_path=path,
        progress=False,
    )
    assert json.loads(path.read_text()) == figures
    assert figures["identical"] is True
    assert figures["layered"]["interactions"] == 6000 and figures["naive"]["interactions"] == 400
    assert figures["ratio"] == pytest.approx(
        figures["layered"]["interactions_per_second"] / figures["naive"]["interactions_per_second"]
    )
    assert figures["ratio"] > 1  # even at 300 nodes a layer holds tens of pairs
    assert 20 < figures["layered"]["pairs_per_layer"] < 150
