"""Real swarms survive frozen, killed and interrupted peers; pure gossip preserves the sum."""

import json
import math
import os
import signal
import time

import pytest
import torch

from swarmnet.config import load_config
from swarmnet.peer import checkpoint
from swarmnet.peer.compute import peer_seed_of
from swarmnet.peer.metrics import read_metrics
from swarmnet.tasks import load_task
from swarmnet.testing import wait_until

from .conftest import digits_config, lsq_config, start_control_peer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PEERS = ["peer0", "peer1", "peer2", "peer3"]


def step_rate(records, start, end):
    records = [r for r in records if start <= r["time"] <= end]
    assert len(records) >= 2, f"fewer than two metrics rows between {start:.1f} and {end:.1f}"
    return (records[-1]["step"] - records[0]["step"]) / (records[-1]["time"] - records[0]["time"])


def test_frozen_peer_never_slows_the_others_and_ctrl_c_stops_cleanly(swarm_factory, daemons, tmp_path):
    # Each step padded to 4x its length: the four peers need about one of the two cores, so a
    # step rate shows whether a peer waits on its neighbours, not how the scheduler shares the
    # cores (with the cores full, the frozen peer's share went to one of the three: steps/s
    # 390/300/346 before, 687/237/257 while frozen, under load).
    config = digits_config(slowdown=4.0)
    swarm = swarm_factory(config)
    # The machine's pace moved by a fifth between the two windows (control 161 -> 205 steps/s,
    # the three peers with it; in CI one peer read 0.87 of its own pace), so each peer's pace is
    # compared with the control's in the same windows.
    control = start_control_peer(tmp_path, config, daemons)
    pids = {name: swarm.card(name)["pid"] for name in PEERS}
    paces = {n: (lambda n=n: swarm.metrics(n)) for n in PEERS}
    paces["control"] = control.metrics
    wait_until(lambda: all(len(records()) > 20 for records in paces.values()), 60, what="training under way")
    watched = [*PEERS[:3], "control"]

    def freeze_peer3():
        """Each watched peer's pace over 6 s before and over 6 s of peer3's freeze."""
        t0 = time.time()
        time.sleep(6)
        before = {n: step_rate(paces[n](), t0, time.time()) for n in watched}
        os.kill(pids["peer3"], signal.SIGSTOP)
        try:
            time.sleep(1.5)  # pulls to the frozen peer start timing out: the worst moment
            t1 = time.time()
            time.sleep(6)
            during = {n: step_rate(paces[n](), t1, time.time()) for n in watched}
            frozen_interactions = swarm.metrics("peer3")[-1]["interactions"]
        finally:
            os.kill(pids["peer3"], signal.SIGCONT)
        kept = {n: during[n] / before[n] / (during["control"] / before["control"]) for n in PEERS[:3]}
        print("steps/s before", before, "while peer3 is frozen", during, "pace kept, against the control's", kept)
        return before, during, kept, frozen_interactions

    def merging_again(frozen_interactions):
        """The thawed peer rejoins: it merges neighbours again."""
        wait_until(lambda: swarm.metrics("peer3")[-1]["interactions"] > frozen_interactions + 10, 20,
                   what="peer3 merging again")

    # A peer that waits on its neighbours loses pace at every freeze; a loaded machine's swings do
    # not repeat. With a load that came and went every few seconds, the killed-peer test's peers
    # once read 0.72-0.84 of the control's pace (the scheduler shares the cores out by session, and
    # the control is a session apart from the swarm's), so up to three freezes are taken and one
    # must keep 90% for every peer.
    for attempt in range(3):
        before, during, kept, frozen_interactions = freeze_peer3()
        # A compute loop that waited on its pulls would step far slower than the control (about a
        # tenth, with the compute thread made to wait for each pull that is due), and slower
        # still while pulls to the frozen peer take request_timeout (1 s) to fail.
        for n in PEERS[:3]:
            assert before[n] >= 0.5 * before["control"], (n, before)
        if min(kept.values()) >= 0.9 or attempt == 2:
            break
        merging_again(frozen_interactions)
    for n in PEERS[:3]:
        assert kept[n] >= 0.9, (n, before, during)
    merging_again(frozen_interactions)
    # Ctrl-C on `swarmnet up`: every peer stops cleanly within seconds, leaving complete files.
    stop = time.time()
    swarm.signal(signal.SIGINT)
    assert swarm.wait(60) == 130
    ended = [(swarm.run_dir / n / "summary.json").stat().st_mtime - stop for n in PEERS]
    print(f"peers finished {max(ended):.1f}s after SIGINT, the launcher after {time.time() - stop:.1f}s")
    assert max(ended) < 8
    summary = swarm.summary()
    assert summary["interrupted"] and not summary["ok"]
    for row in summary["peers"]:
        assert row["exit_code"] == 0 and row["reason"] == "stopped", row
        state = checkpoint.load(swarm.run_dir / row["name"] / "checkpoint.pt")
        assert state["step"] == row["steps"]
        lines = (swarm.run_dir / row["name"] / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)  # every line complete
        assert read_metrics(swarm.run_dir / row["name"] / "metrics.jsonl")[-1]["step"] == row["steps"]


