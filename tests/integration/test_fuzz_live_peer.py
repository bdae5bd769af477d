"""Fuzz a live peer's socket with thousands of random and mutated messages.

The messages start from real, well-formed ones (pulls, status, gossip, nudges carrying a real
snapshot, replies sent as requests) and are broken the ways the network breaks them: wrong
version, unknown type, missing or mistyped fields, frames truncated, added or dropped, sizes
that disagree with the header, oversized headers and frames, flipped bytes, garbage msgpack.
Between them, real snapshot pulls and status requests must keep being answered; the peer must
not crash, its memory must stay bounded, and every refusal must show in its status counters.

``SWARMNET_FUZZ_EXAMPLES`` sets the number of messages (default 4000, about 30 s); the long run
of docs/reliability.md is ``SWARMNET_FUZZ_EXAMPLES=50000 pytest -s tests/integration/test_fuzz_live_peer.py``.
"""

import os
import signal
import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swarmnet import PROTOCOL_VERSION
from swarmnet.bench.memory import resident_mb
from swarmnet.testing import PeerProcessHandle, query_status
from swarmnet.wire import MsgType, encode, request

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES = int(os.environ.get("SWARMNET_FUZZ_EXAMPLES", "4000"))
MAX_FRAME = 1 << 20
"""The peer's network.max_message_bytes: larger frames make the transport drop the sender."""
PROBE_EVERY = 50
BATCH = 8
RSS_SLACK_MB = 64

MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=16) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
HEADER_KEYS = ["v", "t", "id", "mid", "sizes", "re", "clock", "want", "version", "card", "peers", "used",
               "codec", "meta", "status", "code", "reason", "age"]


