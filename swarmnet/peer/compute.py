"""The compute side of a peer: merges between steps and publishing (:class:`Replica`), and the
daemon's training loop over a task (:class:`ComputeLoop`).

Runs in one thread and never waits on the network: it only polls the mailbox and the nudge
inbox between steps (SPEC 2.9). Legend: N = number of float parameter coordinates.

    live_N   W: the model the optimizer steps (the parameters are views into it)
    stale_N  X^: the communication copy as of the last own merge; what gets published

SwarmSGD: after at least H local steps and once the mailbox holds a pulled neighbour, the live
model takes the delta the exchange computed, ``W += (Q(C_j) + Q(K)) / 2 - K`` with K the own
snapshot used as key; then X^ <- W and a new snapshot is published. PopSGD is the same cycle
with H = 1 and the phase-clock learning rate (SPEC 1.2, 2.4); symmetric merges are optional.

A peer whose merge is due but whom no neighbour's model reaches (alone, its neighbours gone or
slow, the exchange off) refreshes instead: X^ <- W and a new snapshot, what a merge with itself
would give, at most every REFRESH_MIN_S seconds. Without it, its snapshot would stay the model of
its last merge, or the untrained one of its start: a newcomer adopting from it, or the first
neighbour merging with it, would take that old model for its current one.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import re
import statistics
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from swarmnet.algorithms import LocalSteps, PhaseClock, Schedule, apply_pull, compress_epochs
from swarmnet.codecs import Codec
from swarmnet.codecs.published import published
from swarmnet.config import MAX_STEPS, SwarmConfig, TrainConfig
from swarmnet.errors import ConfigError, ModelDiverged, NonFiniteInput
from swarmnet.peer import checkpoint
from swarmnet.peer.data import ShardSampler, batch_shortfall
from swarmnet.peer.metrics import MetricsWriter, progress_record
from swarmnet.peer.state import FlatParameters, Mailbox, MergeEntry, NudgeInbox, SnapshotStore
from swarmnet.peer.stats import PeerStats
from swarmnet.tasks import BadTaskResult, Task, build_seeded, defined_at, seed_all, what_failed

REFRESH_MIN_S = 1.0
"""Seconds between two refreshes of a peer no neighbour's model reaches (see the module's doc)."""
REFRESH_MAX_SHARE = 0.02
"""Where publishing is slow (a large model, a lossy codec), refreshes are further apart: at least
the last publish's time over this share, so refreshing takes at most this share of training."""
SLOWDOWN_WINDOW = 15
"""train.slowdown pads each step by the median duration of this many recent training steps."""


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    total_steps: int
    steps_per_epoch: int
    schedule: Schedule


def plan_training(train: TrainConfig, peers: int, num_samples: int) -> TrainingPlan:
    """Budget and schedule in local steps from a config (SPEC 1.4 / 2.7 epoch multiplier)."""
    steps_per_epoch = math.ceil(num_samples / train.batch_size)
    milestones = tuple(train.milestones)
    total: float = train.steps
    if train.epochs:
        total = train.epochs * steps_per_epoch
    elif train.sequential_epochs:
        epochs, milestones = compress_epochs(train.sequential_epochs, milestones, train.multiplier, peers)
        total = epochs * steps_per_epoch
    if total > MAX_STEPS:  # inf included
        budget = "epochs" if train.epochs else "sequential_epochs (times multiplier / peers)"
        raise ConfigError(f"train.{budget} comes to {total:.3g} steps of {steps_per_epoch} per epoch, past the "
                          f"largest budget ({MAX_STEPS} steps); give fewer epochs")
    total = math.ceil(total)
    schedule = Schedule(
        kind=train.schedule,
        lr=train.lr,
        clock_scale=train.clock_scale,
        milestones=tuple(round(m * steps_per_epoch) for m in milestones),
        gamma=train.gamma,
        total_steps=total,
        final_ratio=train.final_lr_ratio,
        warmup_steps=round(train.warmup_epochs * steps_per_epoch),
    )
    return TrainingPlan(total, steps_per_epoch, schedule)


def unreached_milestones(train: TrainConfig, plan: TrainingPlan) -> str | None:
    """Why a multistep rate never decays, if a milestone lies at or past the budget: typically
    a recipe's milestones, in sequential epochs, read as the peer's own epochs once ``--epochs``
    or ``--steps`` replaced the file's ``sequential_epochs``."""
    if train.schedule != "multistep":
        return None
    late = [m for m, at in zip(train.milestones, plan.schedule.milestones) if at >= plan.total_steps]
    if not late:
        return None
    unit = "the recipe's epochs" if train.sequential_epochs else "this peer's own epochs"
    named = ", ".join(f"{m:g}" for m in late)
    return (f"train.milestones [{named}] ({unit}) fall at or past the budget of {plan.total_steps} steps "
            f"({plan.total_steps / plan.steps_per_epoch:.4g} epochs): the rate never decays. Milestones count the "
            "peer's own epochs unless the budget is train.sequential_epochs (which --epochs and --steps replace); "
            "set train.milestones for this budget")


