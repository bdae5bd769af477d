"""A closed swarm of real `swarmnet peer` processes: the right keys train together, a stranger
(no key or a wrong key, as a peer or as a client) gets no snapshot, no membership list, no status
and never becomes a member."""

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from swarmnet.cli import app
from swarmnet.errors import TransportError
from swarmnet.peer.client import PeerClient
from swarmnet.peer.stats import PeerStats
from swarmnet.security import client_keys, generate_keys, load_keypair, with_key
from swarmnet.testing import PeerProcessHandle, query_status, wait_until
from swarmnet.transport import TransportSet
from swarmnet.wire import Limits, MsgType, request

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WARNING = "without authentication"


def peer_config(path, security, **network):
    return write_config(path, {
        "run": {"peers": 2},
        "task": {"spec": "swarmnet.tasks.lsq:task", "options": {"samples": 2000, "dim": 16}},
        "train": {"batch_size": 8, "lr": 0.01, "steps": 1_000_000, "metrics_every": 100,
                  "checkpoint_every": 0.0},
        "network": {"min_peers": 1, "request_timeout": 1.0, "linger": 0.5, "gossip_interval": 0.2,
                    **network},
        "security": security,
    })


def start(daemons, *args, **kw):
    handle = PeerProcessHandle(*args, **kw)
    daemons.append(handle)
    return handle


REQUESTS = {
    "status": (MsgType.STATUS, {}),
    "pull": (MsgType.PULL, {"clock": 0, "want": None, "version": None}),
    "hello": (MsgType.HELLO, {"card": {"id": "spy-1", "addr": "tcp://127.0.0.1:9", "hb": 1, "name": "spy"},
                              "peers": []}),
}


def probe(address, key, *kinds, timeout=1.0):
    """Requests of the given kinds (status, pull, hello), at once, from a client holding ``key``;
    the replies or the exceptions they raised."""

    async def ask():
        transports = TransportSet(client_keys(key))
        # One client per kind: requests on one connection are serialized.
        clients = [PeerClient(sender="spy-1", transports=transports, limits=Limits(), timeout=timeout,
                              stats=PeerStats(), max_frame_bytes=2**24) for _ in kinds]
        try:
            return await asyncio.gather(*(
                c.call(address, request(REQUESTS[k][0], c.sender, **REQUESTS[k][1]))
                for c, k in zip(clients, kinds)), return_exceptions=True)
        finally:
            for c in clients:
                await c.aclose()
            await transports.aclose()

    return asyncio.run(ask())


def members(address, key):
    return {p["name"] for p in query_status(address, timeout=3, key=key)["peers"]}


def assert_gets_nothing(address, key, error=TransportError):
    """No status, no snapshot, no membership list: each request times out, or fails as the
    refused connection drops (RequestTimeout is a TransportError); no reply ever arrives."""
    replies = probe(address, key, *REQUESTS)
    assert all(isinstance(r, error) for r in replies), replies


def stop_all(daemons, *legit):
    for d in daemons:
        d.signal(signal.SIGTERM)
    for d in legit:
        assert d.wait(30) == 0, d.log()
        assert d.summary()["interactions"] > 0
        assert WARNING not in d.log(400)  # loopback: no exposure warning


