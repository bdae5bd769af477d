"""A newcomer's first model: a trained neighbour's snapshot instead of a fresh initialization.

A peer that starts without a checkpoint asks alive neighbours, in a random order of its own (so
newcomers arriving together spread over different donors), for their status; the first one that
has trained (step > 0) sends its snapshot losslessly (a pull with ``want = FULL``: float32,
whatever the swarm's codec, moving no clock). That becomes the newcomer's model and the donor's
phase clock its clock; momentum starts empty. When every neighbour is still at step 0 (a swarm
started together), or none answers, the peer keeps its own initialization.
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
from swarmnet.errors import CodecError, ProtocolError, SwarmError
from swarmnet.peer.client import PeerClient
from swarmnet.peer.membership import PeerTable
from swarmnet.wire import FULL, MsgType, request

ATTEMPTS = 3
"""Donors asked at most, one after the other."""


@dataclass(frozen=True, slots=True)
class Donation:
    donor: str
    """The donor's name (or id)."""
    step: int
    clock: int
    values_N: Tensor
    seconds: float
    """From the first status request to the decoded model."""


async def fetch_donation(client: PeerClient, table: PeerTable, rng: random.Random, numel: int,
                         log: logging.LoggerAdapter) -> Donation | None:  # type: ignore[type-arg]
    started = time.monotonic()
    donors = table.candidates()
    rng.shuffle(donors)
    for rec in donors[:ATTEMPTS]:
        who = rec.name or rec.id
        try:
            status = (await client.call(rec.addr, request(MsgType.STATUS, client.sender))).body["status"]
            step = status.get("step")
            if not isinstance(step, int) or step <= 0:
                continue
            reply = await client.call(rec.addr, request(MsgType.PULL, client.sender, clock=0, want=FULL, version=None))
            if reply.type is not MsgType.SNAPSHOT or reply.body["codec"] != "fp32":
                raise ProtocolError("unexpected_type", f"expected an fp32 snapshot, got {reply.type}")
            values_N = torch.empty(numel, dtype=torch.float32)
            await asyncio.to_thread(Fp32Codec().decode, reply.body["meta"], reply.frames, values_N, values_N, {})
            if not bool(torch.isfinite(values_N).all()):
                raise CodecError("the donor's snapshot holds non-finite values")
        except SwarmError as exc:
            table.record_failure(rec.id)
            log.warning("could not adopt %s's model: %s", who, exc)
            continue
        return Donation(who, step, int(reply.body["clock"]), values_N, time.monotonic() - started)
    return None
