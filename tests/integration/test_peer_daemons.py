"""`swarmnet peer` daemons started by hand: seeds, gossip, status, two hosts in namespaces."""

import contextlib
import itertools
import os
import signal
import time

import pytest

from swarmnet.peer.metrics import read_metrics
from swarmnet.testing import PeerProcessHandle, query_status, wait_until
from swarmnet.testing.ports import unused_port

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def daemon_config(tmp_path, steps):
    return write_config(tmp_path / "swarm.toml", {
        "run": {"peers": 3},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": steps, "checkpoint_every": 0.0},
        "network": {"min_peers": 2, "request_timeout": 2.0, "linger": 2.0},
    })


def test_peers_seeded_in_a_chain_form_one_swarm_and_report_status(tmp_path, daemons):
    config = daemon_config(tmp_path, steps=1_000_000)
    run = tmp_path / "run"
    a = PeerProcessHandle(run, "a", config)
    daemons.append(a)
    a_addr = a.card()["addr"]
    b = PeerProcessHandle(run, "b", config, "--seed", a_addr)
    daemons.append(b)
    # c never hears of a directly; stopped before its budget, it exits as a Kubernetes Job wants it to
    c = PeerProcessHandle(run, "c", config, "--seed", b.card()["addr"], "--set", "run.stopped_exit_code=143")
    daemons.append(c)
    c_addr = c.card()["addr"]

    def everyone_known():
        status = query_status(c_addr)
        alive = {p["name"] for p in status["peers"] if p["alive"]}
        return status if alive == {"a", "b"} and status["interactions"] > 5 else None

    status = wait_until(everyone_known, 60, interval=0.5, what="c learning the whole swarm and merging")
    assert status["name"] == "c" and status["state"] == "training" and status["step"] > 0
    wait_until(lambda: query_status(a_addr)["interactions"] > 0, 30, interval=0.5, what="a merging too")
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in daemons:
        assert d.wait(30) == (143 if d is c else 0), d.log()
        summary = d.summary()
        assert summary["reason"] == "stopped" and summary["interactions"] > 0


def test_peers_waiting_for_their_start_condition_gossip_fast_and_start_together(tmp_path, daemons):
    """c joins through b, so b and c can start at once, while a hears of c only by gossip. A peer
    waiting for its start condition gossips every STARTING_INTERVAL (50 ms), not every
    gossip_interval (here 60 s: a would wait for its next round, or b's, or its 30 s join
    timeout), so all three start within a fraction of a second."""
    config = daemon_config(tmp_path, steps=300)
    slow_gossip = ("--set", "network.gossip_interval=60", "--set", "network.dead_after=300")
    run = tmp_path / "run"
    a = PeerProcessHandle(run, "a", config, *slow_gossip)
    daemons.append(a)
    b = PeerProcessHandle(run, "b", config, "--seed", a.card()["addr"], *slow_gossip)
    daemons.append(b)
    c = PeerProcessHandle(run, "c", config, "--seed", b.card()["addr"], *slow_gossip)
    daemons.append(c)
    for d in daemons:
        assert d.wait(90) == 0, d.log()
    first_row = {d.name: next(r["time"] for r in read_metrics(run / d.name / "metrics.jsonl") if "step" in r)
                 for d in daemons}
    print(f"first metrics row (step 10) after the earliest: "
          f"{ {n: round(t - min(first_row.values()), 3) for n, t in first_row.items()} } s")
    # Without fast gossip a would start 25 s or more after the others (its join timeout, or a
    # gossip round 60 s away); 10 s leaves room for three fresh processes' first 10 steps on 2
    # cores, under load.
    assert max(first_row.values()) - min(first_row.values()) < 10.0, first_row
    assert "only" not in a.log(200)  # a met its start condition, it did not time out


