"""A rogue peer for tests: speaks the wire protocol faithfully but serves a poisoned model, or
a sound one slowly.

    python tests/integration/rogue_peer.py --task swarmnet.tasks.digits:task --mode nan \\
        --seed tcp://127.0.0.1:PORT --out DIR

Modes: ``nan`` (every value NaN), ``inf``, ``huge`` (a real model scaled by 1e6), ``slow`` (a
real model, each pull answered ``--delay`` seconds late, like a slow link), ``confused`` (every
request answered with a well-formed ACK, whatever it asked). It gossips with its seed like a
peer, answers pulls with the poisoned snapshot and writes ``DIR/card.json`` (its address) and
``DIR/served.json`` (pulls answered, per asking peer id; in ``confused`` mode every request).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
from pathlib import Path

import torch

from swarmnet.codecs import make_codec
from swarmnet.errors import ProtocolError, SwarmError
from swarmnet.peer.client import PeerClient
from swarmnet.peer.stats import PeerStats
from swarmnet.tasks import load_task
from swarmnet.transport import TransportSet
from swarmnet.wire import (
    Limits,
    Message,
    MsgType,
    RejectCode,
    decode,
    encode,
    reject,
    reply,
    request,
)


def poisoned_model(task_spec: str, mode: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = load_task(task_spec, {}).build_model()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float()
    if mode == "nan":
        return torch.full_like(flat, float("nan"))
    if mode == "inf":
        return torch.full_like(flat, float("inf"))
    return flat if mode == "slow" else flat * 1e6


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codec = make_codec("fp32")
    encoded = codec.encode(poisoned_model(args.task, args.mode))
    transports = TransportSet()
    listener = await transports.for_url("tcp://127.0.0.1:0").listen("tcp://127.0.0.1:0")
    me = f"rogue-{args.mode}-{secrets.token_hex(3)}"
    heartbeat = 0
    served: collections.Counter[str] = collections.Counter()

    def card() -> dict[str, object]:
        return {"id": me, "addr": listener.address, "hb": heartbeat, "name": f"rogue-{args.mode}"}

    client = PeerClient(sender=me, transports=transports, limits=Limits(), timeout=1.0, stats=PeerStats(),
                        max_frame_bytes=2**31 - 1)

    async def gossip() -> None:
        nonlocal heartbeat
        while True:
            heartbeat += 1
            try:
                await client.call(args.seed, request(MsgType.HELLO, me, card=card(), peers=[]))
            except SwarmError:
                pass
            await asyncio.sleep(0.5)

    async def answer_late(route: object, answer: Message) -> None:
        await asyncio.sleep(args.delay)
        await listener.send(route, encode(answer))

    async def serve() -> None:
        late: set[asyncio.Task[None]] = set()
        while True:
            route, frames = await listener.recv()
            try:
                msg = decode(frames)
            except ProtocolError:
                continue
            if args.mode == "confused":
                served[msg.sender] += 1
                write_json(out / "served.json", served)
                await listener.send(route, encode(reply(msg, MsgType.ACK, me)))
                continue
            if msg.type is MsgType.HELLO:
                answer = reply(msg, MsgType.PEERS, me, card=card(), peers=[])
            elif msg.type is MsgType.PULL:
                served[msg.sender] += 1
                write_json(out / "served.json", served)
                meta, payload = codec.select(encoded, msg.body["want"])
                answer = reply(msg, MsgType.SNAPSHOT, me, payload, version=1, codec=codec.name, meta=meta,
                               clock=msg.body["clock"], age=0.0)
                if args.delay > 0:
                    task = asyncio.create_task(answer_late(route, answer))
                    late.add(task)
                    task.add_done_callback(late.discard)
                    continue
            elif msg.type is MsgType.STATUS:
                answer = reply(msg, MsgType.STATUS_REPLY, me, status={"id": me, "served": dict(served)})
            elif msg.type is MsgType.BYE:
                answer = reply(msg, MsgType.ACK, me)
            else:
                answer = reject(msg, me, RejectCode.MISMATCH, "rogue")
            await listener.send(route, encode(answer))

    write_json(out / "card.json", {"id": me, "addr": listener.address, "pid": os.getpid()})
    await asyncio.gather(gossip(), serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--mode", choices=["nan", "inf", "huge", "slow", "confused"], required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to hold each pull's answer")
    parser.add_argument("--seed", required=True, help="address of a real peer")
    parser.add_argument("--out", required=True, help="folder for card.json and served.json")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
