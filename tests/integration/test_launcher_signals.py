"""`swarmnet up` and its peers under signals, manifests and leftovers of an earlier run."""

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from swarmnet.testing import query_status, wait_until
from swarmnet.testing.ports import unused_port
from swarmnet.testing.processes import parent_of, pid_alive

from .conftest import digits_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PEERS = ("peer0", "peer1")


def two_peers(**train):
    sections = digits_config(checkpoint_every=0.0, **train)
    sections["run"]["peers"] = 2
    sections["network"]["linger"] = 1.0
    return sections


def test_ctrl_c_reaches_the_peers_once_so_they_keep_their_grace_period(swarm_factory):
    """A terminal's Ctrl-C goes to the whole foreground process group. The peers must get it
    only as the launcher's SIGTERM: both would make the second a request to skip the grace
    steps. The launcher is held stopped meanwhile, so what reaches the peers came from the
    terminal."""
    swarm = swarm_factory(two_peers(steps=1_000_000))
    addresses = [swarm.card(name)["addr"] for name in PEERS]
    wait_until(lambda: all(swarm.metrics(name) for name in PEERS), 60, what="every peer training")
    os.kill(swarm.proc.pid, signal.SIGSTOP)
    try:
        os.killpg(swarm.proc.pid, signal.SIGINT)
        time.sleep(1.0)
        for address in addresses:
            assert query_status(address)["state"] == "training"
    finally:
        os.kill(swarm.proc.pid, signal.SIGCONT)  # the launcher takes its pending SIGINT now
    assert swarm.wait(60) == 130, swarm.log()
    for row in swarm.summary()["peers"]:
        assert row["exit_code"] == 0 and row["reason"] == "stopped", row
        log = (swarm.run_dir / row["name"] / "peer.log").read_text()
        assert "second stop request" not in log, log[-2000:]


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "exec"])
def test_cpu_peers_are_forked_from_a_server_that_imported_torch_once(swarm_factory, monkeypatch, fork):
    """The same peers either way: the launch's environment reaches them (the peer count their
    CPU budget divides by), and a SIGTERM to the launcher's process group (a supervisor's) stops
    them cleanly, having reached them once. Forked, their parent is the fork server, the
    launcher's child; exec'd (SWARMNET_EXEC_PEERS=1), the launcher itself."""
    if not fork:
        monkeypatch.setenv("SWARMNET_EXEC_PEERS", "1")
    swarm = swarm_factory(two_peers(steps=1_000_000), "--log-level", "info")
    pids = [swarm.card(name)["pid"] for name in PEERS]
    parents = {parent_of(pid) for pid in pids}
    if fork:
        (server,) = parents
        assert parent_of(server) == swarm.proc.pid
        assert b"multiprocessing.forkserver" in Path(f"/proc/{server}/cmdline").read_bytes()
    else:
        assert parents == {swarm.proc.pid}
    for pid in pids:  # what ps and pkill -f see
        assert b"swarmnet peer --log-level info" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    for name in PEERS:  # logged just after the card is written: on a loaded machine, a moment later
        log = swarm.run_dir / name / "peer.log"
        wait_until(lambda log=log: "listening on" in log.read_text(), 30, what=f"{name}'s first line")
        assert "shared by 2 local peers (SWARMNET_LOCAL_PEERS)" in log.read_text(), log.read_text()[-2000:]
    wait_until(lambda: all(swarm.metrics(name) for name in PEERS), 60, what="every peer training")
    os.killpg(swarm.proc.pid, signal.SIGTERM)
    assert swarm.wait(60) == 143, swarm.log()
    assert [(r["exit_code"], r["reason"]) for r in swarm.summary()["peers"]] == [(0, "stopped")] * 2
    for name in PEERS:
        assert "second stop request" not in (swarm.run_dir / name / "peer.log").read_text()


