"""`swarmnet bench baselines` at a tiny size: real rank processes (gloo, swarmnet peers), the
result's shape and its sanity. Timings are only checked for sign and order of magnitude."""

import json
import math

import pytest

from swarmnet.bench.baselines import ModelSpec, Suite, methods_table, plot, run, straggler_table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

METHODS = {"solo", "swarm-solo", "ddp", "localsgd", "swarm-fp32", "swarm-lattice"}


def test_tiny_suite_measures_every_method_side_by_side(tmp_path):
    # 1500 steps: a phase of a few seconds, so the two ranks step at the same time for a while even
    # when one starts late on a loaded machine (at 400, a fraction of a second).
    suite = Suite(sizes=(2,), repeats=1, models=(ModelSpec("digits", 64, 1500),),
                  straggler_methods=("ddp", "swarm-fp32"), hivemind_sizes=())
    json_path, chart = tmp_path / "baselines.json", tmp_path / "baselines.png"
    result = run(suite, json_path=json_path, chart_path=chart, progress=False)

    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"torch", "pyzmq", "python"} <= set(result["environment"])
    assert len(result["records"]) == 2 * 9  # 2 ranks x (6 methods, allreduce, 2 straggler runs)
    rows = {r["method"]: r for r in result["methods"]}
    assert set(rows) == METHODS
    params = 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    for method, row in rows.items():
        assert (row["model"], row["processes"], row["parameters"]) == ("digits", 2, params)
        step = row["step_time_s"]
        assert step is not None, (method, row)  # None: the ranks never stepped at the same time
        assert 0 < step["min"] <= step["median"] <= step["max"] < 1.0, method
        if method in ("solo", "swarm-solo"):
            assert row["comm_share"] is None
        else:
            assert 0.0 <= row["comm_share"]["median"] <= 1.0 and row["step_vs_solo"]["median"] > 0
        assert row["final_loss"]["median"] < 2.5  # it trained: log(10) = 2.30 at the start
    # a ring all-reduce between 2 processes: each receives one model's worth of bytes
    assert rows["ddp"]["bytes_per_step"]["median"] == 4 * params
    assert rows["localsgd"]["bytes_per_step"]["median"] == 4 * params / 5
    assert rows["solo"]["bytes_per_step"]["median"] == 0
    assert rows["swarm-fp32"]["bytes_per_step"]["median"] > 0  # the peers did pull each other
    # One fp32 pull per H = 2 steps at most, headers aside: the pulls of a peer settling after its
    # budget, while the other still trains, are not counted as traffic of its steps.
    assert rows["swarm-fp32"]["bytes_per_step"]["median"] <= 1.05 * 4 * params / 2

    stragglers = {r["method"]: r for r in result["straggler"]}
    assert set(stragglers) == {"ddp", "swarm-fp32"}
    for row in stragglers.values():
        assert None not in (row["straggler_step_time_s"], row["others_pace_vs_solo"]), row
        assert row["straggler_step_time_s"]["median"] > 0 and row["others_pace_vs_solo"]["median"] > 0
        assert row["others_pace_vs_no_straggler"]["median"] > 0
    (allreduce,) = result["allreduce"]
    assert allreduce["numel"] == params and allreduce["seconds"]["median"] > 0
    assert methods_table(result).row_count == len(METHODS)
    assert straggler_table(result).row_count == 2
    assert plot(result, tmp_path / "again.png").stat().st_size > 1000


def test_suite_refuses_settings_it_cannot_measure():
    with pytest.raises(ValueError, match="at least one, each >= 2"):
        Suite(sizes=(1, 2))
    with pytest.raises(ValueError, match=">= 50 steps"):
        Suite(models=(ModelSpec("digits", 64, 20),))
    with pytest.raises(ValueError, match="straggler 3x slower each model needs >= 120 steps"):
        Suite(models=(ModelSpec("digits", 64, 100),))
    Suite(models=(ModelSpec("digits", 64, 100),), straggler_methods=())


def test_a_rank_without_a_final_loss_leaves_that_cell_empty_not_the_run():
    """A peer whose last metrics rows carry no loss (it settled early) once crashed the whole
    aggregation after minutes of measuring."""
    from swarmnet.bench.baselines import aggregate

    def record(phase, rank, loss):
        return {"model": "digits", "world": 2, "phase": phase, "repeat": 0, "rank": rank,
                "points": [(10 * i, 0.1 * i) for i in range(1, 7)], "time_to_target_s": 1.0, "bytes_per_step": 10.0,
                "final_loss": loss, "backend": "gloo", "parameters": 5}

    records = [record("swarm-solo", 0, 0.5), record("swarm-solo", 1, 0.4),
               record("swarm-fp32", 0, 0.3), record("swarm-fp32", 1, None)]
    rows = {r["method"]: r for r in aggregate(records)["methods"]}
    assert rows["swarm-fp32"]["final_loss"] is None
    assert rows["swarm-solo"]["final_loss"]["median"] == pytest.approx(0.45)
    assert rows["swarm-fp32"]["step_time_s"]["median"] == pytest.approx(0.01)