def test_unreachable_seed_is_reported_and_retried_without_hanging(tmp_path, daemons):
    config = daemon_config(tmp_path, steps=200)
    peer = PeerProcessHandle(tmp_path / "run", "lonely", config, "--seed", "tcp://127.0.0.1:9",
                             "--set", "network.join_timeout=3", "--set", "network.request_timeout=0.5")
    daemons.append(peer)
    assert peer.wait(60) == 0, peer.log()
    log = peer.log(200)
    assert "seed tcp://127.0.0.1:9 unreachable (connection to tcp://127.0.0.1:9 refused or unreachable" in log
    assert "retrying in" in log and "no other peer is alive" in log
    assert "waiting until 2 other peer(s) are known (network.min_peers)" in log  # why nothing happens yet
    assert "only 0 of 2 peers known" in log
    assert peer.summary()["steps"] == 200
    alone = next(line for line in log.splitlines() if "trained alone: no other peer was ever reached" in line)
    assert "refused" in alone  # said again at the end, with the cause


def test_a_file_seed_whose_card_never_came_is_named_as_the_cause_of_training_alone(tmp_path, daemons):
    config = daemon_config(tmp_path, steps=50)
    card = tmp_path / "nobody" / "card.json"
    peer = PeerProcessHandle(tmp_path / "run", "lonely", config, "--seed", f"file://{card}",
                             "--set", "network.join_timeout=2")
    daemons.append(peer)
    assert peer.wait(60) == 0, peer.log()
    alone = next(line for line in peer.log(200).splitlines() if "trained alone" in line)
    assert f"file://{card}: no peer card there" in alone, alone


def test_two_hosts_in_network_namespaces_form_one_swarm(tmp_path, daemons, two_hosts):
    config = write_config(tmp_path / "swarm.toml", {
        "run": {"peers": 2},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 1500, "checkpoint_every": 0.0},
        "network": {"min_peers": 1, "request_timeout": 2.0, "linger": 3.0},
    })
    run = tmp_path / "run"
    host_a = PeerProcessHandle(run, "host-a", config, "--listen", "tcp://10.200.1.1:7000",
                               prefix=two_hosts.prefix(0))
    daemons.append(host_a)
    host_b = PeerProcessHandle(run, "host-b", config, "--listen", "tcp://10.200.1.2:7000",
                               "--seed", "tcp://10.200.1.1:7000", prefix=two_hosts.prefix(1))
    daemons.append(host_b)
    for host in (host_a, host_b):
        assert host.wait(120) == 0, host.log()
    a, b = host_a.summary(), host_b.summary()
    assert a["addr"] == "tcp://10.200.1.1:7000" and b["addr"] == "tcp://10.200.1.2:7000"
    assert a["interactions"] > 50 and b["interactions"] > 50, (a["interactions"], b["interactions"])
    assert a["eval"]["accuracy"] > 0.9 and b["eval"]["accuracy"] > 0.9