def test_killed_peer_does_not_stop_the_others_and_the_summary_says_so(swarm_factory):
    swarm = swarm_factory(digits_config(steps=2500, checkpoint_every=0.0))
    victim = swarm.card("peer1")["pid"]
    wait_until(lambda: swarm.metrics("peer1") and swarm.metrics("peer1")[-1]["step"] >= 300, 60,
               what="peer1 training")
    os.kill(victim, signal.SIGKILL)
    assert swarm.wait(120) == 1  # not every peer ended well
    summary = swarm.summary()
    rows = {r["name"]: r for r in summary["peers"]}
    assert rows["peer1"]["signal"] == "SIGKILL" and not rows["peer1"]["ok"]
    assert "died" in rows["peer1"]["reason"]
    for name in ("peer0", "peer2", "peer3"):
        assert rows[name]["ok"] and rows[name]["reason"] == "budget" and rows[name]["steps"] == 2500
    assert summary["average"]["peers_averaged"] == 3
    assert summary["average"]["eval"]["accuracy"] > 0.9


def test_pure_gossip_preserves_the_sum_and_contracts(swarm_factory):
    n = 4
    config = lsq_config(lr=0.0, steps=10**9)
    config["task"]["options"] = {"init_scale": 1.0}
    config["run"]["init"] = "independent"
    config["algorithm"]["symmetric"] = True
    config["network"]["pull_interval"] = 1.0  # sparse interactions: few overlap in time
    swarm = swarm_factory(config)
    # Stop after a dozen interactions, while Gamma is still far above float round-off.
    wait_until(lambda: sum(r[-1]["interactions"] for n in PEERS if (r := swarm.metrics(n))) >= 12, 120,
               interval=0.02, what="a dozen interactions")
    swarm.signal(signal.SIGINT)
    assert swarm.wait(60) == 130, swarm.log()
    summary = swarm.summary()
    assert all(p["reason"] == "stopped" and p["exit_code"] == 0 for p in summary["peers"])
    cfg = load_config(None, {"run.init": "independent"})
    task = load_task("swarmnet.tasks.lsq:task", {"init_scale": 1.0})
    initial = []
    for name in PEERS:
        torch.manual_seed(peer_seed_of(cfg, name))
        initial.append(task.build_model().weight.detach().reshape(-1).double())
    x0 = torch.stack(initial)
    xt = torch.stack([checkpoint.load(swarm.run_dir / name / "checkpoint.pt")["model"]["weight"].reshape(-1).double()
                      for name in PEERS])
    # Every interaction was applied on both sides ...
    interactions = sum(p["interactions"] for p in summary["peers"])
    assert interactions == sum(p["nudges_applied"] for p in summary["peers"]) > 5
    # ... so the sum of the models is what it was (float32 round-off only).
    assert torch.allclose(xt.sum(0), x0.sum(0), atol=1e-5 * float(x0.norm()))
    gamma0 = float((x0 - x0.mean(0)).pow(2).sum())
    gamma_t = float((xt - xt.mean(0)).pow(2).sum())
    expected = gamma0 * (1 - 1 / (n - 1)) ** interactions  # SPEC 3.5 item 10, complete graph
    rate = math.log(max(gamma_t, 1e-300) / gamma0) / interactions
    print(f"gossip: {interactions} interactions, Gamma {gamma0:.3g} -> {gamma_t:.3g}, expected {expected:.3g}, "
          f"log-rate {rate:.3f} vs {math.log(2 / 3):.3f}")
    # Upper tail of Gamma_T / E[Gamma_T] from 20,000 simulated n = 4 runs: 99.99th percentile 530.
    assert gamma_t <= 1000 * expected
    assert gamma_t < 0.5 * gamma0


