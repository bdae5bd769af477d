"""The collector against real sockets: 64 status responders speaking the wire protocol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarmnet.peer.membership import read_seed_card
from swarmnet.transport import TransportSet
from swarmnet.ui.collect import StatusCollector, mean_model_loss, resolve_seed, seeds_from_run_dir
from swarmnet.wire import MsgType, decode, encode, reply
from tests.ui.conftest import fake_status

pytestmark = pytest.mark.timeout(60)


class Responders:
    """``n`` listeners on 127.0.0.1 answering STATUS; each knows only its ring neighbour, so
    discovery has to follow the peers lists. Index i in ``silent``: that one stops answering."""

    def __init__(self) -> None:
        self.transports = TransportSet()
        self.addrs: list[str] = []
        self.silent: set[int] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.listeners = []
        self.started = time.monotonic()

    async def start(self, n: int) -> None:
        for _ in range(n):
            listener = await self.transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
            self.listeners.append(listener)
            self.addrs.append(listener.address)
        for i, listener in enumerate(self.listeners):
            self.tasks.append(asyncio.create_task(self.serve(i, listener)))

    async def serve(self, i: int, listener) -> None:  # type: ignore[no-untyped-def]
        nxt = (i + 1) % len(self.addrs)
        while True:
            route, frames = await listener.recv()
            if i in self.silent:
                continue
            msg = decode(frames)
            card = {"id": f"peer{nxt}-abcdef", "addr": self.addrs[nxt], "hb": 1, "name": f"peer{nxt}",
                    "done": False, "alive": nxt not in self.silent, "failures": 0}
            status = fake_status(i, self.addrs[i], peers=[card], t=time.monotonic() - self.started)
            await listener.send(route, encode(reply(msg, MsgType.STATUS_REPLY, f"peer{i}-abcdef", status=status)))

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for listener in self.listeners:
            await listener.aclose()
        await self.transports.aclose()


@contextlib.asynccontextmanager
async def responders(n: int) -> AsyncIterator[Responders]:
    r = Responders()
    try:
        await r.start(n)
        yield r
    finally:
        await r.aclose()


async def test_one_seed_discovers_64_peers_and_silent_ones_go_stale() -> None:
    async with responders(64) as swarm:
        # A deadline a loaded machine meets: 64 answers on one event loop, the responders' too.
        timeout = 5.0
        collector = StatusCollector([swarm.addrs[0]], timeout=timeout)
        try:
            first = await collector.poll()
            assert [p.name for p in first.peers] == [f"peer{i}" for i in range(64)]
            assert not any(p.stale for p in first.peers)
            t0 = time.monotonic()
            second = await collector.poll()
            refresh = time.monotonic() - t0
            print(f"refresh of 64 peers over tcp: {refresh * 1000:.0f} ms")
            assert all(p.rates is not None for p in second.peers)
            assert refresh < timeout and not any(p.stale for p in second.peers)  # no timeouts were hit

            swarm.silent.update((7, 8, 9))
            t0 = time.monotonic()
            third = await collector.poll()
            waited = time.monotonic() - t0
            silent = [p for p in third.peers if p.name in ("peer7", "peer8", "peer9")]
            assert all(row.stale and "Timeout" in row.error for row in silent), silent
            assert waited < 2 * timeout  # one deadline for all, not one per silent peer (3)
            assert sum(not p.stale for p in third.peers) == 61
            assert any(e.peer == "peer7" and e.what == "not answering" for e in third.events)

            swarm.silent.clear()
            fourth = await collector.poll()
            assert not next(p for p in fourth.peers if p.name == "peer7").stale
            assert any(e.peer == "peer7" and e.what == "answering again" for e in fourth.events)
        finally:
            await collector.aclose()


async def test_hundreds_of_dead_addresses_neither_crowd_out_live_peers_nor_stay_asked_forever(tmp_path) -> None:
    """A view left running over a swarm with churn once asked every address it had ever seen, all
    at once: past about 340 (ZeroMQ's 1023 sockets, three per connection) even live peers failed
    with 'Too many open files', and the dead were asked for as long as the view ran."""
    dead = [f"tcp://127.0.0.1:{port}" for port in range(1, 401)]  # closed ports: each waits out its deadline
    async with responders(3) as swarm:
        collector = StatusCollector([*dead, swarm.addrs[0]], timeout=1.0, forget_after=0.5)
        try:
            first = await collector.poll()
            live = [p for p in first.peers if not p.stale]
            assert [p.name for p in live] == ["peer0", "peer1", "peer2"], [p.error for p in first.peers][-5:]
            # Seeds the user gave stay asked; a peer known only from others' lists is forgotten
            # once silent for forget_after and counted alive by nobody ...
            swarm.silent.add(2)
            assert next(p for p in (await collector.poll()).peers if p.name == "peer2").stale
            await asyncio.sleep(0.6)
            gone = await collector.poll()
            assert "peer2" not in [p.name for p in gone.peers] and len(gone.peers) == 402
            assert any(e.peer == "peer2" and e.what == "not answering" for e in gone.events)
            assert "peer2" not in [p.name for p in (await collector.poll()).peers]  # and not asked again
            # ... until a peer counts it alive again.
            swarm.silent.clear()
            back = await collector.poll()
            assert not next(p for p in back.peers if p.name == "peer2").stale
        finally:
            await collector.aclose()


async def test_a_forgotten_peer_of_the_run_dir_is_asked_again_once_its_card_is_rewritten(tmp_path: Path) -> None:
    card = tmp_path / "bob" / "card.json"
    card.parent.mkdir()
    card.write_text(json.dumps({"id": "y", "name": "bob", "addr": "tcp://127.0.0.1:9"}))
    collector = StatusCollector([], timeout=0.3, run_dir=tmp_path, forget_after=0.2)
    try:
        assert [p.name for p in (await collector.poll()).peers] == ["bob"]
        await asyncio.sleep(0.3)
        await collector.poll()
        assert "tcp://127.0.0.1:9" not in collector.addresses  # no longer asked ...
        after = await collector.poll()  # ... as its card, unchanged, does not bring it back
        assert "tcp://127.0.0.1:9" not in collector.addresses
        assert [(p.name, p.stale) for p in after.peers] == [("bob", True)]  # one of the run's peers: still shown
        await asyncio.sleep(0.05)  # a later modification time than its forgetting
        card.write_text(card.read_text())  # bob restarted at the same address
        await collector.poll()
        assert "tcp://127.0.0.1:9" in collector.addresses
    finally:
        await collector.aclose()


async def test_run_dir_cards_are_seeds(tmp_path: Path) -> None:
    async with responders(2) as swarm:
        for i, addr in enumerate(swarm.addrs):
            (tmp_path / f"peer{i}").mkdir()
            (tmp_path / f"peer{i}" / "card.json").write_text(json.dumps({"id": "x", "name": f"peer{i}", "addr": addr}))
        (tmp_path / "peer9").mkdir()
        (tmp_path / "peer9" / "card.json").write_text("{not json")
        # A peer that has stopped: its card stays, nothing answers at its address.
        (tmp_path / "bob").mkdir()
        (tmp_path / "bob" / "card.json").write_text(json.dumps({"id": "y", "name": "bob", "addr": "tcp://127.0.0.1:9"}))
        assert seeds_from_run_dir(tmp_path) == ["tcp://127.0.0.1:9", *swarm.addrs]  # bob sorts first
        collector = StatusCollector([], timeout=0.5, run_dir=tmp_path)
        try:
            await collector.poll()
            snap = await collector.poll()
        finally:
            await collector.aclose()
        assert [p.name for p in snap.peers if not p.stale] == ["peer0", "peer1"]
        assert [(p.name, p.addr) for p in snap.peers if p.stale] == [("bob", "tcp://127.0.0.1:9")]  # not its address
        # Every reply repeats the peers' recent events (at new times here); each is shown once.
        assert len([e for e in snap.events if e.what == "joined"]) == 2


def test_status_command_refuses_seeds_it_cannot_use(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from swarmnet.ui.commands import status_command

    app = typer.Typer()
    app.command("status")(status_command)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    assert runner.invoke(app, ["status"]).exit_code == 2
    missing = runner.invoke(app, ["status", "--seed", f"file://{tmp_path}/peer0/card.json"])
    assert missing.exit_code == 2 and "card.json" in missing.output
    empty = runner.invoke(app, ["status", "--run-dir", str(tmp_path)])
    assert empty.exit_code == 2 and "card.json" in empty.output
    (tmp_path / "afile").write_text("x")
    for path, why in ((tmp_path / "afile", "not a directory"), (tmp_path / "nowhere", "no such directory")):
        refused = runner.invoke(app, ["status", "--run-dir", str(path)])
        assert refused.exit_code == 2 and f"{path}: {why}" in refused.output, refused.output


def test_file_seeds_are_read_as_peers_read_them(tmp_path, monkeypatch) -> None:
    """`swarmnet up --run-dir 'runs/a#1'` hands its peers file:// seeds of that path; status and
    eval, given the same seeds, must find the same cards (a relative path included)."""
    card = tmp_path / "runs" / "a#1" / "peer0" / "card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"addr": "tcp://127.0.0.1:7100"}))
    monkeypatch.chdir(tmp_path)
    for seed in (f"file://{card}", "file://runs/a#1/peer0/card.json"):
        assert resolve_seed(seed) == read_seed_card(seed) == "tcp://127.0.0.1:7100", seed
    assert resolve_seed("tcp://10.0.0.1:7000") == "tcp://10.0.0.1:7000"


async def test_a_peer_asked_under_two_spellings_of_its_address_is_one_peer() -> None:
    """A seed typed as localhost (or a port-forward) and the 127.0.0.1 address the peers pass
    on: two rows for one peer counted it twice in status and averaged it twice in eval."""
    from swarmnet.evaluation import discover

    async with responders(3) as swarm:
        alias = swarm.addrs[0].replace("127.0.0.1", "localhost")
        collector = StatusCollector([alias], timeout=2.0)
        try:
            snapshot = await collector.poll()
        finally:
            await collector.aclose()
        assert sorted(row.name for row in snapshot.alive) == ["peer0", "peer1", "peer2"]
        assert len(snapshot.peers) == 3
        found = {name: addr for name, addr, _ in await discover([alias], None, 2.0)}
        assert found["peer0"] == alias  # eval pulls where the peer answered


def test_the_mean_model_loss_of_an_earlier_run_in_the_same_folder_is_not_shown(tmp_path: Path) -> None:
    """``swarmnet up --summary RUN/summary.json`` then a new run in RUN: until the new run writes
    its own summary, the old one's loss is not this run's."""
    import os

    (tmp_path / "peer0").mkdir()
    card, summary = tmp_path / "peer0" / "card.json", tmp_path / "summary.json"
    card.write_text(json.dumps({"addr": "tcp://127.0.0.1:1"}))
    summary.write_text(json.dumps({"average": {"eval": {"loss": 0.25}}}))
    os.utime(card, (1000.0, 1000.0))
    os.utime(summary, (2000.0, 2000.0))  # written after its peers started: this run's
    assert mean_model_loss(tmp_path) == 0.25
    os.utime(card, (3000.0, 3000.0))  # a peer of a new run started since
    assert mean_model_loss(tmp_path) is None