def test_restarted_peer_resumes_from_its_checkpoint(tmp_path, daemons):
    config = daemon_config(tmp_path, steps=300)
    run = tmp_path / "run"
    first = PeerProcessHandle(run, "solo", config, "--set", "network.min_peers=0")
    daemons.append(first)
    assert first.wait(60) == 0, first.log()
    assert first.summary()["steps"] == 300
    second = PeerProcessHandle(run, "solo", config, "--set", "network.min_peers=0", "--steps", "600")
    daemons.append(second)
    assert second.wait(60) == 0, second.log()
    assert "resumed from" in second.log(100)
    summary = second.summary()
    assert summary["steps"] == 600 and summary["eval"]["accuracy"] > 0.9
    steps = [r["step"] for r in read_metrics(run / "solo" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(steps) and steps[-1] == 600 and 300 in steps and 310 in steps


@contextlib.contextmanager
def lone_peer_and_a_raw_socket(tmp_path, daemons, *args):
    """A peer alone (nobody to pull from, so only our requests move it) and a bare DEALER
    socket to it that sends whatever frames it is given, as a hostile client could."""
    import zmq

    peer = PeerProcessHandle(tmp_path / "run", "target", daemon_config(tmp_path, steps=1_000_000),
                             "--set", "network.min_peers=0", *args)
    daemons.append(peer)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(peer.card()["addr"])
    try:
        yield peer, sock
    finally:
        sock.close(0)
        ctx.term()


def test_garbage_is_rejected_counted_and_the_peer_keeps_serving(tmp_path, daemons):
    import msgpack

    bad = [
        [b"\xc1not msgpack"],
        [msgpack.packb({"v": 99, "t": "pull", "id": "x", "mid": 1, "sizes": []})],
        [msgpack.packb({"v": 1, "t": "pull", "id": "x", "mid": 2, "sizes": [5], "clock": 0, "want": None,
                        "version": None}), b"abc"],
        [msgpack.packb({"v": 1, "t": "snapshot", "id": "x", "mid": 3, "sizes": [], "version": 1, "codec": "fp32",
                        "meta": {}, "clock": 0, "age": 0.0})],
    ]
    with lone_peer_and_a_raw_socket(tmp_path, daemons) as (peer, sock):
        for frames, (code, answers) in zip(bad, [("malformed", 0), ("version", 1), ("malformed", 2), ("malformed", 3)]):
            sock.send_multipart(frames)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert (reply["t"], reply["code"], reply.get("re", 0)) == ("reject", code, answers), reply
    address = peer.card()["addr"]
    status = query_status(address)
    assert status["rejected"] == {"malformed": 1, "version": 1, "size_mismatch": 1, "unexpected_type": 1}
    step = status["step"]
    wait_until(lambda: query_status(address)["step"] > step, 20, what="the peer still training")
    peer.signal(signal.SIGTERM)
    assert peer.wait(30) == 0


def test_a_pull_the_server_refuses_moves_no_phase_clock(tmp_path, daemons):
    """SPEC 1.2 step 1: exactly one clock moves per interaction. A pull whose request the codec
    cannot serve is answered with a reject and is no interaction; a good one moves the server's
    clock (ours, 5, is ahead of its 0)."""
    import msgpack

    with lone_peer_and_a_raw_socket(tmp_path, daemons, "--set", "codec.name=lattice",
                                    "--set", "train.metrics_every=10") as (peer, sock):
        address = peer.card()["addr"]

        mids = itertools.count(1)

        def pull(want, clock=5):
            sock.send_multipart([msgpack.packb({"v": 1, "t": "pull", "id": "x", "mid": next(mids), "sizes": [],
                                                "clock": clock, "want": want, "version": None})])
            return msgpack.unpackb(sock.recv_multipart()[0])

        # Its card comes before its first snapshot (a loaded machine shows the gap): wait for one,
        # reading with clock 0, which moves no clock.
        wait_until(lambda: pull(None, clock=0)["t"] == "snapshot", 60, what="the peer's first snapshot")
        refused = pull("not a plan")
        assert (refused["t"], refused["code"]) == ("reject", "malformed"), refused
        served = pull(None)
        assert (served["t"], served["clock"]) == ("snapshot", 0), served  # the clock before the move
        # The status reports the clock of the last metrics row: wait for one after the pulls.
        step = query_status(address)["step"]
        wait_until(lambda: query_status(address)["step"] >= step + 30, 60, what="metrics rows after the pulls")
        assert query_status(address)["clock"] == 1  # alone: the served pull moved it, the refused one did not


def test_a_second_stop_request_ends_the_wait_for_a_pull_in_flight(tmp_path, daemons):
    """The first SIGTERM lets the interaction in flight finish, bounded by its deadlines (here a
    pull from a frozen neighbour: 30 s and more); the second, which a scheduler sends shortly
    before its kill, must end that wait, and the peer still writes its checkpoint and summary."""
    config = write_config(tmp_path / "s.toml", {
        "run": {"peers": 2},
        "task": {"spec": "swarmnet.tasks.lsq:task"},
        "train": {"batch_size": 1, "lr": 0.01, "steps": 10**9, "checkpoint_every": 0.0},
        "network": {"request_timeout": 30.0, "dead_after": 120.0, "failure_backoff": 0.05, "min_peers": 1},
    })
    run = tmp_path / "run"
    a = PeerProcessHandle(run, "a", config)
    daemons.append(a)
    b = PeerProcessHandle(run, "b", config, "--seed", a.card()["addr"])
    daemons.append(b)
    address, frozen = a.card()["addr"], b.card()["pid"]
    wait_until(lambda: query_status(address)["pulls_ok"] > 3, 60, what="a pulling from b")
    os.kill(frozen, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # a's next pull goes to b and waits for its deadline
        a.signal(signal.SIGTERM)
        time.sleep(2.0)
        assert a.proc.poll() is None, a.log()  # draining: the pull in flight is still bounded by 30 s
        forced = time.monotonic()
        a.signal(signal.SIGTERM)
        assert a.wait(15) == 0, a.log()
        assert time.monotonic() - forced < 10, a.log()
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert a.summary()["reason"] == "stopped" and (run / "a" / "checkpoint.pt").exists()
    assert "second stop request" in (run / "a.log").read_text()


def test_a_peer_takes_at_most_one_nudge_per_version(tmp_path, daemons):
    """Symmetric merges: three neighbours nudge the same snapshot version at once; exactly one
    is admitted (two updates against one version average, three would overshoot), the others
    are refused as busy and the model moves by exactly that one half-step."""
    import asyncio

    import torch

    from swarmnet.codecs import make_codec
    from swarmnet.peer.client import PeerClient, Rejected
    from swarmnet.peer.stats import PeerStats
    from swarmnet.transport import TransportSet
    from swarmnet.wire import Limits, MsgType, request

    config = write_config(tmp_path / "still.toml", {
        "task": {"spec": "swarmnet.tasks.lsq:task"},
        "train": {"batch_size": 1, "lr": 0.0, "steps": 10**9, "checkpoint_every": 0.0},
        "network": {"exchange": False, "min_peers": 0},
        # H never done: no refresh of its own (compute.REFRESH_MIN_S) moves its latest version
        # between our pull and the nudges, or stands in for the nudge's publish.
        "algorithm": {"local_steps": 10**9, "symmetric": True},
    })
    peer = PeerProcessHandle(tmp_path / "run", "target", config)
    daemons.append(peer)
    address = peer.card()["addr"]
    codec = make_codec("fp32")

    async def scenario():
        transports = TransportSet()
        clients = [PeerClient(sender=f"nudger{i}", transports=transports, limits=Limits(), timeout=10,
                              stats=PeerStats(), max_frame_bytes=2**31 - 1) for i in range(3)]

        async def pull():
            reply = await clients[0].call(address, request(MsgType.PULL, "nudger0", clock=0, want=None, version=None))
            values = torch.empty(reply.body["meta"]["n"])
            codec.decode(reply.body["meta"], reply.frames, values, values, {})
            return reply.body["version"], values

        async def nudge(client, used, model):
            encoded = codec.encode(model)
            msg = request(MsgType.NUDGE, client.sender, encoded.frames, used=used, codec="fp32", meta=encoded.meta)
            try:
                return (await client.call(address, msg)).type
            except Rejected as exc:
                return exc.code

        try:
            version, k = await pull()
            answers = await asyncio.gather(*(nudge(c, version, k + 1.0) for c in clients))
            deadline = asyncio.get_running_loop().time() + 30
            while (latest := await pull())[0] == version and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            stale = await nudge(clients[1], version, k + 1.0)  # against a version no longer the latest
            return k, answers, latest, stale
        finally:
            for c in clients:
                await c.aclose()
            await transports.aclose()

    k, answers, (new_version, moved), stale = asyncio.run(scenario())
    assert sorted(map(str, answers)) == ["ack", "busy", "busy"], answers
    assert torch.allclose(moved, k + 0.5), float((moved - k).mean())
    assert str(stale) == "busy"
    status = query_status(address)
    assert status["nudges_applied"] == 1 and status["nudges_refused"] == 3


@pytest.mark.parametrize("adopt", [True, False])
def test_a_codec_header_over_the_wire_limit_is_refused_at_start(tmp_path, daemons, adopt):
    """Readers would refuse every reply of this peer (409 lattice chunks of 64 coordinates: a
    6.9 KB header against a 4 KB limit): the peer says so and exits instead of serving them,
    whether it publishes at once or first looks for a model to adopt (inside its services)."""
    config = write_config(tmp_path / "swarm.toml", {
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "steps": 100, "checkpoint_every": 0.0},
        "codec": {"name": "lattice", "options": {"chunk": 64}},
        "network": {"max_header_bytes": 4096, "adopt_model": adopt},
    })
    peer = PeerProcessHandle(tmp_path / "run", "a", config)
    daemons.append(peer)
    assert peer.wait(60) == 2
    assert "409 chunks" in peer.log() and "max_header_bytes = 4096" in peer.log(), peer.log()


def test_the_wait_for_the_start_condition_is_not_charged_to_the_exchange_budget(tmp_path, daemons):
    """a and b know each other and wait 4 s for c (min_peers = 2), gossiping every 50 ms. That
    CPU ran on the threads the exchange's budget charges; counted, it put a tight budget seconds
    in debt, so the first pulls came long after training began (4-6 s of 11 with 16 peers on 2
    cores). The budget now counts from the exchange's first pull."""
    config = daemon_config(tmp_path, steps=4000)
    tight = ("--set", "network.exchange_cpu=0.005")
    run = tmp_path / "run"
    a = PeerProcessHandle(run, "a", config, *tight)
    daemons.append(a)
    b = PeerProcessHandle(run, "b", config, "--seed", a.card()["addr"], *tight)
    daemons.append(b)
    b.card()
    time.sleep(4.0)
    c = PeerProcessHandle(run, "c", config, "--seed", a.card()["addr"], *tight)
    daemons.append(c)
    for d in daemons:
        assert d.wait(120) == 0, d.log()
    for d in (a, b):
        rows = [r for r in read_metrics(run / d.name / "metrics.jsonl") if "interactions" in r]
        merged = next((r["time"] - rows[0]["time"] for r in rows if r["interactions"] > 0), None)
        print(f"{d.name}: first merge {merged and round(merged, 3)} s after its first 10 steps, of "
              f"{rows[-1]['time'] - rows[0]['time']:.1f} s of training; {rows[-1]['interactions']} merges")
        # A merge of this small model costs a few ms of CPU: under 5 ms a second the first one
        # can come within a second; the debt of the wait deferred it by seconds.
        assert merged is not None and merged < 2.0, (d.name, merged, rows[-1])


def test_a_peer_killed_during_its_final_evaluation_leaves_its_summary(tmp_path, daemons):
    """A scheduler stops a job with SIGTERM and kills it a while later (Slurm's KillWait, 30 s by
    default). The final evaluation of a large test set can outlast that: the summary, written
    only after it, was lost with it. Now it is written before the evaluation, and again after."""
    (tmp_path / "slow_eval_task.py").write_text(
        "import dataclasses, time\n"
        "from swarmnet.tasks.digits import task as digits\n"
        "def task(**options):\n"
        "    def evaluate(model):\n"
        "        time.sleep(120)\n"
        "        return {'accuracy': 0.0}\n"
        "    return dataclasses.replace(digits(**options), evaluate=evaluate)\n")
    config = write_config(tmp_path / "slow.toml", {
        "task": {"spec": "slow_eval_task:task"},
        "train": {"batch_size": 32, "steps": 1_000_000, "checkpoint_every": 0.0},
    })
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    peer = PeerProcessHandle(tmp_path / "run", "alone", config, env={"PYTHONPATH": path})
    daemons.append(peer)
    addr = peer.card()["addr"]
    wait_until(lambda: query_status(addr)["step"] > 50, 60, what="the peer training")
    peer.signal(signal.SIGTERM)
    summary = tmp_path / "run" / "alone" / "summary.json"
    wait_until(summary.exists, 20, interval=0.1, what="the summary, before the final evaluation ends")
    assert peer.proc.poll() is None  # still evaluating
    peer.signal(signal.SIGKILL)
    peer.wait(10)
    assert peer.summary()["reason"] == "stopped" and (tmp_path / "run" / "alone" / "checkpoint.pt").exists()


def test_a_peer_that_merged_with_no_one_says_why_at_the_end(tmp_path, daemons):
    """a advertises an address nothing listens on (an --advertise other hosts cannot dial, in
    effect): b hears from a, which reaches it, but never pulls from it. b once ended saying
    nothing: it had joined, so no 'trained alone' line, and a sat on back-off, so no failure."""
    config = daemon_config(tmp_path, steps=600)
    listening, nowhere = (f"tcp://127.0.0.1:{unused_port()}" for _ in range(2))
    run = tmp_path / "run"
    one = ("--set", "network.min_peers=1")
    a = PeerProcessHandle(run, "a", config, "--listen", listening, "--advertise", nowhere, *one,
                          "--set", "train.steps=100000")
    daemons.append(a)
    b = PeerProcessHandle(run, "b", config, "--seed", listening, *one)
    daemons.append(b)
    assert b.wait(90) == 0, b.log()
    assert b.summary()["interactions"] == 0
    alone = next((line for line in b.log(200).splitlines() if "trained alone: merged with none" in line), b.log(200))
    assert f"a at {nowhere}: connection to {nowhere} refused or unreachable" in alone, alone
    assert "check the --advertise of each peer from every host" in alone


def test_an_advertise_copied_from_another_peers_manifest_is_named(tmp_path, daemons):
    """b advertises a's address (and seeds from it, as a's manifest does): b dropped the seed as
    its own address and trained alone, saying only that it knew none of its peers."""
    config = daemon_config(tmp_path, steps=300)
    run = tmp_path / "run"
    one = ("--set", "network.min_peers=1", "--set", "network.join_timeout=2")
    a = PeerProcessHandle(run, "a", config, *one, "--set", "train.steps=100000")
    daemons.append(a)
    theirs = a.card()["addr"]
    b = PeerProcessHandle(run, "b", config, "--listen", f"tcp://127.0.0.1:{unused_port()}", "--advertise", theirs,
                          "--seed", theirs, *one)
    daemons.append(b)
    assert b.wait(90) == 0, b.log()
    log = b.log(200)
    assert f"this peer advertises {theirs}, but peer a answers there" in log, log
    assert f"trained alone: no other peer ever reached this one, whose only seeds are its own address ({theirs})" in log


def test_two_live_peers_of_one_name_are_warned_of(tmp_path, daemons):
    """Two hosts' peers given one name (each in its own run directory) trained together without
    a word, while status rows, events and eval mixed them up."""
    config = daemon_config(tmp_path, steps=100000)
    one = ("--set", "network.min_peers=1")
    first = PeerProcessHandle(tmp_path / "host-a", "twin", config, *one)
    daemons.append(first)
    second = PeerProcessHandle(tmp_path / "host-b", "twin", config, "--seed", first.card()["addr"], *one)
    daemons.append(second)
    wait_until(lambda: "is named twin too" in first.log(200) and "is named twin too" in second.log(200), 60,
               what="each twin's warning")
    assert first.log(200).count("is named twin too") == 1  # once per namesake, not per hello