def test_a_fork_server_killed_mid_run_stops_the_peers_and_up_waits_for_them(swarm_factory):
    """The fork server relays its peers' exit statuses. Killed from outside, it takes them along
    (SIGTERM: a clean stop), and `up` must not take them for ended while they still stop."""
    sections = two_peers(steps=1_000_000)
    sections["task"]["spec"] = "tests.integration.slow_eval_task:task"  # the peers stop over seconds
    swarm = swarm_factory(sections)
    pids = [swarm.card(name)["pid"] for name in PEERS]
    wait_until(lambda: all(swarm.metrics(name) for name in PEERS), 60, what="every peer training")
    os.kill(parent_of(pids[0]), signal.SIGKILL)
    assert swarm.wait(60) == 1, swarm.log()
    rows = swarm.summary()["peers"]
    assert not any(pid_alive(pid) for pid in pids)
    for row in rows:
        own = json.loads((swarm.run_dir / row["name"] / "summary.json").read_text())
        assert own["reason"] == "stopped" and row["steps"] == own["steps"], (row, own)
        assert not row["ok"] and "before its budget" in row["reason"], row


def test_peers_stop_cleanly_when_their_launcher_is_killed(swarm_factory):
    swarm = swarm_factory(two_peers(steps=1_000_000))
    pids = [swarm.card(name)["pid"] for name in PEERS]
    try:
        os.kill(swarm.proc.pid, signal.SIGKILL)
        swarm.wait(10)
        wait_until(lambda: not any(pid_alive(pid) for pid in pids), 60, what="the orphaned peers stopping")
        for name in PEERS:  # they got SIGTERM: a clean stop with a summary, not a kill
            assert json.loads((swarm.run_dir / name / "summary.json").read_text())["reason"] == "stopped"
    finally:
        for pid in pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_sigterm_while_the_first_peer_starts_stops_the_swarm_at_once(swarm_factory):
    """The launcher waits for the first peer's card (up to two minutes) before it watches the
    peers: a stop request meanwhile must not wait for it. SIGTERM: exit status 128 + 15."""
    sections = two_peers(steps=100)
    sections["task"]["spec"] = "tests.integration.slow_task:task"
    swarm = swarm_factory(sections)
    wait_until(lambda: all((swarm.run_dir / n / "peer.log").exists() for n in PEERS), 60, what="the peers started")
    swarm.signal(signal.SIGTERM)
    assert swarm.wait(30) == 143, swarm.log()
    summary = swarm.summary()
    assert summary["interrupted"] and [r["signal"] for r in summary["peers"]] == ["SIGTERM", "SIGTERM"]
    assert {r["reason"] for r in summary["peers"]} == {
        "no summary (the peer got SIGTERM while it started, before it had anything to save)"}, summary["peers"]


def test_a_manifests_advertised_address_is_the_one_peers_use(tmp_path, swarm_factory):
    manifests = tmp_path / "peers"
    manifests.mkdir()
    advertised = []
    for name in PEERS:
        port = unused_port()
        advertised.append(f"tcp://localhost:{port}")
        (manifests / f"{name}.toml").write_text(f'listen = "tcp://127.0.0.1:{port}"\nadvertise = "{advertised[-1]}"\n')
    swarm = swarm_factory(two_peers(steps=200), "--manifests", str(manifests))
    assert swarm.wait(120) == 0, swarm.log()
    rows = swarm.summary()["peers"]
    assert [r["addr"] for r in rows] == advertised
    assert all(r["interactions"] > 0 for r in rows), rows


def test_a_card_left_by_an_earlier_run_is_not_taken_for_the_first_peer(tmp_path, swarm_factory):
    stale = tmp_path / "run" / "peer0" / "card.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"id": "peer0-old", "name": "peer0", "addr": "tcp://127.0.0.1:9", "pid": 1}))
    swarm = swarm_factory(two_peers(steps=200), "--no-fresh")
    assert swarm.wait(120) == 0, swarm.log()
    rows = swarm.summary()["peers"]
    assert f"seed {rows[0]['addr']}," in swarm.log(), swarm.log()
    assert all(r["interactions"] > 0 for r in rows), rows