class Client:
    """A bare DEALER socket: sends whatever frames it is given, as a hostile peer could."""

    def __init__(self, address):
        self.address = address
        self.ctx = zmq.Context()
        self.sock = self._open()

    def _open(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(self.address)
        return sock

    def ask(self, frames):
        self.sock.send_multipart(frames)
        return self.receive()

    def receive(self):
        try:
            return self.sock.recv_multipart()
        except zmq.Again:
            raise AssertionError("the peer did not answer within 10 s") from None

    def send_and_drop(self, frames):
        """For frames the transport refuses: it drops the connection, so use a throwaway socket."""
        sock = self._open()
        sock.send_multipart(frames)
        time.sleep(0.01)
        sock.close(0)

    def close(self):
        self.sock.close(0)
        self.ctx.term()


def header_of(frames):
    return msgpack.unpackb(frames[0], raw=False)


def pull_snapshot(client):
    """A well-formed pull; returns (header, values) after checking the reply fully."""
    reply = client.ask(encode(request(MsgType.PULL, "prober", clock=0, want=None, version=None)))
    head = header_of(reply)
    assert head["t"] == "snapshot", head
    assert head["sizes"] == [len(f) for f in reply[1:]]
    values = torch.frombuffer(bytearray(reply[1]), dtype=torch.float32)
    assert values.numel() == head["meta"]["n"] and bool(torch.isfinite(values).all())
    return head, values


def poisoned_nudge_refusal(client, poison_of, within=10.0):
    """The reply to a nudge carrying ``poison_of(values)`` keyed on the peer's latest snapshot.
    A nudge is refused as busy, before it is decoded, when the peer republished between our pull
    and the nudge (about once a second) or when an earlier nudge on that version awaits its next
    step; it is then sent again against the latest version."""
    deadline = time.monotonic() + within
    while True:
        head, values = pull_snapshot(client)
        nudge = request(MsgType.NUDGE, "poisoner", [poison_of(values).numpy().tobytes()], used=head["version"],
                        codec="fp32", meta=head["meta"])
        reply = header_of(client.ask(encode(nudge)))
        if reply.get("code") != "busy":
            return reply
        assert time.monotonic() < deadline, f"every nudge for {within} s was refused as busy: {reply}"
        time.sleep(0.05)


def base_messages(snapshot_head, values):
    """Well-formed messages of every type, as (header dict, payload frames)."""
    payload = values.numpy().tobytes()
    card = {"id": "fuzzer", "addr": "tcp://127.0.0.1:9", "hb": 1, "name": "fz"}  # the sender's own
    bodies = {
        MsgType.PULL: ({"clock": 3, "want": None, "version": None}, []),
        MsgType.STATUS: ({}, []),
        MsgType.HELLO: ({"card": card, "peers": [dict(card, id="fuzz-other")]}, []),
        MsgType.NUDGE: ({"used": snapshot_head["version"], "codec": "fp32", "meta": snapshot_head["meta"]},
                        [payload]),
        MsgType.BYE: ({}, []),
        MsgType.SNAPSHOT: ({k: snapshot_head[k] for k in ("version", "codec", "meta", "clock", "age")}, [payload]),
        MsgType.ACK: ({}, []),
        MsgType.PEERS: ({"card": card, "peers": []}, []),
        MsgType.REJECT: ({"code": "busy", "reason": "x"}, []),
        MsgType.STATUS_REPLY: ({"status": {"step": 1}}, []),
    }
    out = []
    for mtype, (body, frames) in bodies.items():
        header = dict(body, v=PROTOCOL_VERSION, t=str(mtype), id="fuzzer", mid=1, sizes=[len(f) for f in frames])
        out.append((header, frames))
    return out


def draw_base(draw, bases):
    """One of ``bases`` as the list holds them now: the test refreshes them as the peer's snapshot
    version moves on (a nudge keyed on an old version is refused as busy before it is decoded)."""
    return bases[draw(st.integers(0, len(bases) - 1))]


@st.composite
def hostile_messages(draw, bases):
    """(frames, note): one broken (or, now and then, intact) message."""
    kind = draw(st.sampled_from(["mutated"] * 6 + ["random_frames", "random_msgpack", "oversized_header"]))
    if kind == "random_frames":
        return draw(st.lists(st.binary(max_size=300), min_size=1, max_size=5)), kind
    if kind == "random_msgpack":
        head = msgpack.packb(draw(MSGPACK_VALUES), use_bin_type=True)
        return [head, *draw(st.lists(st.binary(max_size=64), max_size=3))], kind
    if kind == "oversized_header":
        base, _ = draw_base(draw, bases)
        big = dict(base, pad="x" * draw(st.integers(65_536, 200_000)))
        return [msgpack.packb(big, use_bin_type=True)], kind
    base_header, base_frames = draw_base(draw, bases)
    header = dict(base_header)
    frames = [bytes(f) for f in base_frames]
    notes = [header["t"]]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["version", "type", "drop_key", "set_key", "add_key", "sizes", "truncate",
                                   "extra_frame", "drop_frame", "flip_payload", "big_frame", "meta", "card"]))
        notes.append(op)
        if op == "version":
            header["v"] = draw(st.one_of(st.integers(-5, 10), MSGPACK_VALUES))
        elif op == "type":
            header["t"] = draw(st.one_of(st.text(max_size=12), st.sampled_from([str(t) for t in MsgType]),
                                         MSGPACK_VALUES))
        elif op == "drop_key" and header:
            header.pop(draw(st.sampled_from(sorted(header))))
        elif op == "set_key":
            header[draw(st.sampled_from(HEADER_KEYS))] = draw(MSGPACK_VALUES)
        elif op == "add_key":
            header[draw(st.text(max_size=10))] = draw(MSGPACK_VALUES)
        elif op == "sizes":
            header["sizes"] = draw(st.lists(st.integers(-(2**40), 2**40), max_size=4))
        elif op == "truncate" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif op == "extra_frame":
            frames.append(draw(st.binary(max_size=64)))
        elif op == "drop_frame" and frames:
            frames.pop(draw(st.integers(0, len(frames) - 1)))
        elif op == "flip_payload" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            if frames[i]:
                data = bytearray(frames[i])
                for _ in range(draw(st.integers(1, 8))):
                    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
                frames[i] = bytes(data)
        elif op == "big_frame":
            frames.append(b"\0" * draw(st.integers(100_000, MAX_FRAME)))
        elif op == "meta":
            header["meta"] = dict(header.get("meta") if isinstance(header.get("meta"), dict) else {},
                                  **{draw(st.sampled_from(["n", "v", "scale", "bits"])): draw(MSGPACK_VALUES)})
        elif op == "card":
            header["card"] = draw(st.one_of(MSGPACK_VALUES, st.fixed_dictionaries(
                {"id": st.text(max_size=200), "addr": st.text(max_size=600), "hb": MSGPACK_VALUES})))
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        packed = msgpack.packb({"t": "unpackable"})
    if draw(st.integers(0, 9)) == 0:  # break the msgpack itself now and then
        packed = packed[: draw(st.integers(0, len(packed)))] + draw(st.binary(max_size=4))
    return [packed, *frames], "/".join(notes)


