"""The status collector: discovers a swarm through membership and polls every peer's STATUS.

One :class:`StatusCollector` owns one :class:`~swarmnet.peer.client.PeerClient` for a whole
``swarmnet status`` run. Each :meth:`StatusCollector.poll` asks every known address with a short
deadline (at most :data:`ASKS_AT_ONCE` at a time, those that answered last first), learns new
addresses from the ``peers`` lists in the replies, and returns an immutable
:class:`~swarmnet.ui.model.SwarmSnapshot`. A peer that does not answer keeps its last row, marked
stale. Once it has been silent for :data:`FORGET_AFTER_S` and no answering peer counts it alive,
it is no longer asked (a swarm with churn would otherwise pile up addresses for as long as the
view runs) unless a peer lists it alive again or its card is rewritten, and unless it has a card
in the run directory its row goes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swarmnet.errors import HandshakeFailed, TransportError
from swarmnet.log import counted
from swarmnet.peer.client import PeerClient
from swarmnet.peer.membership import read_seed_card, unresolved_host
from swarmnet.peer.stats import PeerStats
from swarmnet.security import CurveKeys
from swarmnet.transport import TransportSet
from swarmnet.transport.registry import transport_class
from swarmnet.ui.model import Event, PeerStatus, SwarmSnapshot
from swarmnet.wire import Limits, MsgType, request

MAX_EVENTS = 12
SAME_EVENT_S = 10.0
ASKS_AT_ONCE = 64
"""Status requests in flight at once: each holds a connection (three ZeroMQ sockets, of a
context's 1023) until its deadline, and a swarm that lost many peers must not crowd out the
live ones."""
FORGET_AFTER_S = 60.0
"""Silence after which an address no answering peer counts alive is no longer asked (twice
the peers' own forgetting, 6 x network.dead_after, at the defaults)."""


def nobody_answered(snapshot: SwarmSnapshot, run_dir: Path | None = None) -> str:
    """The error for a poll that no peer answered, with what the requests ran into, and which of
    the run directory's peers have ended (a peer removes its summary.json as it starts and
    writes it as it stops)."""
    why = "".join(f"\n  {w}" for w in sorted({p.error for p in snapshot.peers if p.error})[:3])
    cards = card_paths(run_dir) if run_dir is not None else []
    ended = sum((card.parent / "summary.json").is_file() for card in cards)
    check = ("check --seed / --run-dir and that the swarm is running (and --key for a swarm with "
             "[security])")
    if not ended:
        return f"no peer answered; {check}{why}"
    rest = len(cards) - ended
    return (f"no peer answered: {ended} of the {counted(len(cards), 'peer')} in {run_dir} "
            f"{'has' if ended == 1 else 'have'} ended (<peer>/summary.json says how; a `swarmnet up` run's "
            "summary holds the average of their final models)"
            + (f"; the other {rest} wrote no summary (killed, or out of reach): {check}" if rest else "") + why)


def seeds_from_run_dir(run_dir: Path) -> list[str]:
    """Addresses from the ``<run_dir>/<peer>/card.json`` files peers write once they are bound."""
    return list(dict.fromkeys(addr for addr, _, _ in _card_entries(card_paths(run_dir))))


def card_paths(run_dir: Path) -> list[Path]:
    """The ``<run_dir>/<peer>/card.json`` files, sorted."""
    return sorted(run_dir.glob("*/card.json"))


def _card_entries(cards: Iterable[Path]) -> list[tuple[str, str, float]]:
    """(address, peer name (the directory's where a card has none), when the card was written)
    of each readable card."""
    found = []
    for path in cards:
        card = _read_card(path)
        if card and card.get("addr"):
            with contextlib.suppress(OSError):
                found.append((str(card["addr"]), str(card.get("name") or path.parent.name), path.stat().st_mtime))
    return found


def resolve_seed(seed: str) -> str | None:
    """A dialable address for ``seed``; ``file://`` seeds name a card.json (None if unreadable)."""
    return read_seed_card(seed) if seed.startswith("file://") else seed  # as peers read them


def check_seeds(seeds: Iterable[str]) -> None:
    """Refuse, before any request, a seed address no installed transport dials (a ConfigError
    naming the schemes there are): polled, it would only ever show as a peer not answering."""
    for seed in seeds:
        if not seed.startswith("file://"):
            transport_class(seed)


def _read_card(path: Path) -> dict[str, Any] | None:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def mean_model_loss(run_dir: Path | None, cards: Iterable[Path] | None = None) -> float | None:
    """Loss of the averaged final models from a finished ``swarmnet up`` run's summary.json;
    None while a peer's card is newer (peers write theirs as they start; the run's summary is
    written after they have all ended): that summary is an earlier run's. ``cards``: the run
    directory's card paths, when the caller has them already."""
    if run_dir is None:
        return None
    path = run_dir / "summary.json"
    try:
        written = path.stat().st_mtime
        if any(card.stat().st_mtime > written for card in (card_paths(run_dir) if cards is None else cards)):
            return None
        summary = json.loads(path.read_text())
        loss = summary["average"]["eval"]["loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(loss) if isinstance(loss, (int, float)) else None


class StatusCollector:
    """Polls a swarm's peers. Create inside the event loop; call :meth:`aclose` when done.

    Args:
        seeds: addresses (``tcp://``, ``ipc://``, ``file:///.../card.json``) to start discovery from.
        timeout: deadline of one STATUS request, seconds.
        run_dir: optional run directory, re-read on each poll for new cards and the final summary.
        curve: keys for a swarm with [security] enabled (swarmnet.security.client_keys).
        forget_after: seconds of silence before an address nobody counts alive is no longer asked.
    """

    def __init__(self, seeds: Iterable[str], *, timeout: float = 0.8, run_dir: Path | None = None,
                 curve: CurveKeys | None = None, forget_after: float = FORGET_AFTER_S) -> None:
        self.seeds = list(seeds)
        self.run_dir = run_dir
        self.timeout = timeout
        self.forget_after = forget_after
        self.transports = TransportSet(curve)
        self.client = PeerClient(sender="status-client", transports=self.transports, limits=Limits(),
                                 timeout=timeout, stats=PeerStats(), max_frame_bytes=2**24)
        self.rows: dict[str, PeerStatus] = {}
        """Last row per address."""
        self.addresses: dict[str, None] = {}
        """Every address known, in discovery order."""
        self.names: dict[str, str] = {}
        """Peer names learned from cards, for rows of peers that never answered us."""
        self._events: dict[tuple[str, str], Event] = {}
        self._failures: dict[str, int] = {}
        """Failed polls per address in a row; a name lookup is tried at the first and every tenth."""
        self._silent_since: dict[str, float] = {}
        """When each address not answering failed first (wall time)."""
        self._forgotten: dict[str, float] = {}
        """Addresses no longer asked, and when they were forgotten (wall time)."""
        self._alive_in_lists: set[str] = set()
        """Addresses an answering peer counted alive in this poll."""
        self._cards: list[Path] = []
        """The run directory's card files as the current poll found them."""
        self._seeds: set[str] = set()
        """This poll's addresses of the user's seeds: never forgotten."""
        self._carded: set[str] = set()
        """This poll's addresses of the run directory's cards: forgotten until a card is rewritten."""
        self._asking = asyncio.Semaphore(ASKS_AT_ONCE)

    def _discover(self) -> None:
        found = [addr for addr in map(resolve_seed, self.seeds) if addr]
        self._seeds = set(found)
        self._carded = set()
        if self.run_dir is not None:
            self._cards = card_paths(self.run_dir)  # read once a poll: for addresses and the summary's age
            for addr, name, written in _card_entries(self._cards):
                self.names[addr] = name
                self._carded.add(addr)
                if written > self._forgotten.get(addr, -1.0):  # a peer started since at that address
                    found.append(addr)
        for addr in found:
            self._forgotten.pop(addr, None)
            self.addresses.setdefault(addr, None)

    async def _ask(self, addr: str) -> tuple[dict[str, Any], float]:
        """The peer's status and the wall time it came (each reply its own: the rates divide by
        it, and a round waits for its slowest, a dead peer's timeout)."""
        async with self._asking:
            reply = await self.client.call(addr, request(MsgType.STATUS, self.client.sender), self.timeout,
                                           expect=MsgType.STATUS_REPLY)
        return dict(reply.body["status"]), time.time()

    async def poll(self) -> SwarmSnapshot:
        """Query every known peer concurrently, fold in what they know, return the new snapshot."""
        started = time.monotonic()
        self._discover()
        self._alive_in_lists.clear()
        asked: set[str] = set()
        # New addresses learned from one round are asked in the next pass of the same poll, so one
        # seed is enough for a full first frame. Those that answered last time go first: the
        # semaphore lets requests in, in order.
        while pending := sorted((a for a in self.addresses if a not in asked), key=self._failures.__contains__):
            asked.update(pending)
            replies = await asyncio.gather(*(self._ask(a) for a in pending), return_exceptions=True)
            now = time.time()
            for reply in replies:
                if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                    raise reply
            failed = [(a, r) for a, r in zip(pending, replies) if isinstance(r, Exception)]
            whys = await asyncio.gather(*(self._unresolved(a, r) for a, r in failed))  # the lookups side by side
            unresolved = {a: why for (a, _), why in zip(failed, whys)}
            for addr, reply in zip(pending, replies):
                if isinstance(reply, Exception):
                    self._failed(addr, reply, now, unresolved[addr])
                else:
                    self._failures.pop(addr, None)
                    self._silent_since.pop(addr, None)
                    self._answered(addr, *reply)
        await self._forget_the_long_silent(time.time())
        return SwarmSnapshot(
            taken_at=time.time(), peers=tuple(sorted(self._one_row_per_peer(), key=_order)),
            events=tuple(sorted(self._events.values(), key=lambda e: e.time)[-MAX_EVENTS:]),
            mean_model_loss=mean_model_loss(self.run_dir, self._cards), query_s=time.monotonic() - started,
        )

    def _answered(self, addr: str, status: dict[str, Any], now: float) -> None:
        previous = self.rows.get(addr)
        row = PeerStatus.from_reply(status, addr=addr, now=now, previous=previous)
        if previous is not None and previous.stale:
            self._note(Event(now, row.name, "answering again", "status"))
        self.rows[addr] = row
        for card in status.get("peers") or []:
            if isinstance(card, dict) and isinstance(card.get("addr"), str):
                if card.get("alive"):
                    self._alive_in_lists.add(card["addr"])
                    self._forgotten.pop(card["addr"], None)
                elif card["addr"] in self._forgotten:
                    continue
                self.addresses.setdefault(card["addr"], None)
                if isinstance(card.get("name"), str) and card["name"]:
                    self.names.setdefault(card["addr"], card["name"])
        for item in status.get("events") or []:
            if isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[0], (int, float)):
                self._note(Event(float(item[0]), str(item[1]), str(item[2]), row.name))

    def _one_row_per_peer(self) -> list[PeerStatus]:
        """One peer asked under two spellings of its address (a seed typed as localhost or a
        port-forward, the address it advertises) answers under both, or under one only: it is
        one row, not two peers (nor a dead one beside it)."""
        answered_elsewhere = {row.addr for row in self.rows.values() if not row.stale and row.reached != row.addr}
        seen: set[str] = set()
        rows = []
        for addr, row in self.rows.items():
            if (row.id and row.id in seen) or (not row.id and addr in answered_elsewhere):
                continue
            seen.add(row.id)
            rows.append(row)
        return rows

    async def _unresolved(self, addr: str, exc: Exception) -> str | None:
        """Why ``addr`` could not be reached when its host name does not resolve (a lookup
        failure otherwise reads as a refused or lost connection)."""
        failures = self._failures[addr] = self._failures.get(addr, 0) + 1
        if not isinstance(exc, TransportError) or isinstance(exc, HandshakeFailed) or failures % 10 != 1:
            return None
        return await unresolved_host(addr)

    async def _forget_the_long_silent(self, now: float) -> None:
        """Stop asking the long silent; a run directory's peers keep their stale rows (the
        run's own peers: finished, killed or frozen), the others' rows go."""
        for addr, since in list(self._silent_since.items()):
            if now - since >= self.forget_after and addr not in self._alive_in_lists and addr not in self._seeds:
                self._forgotten[addr] = now
                dropped = (self.addresses, self._failures, self._silent_since)
                for known in dropped if addr in self._carded else (*dropped, self.rows, self.names):
                    known.pop(addr, None)
                await self.client.forget(addr)  # its socket would redial a dead address for as long as we run
        # What peers listed is gone from their lists long before this; a card stays.
        for addr, when in list(self._forgotten.items()):
            if now - when > 10 * self.forget_after and addr not in self._carded:
                del self._forgotten[addr]

    def _failed(self, addr: str, exc: Exception, now: float, why: str | None = None) -> None:
        self._silent_since.setdefault(addr, now)
        row = self.rows.get(addr)
        if row is None:
            row = PeerStatus(name=self.names.get(addr, addr), addr=addr, sampled_at=0.0)
        if not row.stale:
            self._note(Event(now, row.name, "not answering", "status"))
        if why is None and row.stale and row.error and "does not resolve" in row.error:
            why = row.error  # found at an earlier poll: the lookup is not repeated every time
        self.rows[addr] = row.gone_stale(why or (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__))

    def _note(self, event: Event) -> None:
        # Every peer reports the same membership change at a slightly different time: one
        # occurrence per (peer, what) within SAME_EVENT_S, the earliest report kept.
        key = (event.peer, event.what)
        known = self._events.get(key)
        if known is None or event.time > known.time + SAME_EVENT_S:
            self._events[key] = event
        elif event.time < known.time:
            self._events[key] = event
        if len(self._events) > 4 * MAX_EVENTS:  # only the latest are shown
            for old in sorted(self._events, key=lambda k: self._events[k].time)[:-MAX_EVENTS]:
                del self._events[old]

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.transports.aclose()


def _order(row: PeerStatus) -> tuple[int, str]:
    return name_order(row.name)


def name_order(name: str) -> tuple[int, str]:
    """peer2 before peer10: by the number in a peer's name, then the name."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 1 << 30, name)