def not_json(constant):
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.parametrize("codec", ["fp32", "lattice", "fp16"])
def test_a_diverging_swarm_ends_with_a_clear_reason_not_a_crash(swarm_factory, codec):
    """fp32 publishes a non-finite model (neighbours screen it) and the loss shows it; a lossy
    codec refuses to encode one (fp16 already one beyond its range), which ends the run the same way."""
    swarm = swarm_factory(lsq_config(lr=50.0, steps=5000) | {"run": {"peers": 2, "seed": 0}, "codec": {"name": codec}})
    assert swarm.wait(120) == 1
    log = (swarm.run_dir / "up.log").read_text()
    assert "Traceback" not in log, log[-2000:]
    assert "disk" not in log, log[-2000:]  # a refused checkpoint of a diverged model is no failed write
    summary = swarm.summary()
    assert not summary["ok"]
    for row in summary["peers"]:
        assert not row["ok"] and "diverged" in row["reason"], row
        # Why, in the peer's own words, in the summary and under up's table.
        assert "lower train.lr" in row.get("error", ""), row
        said = f"{row['name']}: diverged: {row['error']}"
        assert " ".join(said.split()) in " ".join(log.split()), log[-2000:]  # wrapped to the terminal's width
        # The metrics stream stays strict JSON: a non-finite loss is written as null.
        lines = (swarm.run_dir / row["name"] / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line, parse_constant=not_json) for line in lines]
        # No checkpoint of the diverged model: a restart with a lower lr resumes from a finite one.
        # (fp16 refuses a model beyond its range already, while it and its loss are still finite.)
        peer_dir = swarm.run_dir / row["name"]
        if codec != "fp16":
            assert any(r.get("loss", 0.0) is None for r in records)
            assert "checkpoint not written" in (peer_dir / "peer.log").read_text()
        if (peer_dir / "checkpoint.pt").exists():
            state = checkpoint.load(peer_dir / "checkpoint.pt")
            assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


def test_a_failing_evaluation_costs_neither_training_nor_the_final_checkpoint(swarm_factory):
    config = lsq_config(steps=400) | {"run": {"peers": 2, "seed": 0}}
    config["task"]["spec"] = "tests.integration.failing_eval_task:task"
    config["train"]["eval_every"] = 100
    swarm = swarm_factory(config)
    assert swarm.wait(120) == 0, swarm.log()
    summary = swarm.summary()
    assert summary["ok"] and "the evaluation's own bug" in summary["average"]["eval_error"], summary["average"]
    for row in summary["peers"]:
        assert row["ok"] and row["steps"] == 400, row
        peer_dir = swarm.run_dir / row["name"]
        assert checkpoint.load(peer_dir / "checkpoint.pt")["step"] == 400
        log = (peer_dir / "peer.log").read_text()
        assert log.count("the task's evaluation failed") == 5, log[-3000:]  # steps 100-400, then the final one


