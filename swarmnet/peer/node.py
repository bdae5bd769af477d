"""The peer daemon: one process, one device, one event loop; composes the services.

    compute thread  -- train steps, merges between steps, publishes snapshots
    server          -- answers pulls, nudges, gossip, status (event loop)
    exchange        -- pulls random neighbours, decodes in a worker thread (event loop)
    membership      -- heartbeats and peer-list gossip (event loop)

The networking half (:meth:`Peer.attach`, :meth:`Peer.serving`, :meth:`Peer.drain`,
:meth:`Peer.finish`) also hosts a user's own training loop (swarmnet.api).

Shutdown order (budget reached, SIGINT or SIGTERM): the compute thread finishes its step; after
a spent budget, while neighbours still train, the peer keeps merging their snapshots without
stepping (at most ``linger`` seconds: a peer that finished first must not keep a model the
others have moved away from); it refuses new nudges; the interaction in flight completes; the
compute thread merges what was acknowledged, evaluates and writes its final checkpoint; the peer
keeps serving its final snapshot while others finish (within the same ``linger``), says goodbye,
closes its sockets with linger 0. A second signal skips the grace steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import random
import secrets
import socket
import time
import zlib
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import torch

from swarmnet import __version__, jsonsafe
from swarmnet.algorithms import PhaseClock, parse_topology
from swarmnet.codecs import make_codec
from swarmnet.config import SwarmConfig, check_device, check_peer_name, is_wildcard, to_dict
from swarmnet.errors import ConfigError, ModelDiverged, SwarmError, unwritable_run_dir
from swarmnet.log import PeerLogAdapter, get_logger
from swarmnet.peer import checkpoint
from swarmnet.peer.budget import auto_cores, peer_share
from swarmnet.peer.claim import DirectoryClaim
from swarmnet.peer.client import PeerClient
from swarmnet.peer.compute import ComputeLoop, Replica, peer_seed_of
from swarmnet.peer.data import shard_count
from swarmnet.peer.earlier import set_aside_earlier_files
from swarmnet.peer.exchange import Exchange, warm_up_loops
from swarmnet.peer.membership import MembershipService, PeerTable, failure_report
from swarmnet.peer.newcomer import fetch_donation
from swarmnet.peer.server import PeerServer
from swarmnet.peer.state import Mailbox, MergeGate, SnapshotStore
from swarmnet.peer.stats import PeerStats
from swarmnet.security import (
    dial_target,
    exposure_warning,
    is_loopback,
    peer_keys,
    split_address,
    url_host,
    with_key,
)
from swarmnet.tasks import load_task, what_failed
from swarmnet.transport import TransportSet
from swarmnet.wire import CARD_BYTES, Limits, MsgType, fit_cards, request

T = TypeVar("T")

REPLY_HEADER_SLACK = 1024
"""Bytes of a snapshot reply's header besides the codec's meta (type, ids, version, clock, age,
frame sizes), with room to spare."""
FINISHED = ("settling", "draining", "done")
"""States of a peer that no longer steps (its budget spent, or stopped): its card says ``done``."""
FINISHED_WELL = ("budget", "stopped")
"""Why a run may end well, its final checkpoint and summary written: exit status 0 (or, stopped
before its budget, run.stopped_exit_code)."""

RANK_VARIABLES = ("SWARMNET_RANK", "RANK", "SLURM_PROCID", "LOCAL_RANK")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    name: str
    """Names the peer's directory <run.dir>/<name>: one path component, so it cannot escape."""
    rank: int | None
    """Its index in the swarm (train.shard = "partition"); None where none was given."""

    def __post_init__(self) -> None:
        check_peer_name(self.name)


