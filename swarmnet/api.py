"""Join a swarm from your own training loop, the way you use a torch optimizer.

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with swarmnet.SwarmOptimizer(optimizer, model, seeds=["tcp://10.0.0.1:7000"]) as opt:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()          # the optimizer's step, then whatever merge is ready

The peer's networking half (server, exchange, membership: the same code as the daemon's) runs
on an event loop in a background thread of this process. ``step()`` never waits on the network:
it applies a neighbour's model only if the exchange already pulled and decoded one. Momentum
buffers and model buffers (BatchNorm statistics) stay local. Learning-rate schedulers attach to
the wrapped optimizer as usual.

Like a daemon, the peer writes ``run_dir/<name>/metrics.jsonl`` (every ``train.metrics_every``
steps; the loss is the mean of what ``step(closure)`` returned or :meth:`report_loss` was given
since the last row) and, on close, ``run_dir/<name>/summary.json``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import os
import random
import socket
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swarmnet.algorithms import LocalSteps, clock_rate
from swarmnet.config import SwarmConfig, build_config, dotted_key, load_config, to_dict
from swarmnet.errors import ConfigError, SwarmError
from swarmnet.log import counted
from swarmnet.peer.compute import Replica
from swarmnet.peer.metrics import MetricsWriter, progress_record
from swarmnet.peer.node import Peer, PeerIdentity
from swarmnet.peer.state import Mailbox

_IN_SWARM: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()
"""Models in a swarm through a SwarmOptimizer of this process, with the ids of the parameters
its merges write."""
"""Models wrapped by an open SwarmOptimizer: a second wrap would re-home their parameters."""
_opened = itertools.count(1)


def _default_name() -> str:
    n = next(_opened)
    return f"{socket.gethostname()}-{os.getpid()}" + (f"-{n}" if n > 1 else "")

START_TIMEOUT = 60.0
"""Seconds to bind and, with network.min_peers, to wait for the others (plus join_timeout)."""
LEAVE_NOW_S = 10.0
"""How long a close interrupted by Ctrl-C waits for the peer's tasks to close its sockets."""