def test_the_summary_shows_the_traffic_of_a_peer_that_died(swarm_factory):
    swarm = swarm_factory(two_peers(steps=1000))
    victim = swarm.card("peer1")["pid"]
    wait_until(lambda: (m := swarm.metrics("peer1")) and m[-1]["step"] >= 200 and m[-1]["bytes_in"] > 0, 60,
               what="peer1 training and merging")
    os.kill(victim, signal.SIGKILL)
    assert swarm.wait(120) == 1, swarm.log()
    row = swarm.summary()["peers"][1]
    last = swarm.metrics("peer1")[-1]
    assert row["signal"] == "SIGKILL"
    assert row["bytes_sent"] == last["bytes_out"] > 0 and row["bytes_received"] == last["bytes_in"] > 0, row


def test_a_peer_that_dies_in_a_rerun_is_not_reported_with_the_earlier_runs_result(tmp_path, swarm_factory):
    earlier = tmp_path / "run" / "peer1"
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text(json.dumps({"reason": "budget", "steps": 100, "ok": True}))
    (earlier / "peer.log").write_text("12:00:00 ERROR [peer1] an error of the earlier run\n")
    swarm = swarm_factory(two_peers(steps=100_000), "--no-fresh")
    victim = swarm.card("peer1")["pid"]
    wait_until(lambda: (m := swarm.metrics("peer1")) and m[-1]["step"] >= 50, 60, what="peer1 training")
    os.kill(victim, signal.SIGKILL)
    swarm.signal(signal.SIGINT)
    swarm.wait(120)
    row = swarm.summary()["peers"][1]
    assert row["signal"] == "SIGKILL" and row["reason"] == "no summary (the peer died before finishing)", row


def test_the_summary_says_why_when_the_first_peer_does_not_come_up(tmp_path, swarm_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "peer0.toml").write_text(f'listen = "tcp://127.0.0.1:{taken.getsockname()[1]}"\n')
        swarm = swarm_factory(two_peers(steps=200), "--manifests", str(manifests))
        assert swarm.wait(120) == 2, swarm.log()
    summary = swarm.summary()
    assert not summary["ok"] and "peer peer0 did not come up" in summary["error"], summary
    row = summary["peers"][0]
    assert row["name"] == "peer0" and row["exit_code"] != 0 and not row["ok"], row


def test_a_peer_that_does_not_stop_is_killed_at_a_second_stop_request_and_the_summary_says_so(swarm_factory):
    """A frozen peer (SIGSTOP) ignores the stop request; `up` kills it at the second one (or
    STOP_GRACE seconds after the first) and names it, where its row used to read as if it had
    died by itself."""
    swarm = swarm_factory(two_peers(steps=100_000))
    frozen, other = swarm.card("peer1")["pid"], swarm.card("peer0")["pid"]
    wait_until(lambda: (m := swarm.metrics("peer1")) and m[-1]["step"] >= 50, 60, what="peer1 training")
    os.kill(frozen, signal.SIGSTOP)
    try:
        swarm.signal(signal.SIGINT)
        wait_until(lambda: not pid_alive(other), 30, what="peer0 stopping")
        swarm.signal(signal.SIGINT)
        assert swarm.wait(60) == 128 + signal.SIGINT, swarm.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    rows = {r["name"]: r for r in swarm.summary()["peers"]}
    assert rows["peer0"]["reason"] == "stopped", rows["peer0"]
    assert rows["peer1"]["signal"] == "SIGKILL", rows["peer1"]
    assert rows["peer1"]["reason"] == "no summary (the peer was killed by `swarmnet up`: a second stop request)"
    assert "peer1: killed (a second stop request)" in swarm.log() and "peer0: killed" not in swarm.log()