def resolve_device(spec: str) -> torch.device:
    """``auto``: the GPU given by the local rank when CUDA is present, else the CPU."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        check_device(spec)
        return torch.device(spec)
    if torch.cuda.is_available():
        local = next((int(os.environ[v]) for v in LOCAL_RANK_VARIABLES if os.environ.get(v, "").isdigit()), 0)
        return torch.device(f"cuda:{local % torch.cuda.device_count()}")
    return torch.device("cpu")


def interface_ipv4(name: str) -> str:
    """IPv4 address of a network interface (Linux), or a ConfigError naming the ones that exist."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"network.interface {name!r} has no IPv4 address (it may be down, or hold IPv6 "
                                  "ones only); give the address to advertise instead: --advertise "
                                  "tcp://ADDRESS:PORT (tcp://[IPv6]:PORT for an IPv6 one)") from None
            known = ", ".join(n for _, n in socket.if_nameindex())
            raise ConfigError(f"network.interface {name!r}: {exc.strerror or exc}; interfaces here: {known}") from None
    return socket.inet_ntoa(packed[20:24])


def with_interface_host(address: str, interface: str) -> str:
    """``tcp://0.0.0.0:7000`` + interface eth0 -> ``tcp://<eth0's IPv4>:7000``."""
    scheme, sep, rest = address.partition("://")
    host, colon, port = rest.rpartition(":")
    if not (sep and colon and port.isdigit()):
        raise ConfigError(f"network.interface only applies to host:port addresses, not {address!r}")
    return f"{scheme}://{interface_ipv4(interface)}:{port}"


def loopback_warning(address: str, seeds: list[str]) -> str | None:
    """A warning when this peer advertises a loopback ``address`` while a tcp seed is not one:
    peers of another host would get its card and could never dial it."""
    if not address.startswith("tcp://") or not is_loopback(url_host(split_address(address)[0])):
        return None
    remote = next((s for s in seeds if s.startswith("tcp://") and not is_loopback(url_host(split_address(s)[0]))),
                  None)
    if remote is None:
        return None
    return (f"this peer advertises {address}, a loopback address, while its seed {remote} is not one: if that "
            "seed is another host, its peers can never pull from this one (it reaches them, they never it); "
            "listen where they can dial it: --listen tcp://0.0.0.0:PORT with --advertise tcp://THIS_HOST:PORT "
            "or --interface NAME")


def resolve_rank(explicit: int) -> int | None:
    """``explicit`` (``--rank``, a manifest's rank) when >= 0, else the first rank variable
    set (RANK_VARIABLES), else None."""
    if explicit >= 0:
        return explicit
    return next((int(os.environ[v]) for v in RANK_VARIABLES if os.environ.get(v, "").isdigit()), None)


