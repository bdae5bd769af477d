"""The transport benchmark's result shape, on tiny payloads (it shares the suite's loopback)."""

import json

import pytest

from swarmnet.bench.transports import run
from swarmnet.errors import SwarmError

pytestmark = pytest.mark.timeout(60)


def test_bench_reports_every_transport_and_size_with_stable_keys(tmp_path):
    out = tmp_path / "bench.json"
    result = run(sizes_mb=(0.5, 1), repeats=2, json_path=out, transports=["tcp", "inproc"])
    assert json.loads(out.read_text()) == result
    assert result["version"] == 1 and result["repeats"] == 2 and result["skipped"] == {}
    rows = {(r["transport"], r["size_mb"]): r for r in result["results"]}
    assert sorted(rows) == [("inproc", 0.5), ("inproc", 1), ("tcp", 0.5), ("tcp", 1)]
    for row in rows.values():
        assert row["swarmnet_s"] > 0 and row["raw_s"] > 0
        for key in ("swarmnet_s", "raw_s"):
            lo, hi = row[f"{key}_range"]
            assert 0 < lo <= row[key] <= hi
        assert row["swarmnet_over_raw"] == pytest.approx(row["swarmnet_s"] / row["raw_s"])
        size = row["size_mb"] * 2**20
        assert row["swarmnet_gb_per_s"] == pytest.approx(size / row["swarmnet_s"] / 1e9)


def test_bench_refuses_unknown_transports():
    with pytest.raises(SwarmError, match="unknown transports"):
        run(transports=["carrier-pigeon"])
