"""A newcomer's first model: a trained neighbour's snapshot instead of a fresh initialization.

A peer that starts without a checkpoint asks a random sample of alive neighbours for their
status and picks, among those that have trained (step > 0, and at least half the steps of the
most advanced one) and did not start together with it, the one that has given its model to the
fewest newcomers so far (ties at random). That donor sends its snapshot losslessly (a
pull with ``want = FULL``: float32, whatever the swarm's codec, moving no clock); it becomes the
newcomer's model, the donor's phase clock its clock and the donor's step its step (its place
in the learning-rate schedule and budget); momentum starts empty. A donor sends
one donation at a time and answers BUSY meanwhile (server.py), so newcomers arriving together
spread over different donors; when every donor asked is busy the newcomer tries again shortly.
When no neighbour has trained, or none answers, the peer keeps its own initialization.

Started together: a neighbour that already knew this peer when it met its start condition
(``started_with_you`` in its status) counted it as one of the swarm it started with. Peers that
``swarmnet up`` launches at once meet their start condition at slightly different times, and
the first to start may have trained hundreds of steps of a small model when the last one looks
for a donor; taking its model would throw away the later peer's share of the work. Such a
neighbour is no donor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from swarmnet.codecs.fp32 import Fp32Codec
from swarmnet.errors import CodecError, ProtocolError, SwarmError, TransportError
from swarmnet.peer.client import PeerClient, Rejected
from swarmnet.peer.membership import PeerRecord, PeerTable
from swarmnet.peer.state import check_layout
from swarmnet.wire import FULL, MsgType, RejectCode, request

ASKED = 8
"""Neighbours whose status a newcomer compares."""
ATTEMPTS = 3
"""Donors asked for their model per round, least used first."""
BEHIND = 0.5
"""A neighbour with fewer than this fraction of the steps of the most advanced one asked has
barely trained (it started on its own later, e.g. with the exchange off): it is no donor."""
PATIENCE = 10.0
"""Seconds a newcomer keeps retrying while every donor it asked is busy with another newcomer."""


@dataclass(frozen=True, slots=True)
class Donation:
    donor: str
    """The donor's name (or id)."""
    step: int
    clock: int
    values_N: Tensor
    seconds: float
    """From the first status request to the decoded model."""


async def fetch_donation(client: PeerClient, table: PeerTable, rng: random.Random, numel: int, layout: str,
                         log: logging.LoggerAdapter) -> Donation | None:  # type: ignore[type-arg]
    """A trained neighbour's model of ``numel`` coordinates and fingerprint ``layout`` (ours)."""
    started = time.monotonic()
    while True:
        busy = False
        for rec, step in (await _trained_donors(client, table, rng, log))[:ATTEMPTS]:
            who = rec.name or rec.id
            try:
                values_N, clock = await _pull_full(client, rec.addr, numel, layout)
            except SwarmError as exc:
                if isinstance(exc, Rejected) and exc.code == RejectCode.BUSY:
                    busy = True
                    continue
                table.record_failure(rec.id, unreachable=isinstance(exc, TransportError), why=str(exc))
                log.warning("could not adopt %s's model: %s", who, exc)
                continue
            return Donation(who, step, clock, values_N, time.monotonic() - started)
        if not busy or time.monotonic() - started > PATIENCE:
            return None
        await asyncio.sleep(rng.uniform(0.02, 0.1))  # every donor asked is serving another newcomer


async def _trained_donors(client: PeerClient, table: PeerTable, rng: random.Random,
                          log: logging.LoggerAdapter) -> list[tuple[PeerRecord, int]]:  # type: ignore[type-arg]
    """Alive neighbours that have trained and did not start with this peer, with their step,
    least used as donors first."""
    asked = table.candidates()
    rng.shuffle(asked)  # a random sample, and random order among equally used donors
    asked = asked[:ASKED]
    answers = await asyncio.gather(*(client.call(r.addr, request(MsgType.STATUS, client.sender),
                                                 expect=MsgType.STATUS_REPLY) for r in asked),
                                   return_exceptions=True)
    trained = []
    for rec, answer in zip(asked, answers, strict=True):
        if isinstance(answer, SwarmError):
            table.record_failure(rec.id, unreachable=isinstance(answer, TransportError), why=str(answer))
            log.warning("could not ask %s for its status: %s", rec.name or rec.id, answer)
            continue
        if isinstance(answer, BaseException):
            raise answer
        status = answer.body["status"]
        step, donations = status.get("step"), status.get("donations", 0)
        if status.get("started_with_you") is True:
            log.info("%s started together with this peer (step %s): not a donor", rec.name or rec.id, step)
            continue
        if isinstance(step, int) and step > 0 and isinstance(donations, int):
            trained.append((donations, rec, step))
    lead = max((step for _, _, step in trained), default=0)
    trained = [t for t in trained if t[2] >= lead * BEHIND]
    trained.sort(key=lambda t: t[0])  # stable: keeps the random order among ties
    return [(rec, step) for _, rec, step in trained]


async def _pull_full(client: PeerClient, addr: str, numel: int, layout: str) -> tuple[Tensor, int]:
    """The donor's current snapshot, lossless, and its phase clock."""
    reply = await client.call(addr, request(MsgType.PULL, client.sender, clock=0, want=FULL, version=None),
                              timeout=client.transfer_timeout, expect=MsgType.SNAPSHOT)
    if reply.body["codec"] != "fp32":
        raise ProtocolError("mismatch", f"expected an fp32 snapshot, got codec {reply.body['codec']}")
    check_layout(reply.body.get("layout"), layout, "the donor")
    values_N = torch.empty(numel, dtype=torch.float32)
    await asyncio.to_thread(Fp32Codec().decode, reply.body["meta"], reply.frames, values_N, values_N, {})
    if not bool(torch.isfinite(values_N).all()):
        raise CodecError("the donor's snapshot holds non-finite values")
    return values_N, int(reply.body["clock"])