class Peer:
    def __init__(self, cfg: SwarmConfig, identity: PeerIdentity, *, resume: bool = True,
                 set_aside_earlier: bool = False, device: torch.device | None = None) -> None:
        """``set_aside_earlier``: move an earlier run's files out of the peer's folder first
        (`swarmnet peer --fresh`; the user API keeps appending to its metrics, as before).
        ``device``: the device of a model the caller holds (the user API), in place of
        ``device.device``."""
        self.cfg = cfg
        self.name = identity.name
        if identity.rank is None and cfg.train.shard == "partition" and shard_count(cfg.run.peers) > 1:
            raise ConfigError(
                f"train.shard = 'partition' trains each peer on the shard of its rank, and peer {identity.name} "
                f"was given none: pass --rank N (0 to {cfg.run.peers - 1}), set rank in its manifest, or set one "
                f"of {', '.join(RANK_VARIABLES)} (without, every such peer would train on shard 0)")
        if (identity.rank is not None and identity.rank >= cfg.run.peers and cfg.train.shard == "partition"
                and shard_count(cfg.run.peers) > 1):
            raise ConfigError(
                f"peer {identity.name} has rank {identity.rank}, but run.peers = {cfg.run.peers}: train.shard = "
                f"'partition' shares the data among ranks 0 to {cfg.run.peers - 1}, and this rank would train on the "
                f"shard of rank {identity.rank % cfg.run.peers}; set run.peers to the swarm's size in every peer's "
                "config, or use train.shard = 'random'")
        if cfg.network.interface and not cfg.network.advertise:  # refused before the run directory is touched
            with_interface_host(cfg.network.listen, cfg.network.interface)
        self.rank = identity.rank or 0
        self.id = f"{identity.name}-{secrets.token_hex(3)}"
        self.log = PeerLogAdapter(get_logger("peer"), {"peer": self.name})
        self.peer_dir = Path(cfg.run.dir) / self.name
        try:
            self.peer_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise unwritable_run_dir(self.peer_dir, exc) from None
        self.resume = resume
        self.device = device if device is not None else resolve_device(cfg.device.device)
        self.stats = PeerStats()
        self.clock = PhaseClock()
        self.gate = MergeGate()
        self.codec = make_codec(cfg.codec.name, **cfg.codec.options)
        self.store = SnapshotStore(history=8 if self.codec.partial_reads else 1)
        net = cfg.network
        self.curve = peer_keys(cfg.security, on_refused=self._count_refused,
                               on_broken_handshake=self._count_broken_handshake)
        self.transports = TransportSet(self.curve, slowest_rate=net.min_transfer_rate)
        self.table = PeerTable(self.id, dead_after=net.dead_after, backoff=net.failure_backoff)
        self.rng = random.Random(zlib.crc32(self.id.encode()))
        self.address = ""
        self.started = time.time()
        self._stopping = asyncio.Event()
        """A stop was requested: waits that may take long end on it (a newcomer's adoption)."""
        self._forced = asyncio.Event()
        """A second stop request: skip every grace period, including one already being waited."""
        self._exchange_task: asyncio.Task[None] | None = None
        self.started_with: frozenset[str] | None = None
        """Ids of the peers alive in the table when this one met its start condition: the swarm
        it started with (a newcomer among them does not adopt this peer's model, newcomer.py)."""
        self.claim = DirectoryClaim(self.peer_dir, self.log)
        """Held until the peer has stopped (:meth:`release_dir`): one live peer per directory."""
        if set_aside_earlier:
            try:
                set_aside_earlier_files(self.peer_dir, self.log)
            except BaseException:
                self.release_dir()  # a caller that fixes the cause may start it again in this process
                raise
        # An earlier run's card would pass for this one's. Its summary goes once this run has
        # taken over (:meth:`_forget_earlier_summary`): a restart refused (a checkpoint that does
        # not fit the model) must leave the earlier run's result where it was.
        with contextlib.suppress(OSError):
            (self.peer_dir / "card.json").unlink(missing_ok=True)
        if not resume:  # nothing to accept first: the user API, or a --fresh start
            self._forget_earlier_summary()

    def _forget_earlier_summary(self) -> None:
        """Remove an earlier run's summary.json: it would pass for this run's result."""
        with contextlib.suppress(OSError):
            (self.peer_dir / "summary.json").unlink(missing_ok=True)

    def release_dir(self) -> None:
        """Give up this peer's directory to a later peer of the same name (in this process too)."""
        self.claim.release()

    def _count_refused(self, client_key: bytes) -> None:
        """A handshake refused by the ZAP handler (its thread): counted under rejected."""
        self.stats.rejected["unauthenticated"] += 1

    def _count_broken_handshake(self) -> None:
        """A handshake that failed before the key check (no CURVE, or not our key)."""
        self.stats.rejected["handshake"] += 1

    # -- identity and status ------------------------------------------------------------------

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "addr": self.address, "hb": self.membership.heartbeat, "name": self.name,
                "done": self.stats.state in FINISHED}

    def status(self, asker: str | None = None) -> dict[str, Any]:
        """What a status request gets; ``started_with_you`` (whether ``asker`` was in the swarm
        this peer started with) once this peer has started."""
        together = {} if asker is None or self.started_with is None else {
            "started_with_you": asker in self.started_with}
        return {
            "id": self.id, "name": self.name, "addr": self.address, "host": socket.gethostname(),
            "pid": os.getpid(), "device": str(self.device), "algorithm": self.cfg.algorithm.name,
            "codec": self.codec.name, "version": __version__, "uptime": time.time() - self.started,
            **self.stats.as_dict(),
            "peers": fit_cards([{**r.card(), "alive": self.table.is_alive(r), "failures": r.failures}
                                for r in list(self.table.records.values())[:256]], limit=256),
            "events": [list(e) for e in self.table.events[-20:]],
            **together,
        }

    def request_stop(self, *, at_once: bool = False) -> None:
        """Signal handler: first call stops gracefully, the second skips the grace steps.
        ``at_once``: skip them from the first (the user API leaving after an error)."""
        if at_once:
            self._forced.set()
        elif self._stopping.is_set():
            self._forced.set()
            self.log.warning("second stop request: skipping the grace period")
        self._stopping.set()
        if isinstance(getattr(self, "compute", None), ComputeLoop):
            self.compute.stop.set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until the budget is spent or a stop is requested; returns the exit status."""
        try:
            return await self._run()
        finally:
            self.release_dir()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        torch.set_num_threads(self.cfg.device.threads)
        task = load_task(self.cfg.task.spec, self.cfg.task.options)
        mailbox = Mailbox(loop)
        compute = ComputeLoop(
            cfg=self.cfg, task=task, device=self.device, codec=self.codec, store=self.store,
            mailbox=mailbox, clock=self.clock, stats=self.stats, peer_dir=self.peer_dir,
            rank=self.rank, peer_seed=peer_seed_of(self.cfg, self.name), log=self.log,
        )
        self.attach(compute, mailbox)
        if self._stopping.is_set():
            compute.stop.set()
        resumed = self.resume and compute.resume()
        self._forget_earlier_summary()  # its checkpoint accepted, or none: this run takes over
        net = self.cfg.network
        adopting = not resumed and net.adopt_model and net.exchange and self.cfg.run.init == "shared"
        if not adopting:
            compute.publish()  # neighbours can pull from us from the first moment on
        compute_thread = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{self.name}")
        started = time.monotonic()
        reason = "error"
        try:
            async with self.serving():
                try:
                    await self.await_swarm()
                    if adopting:
                        await self._adopt_model(compute, compute_thread)
                        self._check_snapshot_fits()
                    self.start_exchange()
                    reason = await loop.run_in_executor(compute_thread, compute.run)
                    linger_until = time.monotonic() + self.cfg.network.linger
                    if reason == "budget":
                        reason = await self._settle(compute, compute_thread, linger_until)
                    await self.drain()
                    evaluate = True
                    try:
                        unsaved = await loop.run_in_executor(compute_thread, compute.finalize)
                    except Exception as exc:  # a device left unusable by the error that ended the run
                        self.log.error("stopping failed: %s; no final checkpoint was written", what_failed(exc),
                                       exc_info=exc)
                        unsaved = f"stopping failed: {what_failed(exc)}"
                        evaluate = False
                        if not reason.startswith("error"):  # the first error is the one to tell
                            reason = f"error: {unsaved}"
                    if unsaved and reason in FINISHED_WELL:  # a script must not take the model for saved
                        reason = f"final checkpoint not written: {unsaved}"

                    def summarize() -> bool:
                        return self.write_summary(reason, time.monotonic() - started, steps=compute.step,
                                                  total_steps=compute.plan.total_steps, evaluation=compute.last_eval)
                    # Once before the final evaluation, which can take long (a large test set): a
                    # scheduler's kill during it (Slurm's KillWait) still finds a summary. A second
                    # stop request skips the evaluation.
                    summarized = summarize()
                    evaluate = evaluate and not self._forced.is_set()
                    await loop.run_in_executor(compute_thread, functools.partial(compute.close, evaluate=evaluate))
                    if evaluate and summarized:
                        summarized = summarize()
                    if not summarized and reason in FINISHED_WELL:
                        reason = "summary not written"
                    self.log.info("finished (%s) at step %d after %d interactions", reason, compute.step,
                                  self.stats.interactions)
                    if self.membership.seeds and not self.membership.joined.is_set():
                        errors = self.membership.seed_errors
                        why = "".join(f"; {seed}: {errors[seed]}" for seed in self.membership.seeds if seed in errors)
                        self.log.warning("trained alone: no other peer was ever reached (seeds: %s)%s",
                                         ", ".join(self.membership.seeds),
                                         why or "; check --seed and that a peer is listening there")
                    elif self.cfg.network.seeds and not self.membership.joined.is_set() and self.cfg.run.peers > 1:
                        self.log.warning("trained alone: no other peer ever reached this one, whose only seeds "
                                         "are its own address (%s): it waited for others to seed from it",
                                         self.address)
                    elif (self.cfg.network.exchange and not self.stats.interactions + self.stats.nudges_applied
                          and (why := failure_report(self.table.records.values()))):
                        self.log.warning("trained alone: merged with none of the peers it knew%s", why)
                    await self.finish(linger_until)
                finally:
                    compute.stop.set()  # whatever ended the loop, the compute thread must not outlive it
        finally:
            # Its stop is set: it ends with its current step or write. Waited for, so that the
            # directory's claim is given back only once nothing of this peer writes there.
            compute_thread.shutdown(wait=True)
        if reason == "stopped":  # before its budget: a scheduler may have to start it again
            return self.cfg.run.stopped_exit_code
        return 0 if reason in FINISHED_WELL else 1

    def attach(self, replica: Replica, mailbox: Mailbox) -> None:
        """The model this peer serves and merges into: the daemon's compute loop, or a user's
        own training loop (swarmnet.api). Must precede :meth:`serving`."""
        self.compute = replica
        self.mailbox = mailbox
        self.inbox = replica.inbox
        self.device = replica.device
        net, n = self.cfg.network, replica.flat.numel
        self.limits = Limits(max_header_bytes=net.max_header_bytes, max_frame_bytes=net.frame_limit(n))
        self.client = PeerClient(sender=self.id, transports=self.transports, limits=self.limits,
                                 timeout=net.request_timeout, transfer_timeout=net.transfer_timeout(n),
                                 stats=self.stats, max_frame_bytes=self.limits.max_frame_bytes)
        warm_up_loops(self.codec, replica.live_N)

    def _check_seeds(self) -> None:
        """A seed this peer's keys can never dial is a mistake in the config, not a seed to retry
        for the whole run (file:// seeds are read later, their addresses checked as they come)."""
        for seed in self.cfg.network.seeds:
            if not seed.startswith("file://"):
                try:
                    dial_target(seed, self.curve)
                except ConfigError as exc:
                    raise ConfigError(f"seed {exc}") from None

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Bind the listener, then run the server and membership around the body; the body
        starts the exchange (:meth:`start_exchange`) once the model it merges into is set."""
        net = self.cfg.network
        self._check_snapshot_fits()
        self._check_seeds()
        try:
            listener = await self.transports.for_url(net.listen).listen(net.listen, max_frame_bytes=self.limits.max_frame_bytes)
            bound, _ = split_address(listener.address)
            exposed = exposure_warning(bound, secured=self.curve is not None)  # the port bound, where port 0 was asked
            if exposed:
                self.log.warning("%s", exposed)
            self.address = net.advertise or (with_interface_host(bound, net.interface) if net.interface else bound)
            if self.curve is not None and self.curve.per_peer:
                self.address = with_key(self.address, self.curve.public)
            self.table.self_addr = self.address
            if is_wildcard(self.address):
                raise ConfigError(f"listening on {listener.address}: set network.advertise (--advertise) to the "
                                  "address other peers should dial, or network.interface (--interface) to "
                                  "advertise an interface's address")
            if warning := loopback_warning(self.address, net.seeds):
                self.log.warning("%s", warning)
            self.membership = MembershipService(
                table=self.table, client=self.client, card=self.card,
                seeds=[s for s in net.seeds if s != self.address],
                interval=net.gossip_interval, rng=self.rng, log=self.log,
                card_bytes=min(CARD_BYTES, net.max_header_bytes // 2),
            )
            cores, how = net.exchange_cpu, ""
            if cores < 0:  # auto; how it was reached, for a user starting peers by hand who may have to give the count
                share, counted_as = peer_share()
                cores, how = auto_cores(self.device, self.cfg.device.threads, share), f", auto from {counted_as}"
            self.stats.exchange_cpu = cores
            self.exchange = Exchange(self, topology=parse_topology(self.cfg.algorithm.topology, self.cfg.run.seed),
                                     symmetric=self.cfg.algorithm.symmetric, pull_interval=net.pull_interval,
                                     cpu_cores=cores, rng=self.rng, log=self.log)
            server = PeerServer(self, listener, self.limits, net.max_concurrent_requests, self.log)
            self._write_card()
            self.log.info("listening on %s (device %s, %d parameters, %s, codec %s, exchange CPU budget %s%s)",
                          self.address, self.device, self.compute.flat.numel, self.cfg.algorithm.name,
                          self.codec.name, f"{cores:.2f} cores" if cores > 0 else "unlimited", how)
            async with asyncio.TaskGroup() as tg:
                services = [tg.create_task(server.run(), name="server"),
                            tg.create_task(self.membership.run(), name="membership"),
                            tg.create_task(self._check_own_address(), name="own address")]
                self._services = tg
                try:
                    yield
                finally:
                    for task in (*services, self._exchange_task):
                        if task is not None:
                            task.cancel()
        finally:
            if hasattr(self, "exchange"):
                self.exchange.close()
            await self.client.aclose()
            await self.transports.aclose()

    async def _check_own_address(self) -> None:
        """Ask this peer's advertised address once: another peer answering there means an
        --advertise copied from its manifest (others would take that peer for this one, and
        this one drops the seed it shares with it as its own). Not in allow-list mode: there our
        address carries our own key, which only this peer can answer to, and our list need not
        hold it."""
        if self.curve is not None and self.curve.per_peer:
            return
        try:
            reply = await self.client.call(self.address, request(MsgType.STATUS, self.id), expect=MsgType.STATUS_REPLY)
        except SwarmError:
            return  # not reachable from here (a NAT, a firewall): nothing learnt
        except Exception:  # a diagnosis only: never fatal to the peer
            self.log.debug("could not ask this peer's own address", exc_info=True)
            return
        if reply.sender != self.id:
            other = reply.body["status"].get("name") or reply.sender
            self.log.error("this peer advertises %s, but peer %s answers there: its --advertise (network.advertise) "
                           "must be an address of this peer's own host and port; no other peer can reach this one",
                           self.address, other)

    def start_exchange(self) -> None:
        """Start pulling neighbours (inside :meth:`serving`). Not earlier than the start
        condition and a newcomer's adoption: a merge computed against the model from before
        the adoption would undo it. Nor once a stop is requested: its first pull would hold the
        stop for as long as the drain waits for the interaction in flight."""
        if self.cfg.network.exchange and self._exchange_task is None and not self._stopping.is_set():
            self._exchange_task = self._services.create_task(self.exchange.run(), name="exchange")

    def _check_snapshot_fits(self) -> None:
        """Readers refuse a reply whose header exceeds network.max_header_bytes before unpacking
        it, and libzmq drops a sender whose frame exceeds network.max_message_bytes: a snapshot
        over either limit would have every pull of ours fail. Say so at start. A codec's meta
        alone can come near the header limit (a lattice chunk far shorter than the model needs:
        about 15 bytes per chunk); where newcomers adopt a model, its lossless form is sent too.
        (A lattice snapshot can grow later, up to 6 bytes a coordinate at its finest step: the
        server warns if one outgrows the limit, PeerServer.handle_pull.)"""
        latest = self.store.latest()
        if latest is None:
            return
        size = len(msgpack.packb(latest.encoded.meta, use_bin_type=True)) + REPLY_HEADER_SLACK
        limit = self.limits.max_header_bytes
        if size > limit:
            chunks = len(latest.encoded.meta.get("bf", ()))
            fix = f"set a longer codec.options.chunk ({chunks} chunks now) or " if chunks else ""
            raise ConfigError(
                f"codec {self.codec.name}: a snapshot reply's header takes about {size} bytes, over "
                f"network.max_header_bytes = {limit}: {fix}raise network.max_header_bytes on every peer")
        frame, what = latest.encoded.nbytes, f"this model's {self.codec.name} snapshots take {latest.encoded.nbytes} bytes"
        if self.cfg.network.adopt_model and 4 * latest.values_N.numel() > frame:
            frame = 4 * latest.values_N.numel()
            what = f"a newcomer's lossless pull of this model (network.adopt_model) takes a {frame}-byte frame"
        if frame > self.limits.max_frame_bytes:
            raise ConfigError(
                f"network.max_message_bytes = {self.limits.max_frame_bytes}: {what}, which every peer would "
                f"refuse; set it to 0 (auto, room for any snapshot of the model) or to at least {frame} on every peer")

    async def _adopt_model(self, compute: ComputeLoop, compute_thread: ThreadPoolExecutor) -> None:
        """A newcomer starts from a trained neighbour's model when there is one (newcomer.py).
        Only then does it publish: until the choice is made, pulls get NOT_READY, so nobody
        averages with a fresh initialization that is about to be replaced."""
        if self.membership.seeds and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(5.0, self.cfg.network.join_timeout)):
                    await self.membership.joined.wait()
        donation = await self._unless_stopped(
            fetch_donation(self.client, self.table, self.rng, compute.flat.numel, compute.flat.layout, self.log))
        if donation is None:
            await asyncio.get_running_loop().run_in_executor(compute_thread, compute.publish)
            return
        await asyncio.get_running_loop().run_in_executor(compute_thread, compute.adopt, donation.values_N,
                                                         donation.clock, donation.step)
        self.stats.adopted_from, self.stats.adopted_step = donation.donor, donation.step
        self.log.info("adopted the model of %s (step %d, clock %d) in %.2fs", donation.donor, donation.step,
                      donation.clock, donation.seconds)

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result, or None once a stop is requested first (``work`` is cancelled):
        a newcomer's adoption may take minutes (several pulls of a large model, each bounded by
        transfer_timeout) where a stop must end the peer within seconds."""
        if self._stopping.is_set():
            work.close()
            return None
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            self.log.info("stop requested while looking for a model to adopt: not adopting")
            return None
        return task.result()

    async def drain(self) -> None:
        """Stop interacting: refuse new nudges, let the interaction in flight complete (bounded),
        start no other. The compute side then merges what was acknowledged."""
        self.stats.state = "draining"
        self.inbox.close()
        # The interaction in flight: its pulls and, in symmetric mode, the nudge, each bounded;
        # a second stop request ends the wait (a scheduler's kill may be close behind it).
        stopped = asyncio.ensure_future(self.exchange.stop())
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait((stopped, forced), timeout=self.cfg.network.request_timeout
                               + 2 * self.client.transfer_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            forced.cancel()
        if self._exchange_task is not None:
            self._exchange_task.cancel()

    async def _settle(self, compute: ComputeLoop, compute_thread: ThreadPoolExecutor, until: float) -> str:
        """Budget spent: merge what the exchange pulls, without stepping, while neighbours still
        train (until ``until``). Peers finish at different times (a faster one, or one that
        merged less often); without this the first to finish would keep a model the others
        have moved away from, and the swarm would end apart. Returns "budget", or "diverged"
        when the model turned out non-finite."""
        self.stats.state = "settling"
        self.exchange.wake()
        loop = asyncio.get_running_loop()
        merge_now = functools.partial(compute.merge_pending, final=True)
        while not self._peers_finished(until):
            try:
                await loop.run_in_executor(compute_thread, merge_now)
            except ModelDiverged as exc:
                compute.diverge(str(exc))
                return "diverged"
            await asyncio.sleep(0.02)
        return "budget"

    async def finish(self, linger_until: float | None = None) -> None:
        """After the final merge: serve the final snapshot while others still train (until
        ``linger_until``, by default ``linger`` seconds from now), then say goodbye."""
        self.stats.state = "done"
        until = time.monotonic() + self.cfg.network.linger if linger_until is None else linger_until
        while not self._peers_finished(until):
            await asyncio.sleep(0.05)
        await self._say_goodbye()

    async def await_swarm(self) -> None:
        """Start condition (not a barrier): wait to know ``min_peers`` others, bounded in time."""
        want, net = self.cfg.network.min_peers, self.cfg.network
        deadline = time.monotonic() + net.join_timeout
        if len(self.table.alive()) < want:
            self.log.info("waiting until %d other peer(s) are known (network.min_peers), for up to %.0fs, before the first step",
                          want, net.join_timeout)
        while len(self.table.alive()) < want and not self._stopping.is_set():
            if time.monotonic() > deadline:
                self.log.warning("only %d of %d peers known after %.0fs; training anyway",
                                 len(self.table.alive()), want, net.join_timeout)
                break
            await asyncio.sleep(0.02)
        self.started_with = frozenset(r.id for r in self.table.alive())
        self.membership.starting = False

    def _peers_finished(self, until: float) -> bool:
        """Whether to stop waiting on the others: all live peers finished, ``until`` passed, or
        a stop was requested."""
        if self._stopping.is_set() or time.monotonic() >= until:
            return True
        return all(r.done for r in self.table.alive())

    async def _say_goodbye(self) -> None:
        bye = [self.client.call(r.addr, request(MsgType.BYE, self.id), timeout=0.5, expect=MsgType.ACK)
               for r in self.table.alive()]
        if bye and not self._forced.is_set():
            await asyncio.gather(*bye, return_exceptions=True)
        else:
            for coro in bye:
                coro.close()

    def _write_card(self) -> None:
        """Peer card for launchers and tools: where this peer listens (owner-only permissions)."""
        card = {"id": self.id, "name": self.name, "addr": self.address, "pid": os.getpid(),
                "device": str(self.device), "version": __version__}
        path = self.peer_dir / "card.json"
        try:
            checkpoint.write_atomic(path, json.dumps(card).encode())  # owner-only, as mkstemp makes it
        except OSError as exc:
            raise unwritable_run_dir(path, exc) from None

    def write_summary(self, reason: str, elapsed: float, *, steps: int, total_steps: int | None,
                      evaluation: dict[str, float]) -> bool:
        """run_dir/<peer>/summary.json: how this peer's run ended (what `swarmnet up` collects);
        whether it was written."""
        s = self.stats
        summary = {
            "name": self.name, "id": self.id, "addr": self.address, "device": str(self.device),
            "reason": reason, "elapsed_s": elapsed, "steps": steps,
            "total_steps": total_steps, "interactions": s.interactions,
            "nudges_applied": s.nudges_applied, "nudges_refused": s.nudges_refused,
            "nudges_rejected": s.nudges_rejected, "pulls_ok": s.pulls_ok, "pull_rounds": s.pull_rounds,
            "pulls_failed": s.pulls_failed,
            "bytes_sent": s.bytes_out, "bytes_received": s.bytes_in, "final_loss": s.loss,
            "eval": evaluation, "clock": self.clock.value, "staleness_s": s.staleness_s,
            "consensus": s.consensus, "exchange_cpu": s.exchange_cpu, "budget_wait_s": s.budget_wait_s,
            "rejected": dict(s.rejected), "checkpoint_errors": s.checkpoint_errors,
            "metrics_errors": s.metrics_errors,
            "adopted_from": s.adopted_from, "adopted_step": s.adopted_step,
            "config": to_dict(self.cfg),
        }
        if reason == "diverged" and (why := getattr(self.compute, "why_diverged", "")):
            summary["error"] = why  # "diverged" says no more; `up` prints it under its table
        path = self.peer_dir / "summary.json"
        try:
            checkpoint.write_atomic(path, jsonsafe.dumps(summary, indent=2, default=str).encode())
        except OSError as exc:
            self.log.error("could not write %s (%s): this run's results are in the log only; free space or fix "
                           "permissions", path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)  # an earlier run's would pass for this one's
            return False
        return True


async def run_peer(cfg: SwarmConfig, identity: PeerIdentity, *, resume: bool = True,
                   install_signals: bool = True) -> int:
    import signal

    try:
        peer = Peer(cfg, identity, resume=resume, set_aside_earlier=not resume)
    except ConfigError as exc:
        get_logger("peer").error("%s", exc)
        return 2
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, peer.request_stop)
    try:
        return await peer.run()
    except SwarmError as exc:
        peer.log.error("%s", exc)
        return 2
    except BaseExceptionGroup as group:  # raised inside serving()'s task group
        errors, others = group.split(SwarmError)
        if others is not None or errors is None:
            raise
        for exc in _leaves(errors):
            peer.log.error("%s", exc)
        return 2


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:  # type: ignore[type-arg]
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def run_event_loop(coro: Any) -> Any:
    """uvloop where installed, asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)

