"""Who is in the swarm: a gossiped peer table with heartbeats, suspicion and back-off.

Each peer increments its own heartbeat counter every gossip round and exchanges a sample of
its table with one random peer (or a seed). A record whose heartbeat has not advanced for
``dead_after`` seconds is suspected and no longer picked as a neighbour; after ``forget_after``
it is dropped. A failed request puts the peer on exponential back-off, so a neighbour that
times out or sends garbage is avoided for a while, never fatal. ``PeerTable`` is plain code
with an injected clock; :class:`MembershipService` is the asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from swarmnet.errors import HandshakeFailed, SwarmError, TransportError
from swarmnet.peer.client import PeerClient
from swarmnet.security import url_host
from swarmnet.wire import CARD_BYTES, MAX_CARDS, Message, MsgType, fit_cards, request

MAX_BACKOFF = 60.0
STARTING_INTERVAL = 0.05
"""Gossip period (seconds) while a peer waits for its start condition. Peers launched together
learn of the last one to come up from whomever it joined through; at the usual period the
first ones then trained up to 0.7 s (hundreds of small-model steps) before the last knew them
all. Idle while waiting, a peer can afford a few rounds more."""
IS_ME = "is this peer itself (a card of its earlier run, or another spelling of its address)"
ROUNDS_IN_FLIGHT = 4
"""Gossip rounds at once: a round waiting on a frozen peer leaves the next ones to the others."""
PROBE_SUSPECTS = 0.1
"""Share of gossip rounds that ask a suspected peer instead of a live one: a partition heals
without a seed on either side, and peers that suspected each other (all stalled on a frozen
one) find each other again."""
CARD_WAIT_WARN_S = 10.0
"""A file:// seed whose card is still missing after this long is worth a warning (once)."""


@dataclass(slots=True)
class PeerRecord:
    id: str
    addr: str
    name: str
    hb: int
    last_seen: float
    failures: int = 0
    avoid_until: float = 0.0
    unreachable_only: bool = False
    """Every failure since the last success was a lost or refused connection or a timeout
    (never a bad message or model): the back-off ends as soon as the peer answers again."""
    served_bad: bool = False
    """A failure since the last success was a bad model or reply (not a refusal, not the network):
    its back-off stays with its address when a new id turns up there."""
    left: bool = False
    done: bool = False
    """The peer has spent its budget and only serves its final snapshot."""
    last_error: str = ""
    """Why the last request to it failed, since it last served us: what a peer that merges with
    no one says (failure_report)."""

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "addr": self.addr, "hb": self.hb, "name": self.name, "done": self.done}