@pytest.fixture
def live_peer(tmp_path):
    config = write_config(tmp_path / "fuzz.toml", {
        "run": {"peers": 1},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "steps": 10**9, "metrics_every": 50, "checkpoint_every": 0.0},
        "algorithm": {"symmetric": True},  # takes nudges (a pull-only peer refuses them unread)
        "network": {"request_timeout": 1.0, "dead_after": 2.0, "failure_backoff": 0.5,
                    "max_message_bytes": MAX_FRAME},
    })
    peer = PeerProcessHandle(tmp_path / "run", "target", config)
    try:
        yield peer, peer.card()
    finally:
        peer.kill_tree()


def test_thousands_of_hostile_messages_never_crash_a_live_peer(live_peer):
    peer, card = live_peer
    address, pid = card["addr"], card["pid"]
    client = Client(address)
    try:
        snapshot_head, values = pull_snapshot(client)
        bases = base_messages(snapshot_head, values)
        before = query_status(address)
        rss = {"start": resident_mb(pid), "max": 0.0}
        tally = {"sent": 0, "rejected": 0, "answered": 0, "probes": 0, "probe_max_s": 0.0, "kinds": {}}

        def probe():
            started = time.monotonic()
            bases[:] = base_messages(*pull_snapshot(client))  # nudges keyed on a recent version
            tally["probe_max_s"] = max(tally["probe_max_s"], time.monotonic() - started)
            tally["probes"] += 1
            assert peer.proc.poll() is None, peer.log()
            rss["max"] = max(rss["max"], resident_mb(pid))

        @settings(max_examples=EXAMPLES // BATCH, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(hostile_messages(bases), min_size=BATCH, max_size=BATCH))
        def fuzz(batch):
            for frames, note in batch:  # pipelined: the peer holds several requests at once
                client.sock.send_multipart(frames)
                kind = note.split("/")[0]
                tally["kinds"][kind] = tally["kinds"].get(kind, 0) + 1
            for _, note in batch:
                head = header_of(client.receive())
                assert head["t"] in ("reject", "snapshot", "status_reply", "peers", "ack"), (note, head)
                if head["t"] == "reject":
                    tally["rejected"] += head["code"] in ("malformed", "version")
                else:
                    tally["answered"] += 1
            tally["sent"] += len(batch)
            if tally["sent"] % PROBE_EVERY < BATCH:
                probe()

        started = time.monotonic()
        fuzz()
        # Frames over the transport's limit: the sender is dropped, the peer goes on.
        for size in (MAX_FRAME + 1, 4 * MAX_FRAME):
            client.send_and_drop([encode(request(MsgType.STATUS, "big"))[0], b"\0" * size])
        probe()
        # Poisoned nudges against the current snapshot: NaN and a model a million times ours.
        for poison_of, why in ((lambda v: torch.full_like(v, float("nan")), "non-finite"),
                               (lambda v: v * 1e6, "away from ours")):
            refusal = poisoned_nudge_refusal(client, poison_of)
            assert refusal["t"] == "reject" and refusal["code"] == "malformed", refusal
            assert why in refusal["reason"], refusal
            tally["rejected"] += 1
        elapsed = time.monotonic() - started
        after = query_status(address)
        counted = sum(after["rejected"].values()) - sum(before["rejected"].values())
        print(f"\nfuzz: {tally['sent']} messages in {elapsed:.1f}s, {tally['rejected']} refused as malformed, "
              f"{tally['answered']} answered; by kind {tally['kinds']}; status counters {after['rejected']}; "
              f"{tally['probes']} well-formed pulls, slowest {tally['probe_max_s'] * 1000:.0f} ms; "
              f"RSS {rss['start']:.0f} MB at start, max {rss['max']:.0f} MB")
        assert tally["sent"] >= EXAMPLES * 0.9
        assert counted == tally["rejected"] > EXAMPLES / 2
        assert after["rejected"]["non_finite"] >= 1 and after["rejected"]["too_far"] >= 1
        assert "internal_error" not in after["rejected"], peer.log(200)  # no handler crashed
        assert after["step"] > before["step"] and after["state"] == "training"
        assert rss["max"] < rss["start"] + RSS_SLACK_MB
        # Thousands of refusals, a few log lines: per reason the first, then one every 10 s.
        lines = [line for line in peer.log(100_000).splitlines() if "rejected a message" in line]
        reasons = {code for code in after["rejected"] if code not in ("non_finite", "too_far")}
        assert len(reasons) <= len(lines) <= len(reasons) * (elapsed // 10 + 1), lines
    finally:
        client.close()
    peer.signal(signal.SIGTERM)
    assert peer.wait(30) == 0, peer.log()


def test_fat_cards_and_refusals_keep_every_reply_readable(live_peer):
    """Hellos stuffed with the largest cards the protocol admits: the peer's gossip and status
    replies still fit the header limit every peer enforces; a refusal answers the request's mid."""
    peer, card = live_peer
    client = Client(card["addr"])
    try:
        for batch in range(6):
            fat = [{"id": f"fat-{batch}-{i:03d}".ljust(128, "x"), "addr": f"tcp://127.0.0.{batch}:{i}".ljust(512, "0"),
                    "hb": 2**40, "name": "n" * 128, "done": False} for i in range(70)]
            head = header_of(client.ask(encode(request(MsgType.HELLO, fat[0]["id"], card=fat[0], peers=fat[1:]))))
            assert head["t"] == "peers", head
        gossip = client.ask(encode(request(MsgType.HELLO, "prober", card=dict(fat[0], id="prober"), peers=[])))
        status = client.ask(encode(request(MsgType.STATUS, "prober")))
        for reply in (gossip, status):
            assert len(reply[0]) <= 65536, (len(reply[0]), header_of(reply)["t"])
        assert len(header_of(gossip)["peers"]) > 10 and len(header_of(status)["status"]["peers"]) > 10
        assert query_status(card["addr"])["state"] == "training"
        stranger = request(MsgType.PULL, "stranger", clock=0, want=None, version=None)
        frames = encode(stranger)
        frames[0] = msgpack.packb(dict(header_of(frames), v=PROTOCOL_VERSION + 1))
        head = header_of(client.ask(frames))
        assert (head["t"], head["code"], head["re"]) == ("reject", "version", stranger.mid), head
        assert head["mid"] > 0, head  # numbered by the peer's own counter, as every message it sends
    finally:
        client.close()


def test_status_json_stays_one_document_when_a_member_advertises_ucx(live_peer):
    """A card with a ucx:// address (any stranger can send one to a swarm without [security]):
    dialing it, UCX's native library prints errors on file descriptor 1, which went into the
    document `swarmnet status --json` prints there."""
    import json
    import subprocess
    import sys

    pytest.importorskip("ucxx", reason="the UCX bindings (extra ucx) print the native errors this is about")
    peer, card = live_peer
    client = Client(card["addr"])
    try:
        ghost = {"id": "ghost", "addr": "ucx://127.0.0.1:1", "hb": 1, "name": "ghost"}
        assert header_of(client.ask(encode(request(MsgType.HELLO, "ghost", card=ghost, peers=[]))))["t"] == "peers"
    finally:
        client.close()
    result = subprocess.run([sys.executable, "-m", "swarmnet", "status", "--seed", card["addr"], "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {p["name"] for p in doc["peers"]} >= {"target", "ghost"}, doc


def test_a_card_at_the_peers_own_address_never_makes_it_its_own_neighbour(live_peer):
    """A card of this peer's earlier run (or a forged one) at its own address, and another at a
    second spelling of that address: neither becomes a neighbour to pull from."""
    peer, card = live_peer
    port = card["addr"].rsplit(":", 1)[1]
    earlier = {"id": "target-aaaaaa", "addr": card["addr"], "hb": 10**9, "name": "earlier"}
    alias = {"id": "alias-bbbbbb", "addr": f"tcp://localhost:{port}", "hb": 10**9, "name": "alias"}
    client = Client(card["addr"])
    try:
        deadline = time.monotonic() + 30
        while True:
            status = query_status(card["addr"])
            names = {p["name"] for p in status["peers"]}
            assert "earlier" not in names and status["pulls_ok"] == 0, status
            if any("is this peer itself" in event[2] for event in status["events"]):
                break  # dialled (gossip or a pull), the alias answered as the peer itself
            assert time.monotonic() < deadline, status
            if "alias" not in names:  # (again, if a loaded machine let it go quiet before it was dialled)
                head = header_of(client.ask(encode(request(MsgType.HELLO, earlier["id"], card=earlier, peers=[alias]))))
                assert head["t"] == "peers", head
            time.sleep(0.2)
        # Forgotten for good: others relay its card on, and it is not taken up again.
        head = header_of(client.ask(encode(request(MsgType.HELLO, earlier["id"], card=earlier, peers=[alias]))))
        time.sleep(1.0)
        status = query_status(card["addr"])
        assert not {"alias", "earlier"} & {p["name"] for p in status["peers"]} and status["pulls_ok"] == 0, status
    finally:
        client.close()