def make_optimizer(train: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The local optimizer of train.optimizer (the learning rate is set before every step)."""
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=(train.betas[0], train.betas[1]), eps=train.eps,
                                 weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                           nesterov=train.nesterov and train.momentum > 0)


def init_seed(cfg: SwarmConfig, peer_seed: int) -> int:
    """Seed of the initial model: the run seed (identical on every peer, SPEC 4 item 6) or,
    with ``run.init = "independent"``, the peer's own seed."""
    return cfg.run.seed if cfg.run.init == "shared" else peer_seed


def peer_seed_of(cfg: SwarmConfig, name: str) -> int:
    """Per-peer seed for data order and sampling: stable across restarts of the same peer."""
    return zlib.crc32(f"{cfg.run.seed}:{name}".encode())


def global_rngs() -> dict[str, Any]:
    """The states of Python's ``random`` and ``numpy.random`` in what a checkpoint may hold
    (tensors, numbers, containers: it is loaded with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"random": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss]}


def set_global_rngs(states: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    random.setstate(tuple(s if not isinstance(s, list) else tuple(s) for s in states["random"]))
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def model_mismatch(saved: dict[str, Any], model: nn.Module, most: int = 2) -> str | None:
    """How a checkpoint's ``saved`` state_dict differs from ``model``'s in words, the first
    ``most`` differences by name with both shapes; None where they match. torch's own message
    lists every differing tensor, which a large model's runs into thousands of characters."""
    own = model.state_dict()
    parts = []
    for name, tensor in own.items():
        theirs = saved.get(name)
        if isinstance(theirs, Tensor) and theirs.shape != tensor.shape:
            parts.append(f"{name} is {tuple(theirs.shape)} in the checkpoint, {tuple(tensor.shape)} in this model")
    sized = len(parts)
    missing = [name for name in own if name not in saved]
    extra = [name for name in saved if name not in own]
    if missing:
        parts.append(f"{missing[0]} is missing from the checkpoint"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        parts.append(f"the checkpoint holds {extra[0]}, which this model has not"
                     + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if not parts:
        return None
    more = sized - min(sized, most)
    shown = parts[:min(sized, most)] + parts[sized:]
    return "; ".join(shown) + (f" (and {more} more tensors of other shapes)" if more else "")


def shortened(text: str, limit: int = 300) -> str:
    """``text`` on one line, cut at a word's end past ``limit`` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


class Replica:
    """The merge side of one model: its parameters laid over ``live_N``, the communication copy
    ``stale_N``, the nudge inbox, publishing and merges between steps. Whoever steps the model
    (the compute loop below, or a user's own loop through :mod:`swarmnet.api`) calls
    :meth:`after_step` after each optimizer step and :meth:`merge_pending` between steps; the
    optimizer's state (momentum buffers) and the model's buffers (BatchNorm statistics) are never
    touched, so they stay local and survive every merge (SPEC 4 item 2)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        codec: Codec,
        store: SnapshotStore,
        mailbox: Mailbox,
        stats: PeerStats,
        local_steps: LocalSteps,
        rng: random.Random,
        averaged: Iterable[nn.Parameter] | None = None,
    ) -> None:
        """``averaged``: the parameters that take part in merges (all of the model's when None)."""
        self.model = model
        self.codec = codec
        self.store = store
        self.mailbox = mailbox
        self.stats = stats
        self.flat = FlatParameters(model, averaged)
        self.device = self.flat.vector_N.device
        self.live_N = self.flat.vector_N
        self.stale_N = self.live_N.clone()
        self.inbox = NudgeInbox()
        self.local_steps = local_steps
        self.rng = rng
        self.step = 0
        self.since_merge = 0
        self._progress_N: Tensor | None = None
        self.target_h = self.local_steps.sample(self.rng)
        self._staleness_sum = 0.0
        self.merge_cpu = 0.0
        """CPU seconds this thread spent merging and republishing (the exchange's budget reads it)."""
        self.step_seconds = 0.0
        """Moving average of the time from one step's end to the next (merges and pauses included)."""
        self._step_ended: float | None = None
        self._published_at = 0.0
        self._synced_at = 0.0
        """When a published snapshot last carried the live model's own steps (a merge, a refresh):
        a neighbour's nudge alone republishes the stale copy, which has none of them."""
        self._publish_seconds = 0.0
        self._keys_from = 0
        """Merges whose gap was measured from an older snapshot of ours are dropped (:meth:`resync`)."""
        self.torn_by: str | None = None
        """Set while a write to the model is under way that an error could leave half done (the
        optimizer's update, a merge): after such an error the model is neither published nor
        checkpointed again."""
        self.non_finite: tuple[int, int] | None = None
        """(version, step) of a published snapshot of ours that the exchange found non-finite (a
        lossless codec publishes such values; its neighbours refuse them): the next merge raises,
        unless :meth:`resync` has published weights since."""

    def current_lr(self) -> float:
        """The learning rate in force, a hint for codecs that follow it."""
        return 0.0

    def publish(self, progress_N: Tensor | None = None, progress_steps: int = 0, *, synced: bool = True) -> None:
        """Encode the communication copy once; the server hands it to any number of readers.
        ``progress_N``: what our own ``progress_steps`` steps moved, for codecs that follow it.
        ``synced``: the copy is the live model (False: only neighbours' nudges were added to it)."""
        began = time.monotonic()
        hints: dict[str, Any] = {"lr": self.current_lr(), "local_steps": self.local_steps.mean}
        if progress_N is not None:
            hints.update(progress=progress_N, progress_steps=progress_steps)
        try:
            encoded = self.codec.encode(self.stale_N, hints)
        except NonFiniteInput as exc:  # lossy codecs refuse non-finite values; fp32 publishes them (neighbours screen)
            raise ModelDiverged(self.step, f"the model cannot be published ({exc})") from None
        values = (encoded.quantized if self.codec.lossless
                  else published(self.stale_N.numel(), torch.float32, self.device).copy_(self.stale_N))
        self.store.publish(values, encoded, self.step, self.inbox.drained)
        self._published_at = time.monotonic()
        if synced:
            self._synced_at = self._published_at
        self._publish_seconds = self._published_at - began

    def count_cpu(self) -> None:
        """From the training thread: its CPU time outside merges, into the stats."""
        self.stats.compute_cpu_s = time.thread_time() - self.merge_cpu

    def seconds_to_merge(self) -> float:
        """About how long until this replica will want a neighbour's model (0: it wants one now)."""
        return max(0, self.target_h - self.since_merge) * self.step_seconds

    def after_step(self) -> None:
        now = time.monotonic()
        if self._step_ended is not None:
            gap = now - self._step_ended
            if self.step_seconds:  # an evaluation or checkpoint between two steps is not the pace
                gap = min(gap, 4 * self.step_seconds)
            self.step_seconds = 0.8 * self.step_seconds + 0.2 * gap if self.step_seconds else gap
        self._step_ended = now
        self.step += 1
        self.since_merge += 1
        self.stats.step = self.step

    def _progress(self) -> Tensor | None:
        """live - stale before a merge: what the ``since_merge`` training steps moved, alone (the
        stale copy was the live model at the last merge, and nudges land on both)."""
        if not self.codec.uses_progress or self.since_merge == 0:
            return None
        if self._progress_N is None:
            self._progress_N = torch.empty_like(self.live_N)
        return torch.sub(self.live_N, self.stale_N, out=self._progress_N)

    def merge_pending(self, *, final: bool = False) -> None:
        """Between steps: neighbours' nudges, then our own merge when H steps are done.

        The thread's CPU clock is read only when there is work: reading it is a system call,
        and a thread that several peers' threads share a core with tends to be switched out
        there, holding the GIL (profiled at about a third of a small model's training thread
        when it was read after every step)."""
        if self.non_finite is not None and self.non_finite[0] >= self._keys_from:
            raise ModelDiverged(self.non_finite[1], "the model holds non-finite or overflowing values (its "
                                "snapshot, which the exchange measured against a neighbour's)")
        entry = self.mailbox.take() if final or self.since_merge >= self.target_h else None
        if entry is not None and entry.key_version < self._keys_from:  # measured from weights since replaced
            self.mailbox.release()
            entry = None
        if entry is None and not self.inbox.pending:
            if self._refresh_due(final):
                self.refresh()
            return
        began = time.thread_time()
        try:
            self.torn_by = "a merge"
            nudged = self.inbox.drain_into(self.live_N, self.stale_N)
            self.stats.nudges_applied += nudged
            if entry is not None or nudged:
                progress, steps = self._progress(), self.since_merge
                synced = entry is not None or self._refresh_due(final)  # nudged, and a refresh is due
                if entry is not None:
                    self.apply(entry)
                if synced:
                    self.stale_N.copy_(self.live_N)
                    self.since_merge = 0
                self.torn_by = None  # publishing copies the model, it does not write it
                self.publish(progress, steps, synced=synced)
            self.torn_by = None
        finally:
            if entry is not None:
                self.mailbox.release()  # the exchange's next pull keys on what we just published
        self.merge_cpu += time.thread_time() - began

    def _refresh_due(self, final: bool) -> bool:
        """Nothing to merge: whether to refresh the snapshot anyway. ``final``: no more steps
        come, so the last ones are published at once."""
        if self.since_merge == 0 or not (final or self.since_merge >= self.target_h):
            return False  # nothing new since the last publish, or a merge may still come in time
        wait = max(REFRESH_MIN_S, self._publish_seconds / REFRESH_MAX_SHARE)
        return final or time.monotonic() - self._synced_at >= wait

    def refresh(self) -> None:
        """Publish the live model without a merge: X^ <- W, what a merge with itself gives."""
        began = time.thread_time()
        progress, steps = self._progress(), self.since_merge
        self.stale_N.copy_(self.live_N)
        self.since_merge = 0
        self.publish(progress, steps)
        self.merge_cpu += time.thread_time() - began

    def resync(self) -> None:
        """The model's weights were replaced between steps, not by them (a checkpoint loaded into
        a model already in the swarm): publish them as they are. Without it the next merge would
        take the change for local progress, W + (C_j - K) / 2 with K the old weights, and
        overshoot by half of it; a merge already pulled against the old weights is dropped, and so
        are neighbours' nudges waiting to be applied (symmetric mode), measured from them too, and
        one still being decoded is refused (its sender drops its half)."""
        began = time.thread_time()
        self.torn_by = None  # whatever a failed write left, the weights are whole again
        self.non_finite = None
        self.inbox.restart_at(self.store.next_version)  # the version publish() gives below
        self.stale_N.copy_(self.live_N)
        self.since_merge = 0
        self.publish()
        latest = self.store.latest()
        assert latest is not None
        self._keys_from = latest.version
        entry = self.mailbox.take()
        if entry is not None:
            self.mailbox.release()
        self.merge_cpu += time.thread_time() - began

    def apply(self, entry: MergeEntry) -> None:
        began = time.perf_counter()
        apply_pull(self.live_N, entry.gap_N)
        self.stats.apply_wall_s += time.perf_counter() - began
        self.stats.interactions += 1
        self._staleness_sum += entry.age + (time.monotonic() - entry.received)
        self.stats.staleness_s = self._staleness_sum / self.stats.interactions
        self.since_merge = 0
        self.target_h = self.local_steps.sample(self.rng)


class ComputeLoop(Replica):
    """The daemon's own training loop over a task: sampler, SGD recipe, metrics, checkpoints."""

    def __init__(
        self,
        *,
        cfg: SwarmConfig,
        task: Task,
        device: torch.device,
        codec: Codec,
        store: SnapshotStore,
        mailbox: Mailbox,
        clock: PhaseClock,
        stats: PeerStats,
        peer_dir: Path,
        rank: int,
        peer_seed: int,
        log: logging.LoggerAdapter,  # type: ignore[type-arg]
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.clock = clock
        self.log = log
        self.peer_dir = peer_dir
        self.checkpoint_path = peer_dir / "checkpoint.pt"
        self.stop = threading.Event()
        algo = cfg.algorithm
        # torch, random and numpy.random alike: a build_model drawing from any of them gives the
        # same model on every peer, however and wherever each was started.
        model = build_seeded(task, init_seed(cfg, peer_seed)).to(device)
        try:
            super().__init__(
                model, codec=codec, store=store, mailbox=mailbox, stats=stats,
                local_steps=LocalSteps(algo.local_steps, algo.geometric),  # popsgd: 1 (config.py)
                rng=random.Random(peer_seed),
            )
        except ValueError as exc:  # FlatParameters: nothing to train, or not float32
            raise ConfigError(f"task {cfg.task.spec!r}: {exc}; fix the task's build_model") from None
        # What the task draws while training (dropout, augmentation) from torch's, random's or
        # numpy's generator differs from peer to peer: seeded as the model was, every peer drew
        # the same crops. Nothing is restored: the task's own code is what draws next.
        seed_all(zlib.crc32(f"{peer_seed}:training".encode()))  # not the stream that drew the model
        train = cfg.train
        self.optimizer = make_optimizer(train, self.model.parameters())
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        """The dtype of mixed precision, None in fp32."""
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        """Dynamic loss scaling for fp16 (disabled otherwise): fp16 gradients underflow without it."""
        self.plan = plan_training(train, cfg.run.peers, task.num_samples)
        if (late := unreached_milestones(train, self.plan)) is not None:
            log.warning("%s", late)
        self.sampler = ShardSampler(
            task.num_samples, train.batch_size, shard=train.shard, rank=rank, peers=cfg.run.peers,
            seed=cfg.run.seed, peer_seed=peer_seed,
        )
        if (short := batch_shortfall(train.batch_size, task.num_samples, train.shard, cfg.run.peers)) is not None:
            log.warning("%s", short)
        self.train_data = tuple(t.to(device) for t in task.train)
        self.metrics = MetricsWriter(peer_dir / "metrics.jsonl", tensorboard=train.tensorboard, stats=self.stats)
        self._loss_sum = torch.zeros((), device=device)
        self._loss_overflows = torch.zeros((), dtype=torch.int64, device=device)
        """fp16: steps of the window whose loss overflowed (the scaler skipped them)."""
        self._loss_count = 0
        self._last_checkpoint = time.monotonic()
        self._saved_step: int | None = None
        """The step of the checkpoint on disk, once one was written or resumed from."""
        self._train_step_seconds: deque[float] = deque(maxlen=SLOWDOWN_WINDOW)
        """The last training steps' own durations, without padding or merges (train.slowdown pads
        by their median; step_seconds is the pace, from one step's end to the next's)."""
        self.last_eval: dict[str, float] = {}
        self._metric_missing_said = False
        self.diverged = False
        """The model went non-finite (or its loss did): its final checkpoint is not written."""
        self.why_diverged = ""
        """What :meth:`diverge` was first told: the peer's summary carries it."""
        self.started = time.monotonic()
        stats.total_steps = self.plan.total_steps

    # -- state --------------------------------------------------------------------------------

    def resume(self) -> bool:
        """Continue from this peer's checkpoint if there is one (model, optimizer, clock, data)."""
        if not self.checkpoint_path.exists():
            return False
        path = self.checkpoint_path
        fix = ("start with --fresh (under swarmnet up: without --no-fresh), or use another --run-dir, "
               "or the config the run was made with")
        try:
            state = checkpoint.load(path)
        except pickle.UnpicklingError as exc:  # torch's text would suggest weights_only=False
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = (f"it holds a {found[1]} object, and loading objects other than tensors and plain data "
                    "could run code" if found else "not a torch checkpoint file")
            raise ConfigError(f"{path} cannot be read as a checkpoint ({what}); {fix}") from None
        except Exception as exc:  # unpickling garbage raises nearly anything
            raise ConfigError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: "
                              f"{shortened(str(exc))}); {fix}") from None
        task = state.get("task") if isinstance(state, dict) else None
        if task is not None and task != self.cfg.task.spec:
            raise ConfigError(f"{path} was made for task {task}, this config trains {self.cfg.task.spec}; {fix}")
        if isinstance(state, dict) and (bad := checkpoint.non_finite(self._must_be_finite(state))):
            raise ConfigError(f"{path} holds non-finite values in {bad} (a damaged file, or a diverged run's); "
                              f"restore a good copy, or {fix}")
        if isinstance(state, dict) and isinstance(state.get("model"), dict) and \
                (unlike := model_mismatch(state["model"], self.model)) is not None:
            saved_options = state.get("task_options")
            options = dict(self.cfg.task.options)
            changed = (f"; the checkpoint was made with task.options {saved_options}, this config has {options}"
                       if isinstance(saved_options, dict) and saved_options != options else "")
            raise ConfigError(f"{path} does not fit this peer's model: {unlike}{changed}; {fix}")
        try:
            self.model.load_state_dict(state["model"])  # copies into the flat views in place
            # The momentum buffers come from the checkpoint, the recipe (momentum, weight decay)
            # from this config: torch's load would put back the recipe the run was saved with.
            recipe = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            saved_with = state.get("optimizer_name", "sgd")  # checkpoints before train.optimizer: SGD's
            if saved_with == self.cfg.train.optimizer:
                self.optimizer.load_state_dict(state["optimizer"])
            else:  # torch would load another optimizer's state without a word, and fail at the first step
                self.log.warning("the checkpoint's optimizer state is %s's; this config's %s starts its own afresh "
                                 "(the model, clock and place in the data go on)", saved_with, self.cfg.train.optimizer)
            for group, own in zip(self.optimizer.param_groups, recipe, strict=True):
                group.update(own)
            self.stale_N.copy_(state["stale"])
            self.step = int(state["step"])
            self.clock.restore(int(state["clock"]))
            scale = self.sampler.load_state_dict(state["sampler"])
            if scale != 1.0:
                # Saved with another batch size or data set: a step is another share of an epoch
                # now, so the budget and the schedule go on from the same share of the run.
                self.log.info("the checkpoint's %d steps were taken with other epochs (batch size or data set "
                              "changed): they count as %d of this config's", self.step, round(self.step * scale))
                self.step = round(self.step * scale)
            self.rng.setstate(state["rng"])
            if state.get("scaler") and self.scaler.is_enabled():  # fp16 before: its loss scale goes on
                self.scaler.load_state_dict(state["scaler"])
            if state.get("torch_rng") is not None:  # checkpoints before it had none
                torch.set_rng_state(state["torch_rng"])
            if state.get("global_rngs") is not None:  # nor these
                set_global_rngs(state["global_rngs"])
            if state.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        except Exception as exc:
            raise ConfigError(f"{path} does not fit this peer's model or settings ({type(exc).__name__}: "
                              f"{shortened(str(exc))}); {fix}") from None
        self._saved_step = self.step
        self.log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        self._warn_past_budget("the checkpoint", "or --fresh to start over")
        return True

    def adopt(self, values_N: torch.Tensor, clock: int, step: int) -> None:
        """Before the first step: take a neighbour's model, clock and place in the schedule (a
        newcomer, newcomer.py). Joining at the donor's step keeps the newcomer's learning rate
        where the swarm's is (a newcomer restarting a decayed schedule would pull the swarm up
        again) and ends it with the others instead of training on alone."""
        self.live_N.copy_(values_N)  # host->device copy when the model lives on a GPU
        self.stale_N.copy_(self.live_N)
        self.clock.restore(clock)
        self.step = step  # not capped at the budget: the checkpoint keeps the model's place in the schedule
        self.sampler.seek(self.step)  # partition mode: the shard of the donor's epoch, not of epoch 0
        self.stats.step = self.step
        self.publish()
        self._warn_past_budget("the adopted model", "or network.adopt_model = false to train from this peer's "
                               "own initialization")

    def _warn_past_budget(self, what: str, other_way: str) -> None:
        if self.step >= self.plan.total_steps:
            self.log.warning("%s is at step %d, the budget is %d steps: this run takes no step (it only merges "
                             "while it lingers); give a larger budget (--steps, --epochs) to train on, %s", what,
                             self.step, self.plan.total_steps, other_way)

    def _must_be_finite(self, state: dict[str, Any]) -> dict[str, Any]:
        """The parts of a checkpoint's state a NaN in would carry into the model at the next step:
        the parameters (not buffers: a mask may hold -inf), the optimizer's state (momentum),
        the stale copy."""
        model = state.get("model")
        parameters = {name for name, _ in self.model.named_parameters()}
        return {"model": {k: v for k, v in model.items() if k in parameters} if isinstance(model, dict) else model,
                "optimizer": state.get("optimizer"), "stale": state.get("stale")}

    def save_checkpoint(self, *, final: bool = False) -> str | None:
        """Write the checkpoint, unless the state is no longer finite: the last good one stays
        (a diverged peer restarted with a lower learning rate resumes from it). What kept it
        from being written, None when it was; ``final``: the peer stops after this one."""
        self._last_checkpoint = time.monotonic()
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stale": self.stale_N,
            "step": self.step,
            "clock": self.clock.value,
            "sampler": self.sampler.state_dict(),
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "global_rngs": global_rngs(),  # what the task draws from random and numpy.random (augmentation)
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "task": self.cfg.task.spec,
            "task_options": dict(self.cfg.task.options),  # named when a restart's model does not fit
            "optimizer_name": self.cfg.train.optimizer,
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if (bad := checkpoint.non_finite(self._must_be_finite(state))) is not None:
            # Refused on purpose, not a failed write: checkpoint_errors counts those (a disk to look at).
            self.log.error("%s holds non-finite values at step %d: checkpoint not written, %s", bad, self.step,
                           self._kept())
            return f"{bad} holds non-finite values"
        try:
            checkpoint.save_atomic(state, self.checkpoint_path)
        except OSError as exc:
            self.stats.checkpoint_errors += 1
            if final:
                self.log.error("the final checkpoint to %s failed (%s): the model of step %d is lost, %s; free "
                               "space or fix permissions before restarting this peer",
                               self.checkpoint_path, exc.strerror or exc, self.step, self._kept())
            else:
                self.log.error("checkpoint to %s failed (%s); training goes on, the previous "
                               "checkpoint is intact; free space or fix permissions",
                               self.checkpoint_path, exc.strerror or exc)
            return str(exc.strerror or exc)
        self._saved_step = self.step
        return None

    def _kept(self) -> str:
        """What the checkpoint file holds, for the messages about one not written."""
        if self._saved_step is None:
            return f"no checkpoint was written to {self.checkpoint_path} before"
        return f"{self.checkpoint_path} keeps step {self._saved_step}"

    def current_lr(self) -> float:
        return self.plan.schedule(self.step, self.clock.value)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> str:
        """Train until the budget or ``stop``; returns why it ended (budget, stopped, diverged,
        or ``error: ...`` when a step raised)."""
        self.model.train()
        self.stats.state = "training"
        while self.step < self.plan.total_steps:
            if self.stop.is_set():
                return "stopped"
            step = self.step + 1
            try:
                if not self._one_step():
                    return "diverged"
            except Exception as exc:  # the task's code (data, model, loss) or the device: the peer
                # still stops as after any end, its last steps checkpointed and a summary saying why.
                if self.torn_by is None:
                    self.log.error("step %d failed: %s; the peer stops and checkpoints the model as of its last "
                                   "step (fix the cause, then restart it to resume)", step, what_failed(exc),
                                   exc_info=exc)
                    return f"error: step {step} failed: {what_failed(exc)}"
                restart = ("restart it to resume from there" if self._saved_step is not None
                           else "restart it: it starts over")
                self.log.error("step %d failed in %s: %s; the model may hold part of that write, so the peer stops "
                               "without publishing or checkpointing it: %s (fix the cause, then %s)", step,
                               self.torn_by, what_failed(exc), self._kept(), restart, exc_info=exc)
                return f"error: step {step} failed in {self.torn_by}: {what_failed(exc)}"
        return "budget"

    def _one_step(self) -> bool:
        """A training step and what follows it between steps; False when the model diverged."""
        self.train_step()
        try:
            self.merge_pending()
        except ModelDiverged as exc:  # a lossy codec's last finite snapshot stays published; fp32 serves the bad one
            self.diverge(str(exc))
            return False
        if self.cfg.train.slowdown > 1 or self.cfg.train.step_pad_s > 0:
            self.pad_step()
        if self.step % self.cfg.train.metrics_every == 0 and not self.write_metrics():
            return False
        every = self.cfg.train.eval_every
        if every and self.step % every == 0:
            self.evaluate_or_log()
        interval = self.cfg.train.checkpoint_every
        if interval and time.monotonic() - self._last_checkpoint >= interval:
            self.save_checkpoint()
        return True

    def train_step(self) -> None:
        started = time.monotonic()
        indices = self.sampler.next_indices()
        batch = tuple(t[indices.to(t.device)] for t in self.train_data)
        lr = self.plan.schedule(self.step, self.clock.value)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.autocast is None and self.cfg.train.clip_grad_norm == 0:
            loss = self._checked(self.task.loss(self.model, batch))
            loss.backward()
            self.torn_by = "the optimizer's update"  # until the step is counted
            self.optimizer.step()
        else:
            loss = self._mixed_step(batch)
        loss = loss.detach().reshape(())  # a loss of shape (1,) is one element too
        if self.scaler.is_enabled():  # an fp16 step whose loss overflowed was skipped, not taken
            finite = torch.isfinite(loss)
            self._loss_sum += torch.where(finite, loss, 0.0)
            self._loss_overflows += ~finite
        else:
            self._loss_sum += loss
        self._loss_count += 1
        self.after_step()
        self.torn_by = None
        self.stats.lr = lr
        self.stats.epoch = self.step / self.plan.steps_per_epoch
        self._train_step_seconds.append(time.monotonic() - started)

    def _mixed_step(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The step under train.precision's autocast and train.clip_grad_norm; the loss."""
        with torch.autocast(self.train_data[0].device.type, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self._checked(self.task.loss(self.model, batch))
        self.scaler.scale(loss).backward()
        self.torn_by = "the optimizer's update"  # until the step is counted
        if clip := self.cfg.train.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)  # the norm of the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)  # skipped where fp16 gradients overflowed; the scale then drops
        self.scaler.update()
        return loss

    def _checked(self, loss: Any) -> Tensor:
        """The task's loss, refused unless it is a one-element tensor that requires grad: a float
        or a dict failed deep inside backward(), and per-sample losses were refused by it with
        torch's "grad can be implicitly created only for scalar outputs". An isinstance and two
        attribute reads a step."""
        if isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad:
            return loss
        if not isinstance(loss, Tensor):
            what = type(loss).__name__
        elif loss.numel() != 1:
            what = f"a tensor of shape {tuple(loss.shape)}"
        else:
            what = "a tensor that does not require grad (computed under no_grad, or detached)"
        raise BadTaskResult(f"the task's loss{defined_at(self.task.loss)} returned {what}: it must return the "
                            "batch's mean loss as a one-element torch tensor that requires grad (not .item(), "
                            "float() or per-sample losses)")

    def pad_step(self) -> None:
        """Artificial straggler: sleep train.step_pad_s, or stretch the step just taken by
        train.slowdown, by the recent steps' median duration: a step that spanned a pause of the
        whole process (SIGSTOP, swapping) would otherwise stall it for (slowdown - 1) times that pause."""
        train = self.cfg.train
        self.stop.wait(train.step_pad_s or (train.slowdown - 1) * statistics.median(self._train_step_seconds))

    def write_metrics(self) -> bool:
        # The mean over the window's steps; in fp16, over those the loss scaler did not skip.
        overflows = int(self._loss_overflows) if self.scaler.is_enabled() else 0  # CPU<->GPU sync point
        taken = self._loss_count - overflows
        loss = float(self._loss_sum / taken) if taken else math.nan
        self._loss_sum.zero_()
        self._loss_overflows.zero_()
        self._loss_count = 0
        self.stats.loss = loss
        self.stats.clock = self.clock.value
        self.count_cpu()
        self.metrics.write(progress_record(self.stats, elapsed=time.monotonic() - self.started, loss=loss))
        if not math.isfinite(loss):
            self.diverge(f"training loss overflowed fp16 in each of the last {overflows} steps up to step {self.step} "
                         "(the loss scaler skipped them all): the model cannot train in fp16; use train.precision = "
                         "bf16 or fp32, or lower train.lr" if overflows else
                         f"training loss is {loss} at step {self.step}: the model diverged; lower train.lr or check "
                         "the data")
            return False
        return True

    def diverge(self, why: str) -> None:
        """The model (or its loss) went non-finite: say why, once, and keep it for the summary."""
        self.log.error("%s", why)
        self.diverged = True
        self.why_diverged = self.why_diverged or why

    def evaluate(self) -> dict[str, float]:
        if self.task.evaluate is None:
            return {}
        self.model.eval()
        try:
            self.last_eval = self.task.metrics(self.model)
        finally:
            self.model.train()
        if self.task.metric not in self.last_eval and not self._metric_missing_said:
            self._metric_missing_said = True
            self.log.warning("the task's evaluate returned %s without its metric %r (Task.metric), which `up`, "
                             "`status` and `eval` show: return it too, or name one of these as the task's metric",
                             sorted(self.last_eval), self.task.metric)
        self.metrics.write({"time": time.time(), "step": self.step, "eval": self.last_eval})
        return self.last_eval

    def evaluate_or_log(self) -> None:
        """:meth:`evaluate`, where a failure of the task's own evaluation (a bug in it, a GPU out
        of memory) is logged and costs the peer neither its training nor its final checkpoint."""
        try:
            self.evaluate()
        except Exception:
            self.log.exception("the task's evaluation failed at step %d; training goes on without it", self.step)

    def finalize(self) -> str | None:
        """After the exchange has stopped: merge what was acknowledged, publish, checkpoint.
        What kept the final checkpoint from being written, None when it was. After an error
        midway through a write to the model (:attr:`torn_by`) only the metrics are. The final
        evaluation comes after, in :meth:`close`."""
        self.inbox.close()
        if self.torn_by is not None:  # run() said why; the last checkpoint stays as it is
            if self._loss_count:
                self.write_metrics()
            return f"the model may hold part of {self.torn_by}; {self._kept()}"
        try:
            if not self.diverged:
                self.merge_pending(final=True)
        except ModelDiverged as exc:
            self.diverge(str(exc))
        except Exception as exc:  # e.g. out of memory publishing: the model itself may be whole
            if self.torn_by is not None:
                raise
            self.log.error("the final merge or publish failed (%s); the model is whole and is checkpointed",
                           what_failed(exc), exc_info=exc)
        if self._loss_count:
            self.write_metrics()
        if self.diverged:  # finite but huge, it is no model to resume from (a lower lr restarts from the last)
            self.log.error("the model diverged at step %d: checkpoint not written, %s", self.step, self._kept())
            return "the model diverged"
        return self.save_checkpoint(final=True)

    def close(self, *, evaluate: bool) -> None:
        """The final evaluation (unless ``evaluate`` is false, or the model may be torn), then
        the end of the metrics stream."""
        try:
            if evaluate and self.torn_by is None:
                self.evaluate_or_log()
        finally:
            self.metrics.close()