class PeerTable:
    def __init__(
        self, self_id: str, *, dead_after: float, backoff: float,
        now: Callable[[], float] = time.monotonic, forget_after: float | None = None,
    ) -> None:
        self.self_id = self_id
        self.self_addr = ""
        """This peer's advertised address, once bound: a card there under another id is an
        earlier run of this peer (or a forgery), and a neighbour there would be itself."""
        self.self_aliases: set[str] = set()
        """Other spellings of this peer's address, learnt when one answered as this peer: cards
        there are ignored too (others keep relaying them)."""
        self.dead_after = dead_after
        self.backoff = backoff
        self.forget_after = forget_after if forget_after is not None else 6 * dead_after
        self.now = now
        self.records: dict[str, PeerRecord] = {}
        self.events: list[tuple[float, str, str]] = []
        """(time, peer name or id, what happened) for status views; bounded."""

    def _event(self, who: PeerRecord, what: str) -> None:
        self.events.append((time.time(), who.name or who.id, what))
        del self.events[:-100]

    def merge(self, card: dict[str, Any], *, direct: bool = False) -> None:
        """Fold in a card heard from the peer itself (``direct``) or relayed by another."""
        pid = str(card["id"])
        if pid == self.self_id or card["addr"] == self.self_addr or card["addr"] in self.self_aliases:
            return
        now = self.now()
        rec = self.records.get(pid)
        blamed: PeerRecord | None = None
        if rec is None or direct:
            # A restarted peer comes back under a new id at the same address: drop the old one,
            # on the new one's own word, or once the old one has gone quiet (anyone can relay a
            # card, so a relayed one alone must not evict a live peer).
            for old in [r for r in self.records.values() if r.addr == card["addr"] and r.id != pid]:
                if direct or not self.is_alive(old):
                    del self.records[old.id]
                    if old.served_bad:
                        blamed = old
        if rec is None:
            rec = PeerRecord(pid, str(card["addr"]), str(card.get("name", "")), int(card["hb"]), now,
                             done=card.get("done") is True)
            if blamed is not None:
                # What its address served stays held against it: a server of bad models that
                # took a new id at every hello was pulled five times a second, never backed off.
                rec.failures, rec.avoid_until, rec.last_error = blamed.failures, blamed.avoid_until, blamed.last_error
                rec.served_bad = True
            self.records[pid] = rec
            self._event(rec, "joined")
            return
        if rec.left:
            if not (direct and int(card["hb"]) > rec.hb):
                return
            # Still gossiping after a bye: the bye was not its own (ids are claims), or it came back.
            rec.left = False
            self._event(rec, "back")
        if int(card["hb"]) > rec.hb or direct:
            rec.hb = max(rec.hb, int(card["hb"]))
            rec.last_seen = now
            rec.done = card.get("done") is True

    def forget_self_alias(self, pid: str) -> None:
        """The record's address answered as this peer itself: drop the record, and ignore cards
        for that address from now on."""
        rec = self.records.pop(pid, None)
        if rec is not None:
            self.self_aliases.add(rec.addr)
            self._event(rec, f"forgotten: {IS_ME}")

    def mark_left(self, pid: str) -> None:
        rec = self.records.get(pid)
        if rec is not None and not rec.left:
            rec.left = True
            self._event(rec, "left")

    def record_failure(self, pid: str, *, unreachable: bool = False, why: str = "", served_bad: bool = False) -> None:
        """``unreachable``: the peer could not be reached (connection lost or refused, timeout),
        as opposed to answering with something bad; ``served_bad``: it served a bad model or
        reply; ``why``: the error."""
        rec = self.records.get(pid)
        if rec is not None:
            rec.last_error = why or rec.last_error
            rec.unreachable_only = unreachable and (rec.unreachable_only or rec.failures == 0)
            rec.served_bad = rec.served_bad or served_bad
            rec.failures += 1
            rec.avoid_until = self.now() + min(MAX_BACKOFF, self.backoff * 2 ** (rec.failures - 1))
            if rec.failures == 1:
                self._event(rec, "suspected")

    def record_success(self, pid: str) -> None:
        rec = self.records.get(pid)
        if rec is not None:
            rec.failures, rec.unreachable_only, rec.served_bad, rec.last_error = 0, False, False, ""
            rec.avoid_until = 0.0
            rec.last_seen = self.now()

    def record_seen(self, pid: str) -> None:
        """The peer answered gossip: alive, but that says nothing about the models it serves,
        so a back-off earned by bad snapshots stays in force; one earned only by being
        unreachable (a partition, now healed) ends."""
        rec = self.records.get(pid)
        if rec is not None:
            rec.last_seen = self.now()
            if rec.unreachable_only:
                rec.failures, rec.avoid_until, rec.unreachable_only = 0, 0.0, False

    def is_alive(self, rec: PeerRecord) -> bool:
        return not rec.left and self.now() - rec.last_seen <= self.dead_after

    def alive(self) -> list[PeerRecord]:
        return [r for r in self.records.values() if self.is_alive(r)]

    def candidates(self, allowed: Iterable[str] | None = None) -> list[PeerRecord]:
        """Alive peers not on back-off (restricted to ``allowed`` ids when given)."""
        now = self.now()
        allowed_set = set(allowed) if allowed is not None else None
        return [
            r for r in self.alive()
            if r.avoid_until <= now and (allowed_set is None or r.id in allowed_set)
        ]

    def sample_cards(self, rng: random.Random, budget: int = CARD_BYTES) -> list[dict[str, Any]]:
        """A random sample of the live peers' cards, as many as one message carries (``budget``
        packed bytes at most)."""
        alive = self.alive()
        return fit_cards([r.card() for r in rng.sample(alive, min(len(alive), MAX_CARDS))], budget)

    def prune(self) -> list[PeerRecord]:
        """Forget the records silent for ``forget_after``; returns them."""
        now = self.now()
        gone = [rec for rec in self.records.values() if now - rec.last_seen > self.forget_after]
        for rec in gone:
            del self.records[rec.id]
            self._event(rec, "forgotten")
        return gone


UNREACHABLE_HINT = ("a peer whose advertised address this host cannot dial (a loopback or private address, "
                    "a name this host does not resolve, a firewall) can still reach us, but never serves "
                    "us a pull: check the --advertise of each peer from every host")


