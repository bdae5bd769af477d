import random

import msgpack

from swarmnet.peer.membership import PeerTable


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def card(pid, hb, addr=None):
    return {"id": pid, "addr": addr or f"ipc:///tmp/{pid}.sock", "hb": hb, "name": pid}


def test_heartbeats_keep_peers_alive_and_silence_makes_them_suspect():
    clock = FakeClock()
    table = PeerTable("me", dead_after=3.0, backoff=1.0, now=clock)
    table.merge(card("a", 1))
    table.merge(card("b", 1))
    table.merge(card("me", 9))  # our own card is ignored
    assert {r.id for r in table.alive()} == {"a", "b"}
    clock.t = 2.0
    table.merge(card("a", 2))  # a's heartbeat advanced (relayed): a stays alive
    table.merge(card("b", 1))  # stale relay of b: b's clock does not move
    clock.t = 4.0
    assert [r.id for r in table.alive()] == ["a"]
    table.merge(card("b", 1), direct=True)  # heard from b itself
    assert {r.id for r in table.alive()} == {"a", "b"}


def test_failures_back_off_exponentially_and_success_clears():
    clock = FakeClock()
    table = PeerTable("me", dead_after=100.0, backoff=1.0, now=clock)
    table.merge(card("a", 1))
    table.record_failure("a")
    assert table.candidates() == []
    clock.t = 1.01
    assert [r.id for r in table.candidates()] == ["a"]
    table.record_failure("a")  # second failure: 2 s
    clock.t = 2.5
    assert table.candidates() == []
    clock.t = 3.1
    table.record_success("a")
    assert [r.id for r in table.candidates()] == ["a"]
    assert ("a", "suspected") in [(who, what) for _, who, what in table.events]


def test_gossip_keeps_a_peer_alive_but_does_not_lift_its_back_off():
    clock = FakeClock()
    table = PeerTable("me", dead_after=5.0, backoff=10.0, now=clock)
    table.merge(card("a", 1))
    table.record_failure("a")  # e.g. it served a poisoned snapshot
    clock.t = 6.0
    table.record_seen("a")  # it still answers gossip
    assert [r.id for r in table.alive()] == ["a"] and table.candidates() == []
    clock.t = 10.01
    assert [r.id for r in table.candidates()] == ["a"]


def test_a_peer_that_was_only_unreachable_is_picked_again_once_it_answers():
    clock = FakeClock()
    table = PeerTable("me", dead_after=5.0, backoff=1.0, now=clock)
    table.merge(card("a", 1))
    table.merge(card("b", 1))
    for _ in range(8):  # a partition: every pull and gossip to them fails to connect
        table.record_failure("a", unreachable=True)
        table.record_failure("b", unreachable=True)
    table.record_failure("b")  # ... and b also once sent something bad
    assert table.candidates() == []  # both on a back-off of up to a minute
    clock.t = 1.0
    table.record_seen("a")  # healed: they answer gossip again
    table.record_seen("b")
    assert [r.id for r in table.candidates()] == ["a"]  # b's back-off stands


def test_left_and_forgotten_peers_and_restart_under_a_new_id():
    clock = FakeClock()
    table = PeerTable("me", dead_after=1.0, backoff=1.0, now=clock, forget_after=5.0)
    table.merge(card("a", 1, "tcp://h:1"))
    table.merge(card("b", 1, "tcp://h:2"))
    table.mark_left("b")
    table.merge(card("b", 5, "tcp://h:2"))  # a departed id does not come back on hearsay
    assert [r.id for r in table.alive()] == ["a"]
    table.merge(card("a2", 1, "tcp://h:1"))  # a relayed claim to a's address while a is alive...
    assert {"a", "a2"} <= set(table.records)
    table.merge(card("a2", 2, "tcp://h:1"), direct=True)  # ...but a2 itself there: a restarted
    assert "a" not in table.records and "a2" in table.records
    clock.t = 10.0
    assert {r.id for r in table.prune()} == {"a2", "b"}
    assert table.records == {}


