"""The exchange: pick a random neighbour, pull its snapshot, decode it against our own, hand the
merge to the compute thread. One interaction at a time, paced by the compute loop: the next pull
starts once the previous merge was applied and republished (and ``pull_interval`` has passed).

Decoding and the delta arithmetic run in a dedicated worker thread, not on the event loop, except
the gap of a small model on a CPU, which costs less than the hop to the worker (INLINE_GAP_MAX).
Any failure of a neighbour (timeout, garbage, reject, non-finite values) puts it on back-off and
the exchange moves on; the compute loop never notices.

Legend: N = number of float parameter coordinates.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from swarmnet.algorithms import Topology, apply_nudge, pull_gap
from swarmnet.codecs import Codec, kernels
from swarmnet.codecs.published import until_copied
from swarmnet.errors import CodecError, ProtocolError, SwarmError, TransportError
from swarmnet.log import counted
from swarmnet.peer.budget import CpuBudget, named_threads_cpu, thread_cpu_clock
from swarmnet.peer.client import Rejected
from swarmnet.peer.membership import IS_ME, PeerRecord, failure_report
from swarmnet.peer.screening import Screen
from swarmnet.peer.state import MergeEntry, Snapshot, check_layout
from swarmnet.wire import Message, MsgType, RejectCode, request

if TYPE_CHECKING:
    from swarmnet.peer.node import Peer

MAX_ROUNDS = 8
"""Pulls of one snapshot version a codec may ask for (lattice escalation) before giving up."""
STUCK_WARN_S = 60.0
"""Time without a merge, while peers are alive but each one fails or is on back-off, after which
a peer warns (then every STUCK_WARN_REPEAT_S while it lasts)."""
STUCK_WARN_REPEAT_S = 300.0
"""How often that warning repeats while no merge takes place."""
BUDGET_WAIT_WARN_S = 30.0
"""A wait for the CPU budget this long is worth a warning (at most every STUCK_WARN_REPEAT_S)."""
INLINE_GAP_MAX = 1 << 19
"""Coordinates up to which a CPU model's gap and its screening are computed on the event loop:
0.17 ms or less there (2 MB in fp32), where handing them to the worker thread and back costs
about 0.1 ms of CPU more (docs/benchmarks.md, The gap of a small model on the event loop)."""


def gap_over(remote_N: Tensor, q_own_N: Tensor, own_N: Tensor) -> float:
    """:func:`pull_gap` written over ``remote_N`` (the neighbour's vector, which the exchange owns:
    the received frames read in place, or its decoded copy) and the gap's 2-norm, not finite
    when the gap is not. Writing where the passes have just read saves a model-sized buffer and,
    on the CPUs measured, a third of the time of writing into one (docs/benchmarks.md)."""
    return float(torch.linalg.vector_norm(pull_gap(remote_N, q_own_N, own_N, out=remote_N)))  # CPU<->GPU sync point


def warm_up_loops(codec: Codec, model_N: Tensor) -> None:
    """Have numba load (or compile) the CPU loops a peer with this codec and model will use.
    A peer does it before it joins the swarm: loaded at the first pull, they charged a lattice
    peer's first interaction about 15 ms of CPU (0.6 s of waiting under the budget's 5% floor);
    loaded once the peer serves, they would block a loop that answers neighbours."""
    if kernels.usable(model_N):
        kernels.warm_up(codecs=(codec.name,))


class Exchange:
    def __init__(self, peer: Peer, *, topology: Topology, symmetric: bool, pull_interval: float,
                 cpu_cores: float, rng: random.Random, log: logging.LoggerAdapter) -> None:  # type: ignore[type-arg]
        self.peer = peer
        self.codec: Codec = peer.codec
        self.topology = topology
        self.symmetric = symmetric
        self.pull_interval = pull_interval
        self.rng = rng
        self.log = log
        self.screen = Screen(peer.cfg.screening, peer.stats)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"codec-{peer.name}")
        # What the budget charges: this (event-loop) thread, which pulls and serves, the decode
        # worker, the compute thread's merges and republishing, libzmq's I/O thread, and the
        # helper threads of the fused loops (encode and decode, with device.threads > 1).
        loop_cpu = thread_cpu_clock(threading.get_ident())
        worker_cpu = thread_cpu_clock(self.worker.submit(threading.get_ident).result())
        unnamed_cpu = named_threads_cpu(("ZMQbg/IO", kernels.HELPER_THREADS))  # threads with no ident to ask
        compute = peer.compute
        self.budget = CpuBudget(cpu_cores, lambda: loop_cpu() + worker_cpu() + unnamed_cpu() + compute.merge_cpu)
        # Where a codec that cannot be read in place decodes the neighbour's vector (on a CPU,
        # pages that fp32, read in place, never touches). Made here, so that a GPU without room
        # for it fails at start, not at every pull. One is enough: the gap overwrites it, and the
        # next interaction starts only once the compute thread has applied that gap (Mailbox.emptied).
        self._remote_N = torch.empty(peer.compute.flat.numel, dtype=torch.float32, device=peer.compute.device)
        self._inline_gap = peer.compute.device.type == "cpu" and peer.compute.flat.numel <= INLINE_GAP_MAX
        self.pull_seconds = 0.0
        """Moving average of an interaction's duration: pull, decode, delta (see _until_due)."""
        self._codec_state: dict[str, dict[str, Any]] = {}
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._waker: asyncio.Future[bool] | None = None
        self._stuck_since: float | None = None
        """Since when every interaction failed or no alive peer was a candidate (None: merging)."""
        self._next_stuck_warning = 0.0
        self._next_budget_warning = 0.0
        self._nudges_seen = 0

    # -- loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        last = 0.0
        mailbox = self.peer.mailbox
        self.budget.start()
        while not self._stopping.is_set():
            await mailbox.emptied.wait()
            self.peer.gate.end_own()  # our last merge, if any, has been applied
            owed = self.budget.delay()
            if owed >= BUDGET_WAIT_WARN_S:
                self._note_budget_wait(owed)
            wait = max(self.pull_interval - (time.monotonic() - last), owed, self._until_due())
            self.peer.stats.exchange_cpu_s = self.budget.used
            if wait > 0:
                woken = await self._rest(wait)
                self.peer.stats.budget_wait_s = self.budget.waited
                if woken:  # the peer began settling: the pull's due time no longer holds
                    continue
            target = self.pick()
            if target is None or self.peer.store.latest() is None:
                if target is None:
                    self._note_no_merge()
                await asyncio.sleep(0.05)  # nobody to talk to yet, or nothing of ours to merge
                continue
            last = time.monotonic()
            self._idle.clear()
            try:
                if await self.interact(target):
                    self._stuck_since, self._next_stuck_warning = None, 0.0
                    took = time.monotonic() - last
                    self.peer.stats.pull_wall_s += took
                    self.pull_seconds = took if self.pull_seconds == 0 else 0.8 * self.pull_seconds + 0.2 * took
            except Rejected as exc:
                # Busy, starting, or no longer holding a version we were still reading (it
                # published several since) is not faulty.
                if exc.code not in (RejectCode.NOT_READY, RejectCode.BUSY, RejectCode.GONE):
                    self._failed(target, exc)
                    # What we knew of its snapshots may be what it refused (a plan for a chunk
                    # layout it no longer has): start afresh with it.
                    self._codec_state.pop(target.id, None)
                else:
                    self.peer.stats.pulls_failed += 1
                self.log.debug("%s refused: %s", target.name or target.id, exc)
                await asyncio.sleep(0.01)
            except OwnModelNonFinite as exc:  # the compute side raises at its next merge
                self.peer.compute.non_finite = (exc.version, exc.step)
                await self._until_published_after(exc.version)  # weights resynced (the user API), if ever
            except SwarmError as exc:
                self._failed(target, exc)
                if isinstance(exc, (CodecError, ProtocolError)):
                    self._codec_state.pop(target.id, None)
                level = logging.WARNING if isinstance(exc, (CodecError, ProtocolError)) else logging.DEBUG
                self.log.log(level, "interaction with %s failed: %s", target.name or target.id, exc)
            except Exception as exc:  # a reply no check of ours foresaw: a bug to fix, never fatal to the peer
                self.peer.stats.rejected["internal_error"] += 1
                self._failed(target, exc, "an unexpected error (see the log)")
                self.log.exception("interaction with %s failed unexpectedly (please report this)",
                                   target.name or target.id)
            finally:
                self._idle.set()

    def _failed(self, target: PeerRecord, exc: Exception, why: str = "") -> None:
        """An interaction with ``target`` failed through its fault or the network's."""
        self.peer.stats.pulls_failed += 1
        # A bad snapshot or reply is held against its address too; a refusal (draining, busy) is not.
        served_bad = isinstance(exc, (CodecError, ProtocolError)) and not isinstance(exc, Rejected)
        self.peer.table.record_failure(target.id, unreachable=isinstance(exc, TransportError), why=why or str(exc),
                                       served_bad=served_bad)
        self._note_no_merge()

    def _note_no_merge(self) -> None:
        """Called when an interaction failed or no alive peer could be picked: a peer that has
        merged with none of the alive peers it knows for STUCK_WARN_S says so, and why (it
        would otherwise train alone, counting no failure, as its neighbours stay on back-off).
        Nudges applied (symmetric mode) are merges too."""
        now = time.monotonic()
        alive = self.peer.table.alive()
        nudged = self.peer.stats.nudges_applied
        if not alive or nudged != self._nudges_seen:  # alone (nothing failed), or merging all the same
            self._stuck_since, self._nudges_seen = None, nudged
        elif self._stuck_since is None:
            self._stuck_since = now
        elif now - self._stuck_since >= STUCK_WARN_S and now >= self._next_stuck_warning:
            self._next_stuck_warning = now + STUCK_WARN_REPEAT_S
            self.log.warning("no merge for %.0fs with the %s this peer knows alive%s", now - self._stuck_since,
                             counted(len(alive), "peer"), failure_report(alive))

    def _note_budget_wait(self, owed: float) -> None:
        now = time.monotonic()
        if now < self._next_budget_warning:
            return
        self._next_budget_warning = now + STUCK_WARN_REPEAT_S
        cores = self.budget.cores
        self.log.warning(
            "merging pauses for %.0fs: the CPU this peer spent besides its training steps (merges, and answering "
            "other peers' and clients' requests) ran %.2g CPU-seconds over the exchange's budget of %.3g cores "
            "(network.exchange_cpu). Raise that budget where cores are spare; a burst of requests costs the same "
            "(many status clients, or strangers in a swarm without [security])", owed, owed * cores, cores)

    def _until_due(self) -> float:
        """Seconds to hold the next pull so that it lands about when the compute thread wants
        it. A snapshot pulled at once after the last merge waits H steps in the mailbox while
        its sender moves on; averaging with an older model than our own stale copy undoes part
        of the swarm's progress, which costs most where every step counts (SPEC 2.9 item 5)."""
        if self.peer.stats.state != "training":
            return 0.0  # settling or stopping: merge whatever comes, as soon as it comes
        return self.peer.compute.seconds_to_merge() - self.pull_seconds

    async def _rest(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if :meth:`wake` is called meanwhile; whether it was. (As
        cheap as asyncio.sleep, which it mirrors: it runs before every pull.)"""
        loop = asyncio.get_running_loop()
        self._waker = waker = loop.create_future()
        timer = loop.call_later(seconds, _resolve, waker, False)
        try:
            return await waker
        finally:
            timer.cancel()
            self._waker = None

    async def _until_published_after(self, version: int) -> None:
        """Wait until a snapshot newer than ``version`` is published, or the exchange stops."""
        while not self._stopping.is_set() and (latest := self.peer.store.latest()) is not None \
                and latest.version <= version:
            await asyncio.sleep(0.05)

    def wake(self) -> None:
        """The peer's state changed what the next pull waits for (its budget is spent: it now
        merges whatever comes, at once): a pull held back for the next merge's due time, up to
        H steps of a slow model, would otherwise sleep through the settling."""
        if self._waker is not None:
            _resolve(self._waker, True)

    async def stop(self) -> None:
        """Let the interaction in flight finish (it is bounded by timeouts), start no other."""
        self._stopping.set()
        await self._idle.wait()

    def pick(self) -> PeerRecord | None:
        table = self.peer.table
        alive = [r.id for r in table.alive()]
        allowed = self.topology.neighbours_of(self.peer.id, alive) if alive else []
        candidates = table.candidates(allowed)
        return self.rng.choice(candidates) if candidates else None

    # -- one interaction ----------------------------------------------------------------------

    async def interact(self, target: PeerRecord) -> bool:
        """One interaction with ``target``; False when none took place (a nudge admitted
        meanwhile was not applied before the deadline, or we are stopping)."""
        peer = self.peer
        own = peer.store.latest()
        deadline = time.monotonic() + peer.cfg.network.request_timeout
        while own is not None and not peer.gate.may_key_on(own):  # a nudge is on its way in (symmetric)
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            await asyncio.sleep(0.001)
            own = peer.store.latest()
        assert own is not None, "run() checks that a snapshot was published"
        peer.gate.begin_own(own.version)
        try:
            await self._interact(target, own)
        except BaseException:
            peer.gate.end_own()
            raise
        return True

    async def _interact(self, target: PeerRecord, own: Snapshot) -> None:
        peer = self.peer
        if len(self._codec_state) > 2 * len(peer.table.records) + 8:  # neighbours forgotten (churn, restarts)
            self._codec_state = {k: v for k, v in self._codec_state.items() if k in peer.table.records}
        state = self._codec_state.setdefault(target.id, {})
        sent_clock = peer.clock.value
        want = self.codec.plan(state, {"cpu_bound": self.budget.pressure > 0.5})
        reply = await peer.client.call(
            target.addr, request(MsgType.PULL, peer.id, clock=sent_clock, want=want, version=None),
            timeout=peer.client.transfer_timeout, expect=MsgType.SNAPSHOT,
        )
        if reply.sender == peer.id:  # its address answered as us: no neighbour to average with
            peer.table.forget_self_alias(target.id)
            self.log.info("%s at %s %s", target.name or target.id, target.addr, IS_ME)
            return
        self._check_codec(reply)
        check_layout(reply.body.get("layout"), peer.compute.flat.layout, "the neighbour")
        peer.clock.initiate(sent_clock, reply.body["clock"])
        received = time.monotonic()
        version = reply.body["version"]
        remote_N = self.codec.view(reply.body["meta"], reply.frames, own.values_N)  # held by `reply`
        if remote_N is None:
            remote_N = self._remote_N
            rounds, codec_stats = await self._decode(target, reply, own, state, remote_N)
        else:
            rounds, codec_stats = 1, {"bits_per_coord": 8.0 * remote_N.element_size()}
        if self._inline_gap:
            distance = self._merge_gap(own, remote_N, target.id)  # remote_N now holds the gap
        else:
            distance = await self._run(self._merge_gap, own, remote_N, target.id)
        self.codec.accepted(codec_stats)  # screened: what it learns from this pull may steer the next ones
        if self.symmetric:
            await self._nudge(target, own, version)
        stats = peer.stats
        stats.pulls_ok += 1
        stats.pull_rounds += rounds
        stats.consensus = distance if stats.pulls_ok == 1 else 0.9 * stats.consensus + 0.1 * distance
        if "bits_per_coord" in codec_stats:
            stats.bits_per_coord = codec_stats["bits_per_coord"]
        peer.table.record_success(target.id)
        peer.mailbox.put(MergeEntry(remote_N, target.id, float(reply.body["age"]), received, distance, own.version))

    async def _decode(self, target: PeerRecord, reply: Message, own: Snapshot, state: dict[str, Any],
                      out_N: Tensor) -> tuple[int, dict[str, float]]:
        """Decode into ``out_N``, pulling more of the same snapshot while the codec asks;
        returns the number of pulls and the codec's statistics."""
        version = reply.body["version"]
        result = await self._run(self.codec.decode, reply.body["meta"], reply.frames, own.values_N, out_N, state)
        rounds = 1
        while not result.complete:
            if rounds >= MAX_ROUNDS:
                raise CodecError(f"snapshot {version} still unverified after {rounds} pulls")
            reply = await self.peer.client.call(
                target.addr, request(MsgType.PULL, self.peer.id, clock=self.peer.clock.value, want=result.more,
                                     version=version),
                timeout=self.peer.client.transfer_timeout, expect=MsgType.SNAPSHOT,
            )
            self._check_codec(reply)
            result = await self._run(self.codec.decode, reply.body["meta"], reply.frames, own.values_N, out_N, state)
            rounds += 1
        return rounds, result.stats

    def _check_codec(self, reply: Message) -> None:
        if reply.body["codec"] != self.codec.name:
            raise ProtocolError("mismatch", f"neighbour uses codec {reply.body['codec']}, we use {self.codec.name}: "
                                            "every peer of a swarm must use the same codec.name (set it in the "
                                            "config they share)")

    def _merge_gap(self, own: Snapshot, remote_N: Tensor, source: str) -> float:
        """Worker thread: gap = Q(C_j) + Q(K) - 2K (pull_gap) over ``remote_N``, then one pass
        over it both to refuse non-finite (or overflowing) neighbours and to estimate the
        consensus distance: ||Q(C_j) - K|| / sqrt(2) = ||gap|| / sqrt(2) for lossless codecs
        (SPEC 4 item 12)."""
        norm = gap_over(remote_N, own.encoded.quantized, own.values_N)
        if not math.isfinite(norm) and not math.isfinite(self.screen.own_norm(own)):
            raise OwnModelNonFinite(own.version, own.step)  # ours, not the neighbour's
        self.screen.check(norm, own, remote_N, source=source)  # poisoned neighbours raise (screening.py)
        if not math.isfinite(norm):
            raise CodecError("the neighbour's snapshot holds non-finite or overflowing values")
        return norm / math.sqrt(2)

    async def _nudge(self, target: PeerRecord, own: Snapshot, used: int) -> None:
        """Symmetric mode: send our snapshot so the neighbour moves halfway too. If it refuses,
        we drop our half as well (raising), so the swarm's sum stays what it was."""
        await until_copied(own.encoded.ready)  # select may read the frames' bytes
        meta, frames = self.codec.select(own.encoded, None)
        msg = request(MsgType.NUDGE, self.peer.id, frames, used=used, codec=self.codec.name, meta=meta)
        try:
            await self.peer.client.call(target.addr, msg, timeout=self.peer.client.transfer_timeout,
                                        expect=MsgType.ACK)
        except Rejected:
            self.peer.stats.nudges_rejected += 1
            raise
        self.peer.stats.nudges_sent += 1

    async def accept_nudge(self, msg: Message, used: Snapshot) -> bool:
        """Server side of a nudge: (Q(C_i) - Q(C_j used)) / 2, counted into the inbox, all in the
        worker thread (the inbox's add is a model-sized pass, and it may wait for the compute
        thread's drain: neither belongs on the event loop). Whether the inbox took it."""
        def work() -> bool:
            decoded = torch.empty_like(used.values_N)
            result = self.codec.decode(msg.body["meta"], msg.frames, used.values_N, decoded, {})
            if not result.complete:
                raise CodecError("a nudge must carry a complete snapshot")
            delta = apply_nudge(decoded, used.encoded.quantized, out=decoded)
            # Non-finite values give a non-finite norm: refused as such (CPU<->GPU sync point).
            self.screen.check(2 * float(torch.linalg.vector_norm(delta)), used, delta, "nudge", pushed=True)
            return self.peer.inbox.add(delta, used.version)
        return await self._run(work)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)


class OwnModelNonFinite(SwarmError):
    """Our own published snapshot holds non-finite (or overflowing) values: a pull found it, and
    the neighbour is not to blame."""

    def __init__(self, version: int, step: int) -> None:
        super().__init__(f"our own snapshot of step {step} holds non-finite or overflowing values")
        self.version, self.step = version, step


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)