def test_a_step_that_raises_ends_the_peer_with_its_checkpoint_and_a_summary_saying_why(swarm_factory):
    """A bug in the task's own code mid-run once ended the peer on a traceback, with neither a
    final checkpoint (its steps lost) nor a summary."""
    config = lsq_config(steps=400) | {"run": {"peers": 2, "seed": 0}}
    config["task"]["spec"] = "tests.integration.failing_step_task:task"
    config["task"]["options"] = {"fail_at": 45}
    swarm = swarm_factory(config)
    assert swarm.wait(120) == 1
    log = (swarm.run_dir / "up.log").read_text()
    for row in swarm.summary()["peers"]:
        why = "error: step 45 failed: RuntimeError: the data loader broke (at "
        assert not row["ok"] and row["reason"].startswith(why) and "failing_step_task.py:" in row["reason"], row
        peer_dir = swarm.run_dir / row["name"]
        assert json.loads((peer_dir / "summary.json").read_text())["reason"] == row["reason"]
        assert checkpoint.load(peer_dir / "checkpoint.pt")["step"] == 44
        assert f"{row['name']}: {why}" in log, log  # the whole reason, under the table


def test_a_step_that_fails_inside_the_optimizer_update_leaves_the_last_good_checkpoint(swarm_factory, tmp_path):
    """The update of step 45 is applied, then the optimizer raises: the model holds a step that
    was never counted. It once went into the final checkpoint as step 44's model."""
    config = lsq_config(steps=400) | {"run": {"peers": 2, "seed": 0}}
    config["task"]["spec"] = "tests.integration.failing_step_task:failing_update"
    config["task"]["options"] = {"fail_at": 45, "record": str(tmp_path)}
    config["train"]["checkpoint_every"] = 1e-6  # after every step: step 44's is the last good one
    swarm = swarm_factory(config)
    assert swarm.wait(120) == 1
    began_from = [torch.load(path) for path in tmp_path.glob("*.pt")]
    assert len(began_from) == 2
    for row in swarm.summary()["peers"]:
        why = "error: step 45 failed in the optimizer's update: RuntimeError: the optimizer broke after its update"
        assert not row["ok"] and row["reason"].startswith(why) and row["steps"] == 44, row
        peer_dir = swarm.run_dir / row["name"]
        saved = checkpoint.load(peer_dir / "checkpoint.pt")
        assert saved["step"] == 44
        assert any(all(torch.equal(saved["model"][k], weights[k]) for k in weights) for weights in began_from)
        log = (peer_dir / "peer.log").read_text()
        assert "without publishing or checkpointing it" in log and "checkpoint.pt keeps step 44" in log, log[-3000:]


def test_a_failure_while_stopping_still_leaves_a_summary_saying_why(swarm_factory):
    config = lsq_config(steps=100) | {"run": {"peers": 2, "seed": 0}}
    config["task"]["spec"] = "tests.integration.failing_step_task:unsavable"
    swarm = swarm_factory(config)
    assert swarm.wait(120) == 1
    for row in swarm.summary()["peers"]:
        assert not row["ok"] and row["steps"] == 100, row
        assert row["reason"].startswith("error: stopping failed: RuntimeError: the device is gone (at "), row


def test_the_launcher_says_why_a_peer_stopped_without_a_summary(swarm_factory):
    config = lsq_config(steps=5000) | {"run": {"peers": 2, "seed": 0}}
    config["task"]["options"] = {"dim": 8192, "samples": 64}
    config["codec"] = {"name": "lattice", "options": {"chunk": 64}}  # 128 chunks: about 2.2 KB of header
    config["network"]["max_header_bytes"] = 2048
    swarm = swarm_factory(config)
    assert swarm.wait(120) == 1
    rows = {r["name"]: r for r in swarm.summary()["peers"]}
    log = (swarm.run_dir / "up.log").read_text()
    for name, row in rows.items():
        assert not row["ok"] and row["reason"].startswith("no summary"), row
        assert "max_header_bytes = 2048" in row["reason"], row
        assert f"{name}: no summary (the peer stopped on an error): codec" in log, log  # under the table