def test_swarm_key_peers_train_and_strangers_get_nothing(tmp_path, daemons):
    keys = tmp_path / "keys"
    swarm = generate_keys(keys, "swarm")[1]
    wrong = generate_keys(keys, "wrong")[1]
    run = tmp_path / "run"
    config = peer_config(tmp_path / "swarm.toml", {"mode": "swarm-key", "key": str(swarm)})
    a = start(daemons, run, "a", config)
    a_addr = a.card()["addr"]
    b = start(daemons, run, "b", config, "--seed", a_addr)
    # A peer holding another swarm key, seeded with a's address, keeps knocking.
    stranger = start(daemons, run, "stranger",
                     peer_config(tmp_path / "other.toml", {"mode": "swarm-key", "key": str(wrong)}),
                     "--seed", a_addr, "--set", "network.join_timeout=1")

    def trained():
        sa, sb = (query_status(x, timeout=3, key=swarm) for x in (a_addr, b.card()["addr"]))
        return sa["interactions"] > 3 and sb["interactions"] > 3
    wait_until(trained, 90, interval=0.5, what="a and b merging each other's models")
    # The right key gets a snapshot (a deadline a loaded machine meets: the requests that must fail keep 1 s).
    assert probe(a_addr, swarm, "pull", timeout=5.0)[0].type is MsgType.SNAPSHOT

    assert_gets_nothing(a_addr, None)  # no key at all
    assert_gets_nothing(a_addr, wrong)  # a wrong key: the handshake fails its cryptography
    # Public keys are no secret: knowing a's key, the stranger's handshake reaches a's ZAP handler.
    assert_gets_nothing(with_key(a_addr, load_keypair(swarm)[0]), wrong)
    s_addr = stranger.card()["addr"]
    wait_until(lambda: query_status(s_addr, timeout=3, key=wrong)["step"] > 50, 60, interval=0.5,
               what="the stranger training alone")
    stranger_view = query_status(s_addr, timeout=3, key=wrong)
    assert stranger_view["interactions"] == 0 and stranger_view["pulls_ok"] == 0
    assert [p for p in stranger_view["peers"] if p["alive"]] == []
    assert f"seed {a_addr} unreachable" in stranger.log(400)
    assert "different swarm key files" in stranger.log(400)  # the stranger is told where to look
    for addr in (a_addr, b.card()["addr"]):
        assert members(addr, swarm) <= {"a", "b"}  # never the stranger, never the spy
    status_a = query_status(a_addr, timeout=3, key=swarm)
    assert status_a["rejected"].get("unauthenticated", 0) > 0  # refusals are counted and logged
    assert "refused a client at 127.0.0.1 with unknown key" in a.log(400)
    # The stranger's own handshakes fail before the key check: counted and logged as well.
    assert status_a["rejected"].get("handshake", 0) > 0
    assert "refused a CURVE handshake from a client that does not hold this peer's key" in a.log(400)
    # The operator's view takes the key from the swarm's config; without it, nobody answers.
    view = CliRunner().invoke(app, ["status", "--seed", a_addr, "--config", str(config), "--json", "--timeout", "3"])
    assert view.exit_code == 0, view.output
    assert {"a", "b"} <= {p["name"] for p in json.loads(view.output)["peers"] if p["step"] > 0}
    # The mismatch is seen at the handshake, at once; the timeout only has to outlast a loaded machine.
    blind = CliRunner().invoke(app, ["status", "--seed", a_addr, "--json", "--timeout", "5"])
    assert blind.exit_code == 1 and "no peer answered" in blind.output
    assert "requires CURVE" in blind.output and "pass --key" in blind.output  # and why
    blind = CliRunner().invoke(app, ["eval", "--seed", a_addr, "--config", str(peer_config(tmp_path / "plain.toml", {})),
                                     "--timeout", "5"])
    assert blind.exit_code != 0 and "no peer answered" in blind.output and "requires CURVE" in blind.output
    stop_all(daemons, a, b)
    stranger.wait(30)
    alone = [line for line in stranger.log(400).splitlines() if "trained alone" in line]
    assert alone and "different swarm key files" in alone[0], alone  # the end-of-run line keeps the cause


def test_a_seed_the_peer_can_never_dial_stops_it_at_start(tmp_path, daemons):
    """Seeds that no retry can fix are config errors (exit 2), not "unreachable" for a whole run."""
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    public, secret = generate_keys(keys, "a")
    allow.mkdir()
    shutil.copy(public, allow)
    other = load_keypair(generate_keys(keys, "other")[1])[0]
    listed = peer_config(tmp_path / "listed.toml", {"mode": "allow-list", "key": str(secret), "allow": str(allow)})
    swarm = peer_config(tmp_path / "swarm.toml", {"mode": "swarm-key", "key": str(secret)})
    plain = peer_config(tmp_path / "plain.toml", {})
    cases = {  # config, seed, what the peer says
        "keyless": (listed, "tcp://127.0.0.1:9", "no key in the address"),
        "unlisted": (listed, with_key("tcp://127.0.0.1:9", other), "its key is not in the allow-list"),
        "other-swarm": (swarm, with_key("tcp://127.0.0.1:9", other), "is not this swarm's key"),
        "plain": (plain, with_key("tcp://127.0.0.1:9", other), "is a CURVE-secured peer"),
        "inproc": (swarm, "inproc://elsewhere", "inproc:// skips CURVE authentication"),
    }
    peers = {name: start(daemons, tmp_path / "run", name, config, "--seed", seed)
             for name, (config, seed, _) in cases.items()}
    for name, (_, seed, says) in cases.items():
        assert peers[name].wait(60) == 2, peers[name].log()
        assert f"seed {seed}" in peers[name].log() or "seed address" in peers[name].log(), peers[name].log()
        assert says in peers[name].log() and "Traceback" not in peers[name].log()


