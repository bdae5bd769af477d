"""``swarmnet bench memory`` reads real peers' resident sets and counts them in model copies."""

import os

import pytest

from swarmnet.bench.memory import model_bytes, resident_mb, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_resident_sets_come_from_proc():
    assert resident_mb(os.getpid()) > 50  # this interpreter, torch loaded
    assert resident_mb(os.getpid(), "VmHWM") >= resident_mb(os.getpid())  # the peak, never below now
    assert resident_mb(2**22 + 1) == 0.0  # no such process


def test_a_peer_holds_at_least_its_parameters_gradients_and_communication_copy(tmp_path):
    result = run(codecs=("fp32",), hidden=1200, steps=60, json_path=tmp_path / "not-yet" / "memory.json")
    fp32 = result["codecs"]["fp32"]
    width = lambda h: 4 * (64 * h + h + h * h + h + h * 10 + 10)  # noqa: E731
    assert result["model_bytes"] == [model_bytes(600), model_bytes(1200)] == [width(600), width(1200)]
    assert [len(p) for p in fp32["peak_rss_mb"]] == [2, 2] and min(fp32["peak_rss_mb"][0]) > 50
    assert fp32["model_copies"] >= 3, fp32  # a sampler that missed the peers would read about 0
    assert (tmp_path / "not-yet" / "memory.json").exists()  # its folder made
