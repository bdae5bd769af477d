"""A peer's outgoing side over real ZeroMQ sockets: replies that do not line up with requests,
and connections to peers the swarm has forgotten."""

import asyncio
import logging
import random

import pytest

from swarmnet.errors import ProtocolError
from swarmnet.peer.client import PeerClient
from swarmnet.peer.membership import MembershipService, PeerTable
from swarmnet.peer.stats import PeerStats
from swarmnet.transport import TransportSet
from swarmnet.wire import Limits, MsgType, decode, encode, reply, request

pytestmark = pytest.mark.timeout(30)


def make_client(transports, timeout=2.0, **kwargs):
    return PeerClient(sender="me", transports=transports, limits=Limits(), timeout=timeout, stats=PeerStats(),
                      max_frame_bytes=2**20, **kwargs)


async def serve(listener, card, *, echo_first=1):
    """Answers hellos with ``card``; its first answer is sent ``echo_first`` times."""
    answered = 0
    while True:
        route, frames = await listener.recv()
        msg = decode(frames)
        answered += 1
        for _ in range(echo_first if answered == 1 else 1):
            await listener.send(route, encode(reply(msg, MsgType.PEERS, card["id"], card=card, peers=[])))


def hello(card):
    return request(MsgType.HELLO, "me", card=card, peers=[])


async def test_a_stray_reply_costs_one_request_not_the_connection():
    transports = TransportSet()
    listener = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
    card = {"id": "far", "addr": listener.address, "hb": 1}
    server = asyncio.create_task(serve(listener, card, echo_first=2))  # answers the first request twice
    client = make_client(transports)
    mine = {"id": "me", "addr": "tcp://127.0.0.1:9", "hb": 1}
    first = hello(mine)
    assert (await client.call(listener.address, first)).re == first.mid
    with pytest.raises(ProtocolError, match=f"reply to message {first.mid}"):
        await client.call(listener.address, hello(mine))  # gets the duplicate
    for _ in range(3):  # every later request gets its own reply again
        msg = hello(mine)
        assert (await client.call(listener.address, msg)).re == msg.mid
    server.cancel()
    await client.aclose()
    await transports.aclose()


async def test_connections_to_forgotten_peers_are_closed():
    transports = TransportSet()
    client = make_client(transports)
    table = PeerTable("me", dead_after=1.0, backoff=0.1, forget_after=1.5)
    stats = client.stats
    membership = MembershipService(table=table, client=client, seeds=[], interval=0.05, rng=random.Random(0),
                                   card=lambda: {"id": "me", "addr": "tcp://127.0.0.1:9", "hb": 0},
                                   log=logging.LoggerAdapter(logging.getLogger("test")))
    listeners, servers, cards = [], [], []
    try:
        for i in range(4):
            listener = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
            cards.append({"id": f"p{i}", "addr": listener.address, "hb": 1})
            listeners.append(listener)
            servers.append(asyncio.create_task(serve(listener, cards[-1])))
        for card in cards:  # talk to each, as gossip would
            membership.merge_reply(await client.call(card["addr"], membership.hello()))
        connections = [client.connection(card["addr"]) for card in cards]
        assert not any(c.closed for c in connections)
        await membership.gossip_once()
        assert stats.peers_alive == len(table.alive()) > 0  # what status and the metrics report
        for server, listener in zip(servers[1:], listeners[1:]):  # three of them leave without a word
            server.cancel()
            await listener.aclose()
        for _ in range(100):
            await membership.gossip_once()  # p0 keeps answering; the others are forgotten
            await asyncio.sleep(0.05)
            if set(table.records) == {"p0"}:
                break
        assert set(table.records) == {"p0"}
        assert [c.closed for c in connections] == [False, True, True, True]
        assert stats.peers_alive == len(table.alive()) <= 1
    finally:  # a failed check must not leave sockets and tasks to the tests that follow
        for server in servers:
            server.cancel()
        await client.aclose()
        await transports.aclose()


