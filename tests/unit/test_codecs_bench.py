"""Smoke test of the codec benchmark: every codec measured, stable keys, exact round trips."""

from __future__ import annotations

import json

import pytest

from swarmnet.bench.codecs import main_table, run, wire_table

pytestmark = pytest.mark.timeout(60)


def test_bench_runs_small_and_writes_json(tmp_path) -> None:
    path = tmp_path / "codecs.json"
    result = run(size=4096, repeats=3, distances=[1.0, 100.0], json_path=path, progress=False)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert set(result) == {
        "version",
        "size",
        "device",
        "repeats",
        "environment",
        "codecs",
        "lattice_wire",
    }
    assert {"fp32", "fp16", "bf16", "blockwise8", "blockwise4", "lattice"} <= set(result["codecs"])
    for row in result["codecs"].values():
        assert row["exact_roundtrip"] and row["encode_gbps"] > 0 and row["decode_gbps"] > 0
        for what in ("encode", "decode"):
            lo, hi = row[f"{what}_gbps_range"]
            assert 0 < lo <= row[f"{what}_gbps"] <= hi
    assert result["codecs"]["fp32"]["ratio_vs_fp32"] == 1.0
    near, far = result["lattice_wire"]
    assert near["exact"] and far["exact"]
    assert near["steady_bits_per_coord"] < far["steady_bits_per_coord"] <= 32
    assert main_table(result).row_count == len(result["codecs"])
    assert wire_table(result).row_count == 2