def test_a_new_id_at_an_address_that_served_bad_models_keeps_its_back_off():
    """Back-off earned by bad answers belongs to the address as well: a server of poisoned models
    taking a new id at every hello was otherwise pulled at once each time. One earned only by
    being unreachable (a restart) is not carried over."""
    clock = FakeClock()
    table = PeerTable("me", dead_after=10.0, backoff=1.0, now=clock)
    table.merge(card("p1", 1, "tcp://h:1"), direct=True)
    for _ in range(3):
        table.record_failure("p1", why="the neighbour's snapshot holds non-finite values", served_bad=True)
    table.merge(card("p2", 1, "tcp://h:1"), direct=True)
    assert set(table.records) == {"p2"} and table.candidates() == []
    assert table.records["p2"].failures == 3 and table.records["p2"].avoid_until == 4.0
    table.record_failure("p2")
    assert table.records["p2"].avoid_until == 8.0  # the doubling goes on
    table.merge(card("q1", 1, "tcp://h:2"), direct=True)
    table.record_failure("q1", unreachable=True, why="timed out")
    table.record_failure("q1", why="draining: peer is stopping")  # a refusal: no bad model
    table.merge(card("q2", 1, "tcp://h:2"), direct=True)  # restarted at the same address
    assert [r.id for r in table.candidates()] == ["q2"] and table.records["q2"].failures == 0


def test_a_bye_in_someone_elses_name_lasts_until_the_peer_speaks_for_itself():
    table = PeerTable("me", dead_after=10.0, backoff=1.0, now=FakeClock())
    table.merge(card("b", 1))
    table.mark_left("b")  # anyone can send a bye with b's id
    table.merge(card("b", 1), direct=True)  # no newer heartbeat: nothing new from b
    assert table.alive() == []
    table.merge(card("b", 2), direct=True)
    assert [r.id for r in table.alive()] == ["b"]


def test_a_quiet_peer_is_replaced_by_a_relayed_card_for_its_address():
    clock = FakeClock()
    table = PeerTable("me", dead_after=1.0, backoff=1.0, now=clock)
    table.merge(card("a", 1, "tcp://h:1"))
    clock.t = 2.0  # a has gone quiet (restarted, say)
    table.merge(card("a2", 1, "tcp://h:1"))
    assert list(table.records) == ["a2"]


def test_candidates_restricted_to_topology_and_sampled_cards_bounded():
    table = PeerTable("me", dead_after=10.0, backoff=1.0, now=FakeClock())
    for i in range(300):
        table.merge(card(f"p{i}", 1))
    assert {r.id for r in table.candidates(["p1", "p2", "zzz"])} == {"p1", "p2"}
    cards = table.sample_cards(random.Random(0))
    assert len(cards) == 127 and len({c["id"] for c in cards}) == 127
    assert {c["id"] for c in cards} != {c["id"] for c in table.sample_cards(random.Random(1))}
    # A swarm configured with a small header limit gossips within half of it (node.py passes it).
    small = table.sample_cards(random.Random(0), 2048)
    assert 0 < len(small) < 127 and len(msgpack.packb(small, use_bin_type=True)) <= 2048 + 3


def test_a_seed_whose_host_does_not_resolve_is_called_that(monkeypatch):
    """What a peer says of such a seed, instead of a connection that never comes up. The lookup
    fails in-process: a real one for a missing name would query the machine's DNS server."""
    import asyncio
    import socket

    from swarmnet.peer.membership import unresolved_host

    async def no_such_host(host, port, *args, **kwargs):
        assert host == "no-such-host.invalid"
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def check():
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_such_host)
        return (await unresolved_host("tcp://no-such-host.invalid:7000"), await unresolved_host("ipc:///tmp/x.sock"))

    assert asyncio.run(check()) == ("its host 'no-such-host.invalid' does not resolve: Name or service not "
                                    "known; check the name", None)