class SwarmOptimizer:
    """Wraps ``optimizer`` (which steps ``model``) and makes this process one peer of a swarm.

    ``config`` is a swarm config (a TOML path or a :class:`SwarmConfig`); its ``algorithm``,
    ``codec``, ``network``, ``screening`` and ``security`` sections apply, of ``run`` ``dir`` and
    ``seed``, of ``device`` ``threads`` (counted by the exchange's automatic CPU budget; the
    model's device is the peer's), and of ``train`` only
    ``metrics_every``, ``tensorboard`` and, with ``algorithm.name = "popsgd"``, ``schedule =
    "popsgd"`` (your loop is the training; ``task`` does not apply). With the latter, PopSGD's learning rate follows
    the phase clock (SPEC 1.3): before each step every parameter group's rate is set to its rate
    when wrapped divided by ``1 + V / train.clock_scale``, so attach no other scheduler. ``listen``,
    ``seeds``, ``run_dir`` and ``settings`` (dotted keys, as ``--set`` on the command line)
    override it. ``name`` defaults to host-pid (host-pid-2, -3, ... for the next ones a process
    opens: two peers may not share a name and run directory).

    Call :meth:`close` (or use ``with``) when done: it stops the exchange, merges what was
    already acknowledged, serves the final model while others still train (at most
    ``network.linger`` seconds) and leaves. Call it where you call :meth:`step`, in the same
    thread (or in any, once that one has ended) and not during a step (its final merge writes
    the model the step updates): to stop from a signal handler or another thread, set a flag
    your training loop checks.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        config: SwarmConfig | str | os.PathLike[str] | None = None,
        listen: str | None = None,
        seeds: Iterable[str] = (),
        name: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in owned for p in model.parameters()):
            raise ValueError("the optimizer does not step any parameter of the model; build it "
                             "from model.parameters()")
        if not _trained(optimizer) & {id(p) for p in model.parameters()}:
            raise ValueError("the optimizer steps no parameter of the model that requires grad (all are frozen): "
                             "unfreeze what it trains before SwarmOptimizer(...)")
        if model in _IN_SWARM:
            raise ValueError("this model is already in a swarm through another SwarmOptimizer; "
                             "close() that one first")
        written = set().union(*_IN_SWARM.values())
        if shared := _trained(optimizer) & {id(p) for p in model.parameters()} & written:
            raise ValueError(f"this model shares {counted(len(shared), 'parameter')} with a model already in a swarm "
                             "through another SwarmOptimizer: merges of both would write them; give each peer a "
                             "model of its own, or close() the other first")
        self.optimizer = optimizer
        self.model = model
        self.cfg = _resolve_config(config, listen=listen, seeds=[seeds] if isinstance(seeds, str) else list(seeds),
                                   run_dir=run_dir,
                                   settings=settings)
        self.name = name or _default_name()
        self.peer = Peer(self.cfg, PeerIdentity(self.name, 0), resume=False,  # no task: no shard to rank
                         device=next(model.parameters()).device)
        try:  # until the background loop runs, a failure here must give the directory back
            algo = self.cfg.algorithm
            self._loop = _new_event_loop()
            self.replica = _UserReplica(
                optimizer, model, codec=self.peer.codec, store=self.peer.store, mailbox=Mailbox(self._loop),
                stats=self.peer.stats, rng=random.Random(zlib.crc32(self.peer.id.encode())),
                local_steps=LocalSteps(algo.local_steps, algo.geometric),  # popsgd: 1 (config.py)
            )
            self.replica.publish()
            self._clocked_lrs = ([float(g["lr"]) for g in optimizer.param_groups]
                                 if algo.name == "popsgd" and self.cfg.train.schedule == "popsgd" else None)
            """PopSGD's base rates per parameter group, when the phase clock drives them."""
            self.peer.attach(self.replica, self.replica.mailbox)
            self.metrics = MetricsWriter(self.peer.peer_dir / "metrics.jsonl", tensorboard=self.cfg.train.tensorboard,
                                         stats=self.peer.stats)
        except BaseException:
            self.peer.release_dir()
            raise
        self._began = time.monotonic()
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._last_row_step = 0
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"swarmnet-{self.name}",
                                        daemon=True)
        self._thread.start()
        self._started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._drained: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop = asyncio.Event()
        self._merged = asyncio.Event()
        self._hosting = asyncio.run_coroutine_threadsafe(self._host(), self._loop)
        self._closed = False
        self._averaged = _trained(optimizer)
        self._told_averaged_set = False
        self._error: SwarmError | None = None
        """The error that failed a step, for the summary."""
        self._exit_reason = ""
        """Why the ``with`` block ended early (an exception in it), for the summary."""
        self._summarized = False
        self._stepper: threading.Thread | None = None
        """The thread that steps: close() from another is refused while it runs."""
        """The thread that calls step(), from its first call: the one close() must be called in."""
        self._stepping = False
        try:
            concurrent.futures.wait([self._started, self._hosting], START_TIMEOUT + self.cfg.network.join_timeout,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        except BaseException:  # Ctrl-C while waiting for the swarm: no object is left to close
            self._abandon_start()
            raise
        if not self._started.done():
            error = self._hosting.exception() if self._hosting.done() else None
            self._abandon_start()
            if isinstance(error, SwarmError):
                raise error
            raise SwarmError(f"peer {self.name} did not start: {error or 'timed out'}") from error
        self.peer.stats.state = "training"
        _IN_SWARM[model] = self._averaged

    def _abandon_start(self) -> None:
        """Undo a start that did not complete: cancel the peer's tasks and wait until they have
        unwound (its sockets closed, its port free again), then stop the loop and its thread."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(5)
        self.metrics.close()
        self._shutdown_loop()
        self.peer.release_dir()

    async def _host(self) -> None:
        """Background loop: serve, pull and gossip until close(), then leave cleanly."""
        async with self.peer.serving():
            await self.peer.await_swarm()
            self.peer.start_exchange()
            self._started.set_result(self.peer.address)
            await self._stop.wait()
            await self.peer.drain()
            self._drained.set_result(None)
            await self._merged.wait()
            await self.peer.finish()

    # -- the optimizer interface ---------------------------------------------------------------

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """The wrapped optimizer's step, then the merges that are ready (never waits)."""
        if self._closed:
            raise SwarmError("step() after close(): this peer has left the swarm")
        self._stepper = self._stepper or threading.current_thread()
        self._stepping = True
        try:
            return self._step(closure)
        finally:
            self._stepping = False

    def _step(self, closure: Callable[[], float] | None) -> Any:
        if self.replica.flat.moved():
            raise SwarmError(self._MOVED)
        device = self.replica.device
        if device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
            raise SwarmError("step() under a CUDA stream of your own: the exchange's threads read the model "
                             "on the default stream, unordered with yours; call step() outside "
                             "torch.cuda.stream(...)")
        self.peer.stats.clock = clock = self.peer.clock.value
        if self._clocked_lrs is not None:
            for group, base in zip(self.optimizer.param_groups, self._clocked_lrs):
                group["lr"] = clock_rate(base, self.cfg.train.clock_scale, clock)
        if closure is None:
            self.replica.torn_by = "the optimizer's update"  # until the step is counted
            result = self.optimizer.step()
        else:
            result = self.optimizer.step(self._marking_writes(closure))
        self.replica.after_step()
        self.replica.torn_by = None
        if result is not None:
            self.report_loss(result)
        try:
            self.replica.merge_pending()
        except SwarmError as exc:  # e.g. a model gone non-finite: its snapshot cannot be published
            self._error = exc
            raise
        if self.replica.step % self.cfg.train.metrics_every == 0:
            self._write_metrics()
            self._check_averaged_set()
            if self.replica.flat.moved(all_of_them=True):
                raise SwarmError(self._MOVED)
        return result

    def _marking_writes(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure`` for the optimizer: it runs the user's forward and backward before any
        update (each time, for optimizers that call it more than once), so the model counts as
        being written only once it has returned."""
        def closure_then_update() -> Any:
            loss = closure()
            self.replica.torn_by = "the optimizer's update"
            return loss
        return closure_then_update

    _MOVED = ("the model's parameters were moved or converted after it joined the swarm (model.to, .cuda(), "
              ".double(), ...): they no longer live where merges and snapshots read them; move or convert the "
              "model before SwarmOptimizer(...)")

    def resync(self) -> None:
        """Call after replacing the model's weights yourself while it is in the swarm (a
        checkpoint loaded after wrapping, weights copied in): publishes them as they are. Without
        it the next merge would take the change for training progress and overshoot by half of
        it. :meth:`load_state_dict` does it too. Between steps, in the training thread."""
        with self._on_default_stream():
            self.replica.resync()

    @contextlib.contextmanager
    def _on_default_stream(self) -> Any:
        """Run replica work that the exchange's threads will read (they use the device's default
        stream) on that stream, after whatever the caller's own CUDA stream has queued and before
        what it queues next; a no-op on a CPU or on the default stream. step() refuses a stream
        of the user's instead: what it merges is what the user's optimizer step just wrote."""
        device = self.replica.device
        if device.type != "cuda" or torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
            yield
            return
        current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
        default.wait_stream(current)
        try:
            with torch.cuda.stream(default):
                yield
        finally:
            current.wait_stream(default)

    def _check_averaged_set(self) -> None:
        """The parameters merges average were fixed when the model was wrapped: say so, once,
        when the optimizer has come to train others (unfrozen, or a parameter group added)."""
        if self._told_averaged_set or not _trained(self.optimizer) - self._averaged:
            return
        self._told_averaged_set = True
        self.peer.log.warning(
            "the optimizer now trains parameters it did not train when the model joined the swarm: they are not "
            "averaged (parameters unfrozen or added later train alone on each peer); wrap the model once every "
            "parameter it will train is trainable")

    def report_loss(self, loss: torch.Tensor | float) -> None:
        """Count a training loss into the next metrics row (``step(closure)`` does it for you)."""
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:  # summed in, it would fail at a later step
            raise ValueError(f"report_loss() takes one value, the batch's loss; got a tensor of shape "
                             f"{tuple(loss.shape)}: reduce it first (e.g. loss.mean())")
        value = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)
        self._loss_sum = self._loss_sum + value
        self._loss_count += 1

    def _write_metrics(self) -> None:
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None  # CPU<->GPU sync point
        self._loss_sum, self._loss_count = 0.0, 0
        if loss is not None:
            self.peer.stats.loss = loss
        self.replica.count_cpu()
        self.metrics.write(progress_record(self.peer.stats, elapsed=time.monotonic() - self._began, loss=loss))
        self._last_row_step = self.replica.step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, plus (under ``"swarmnet"``) this peer's phase clock, its
        step count and PopSGD's base rates: the clock drives PopSGD's rate, and the inner
        optimizer's saved ``lr`` is already the decayed one."""
        state = self.optimizer.state_dict()
        state["swarmnet"] = {"clock": self.peer.clock.value, "step": self.replica.step, "base_lrs": self._clocked_lrs}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (a plain optimizer state dict also loads). Load
        through this wrapper, not into the inner optimizer before wrapping it: that would make
        PopSGD's decayed rate its new base rate. Load the model's weights first (or call
        :meth:`resync` after them): this publishes the model as it is then."""
        state = dict(state)
        swarm = state.pop("swarmnet", None)
        self.optimizer.load_state_dict(state)
        if swarm is not None:
            self.peer.clock.restore(int(swarm["clock"]))
            self.replica.step = self.peer.stats.step = int(swarm["step"])
            if swarm.get("base_lrs") is not None and self._clocked_lrs is not None:
                self._clocked_lrs = [float(lr) for lr in swarm["base_lrs"]]
        self.resync()  # a resume: the model's weights were most likely loaded with it

    # -- the swarm -----------------------------------------------------------------------------

    @property
    def clock(self) -> int:
        """This peer's phase clock V: its count of the swarm's interactions (SPEC 1.2)."""
        return self.peer.clock.value

    @property
    def address(self) -> str:
        """Where this peer listens: give it to others as a seed."""
        return self.peer.address

    def status(self) -> dict[str, Any]:
        """The same status a ``swarmnet status`` query returns (steps, merges, peers, bytes)."""
        if self._closed:
            raise SwarmError("status() after close(): this peer has left the swarm; its summary.json says how it ended")
        return self._call(_status_of(self.peer))

    def close(self) -> None:
        """Leave the swarm: stop pulling, merge what was acknowledged, linger, say goodbye. In the
        thread that calls :meth:`step` (or any, once that one has ended), between steps (see the
        class's doc)."""
        if self._closed:
            return
        if self._stepping:
            raise SwarmError("close() during step() (from a signal handler?): the final merge would write the "
                             "model while the step updates it; set a flag in the handler and call close() from "
                             "your training loop")
        if self._stepper is not None and threading.current_thread() is not self._stepper and self._stepper.is_alive():
            raise SwarmError("close() from another thread than the one calling step(): the final merge would "
                             "write the model while a step may update it; have the training loop call close() "
                             "(e.g. when a threading.Event you set is set)")
        self._closed = True
        try:
            self._leave()
        except BaseException as exc:  # Ctrl-C (again) while leaving, or a failure: leave at once, then let it through
            self._leave_now("interrupted while leaving" if isinstance(exc, KeyboardInterrupt) else f"error: {exc!r}")
            raise
        finally:
            self.metrics.close()
            _IN_SWARM.pop(self.model, None)
            self._shutdown_loop()
            self.peer.release_dir()

    def _leave(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        concurrent.futures.wait([self._drained, self._hosting], return_when=concurrent.futures.FIRST_COMPLETED)
        if self._drained.done():
            reason = f"error: {self._error}" if self._error else self._exit_reason or "closed"
            try:
                if self.replica.torn_by is not None:  # the error that ended the block came midway through it
                    self.peer.log.warning(
                        "leaving without publishing the model: it may hold part of %s; do not save it or train "
                        "it on, reload your last checkpoint",
                        self.replica.torn_by)
                else:
                    with self._on_default_stream():
                        self.replica.merge_pending(final=True)  # here, in the training thread
                if self.replica.step != self._last_row_step:
                    self._write_metrics()
            except SwarmError as exc:  # e.g. a model gone non-finite, which step() has raised already
                reason = f"error: {exc}"
            except BaseException:  # Ctrl-C during the final merge: it did not complete
                reason = "interrupted while leaving"
                raise
            finally:
                self._summarize(reason)
                self._loop.call_soon_threadsafe(self._merged.set)  # the peer says goodbye either way
        self._hosting.result()

    def _leave_now(self, reason: str) -> None:
        """Skip every grace period, as a second Ctrl-C does to a daemon, and wait (bounded) for
        the peer to close its sockets: its port must be free when this returns. ``reason``: for
        the summary, unless it is written already."""
        self._loop.call_soon_threadsafe(functools.partial(self.peer.request_stop, at_once=True))
        self._loop.call_soon_threadsafe(self._stop.set)
        self._loop.call_soon_threadsafe(self._merged.set)
        self._summarize(reason)
        done, _ = concurrent.futures.wait([self._hosting], timeout=LEAVE_NOW_S)
        if not done:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), self._loop).result(5)

    def _summarize(self, reason: str) -> None:
        if not self._summarized:
            self._summarized = True
            self.peer.write_summary(reason, time.monotonic() - self._began, steps=self.replica.step,
                                    total_steps=None, evaluation={})

    def __enter__(self) -> SwarmOptimizer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None and not self._closed:  # an error or Ctrl-C in the block: leave without lingering
            self._exit_reason = ("interrupted" if issubclass(exc_type, KeyboardInterrupt)
                                 else f"error: {exc_type.__name__}: {exc}")
            self._loop.call_soon_threadsafe(self.peer.request_stop)
        self.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def _shutdown_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        if not self._loop.is_running():
            self._loop.close()


