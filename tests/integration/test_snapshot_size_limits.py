"""The network limits follow the model's size: the frame limit admits any snapshot of it and
nothing much larger, and a request that moves a snapshot gets time for its bytes."""

import json
from pathlib import Path

import msgpack
import pytest
import zmq

from swarmnet.config import load_config
from swarmnet.peer.node import Peer, PeerIdentity
from swarmnet.testing import PeerProcessHandle, query_status, wait_until
from swarmnet.testing.processes import ScriptProcess
from swarmnet.wire import MsgType, encode, request

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROGUE = Path(__file__).with_name("rogue_peer.py")
DIGITS_N = 26_122
"""Float coordinates of the digits MLP (64-128-128-10): its fp32 snapshot is one 104,488-byte frame."""


def digits_peer_config(path, **network):
    return write_config(path, {
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "steps": 10**9, "metrics_every": 50, "checkpoint_every": 0.0},
        "network": {"adopt_model": False, "failure_backoff": 0.2, **network},
    })


def ask(address, frames, timeout_ms):
    """Send raw frames on a fresh DEALER; the reply's header, or None when none came in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()


@pytest.mark.parametrize("codec, adopt, refusal", [
    ("fp32", False, "this model's fp32 snapshots take 104488 bytes"),
    ("blockwise8", True, "a newcomer's lossless pull of this model (network.adopt_model) takes a 104488-byte frame"),
    ("blockwise8", False, None),  # 27,758-byte snapshots: within 64 KiB
])
def test_a_frame_limit_below_what_the_peer_sends_is_refused_at_start(tmp_path, daemons, codec, adopt, refusal):
    """Every neighbour's libzmq would drop a frame over the limit (here 64 KiB): the peer says so
    and exits instead of serving pulls that all fail. Newcomers pull a lossless model (4 bytes a
    coordinate) only where they adopt one."""
    config = digits_peer_config(tmp_path / "swarm.toml", max_message_bytes=65536, adopt_model=adopt)
    peer = PeerProcessHandle(tmp_path / "run", "a", config, "--set", f'codec.name="{codec}"')
    daemons.append(peer)
    if refusal is None:
        assert query_status(peer.card()["addr"])["codec"] == codec
        return
    assert peer.wait(60) == 2
    assert refusal in peer.log() and "max_message_bytes = 65536" in peer.log(), peer.log()


def test_peers_keep_older_snapshots_only_for_codecs_with_partial_reads(tmp_path):
    """Lattice readers ask for more planes of the version they started on; no other reader asks
    for an older version, so other peers keep none (each one held a copy of the model)."""
    for codec, history in (("fp32", 1), ("blockwise8", 1), ("lattice", 8)):
        cfg = load_config(None, {"run.dir": str(tmp_path), "codec.name": codec})
        peer = Peer(cfg, PeerIdentity("a", 0))
        peer.release_dir()
        assert peer.store.history == history, codec


def test_the_automatic_frame_limit_admits_snapshots_and_drops_larger_frames(tmp_path, daemons):
    """Auto (the default): 8 bytes a coordinate plus 1 MiB, 1,257,552 bytes for this model. A
    frame under it is read and answered, one over it drops its sender (the old fixed 2 GiB limit
    let any stranger make a peer take in 2 GiB per frame), and the peer goes on."""
    peer = PeerProcessHandle(tmp_path / "run", "a", digits_peer_config(tmp_path / "swarm.toml"))
    daemons.append(peer)
    address = peer.card()["addr"]
    limit = 8 * DIGITS_N + (1 << 20)
    header = encode(request(MsgType.STATUS, "stranger"))[0]
    under = ask(address, [header, b"\0" * (limit - 1000)], timeout_ms=5000)
    assert under is not None and under["t"] == "reject" and under["code"] == "malformed", under
    assert ask(address, [header, b"\0" * (limit + 1000)], timeout_ms=1500) is None
    full = ask(address, encode(request(MsgType.PULL, "stranger", clock=0, want="full", version=1)), timeout_ms=5000)
    assert full["t"] == "reject" and "takes the latest snapshot" in full["reason"], full  # never an older one
    status = query_status(address)
    assert status["state"] == "training" and status["rejected"] == {"size_mismatch": 1}, status  # counted by reason


@pytest.mark.parametrize("rate, merges", [(20e3, True), (50e6, False)])
def test_a_pull_has_time_to_move_the_snapshot_at_the_slowest_rate_allowed(tmp_path, daemons, rate, merges):
    """A neighbour on a slow link: each pull's answer arrives 1 s late, past request_timeout
    (0.5 s). At min_transfer_rate 20 KB/s the model's 104 KB get 5.2 s more and every pull
    lands, however busy the machine; at the default 50 MB/s they get 2 ms more and every pull
    times out."""
    config = digits_peer_config(tmp_path / "swarm.toml", request_timeout=0.5, min_transfer_rate=rate)
    peer = PeerProcessHandle(tmp_path / "run", "a", config)
    daemons.append(peer)
    address = peer.card()["addr"]
    out = tmp_path / "slow"
    slow = ScriptProcess(ROGUE, "--task", "swarmnet.tasks.digits:task", "--mode", "slow", "--delay", "1.0",
                         "--seed", address, "--out", str(out), log=out / "log")
    try:
        wait_until(lambda: (out / "served.json").exists() and sum(json.loads((out / "served.json").read_text())
                                                                   .values()) >= 3, 60, interval=0.2,
                   what="three pulls asked of the slow neighbour")
        status = wait_until(lambda: (s := query_status(address))["pulls_ok"] + s["pulls_failed"] >= 3 and s,
                            30, interval=0.2, what="three pulls ended")
    finally:
        slow.kill_tree()
    print(f"\nmin_transfer_rate {rate:.0e}: pulls ok {status['pulls_ok']}, failed {status['pulls_failed']}")
    if merges:
        assert status["pulls_ok"] >= 2 and status["pulls_failed"] == 0, status
    else:
        assert status["pulls_ok"] == 0 and status["pulls_failed"] >= 2, status