def failure_report(records: Iterable[PeerRecord], most: int = 3) -> str:
    """`` (name at addr: error; ...)`` for the records still failing (the first ``most``), with
    the hint on addresses where each failed only to be reached; "" where none is failing."""
    failed = [r for r in records if r.failures and r.last_error]
    if not failed:
        return ""
    shown = "; ".join(f"{r.name or r.id} at {r.addr}: {r.last_error}" for r in failed[:most])
    more = f"; and {len(failed) - most} more" if len(failed) > most else ""
    hint = f"; {UNREACHABLE_HINT}" if all(r.unreachable_only for r in failed) else ""
    return f" ({shown}{more}){hint}"


def read_seed_card(seed: str) -> str | None:
    """``file:///path/card.json`` seeds name a peer card (written by a peer at start) instead of
    an address: handy where ports are chosen at bind time and a filesystem is shared (a local
    launcher, a Slurm job's home directory). None while the card does not exist yet."""
    try:
        with open(seed.removeprefix("file://"), encoding="utf-8") as fh:
            return str(json.load(fh)["addr"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def unresolved_host(address: str) -> str | None:
    """Why a tcp:// address's host name does not resolve, if it does not (a name lookup failure
    otherwise shows only as a connection that never comes up)."""
    host = url_host(address)
    if not address.startswith("tcp://") or not host:
        return None
    try:
        await asyncio.get_running_loop().getaddrinfo(host, None)
    except OSError as exc:
        return f"its host {host!r} does not resolve: {exc.strerror or exc}; check the name"
    return None


class MembershipService:
    """Heartbeats and peer-list gossip; learns the swarm from seeds."""

    def __init__(
        self, *, table: PeerTable, client: PeerClient, card: Callable[[], dict[str, Any]],
        seeds: list[str], interval: float, rng: random.Random, log: logging.LoggerAdapter,  # type: ignore[type-arg]
        card_bytes: int = CARD_BYTES,
    ) -> None:
        self.table = table
        self.card_bytes = card_bytes
        """Packed bytes of cards per message: half the header limit where the config lowers it
        (the swarm's peers share it), so that gossip stays under every peer's limit."""
        self.client = client
        self.card = card
        self.seeds = [s for s in seeds if s]
        self.interval = interval
        self.rng = rng
        self.log = log
        self.heartbeat = 0
        self.joined = asyncio.Event()
        self.starting = True
        """Until the peer meets its start condition it gossips every STARTING_INTERVAL."""
        self._seed_retry: dict[str, float] = {}
        self._seed_failures: dict[str, int] = {}
        self.seed_errors: dict[str, str] = {}
        """The last error of each seed that has failed (kept once reached: a peer that never
        joined reports them at the end)."""
        self._card_missing_since: dict[str, float] = {}
        """file:// seeds: since when their card has been missing (infinity once warned about)."""
        self._seeding = False
        self._namesakes: set[str] = set()
        """Ids of live peers heard from under this peer's own name (warned about once each)."""

    def hello(self) -> Message:
        return request(MsgType.HELLO, self.client.sender, card=self.card(),
                       peers=self.table.sample_cards(self.rng, self.card_bytes))

    def handle_hello(self, msg: Message) -> dict[str, Any]:
        """Server side: merge what the caller knows; reply with our card and our view."""
        self.merge_reply(msg)
        return {"card": self.card(), "peers": self.table.sample_cards(self.rng, self.card_bytes)}

    def merge_reply(self, msg: Message) -> None:
        card = msg.body["card"]
        ours = self.card()
        name = ours.get("name")
        if name and card.get("name") == name and card["id"] != ours["id"] and card["id"] not in self._namesakes:
            self._namesakes.add(card["id"])  # a live one: only a running peer sends its own card
            self.log.warning("peer %s at %s is named %s too: the status view, events and eval then mix the two "
                             "up; give each peer its own --name", card["id"], card["addr"], name)
        self.table.merge(card, direct=True)
        for card in msg.body["peers"]:
            self.table.merge(card)
        if self.table.alive():
            self.joined.set()

    async def gossip_once(self) -> None:
        targets = self.table.alive()
        suspects = [r for r in self.table.records.values() if not r.left and not self.table.is_alive(r)]
        if suspects and (not targets or self.rng.random() < PROBE_SUSPECTS):
            targets = suspects  # quiet, maybe only because it could not reach us: ask it directly
        # Not behind a request in flight to the same peer (a pull of a large model, or an earlier
        # round waiting on a frozen one): queued, the hello's short deadline would run out there.
        targets = [r for r in targets if not self.client.busy(r.addr)]
        if targets:
            rec = self.rng.choice(targets)
            try:
                # Bounded by dead_after: a round waiting on a frozen peer must not outlast the
                # liveness of the live ones (rounds overlap, at most ROUNDS_IN_FLIGHT of them).
                reply = await self.client.call(rec.addr, self.hello(), expect=MsgType.PEERS,
                                               timeout=min(self.client.timeout, self.table.dead_after / 2))
            except SwarmError as exc:
                self.log.debug("gossip with %s failed: %s", rec.name or rec.id, exc)
                self.table.record_failure(rec.id, unreachable=isinstance(exc, TransportError), why=str(exc))
            else:
                self.merge_reply(reply)
                if reply.sender == self.table.self_id:
                    self.table.forget_self_alias(rec.id)
                    self.log.info("%s at %s %s", rec.name or rec.id, rec.addr, IS_ME)
                else:
                    self.table.record_seen(rec.id)
        # Seeds are asked until the swarm is known, then now and then (healing partitions); by one
        # round at a time.
        if (not self.table.alive() or self.rng.random() < 0.05) and not self._seeding:
            self._seeding = True
            try:
                await self._contact_seeds()
            finally:
                self._seeding = False
        gone = self.table.prune()
        self.client.stats.peers_alive = len(self.table.alive())  # the peer's stats: status, metrics
        known = {r.addr for r in self.table.records.values()}
        for rec in gone:
            if rec.addr not in known and rec.addr not in self.seeds:
                await self.client.forget(rec.addr)  # its socket would redial a dead address forever

    async def _contact_seeds(self) -> None:
        """Greet every seed that is due, all at once: a seed that hangs must not hold up the
        others (a joining peer would wait its whole request timeout to learn of the swarm)."""
        now = time.monotonic()
        await asyncio.gather(*(self._contact_seed(seed, now) for seed in self.seeds
                               if self._seed_retry.get(seed, 0.0) <= now))

    async def _contact_seed(self, seed: str, now: float) -> None:
        address = read_seed_card(seed) if seed.startswith("file://") else seed
        if address is None:  # the seed's card is not written yet: try again next round
            since = self._card_missing_since.setdefault(seed, now)
            self.seed_errors[seed] = "no peer card there (its peer has not bound yet, or the path is wrong)"
            if now - since >= CARD_WAIT_WARN_S:
                self._card_missing_since[seed] = math.inf
                self.log.warning("seed %s: no peer card there after %.0fs (its peer has not bound yet, or the path "
                                 "is wrong); still looking", seed, now - since)
            return
        try:
            reply = await self.client.call(address, self.hello(), expect=MsgType.PEERS)
        except SwarmError as exc:
            failures = self._seed_failures.get(seed, 0) + 1
            self._seed_failures[seed] = failures
            delay = min(30.0, self.interval * 2**failures)
            self._seed_retry[seed] = now + delay
            if failures in (1, 3) or failures % 10 == 0:
                # Silence or a refused connection may be a wrong address; a failed handshake or
                # a reply says itself what to check.
                unanswered = isinstance(exc, TransportError) and not isinstance(exc, HandshakeFailed)
                why = await unresolved_host(address) or (
                    f"{exc}; check the address and that a peer is running there" if unanswered else str(exc))
                self.seed_errors[seed] = why
                alone = "" if self.table.alive() else "; no other peer is alive"
                self.log.warning("seed %s unreachable (%s); retrying in %.1fs%s", seed, why, delay, alone)
        else:
            if self._seed_failures.pop(seed, 0) >= 1:
                self.log.info("seed %s reached", seed)
            self._seed_retry.pop(seed, None)
            self.merge_reply(reply)

    async def run(self) -> None:
        """Beat every period and start a round of gossip, up to ROUNDS_IN_FLIGHT at once: a
        round can wait on a frozen neighbour (up to dead_after / 2) or an unreachable seed, and
        neither our heartbeat, which our replies to others' gossip carry too, nor our gossip
        with the live peers may stop meanwhile: they would suspect us, and we them."""
        rounds: set[asyncio.Task[None]] = set()
        try:
            while True:
                self.heartbeat += 1
                rounds = {r for r in rounds if not r.done()}
                if len(rounds) < ROUNDS_IN_FLIGHT:
                    rounds.add(asyncio.create_task(self._gossip_round()))
                period = min(self.interval, STARTING_INTERVAL) if self.starting else self.interval
                await asyncio.sleep(period * (0.5 + self.rng.random()))
        finally:
            for r in rounds:
                r.cancel()

    async def _gossip_round(self) -> None:
        try:
            await self.gossip_once()
        except Exception:  # a reply no check of ours foresaw: a bug to fix, never fatal to the peer
            self.log.exception("gossip failed unexpectedly (please report this)")