class _UserReplica(Replica):
    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, **kwargs: Any) -> None:
        """Only what the optimizer trains is averaged: a frozen backbone (or any parameter the
        optimizer does not step) stays as it is, untouched by quantized merges and never sent."""
        self.optimizer = optimizer
        trained = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        super().__init__(model, averaged=trained, **kwargs)

    def current_lr(self) -> float:
        """Read at each publish (a tensor lr on a GPU makes this a CPU<->GPU sync point)."""
        self.stats.lr = float(self.optimizer.param_groups[0].get("lr", 0.0))
        return self.stats.lr


def _trained(optimizer: torch.optim.Optimizer) -> set[int]:
    """The ids of the parameters ``optimizer`` trains now (those with requires_grad)."""
    return {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _status_of(peer: Peer) -> dict[str, Any]:
    return peer.status()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


TRAIN_KEYS_APPLIED = {"metrics_every", "tensorboard", "schedule", "clock_scale"}
"""The [train] keys a SwarmOptimizer follows: the user's loop does the rest of the training."""


RUN_KEYS_IGNORED = {"run.peers", "run.init", "run.stopped_exit_code"}
"""The [run] keys of a daemon's training and exit that a SwarmOptimizer has no use for."""


def _ignored(key: str) -> str:
    """Why SwarmOptimizer ignores the config key ``key`` (section.key), or "" where it applies."""
    section, _, name = key.partition(".")
    if key == "device.device":
        return "the model's device is the peer's"
    if key in RUN_KEYS_IGNORED:
        return "your own process trains the model and decides when it ends (of [run] only dir and seed apply)"
    if (section == "task" or (section == "train" and name.split(".")[0] not in TRAIN_KEYS_APPLIED)
            or key == "network.adopt_model"):
        return (f"your own loop trains the model (of [train] only {', '.join(sorted(TRAIN_KEYS_APPLIED))} "
                "apply; see its docstring)")
    return ""


def _resolve_config(config: SwarmConfig | str | os.PathLike[str] | None, *, listen: str | None,
                    seeds: list[str], run_dir: str | os.PathLike[str] | None,
                    settings: Mapping[str, Any] | None) -> SwarmConfig:
    overrides: dict[str, Any] = {}
    if listen:
        overrides["network.listen"] = listen
    if seeds:
        overrides["network.seeds"] = seeds
    if run_dir is not None:
        overrides["run.dir"] = str(run_dir)
    for key, value in (settings or {}).items():
        if not dotted_key(key):
            raise ConfigError(f"setting {key!r}: expected section.key, e.g. network.pull_interval "
                              "(an entry of a table: codec.options.block)")
        if why := _ignored(key):
            warnings.warn(f"setting {key!r} does not apply to SwarmOptimizer: {why}", stacklevel=3)
        overrides[key] = value
    if isinstance(config, SwarmConfig):
        return build_config(to_dict(config), "<SwarmConfig>", overrides)
    return load_config(Path(config) if config is not None else None, overrides)