async def test_open_connections_stay_within_the_cap_and_a_busy_one_is_never_closed():
    """A peer that has talked to more neighbours than it keeps connections for closes the least
    recently used idle ones (a swarm of hundreds would otherwise exhaust ZeroMQ's sockets and
    the descriptors), never one whose request is still in flight, and redials the closed ones."""
    transports = TransportSet()
    client = make_client(transports, timeout=10.0, max_connections=3)
    listeners, servers = [], []
    try:
        slow = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
        for i in range(5):
            listener = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
            listeners.append(listener)
            servers.append(asyncio.create_task(serve(listener, {"id": f"p{i}", "addr": listener.address, "hb": 1})))
        mine = {"id": "me", "addr": "tcp://127.0.0.1:9", "hb": 1}
        held = asyncio.create_task(client.call(slow.address, hello(mine)))
        route, frames = await asyncio.wait_for(slow.recv(), 5)  # in flight until we answer it
        slow_conn = client.connection(slow.address)
        for listener in listeners:
            assert (await client.call(listener.address, hello(mine))).type is MsgType.PEERS
            assert len(client._connections) <= 3 and not slow_conn.closed
        assert list(client._connections) == [slow.address, listeners[3].address, listeners[4].address]
        slow_card = {"id": "slow", "addr": slow.address, "hb": 1}
        await slow.send(route, encode(reply(decode(frames), MsgType.PEERS, "slow", card=slow_card, peers=[])))
        assert (await asyncio.wait_for(held, 5)).type is MsgType.PEERS
        first = client.connection(listeners[0].address)  # closed long ago: a new one, which works
        assert (await client.call(listeners[0].address, hello(mine))).type is MsgType.PEERS
        assert not first.closed and len(client._connections) == 3 and slow.address not in client._connections
    finally:
        for server in servers:
            server.cancel()
        await client.aclose()
        await transports.aclose()


async def test_a_frozen_neighbour_does_not_stop_our_heartbeat():
    """Gossip to a neighbour that takes requests and never answers waits the whole request
    timeout (30 s here, 10 s by default, longer than dead_after); our heartbeat, which every
    reply to others' gossip carries, keeps beating meanwhile."""
    transports = TransportSet()
    frozen = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
    table = PeerTable("me", dead_after=1.0, backoff=0.1)
    table.merge({"id": "frozen", "addr": frozen.address, "hb": 1}, direct=True)
    membership = MembershipService(table=table, client=make_client(transports, timeout=30.0), seeds=[], interval=0.05,
                                   rng=random.Random(0), card=lambda: {"id": "me", "addr": "tcp://127.0.0.1:9", "hb": 0},
                                   log=logging.LoggerAdapter(logging.getLogger("test")))
    gossip = asyncio.create_task(membership.run())
    await asyncio.wait_for(frozen.recv(), 5)  # the first round's hello: held, never answered
    beat = membership.heartbeat
    held = asyncio.get_running_loop().time()
    # ~20 rounds a second (0.025-0.075 s each); a heartbeat stuck behind the held hello would not
    # move before its 30 s timeout.
    while membership.heartbeat - beat < 8:
        assert asyncio.get_running_loop().time() - held < 20, membership.heartbeat - beat
        await asyncio.sleep(0.05)
    gossip.cancel()
    await asyncio.gather(gossip, return_exceptions=True)
    await membership.client.aclose()
    await transports.aclose()


async def test_a_file_seed_whose_card_never_appears_is_reported_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("swarmnet.peer.membership.CARD_WAIT_WARN_S", 0.2)
    transports = TransportSet()
    seed = f"file://{tmp_path}/nobody/card.json"
    membership = MembershipService(table=PeerTable("me", dead_after=1.0, backoff=0.1), client=make_client(transports),
                                   seeds=[seed], interval=0.05, rng=random.Random(0),
                                   card=lambda: {"id": "me", "addr": "tcp://127.0.0.1:9", "hb": 0},
                                   log=logging.LoggerAdapter(logging.getLogger("test")))
    try:
        with caplog.at_level(logging.WARNING, logger="test"):
            for _ in range(10):
                await membership.gossip_once()
                await asyncio.sleep(0.05)
        warnings = [r.getMessage() for r in caplog.records if "no peer card there" in r.getMessage()]
        assert len(warnings) == 1 and seed in warnings[0] and "the path is wrong" in warnings[0], caplog.text
    finally:
        await membership.client.aclose()
        await transports.aclose()