def test_a_run_whose_ranks_never_stepped_together_has_no_communication_share(tmp_path):
    """Its step time is not a number; the share read 0.00, the best a method can show. The
    chart leaves that point out (it raised, before the tables were printed)."""
    from swarmnet.bench.baselines import aggregate

    def record(phase, rank, start):
        return {"model": "digits", "world": 2, "phase": phase, "repeat": 0, "rank": rank,
                "points": [(10 * i, start + 0.1 * i) for i in range(1, 7)], "time_to_target_s": 1.0,
                "bytes_per_step": 10.0, "final_loss": 0.1, "backend": "gloo", "parameters": 5}

    records = [record("swarm-solo", 0, 0.0), record("swarm-solo", 1, 0.0),
               record("swarm-fp32", 0, 0.0), record("swarm-fp32", 1, 10.0)]  # apart: never side by side
    methods = aggregate(records)["methods"]
    row = {r["method"]: r for r in methods}["swarm-fp32"]
    assert row["step_time_s"] is None and row["comm_share"] is None
    assert plot({"methods": methods, "environment": {"cpus": 2, "torch": "2"}}, tmp_path / "c.png").exists()


def test_paces_are_read_where_every_rank_steps():
    """A rank that stepped alone while the other was still starting (or already done) had a core
    of its own then: only the span in which both stepped counts, after each one's warm-up."""
    from swarmnet.bench.baselines import common_window, paces

    def record(rank, points):
        return {"rank": rank, "points": points}

    # rank 0: 200 steps/s alone for 1 s, then 100 steps/s beside rank 1 until t = 2;
    # rank 1: from t = 1, 100 steps/s beside rank 0, then 200 steps/s alone until t = 3.
    first = [(10 * i, 0.05 * i) for i in range(1, 21)] + [(200 + 10 * i, 1 + 0.1 * i) for i in range(1, 11)]
    second = [(10 * i, 1 + 0.1 * i) for i in range(1, 11)] + [(100 + 10 * i, 2 + 0.05 * i) for i in range(1, 21)]
    rows = [record(0, first), record(1, second)]
    assert common_window(rows) == pytest.approx((1.2, 2.0))  # rank 1 past its first 20 steps
    assert paces(rows) == pytest.approx({0: 100.0, 1: 100.0})  # over each one's own run: 133 and 133
    # never side by side: no pace at all rather than a solo one
    apart = [record(0, [(10 * i, 0.1 * i) for i in range(1, 6)]), record(1, [(10 * i, 1 + 0.1 * i) for i in range(1, 6)])]
    assert common_window(apart) is None and all(math.isnan(p) for p in paces(apart).values())


def test_averaging_table_shows_hivemind_steps_with_their_spread_and_failures():
    from rich.console import Console

    from swarmnet.bench.baselines import averaging_table, spread

    result = {"allreduce": [{"processes": 2, "numel": 1000, "backend": "gloo", "seconds": spread([0.004, 0.005])}],
              "hivemind": {"rows": [{"peers": 2, "numel": 1000, "compression": "8bit", "max_error": 0.9,
                                     "allreduce_s": 0.06, "seconds": spread([0.05, 0.06, 0.08])},
                                    {"peers": 4, "compression": "none", "error": "timed out after 600s"}]}}
    console = Console(width=200, record=True)
    console.print(averaging_table(result))
    text = console.export_text()
    assert "median [min-max] over repeats" in text and "4.5 [4.0-5.0]" in text and "60.0 [50.0-80.0] (max error 0.9)" in text and "timed out after 600s" in text


def test_a_skipped_hivemind_says_which_extra_to_install():
    from rich.console import Console

    from swarmnet.bench.baselines import averaging_table, run_hivemind

    skipped = run_hivemind(None, sizes=(2,), compressions=("none",), numel=10, timeout=1)
    assert "skipped" in skipped, skipped
    console = Console(width=200, record=True)
    console.print(averaging_table({"allreduce": [], "hivemind": skipped}))
    assert "install 'swarmnet[bench-hivemind]'" in " ".join(console.export_text().split())