def test_allow_list_admits_listed_peers_and_an_operator_key_only(tmp_path, daemons):
    keys, allow = tmp_path / "keys", tmp_path / "allow"
    secrets = {}
    for name in ("a", "b", "operator", "outsider"):
        public, secrets[name] = generate_keys(keys, name)
        if name != "outsider":
            allow.mkdir(exist_ok=True)
            shutil.copy(public, allow)
    outsider_allow = tmp_path / "outsider-allow"
    shutil.copytree(allow, outsider_allow)
    shutil.copy(keys / "outsider.key", outsider_allow)  # it trusts everyone; nobody trusts it

    def config(name, allow_dir):
        return peer_config(tmp_path / f"{name}.toml", {"mode": "allow-list", "key": str(secrets[name]),
                                                       "allow": str(allow_dir)})
    run = tmp_path / "run"
    a = start(daemons, run, "a", config("a", allow))
    a_addr = a.card()["addr"]
    assert "#curve=" in a_addr  # the address carries a's public key
    b = start(daemons, run, "b", config("b", allow), "--seed", f"file://{run / 'a' / 'card.json'}")
    outsider = start(daemons, run, "outsider", config("outsider", outsider_allow), "--seed", a_addr,
                     "--set", "network.join_timeout=1")

    def trained():
        sa = query_status(a_addr, timeout=3, key=secrets["operator"])
        return sa["interactions"] > 3 and {p["name"] for p in sa["peers"] if p["alive"]} == {"b"}
    wait_until(trained, 90, interval=0.5, what="a and b merging each other's models")

    # The operator's key reads status through the real CLI, discovering b through a.
    out = subprocess.run([sys.executable, "-m", "swarmnet", "status", "--seed", a_addr, "--key",
                          str(secrets["operator"]), "--json", "--timeout", "3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["peers"]
    assert {r["name"] for r in rows if not r.get("stale")} >= {"a", "b"}

    assert_gets_nothing(a_addr, secrets["outsider"])
    assert_gets_nothing(a_addr, None, error=TransportError)  # a plain client is told why at once
    wait_until(lambda: "unreachable" in outsider.log(400), 30, what="the outsider's failed joins")
    o_status = query_status(outsider.card()["addr"], timeout=3, key=secrets["operator"])
    assert o_status["interactions"] == 0 and not [p for p in o_status["peers"] if p["alive"]]
    for addr in (a_addr, b.card()["addr"]):
        assert members(addr, secrets["operator"]) <= {"a", "b"}
    stop_all(daemons, a, b)


def test_all_interfaces_without_authentication_warns(tmp_path, daemons):
    """In a private network namespace (unshare -rn) binding 0.0.0.0 reaches nobody."""
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rn (user and network namespaces) is not permitted here")
    plain = start(daemons, tmp_path / "run", "open", peer_config(tmp_path / "open.toml", {}),
                  "--listen", "tcp://0.0.0.0:0", "--advertise", "tcp://127.0.0.1:9", "--steps", "20",
                  "--set", "network.min_peers=0", prefix=["unshare", "-rn"])
    assert plain.wait(90) == 0, plain.log()
    assert re.search(rf"listening on tcp://0\.0\.0\.0:[1-9]\d* \(all interfaces\) {WARNING}", plain.log(400))  # the port bound
