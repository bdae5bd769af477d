"""Rogue peers that serve NaN or absurdly large models are refused and avoided by a real swarm."""

import json
import signal
import time
from pathlib import Path

import pytest

from swarmnet.testing import query_status, wait_until
from swarmnet.testing.processes import ScriptProcess

from .test_swarm_faults import digits_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROGUE = Path(__file__).with_name("rogue_peer.py")
HONEST = ["peer0", "peer1", "peer2"]


def test_poisoned_snapshots_are_refused_and_their_servers_avoided(swarm_factory, tmp_path):
    config = digits_config()
    config["run"]["peers"] = 3
    config["network"].update(failure_backoff=0.5)
    swarm = swarm_factory(config)
    cards = {name: swarm.card(name) for name in HONEST}
    wait_until(lambda: all(len(swarm.metrics(n)) > 5 for n in HONEST), 60, what="training under way")
    before = {n: query_status(cards[n]["addr"])["interactions"] for n in HONEST}
    time.sleep(10)
    pace = {n: query_status(cards[n]["addr"])["interactions"] - before[n] for n in HONEST}
    rogues = {}
    for mode in ("nan", "huge"):
        out = tmp_path / f"rogue-{mode}"
        rogues[mode] = (ScriptProcess(ROGUE, "--task", config["task"]["spec"], "--mode", mode,
                                      "--seed", cards["peer0"]["addr"], "--out", str(out), log=out / "log"), out)
    try:
        def rogues_known():
            names = {p["name"] for n in HONEST for p in query_status(cards[n]["addr"])["peers"] if p["alive"]}
            return {"rogue-nan", "rogue-huge"} <= names
        wait_until(rogues_known, 30, interval=0.5, what="the rogues known to the swarm")
        start = {n: query_status(cards[n]["addr"]) for n in HONEST}
        time.sleep(10)
        status = {n: query_status(cards[n]["addr"]) for n in HONEST}
        served = {mode: json.loads((out / "served.json").read_text()) for mode, (_, out) in rogues.items()}
    finally:
        for proc, _ in rogues.values():
            proc.kill_tree()
    print("\nrefusals", {n: s["rejected"] for n, s in status.items()}, "pulls served by the rogues", served,
          "interactions in 10 s", {n: status[n]["interactions"] - start[n]["interactions"] for n in HONEST},
          "before the rogues", pace)
    for name in HONEST:
        s = status[name]
        assert s["rejected"].get("non_finite", 0) >= 1 and s["rejected"].get("too_far", 0) >= 1, s["rejected"]
        assert s["state"] == "training" and s["loss"] < 1.0, s
        # Honest pulls go on, not stalled by the rogues: at least a quarter of their pace of the 10 s before
        # the rogues came. Merges are paced by the CPU budget, so the machine's load moves them: a loaded CI
        # machine measured 50-61 in 10 s, and a full-suite run 48 against 165 before (steps unchanged, the
        # rogues refused 5 times each, as in the runs that pass). That the rogues are avoided is
        # checked by their served counts below.
        assert s["interactions"] - start[name]["interactions"] >= 0.25 * pace[name] > 0, (pace, s["interactions"])
        # Avoided: back-off doubles from 0.5 s per refusal (0.5 + 1 + 2 + 4 + 8 s): a handful of pulls.
        for mode in served:
            assert served[mode].get(s["id"], 0) <= 7, (mode, served[mode])
    swarm.signal(signal.SIGINT)
    assert swarm.wait(60) == 130
    for row in swarm.summary()["peers"]:
        assert row["reason"] == "stopped" and row["eval"]["accuracy"] > 0.9, row


def test_a_neighbour_answering_with_the_wrong_message_type_is_avoided_not_fatal(swarm_factory, tmp_path):
    """A process that answers gossip, status and pulls alike with a well-formed ACK: each such
    reply is a failed request of the asking peer, never a crash of its gossip or exchange."""
    config = digits_config()
    config["run"]["peers"] = 2
    config["network"].update(failure_backoff=0.5)
    swarm = swarm_factory(config)
    honest = ["peer0", "peer1"]
    cards = {name: swarm.card(name) for name in honest}
    wait_until(lambda: all(len(swarm.metrics(n)) > 3 for n in honest), 60, what="training under way")
    out = tmp_path / "rogue-confused"
    rogue = ScriptProcess(ROGUE, "--task", config["task"]["spec"], "--mode", "confused",
                          "--seed", cards["peer0"]["addr"], "--out", str(out), log=out / "log")
    try:
        def asked_by_both() -> bool:
            path = out / "served.json"
            served = json.loads(path.read_text()) if path.exists() else {}
            return all(served.get(cards[n]["id"], 0) >= 3 for n in honest)
        wait_until(asked_by_both, 60, interval=0.5, what="both peers asking the rogue")
        status = {n: query_status(cards[n]["addr"]) for n in honest}
    finally:
        rogue.kill_tree()
    for name in honest:
        assert status[name]["state"] == "training", status[name]
    swarm.signal(signal.SIGINT)
    assert swarm.wait(60) == 130
    assert [row["reason"] for row in swarm.summary()["peers"]] == ["stopped", "stopped"]
