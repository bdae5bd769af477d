"""Typed, validated configuration loaded from TOML (configs/ for the swarm, peers/ for one peer).

Every section is a dataclass whose fields are the schema; every field has a default that serves
the bundled quickstart. Unknown keys and bad values raise :class:`ConfigError` naming the file,
the key and the fix. Precedence: defaults < config file < peer manifest < CLI flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from swarmnet.algorithms.schedules import SCHEDULES
from swarmnet.algorithms.topology import parse_topology
from swarmnet.errors import ConfigError
from swarmnet.transport.base import SLOWEST_RATE
from swarmnet.wire import snapshot_frame_limit


@dataclass(kw_only=True, slots=True)
class RunConfig:
    dir: str = "runs/default"
    """Run directory; each peer writes <dir>/<peer name>/ (metrics, checkpoint, summary)."""
    seed: int = 0
    """Seeds the shared model initialization; per-peer data order derives from it and the name."""
    peers: int = 4
    """Expected swarm size: used by `swarmnet up` and by the epoch multiplier."""
    init: str = "shared"
    """shared: every peer starts from the same model (SPEC 4 item 6); independent: each peer
    draws its own initialization (for gossip and consensus experiments)."""
    stopped_exit_code: int = 0
    """Exit status of a peer stopped (SIGTERM, SIGINT) cleanly before its budget was spent: 0, as
    a daemon stops. A Kubernetes Job needs another (`swarmnet init`'s sets 143): a pod that exits 0
    counts as a completed index, so a drained node's peer would never be replaced."""

    def __post_init__(self) -> None:
        _require(bool(self.dir.strip()), "dir", "must name a directory, e.g. runs/default")
        _require(0 <= self.stopped_exit_code <= 255, "stopped_exit_code", "must be an exit status in 0..255, e.g. 143")
        _require(self.peers >= 1, "peers", "must be >= 1")
        _require(0 <= self.seed < 2**32, "seed", "must be in 0..4294967295 (torch and numpy seeds are 32 or 64 bits)")
        _require(self.init in ("shared", "independent"), "init", "must be 'shared' or 'independent'")


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    spec: str = "swarmnet.tasks.digits:task"
    """``module:function`` returning a swarmnet.tasks.Task."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task function."""

    def __post_init__(self) -> None:
        _require(":" in self.spec, "spec", "must look like 'module:function'")


BUDGETS = ("steps", "epochs", "sequential_epochs")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
"""train.precision: none, or the dtype torch.autocast computes in."""
DEFAULT_STEPS = 1000
"""The budget when none of BUDGETS is set."""
MAX_STEPS = 2**53
"""The largest budget in steps (a step count stays exact as a float, and fits the wire's integers)."""
WILDCARD_HOSTS = ("0.0.0.0", "*", "::")
"""How a bind address says "every interface": no peer can dial it."""


def is_wildcard(url: str) -> bool:
    """Whether a tcp:// address names every interface rather than one a peer can dial."""
    try:
        return url.startswith("tcp://") and urlsplit(url).hostname in WILDCARD_HOSTS
    except ValueError:  # not a URL (an unclosed IPv6 bracket): the address check says so
        return False


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    batch_size: int = 32
    """Samples per local step (each peer's own mini-batch)."""
    steps: int = 0
    """Budget in local steps per peer (0: use epochs; none of the budgets set: 1000 steps)."""
    epochs: float = 0.0
    """Budget in epochs per peer; one epoch is ceil(|D| / batch_size) local steps (SPEC 1.4)."""
    sequential_epochs: float = 0.0
    """If > 0: the sequential recipe's epochs; each peer then trains
    multiplier * sequential_epochs / peers epochs and milestones scale alike (SPEC 1.4, 2.7)."""
    multiplier: float = 1.0
    """The epoch multiplier of sequential_epochs (SPEC 1.4): >1 gives each peer more epochs
    than its share of the sequential budget."""
    lr: float = 0.1
    """Base learning rate (eta0 of the popsgd schedule)."""
    schedule: str = "constant"
    """constant, popsgd (eta0 / (1 + V / V0) from the phase clock), multistep (times gamma at
    each milestone) or cosine (down to final_lr_ratio * lr at the end of the budget)."""
    clock_scale: float = 100.0
    """V0 of the popsgd schedule eta0 / (1 + V / V0)."""
    milestones: list[float] = field(default_factory=list)
    """Epochs (of the recipe given) at which multistep multiplies the rate by gamma."""
    gamma: float = 0.1
    """Factor multistep applies to the rate at each milestone."""
    warmup_epochs: float = 0.0
    """Linear warm-up over this many of the peer's own epochs: unlike milestones, not rescaled by
    the epoch multiplier (a warm-up steadies each model's first steps, whatever the swarm size)."""
    final_lr_ratio: float = 0.0
    """cosine: the rate at the end of the budget, as a fraction of lr."""
    optimizer: str = "sgd"
    """The local optimizer: sgd (momentum, nesterov, weight_decay as an L2 term) or adamw
    (betas, eps, weight_decay decoupled). Its state (momentum buffers, Adam's moments) stays
    local, never averaged or sent (SPEC 4)."""
    momentum: float = 0.0
    """SGD momentum; its buffer stays local, never averaged or sent (SPEC 4)."""
    weight_decay: float = 0.0
    """Weight decay, applied by the local optimizer (sgd: L2; adamw: decoupled)."""
    nesterov: bool = False
    """Nesterov momentum (without momentum it has no effect)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adamw: the decay rates of its first and second moment estimates."""
    eps: float = 1e-8
    """adamw: added to the denominator."""
    clip_grad_norm: float = 0.0
    """Scale the gradients down to this total L2 norm before each step where it is larger
    (torch.nn.utils.clip_grad_norm_); 0: no clipping."""
    precision: str = "fp32"
    """The forward and backward pass's precision: fp32, or mixed precision under torch.autocast
    with bf16 or fp16 (fp16 with dynamic loss scaling, whose state the checkpoint keeps). The
    weights, the optimizer's state and the snapshots peers exchange stay fp32."""
    shard: str = "random"
    """random: each peer samples the whole set in its own order; partition: n/2 shards, each
    shared by two peers (SPEC 1.4), reshuffled per epoch with per-peer seeds."""
    metrics_every: int = 10
    """Write a row to metrics.jsonl every this many steps."""
    eval_every: int = 0
    """Evaluate the local model every this many steps (0: only at the end)."""
    checkpoint_every: float = 30.0
    """Seconds between checkpoints (0: only the final one)."""
    tensorboard: bool = True
    """Mirror the metrics to TensorBoard when the tensorboard package is installed."""
    slowdown: float = 1.0
    """Make this peer an artificial straggler: after each step, sleep (slowdown - 1) times the
    median duration of its last 15 steps (3.0: a peer 3x slower). For benchmarks and fault
    tests; 1.0 in training."""
    step_pad_s: float = 0.0
    """Make this peer a straggler by a fixed time instead: sleep this many seconds after each
    step (benchmarks that slow every method's straggler by the same time); 0.0 in training."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(0 <= self.steps <= MAX_STEPS, "steps", f"must be in 1..{MAX_STEPS} (or 0 to budget in epochs)")
        for name in ("epochs", "sequential_epochs"):
            _require(_at_least(getattr(self, name), 0) and getattr(self, name) <= MAX_STEPS, name,
                     f"must be a finite number >= 0 and <= {MAX_STEPS} (0: not this budget)")
        budgets = [name for name in BUDGETS if getattr(self, name) > 0]
        _require(len(budgets) <= 1, budgets[-1] if budgets else "steps",
                 f"set only one of steps, epochs, sequential_epochs; here {' and '.join(budgets)} are set "
                 "(an override of one should set the other to 0, or use --steps (swarmnet peer and up) or --epochs "
                 "(swarmnet up), which replace the file's budget)")
        if not budgets:
            self.steps = DEFAULT_STEPS
        _require(_at_least(self.lr, 0), "lr", "must be a finite number >= 0")
        _require(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}")
        _require(_above(self.multiplier, 0), "multiplier", "must be a finite number > 0")
        _require(all(_at_least(m, 0) for m in self.milestones), "milestones", "must be finite epochs >= 0")
        _require(_at_least(self.gamma, 0), "gamma", "must be a finite number >= 0 (it multiplies the rate)")
        _require(_at_least(self.warmup_epochs, 0), "warmup_epochs", "must be a finite number >= 0 (0: no warm-up)")
        _require(_at_least(self.final_lr_ratio, 0), "final_lr_ratio", "must be a finite number >= 0")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(_at_least(self.weight_decay, 0), "weight_decay", "must be a finite number >= 0")
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        _require(len(self.betas) == 2 and all(_at_least(b, 0) and b < 1 for b in self.betas), "betas",
                 "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _require(_above(self.eps, 0), "eps", "must be a finite number > 0")
        if self.optimizer == "adamw":
            _require(self.momentum == 0 and not self.nesterov, "momentum" if self.momentum else "nesterov",
                     "applies to optimizer = 'sgd'; adamw's momentum is train.betas (set momentum = 0, nesterov = "
                     "false)")
        _require(_at_least(self.clip_grad_norm, 0), "clip_grad_norm", "must be a finite number >= 0 (0: no clipping)")
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(self.shard in ("random", "partition"), "shard", "must be 'random' or 'partition'")
        _require(self.metrics_every >= 1, "metrics_every", "must be >= 1")
        _require(self.eval_every >= 0, "eval_every", "must be >= 0 (0: evaluate only at the end)")
        _require(_at_least(self.checkpoint_every, 0), "checkpoint_every",
                 "must be a finite number of seconds >= 0 (0: only the final checkpoint)")
        _require(_above(self.clock_scale, 0), "clock_scale", "must be a finite number > 0")
        _require(math.isfinite(self.slowdown) and self.slowdown >= 1, "slowdown",
                 "must be a finite number >= 1 (1.0: no artificial delay)")
        _require(_at_least(self.step_pad_s, 0), "step_pad_s", "must be a finite number of seconds >= 0")
        _require(self.slowdown == 1 or self.step_pad_s == 0, "step_pad_s",
                 "and train.slowdown both make a straggler: set one of them")


@dataclass(kw_only=True, slots=True)
class AlgorithmConfig:
    name: str = "swarmsgd"
    """swarmsgd (SPEC 2.9) or popsgd (SPEC 1.2)."""
    local_steps: float = 1
    """H: local steps between interactions (swarmsgd; popsgd takes 1, and refuses another value)."""
    geometric: bool = False
    """Draw H from a geometric law with mean local_steps instead of fixing it."""
    symmetric: bool = False
    """Also update the neighbour (a nudge in delta form, SPEC 2.9 item 4). Off by default for both
    algorithms: pull-only, as SPEC 2.9 recommends and as PopSGD's reference runs did (SPEC 1.7).
    A peer admits at most one nudge per published version, and refuses the rest as busy (the
    initiator then drops its half too), so every merge stays a convex combination."""
    topology: str = "complete"
    """complete, ring or random-regular:K, over the membership sorted by peer id."""

    def __post_init__(self) -> None:
        _require(self.name in ("swarmsgd", "popsgd"), "name", "must be 'swarmsgd' or 'popsgd'")
        _require(_at_least(self.local_steps, 1), "local_steps", "must be a finite number >= 1")
        _require(self.geometric or self.local_steps == int(self.local_steps), "local_steps",
                 "must be an integer unless geometric = true")
        for key, unset, neutral in (("local_steps", self.local_steps == 1, "1"),
                                    ("geometric", not self.geometric, "false")):
            _require(self.name == "swarmsgd" or unset, key, "is SwarmSGD's: popsgd takes one local step per "
                     f"interaction (SPEC 1.2); set {key} = {neutral} (or leave it out), or name = \"swarmsgd\"")
        try:
            parse_topology(self.topology)
        except ValueError as exc:
            raise ValueError(f"topology: {exc}") from None



@dataclass(kw_only=True, slots=True)
class CodecConfig:
    name: str = "fp32"
    """Snapshot codec: fp32, fp16, bf16, blockwise8, blockwise4 or lattice (docs/codecs.md)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The codec's own options, e.g. {mode = "dither"} for lattice (docs/codecs.md); unknown ones are refused."""

    def __post_init__(self) -> None:
        """The codec is built here once, so that a typo fails when the config is read, not in
        every peer at its start."""
        from swarmnet.codecs import CODECS, make_codec  # here: the codecs import torch

        try:
            make_codec(self.name, **self.options)
        except ConfigError as exc:
            _require(False, "options" if self.name in CODECS else "name", str(exc))


@dataclass(kw_only=True, slots=True)
class NetworkConfig:
    listen: str = "tcp://127.0.0.1:0"
    """Address to bind; port 0 picks a free port, which the peer then advertises."""
    advertise: str = ""
    """Address other peers should use, when it differs from the bound one (NAT, 0.0.0.0)."""
    interface: str = ""
    """Advertise the IPv4 address of this network interface (e.g. ib0, eth0) with the bound port,
    when ``advertise`` is not set: handy when binding 0.0.0.0 on a multi-homed host."""
    seeds: list[str] = field(default_factory=list)
    """Addresses of peers to learn the swarm from (tcp://host:port, or file:///path/card.json);
    any one reachable seed is enough, gossip does the rest."""
    request_timeout: float = 10.0
    """Deadline of one request; requests that move a snapshot (pulls, nudges) add the model's fp32
    size over ``min_transfer_rate``."""
    gossip_interval: float = 0.5
    """Mean seconds between two membership gossip rounds (each jittered 0.5-1.5x); every round
    advances this peer's heartbeat and exchanges peer lists with a neighbour."""
    dead_after: float = 5.0
    """A peer whose heartbeat has not advanced for this long is suspected and not picked."""
    failure_backoff: float = 2.0
    """First back-off after a failed request to a peer; doubles per failure, capped at 60 s."""
    exchange: bool = True
    """Pull neighbours. False: train alone while still serving snapshots (baselines, benches)."""
    pull_interval: float = 0.0
    """Minimum seconds between two pulls (0: pull as soon as the last one was applied)."""
    exchange_cpu: float = -1.0
    """CPU cores' worth of time the peer may spend outside its training steps (exchange,
    serving, gossip), averaged over about a second; short steps then stretch H rather than slow
    down (swarmnet/peer/budget.py). -1: auto, the spare cores of this peer's share of the machine
    (its usable cores over the local peers, from SWARMNET_LOCAL_PEERS, which `swarmnet up` and the
    Procfiles set, LOCAL_WORLD_SIZE or SLURM_NTASKS_PER_NODE; a Slurm task's own allocation) but at
    least 5% of that share and 1% of a core; 0: no limit."""
    min_peers: int = 0
    """Before the first step, wait until this many other peers are known (or join_timeout
    passes): lets a launcher start a swarm without giving the first peer a head start. A peer
    gossips every 50 ms while it waits."""
    join_timeout: float = 30.0
    """Longest wait for min_peers before training starts anyway (with a warning)."""
    adopt_model: bool = True
    """A peer starting without a checkpoint first takes the model, phase clock and step of a
    neighbour that has trained (a lossless pull), instead of its own initialization; never with
    run.init = independent or with the exchange off. Neighbours it started together with (they
    knew it when they met their start condition) are no donors. Until then it serves no
    snapshot (pulls get not_ready)."""
    linger: float = 5.0
    """Seconds a peer that spent its budget stays while others still train: first merging their
    snapshots without stepping (so the first to finish does not keep a model the others moved
    away from), then serving its final snapshot."""
    max_header_bytes: int = 65536
    """Largest msgpack header accepted, checked before it is unpacked (1 KiB to 16 MiB)."""
    max_message_bytes: int = 0
    """Largest single frame accepted (ZeroMQ drops connections that send more). 0: auto, room
    for any snapshot of this peer's model (twice its fp32 size plus 1 MiB), so a stranger's
    frame costs at most about two models of memory, and a model of any size can be pulled."""
    min_transfer_rate: float = SLOWEST_RATE
    """Slowest rate (bytes per second) a snapshot may move at: a request that moves one (pull,
    nudge, a newcomer's model) gets request_timeout plus the model's fp32 size over this rate
    (+0.02 s for a 1.2 MB model, +8 s for 400 MB). Lower it for slow or shared links."""
    max_concurrent_requests: int = 64
    """Requests a peer serves at once; more wait their turn in its queue (none is refused for it)."""

    def __post_init__(self) -> None:
        _check_address("listen", self.listen, "tcp://127.0.0.1:0", lowest_port=0)
        if self.advertise:
            _check_address("advertise", self.advertise, "tcp://10.0.0.1:7000")
            _require(not is_wildcard(self.advertise), "advertise",
                     f"{self.advertise!r} is a wildcard, not an address other peers can dial: give this host's "
                     "reachable IP or name (e.g. tcp://10.0.0.1:7000), or set network.interface instead")
        for seed in self.seeds:
            _check_address("seeds", seed, "tcp://host:port (or file:///path/card.json)")
        for name in ("request_timeout", "gossip_interval", "dead_after", "failure_backoff"):
            _require(_above(getattr(self, name), 0), name, "must be a finite number of seconds > 0")
        for name in ("pull_interval", "linger", "join_timeout"):
            _require(_at_least(getattr(self, name), 0), name, "must be a finite number of seconds >= 0")
        _require(_at_least(self.exchange_cpu, 0) or self.exchange_cpu == -1, "exchange_cpu",
                 "must be -1 (auto), 0 (no limit) or a number of cores > 0")
        _require(self.min_peers >= 0, "min_peers", "must be >= 0")
        _require(self.max_concurrent_requests >= 1, "max_concurrent_requests", "must be >= 1")
        _require(1024 <= self.max_header_bytes <= 2**24, "max_header_bytes", "must be in [1 KiB, 16 MiB]")
        _require(self.max_message_bytes == 0 or 1024 <= self.max_message_bytes < 2**63, "max_message_bytes",
                 "must be 0 (auto: room for any snapshot of the model) or a number of bytes in 1024..2^63-1")
        _require(_above(self.min_transfer_rate, 0), "min_transfer_rate", "must be a finite number of bytes per second > 0")

    def frame_limit(self, n: int) -> int:
        """``max_message_bytes`` for a model of ``n`` float coordinates."""
        return self.max_message_bytes or snapshot_frame_limit(n)

    def transfer_timeout(self, n: int) -> float:
        """Deadline of a request that moves a snapshot of a model of ``n`` float coordinates."""
        return self.request_timeout + 4 * n / self.min_transfer_rate


@dataclass(kw_only=True, slots=True)
class ScreeningConfig:
    """How a neighbour's model is screened before merging (rule in docs/reliability.md)."""

    distance_ratio: float = 10.0
    """Refuse a neighbour farther than this many times the larger of our model's norm and the
    typical distance (0: off)."""
    max_distance: float = 0.0
    """Refuse a neighbour farther than this, absolutely (0: off)."""
    clip_ratio: float = 0.0
    """Scale a neighbour's pull down to at most this many typical distances (0: off)."""
    warmup: int = 8
    """Accepted distances needed before clipping applies."""

    def __post_init__(self) -> None:
        for name in ("distance_ratio", "max_distance", "clip_ratio"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0 (0: off)")
        _require(self.clip_ratio == 0 or self.clip_ratio >= 1, "clip_ratio", "must be 0 (off) or >= 1")
        _require(self.warmup >= 1, "warmup", "must be >= 1")


MAX_THREADS = 1024
"""device.threads above this are a typo (each is an OS thread of every peer)."""


@dataclass(kw_only=True, slots=True)
class DeviceConfig:
    device: str = "auto"
    """auto (GPU from LOCAL_RANK / SLURM_LOCALID / OMPI_COMM_WORLD_LOCAL_RANK when CUDA is present,
    else CPU), cpu, cuda (the current GPU) or cuda:N."""
    threads: int = 1
    """torch intra-op threads per peer (several peers usually share a machine)."""

    def __post_init__(self) -> None:
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                 "must be auto, cpu, cuda or cuda:N")
        _require(1 <= self.threads <= MAX_THREADS, "threads", f"must be between 1 and {MAX_THREADS}")


SECURITY_MODES = ("none", "swarm-key", "allow-list")


@dataclass(kw_only=True, slots=True)
class SecurityConfig:
    """Who may talk to this peer (ZeroMQ CURVE; docs/operations.md, "Security")."""

    mode: str = "none"
    """none: no authentication (loopback demos); swarm-key: every peer uses the same keypair and
    admits only it; allow-list: every peer has its own keypair and admits the public keys listed
    in ``allow``."""
    key: str = ""
    """This peer's secret key file (written by `swarmnet keys generate`: NAME.key_secret). In
    swarm-key mode, the swarm's shared key file."""
    allow: str = ""
    """allow-list mode: a directory of NAME.key public key files, or a file with one public key
    (Z85, 40 characters) per line."""

    def __post_init__(self) -> None:
        _require(self.mode in SECURITY_MODES, "mode", f"must be one of {', '.join(SECURITY_MODES)}")
        if self.mode == "none":  # named by the key given, so the message names where it was given
            for key in ("key", "allow"):
                _require(not getattr(self, key), key, "is set but security.mode is 'none'; set security.mode = "
                         "'swarm-key' or 'allow-list' in the config, or leave it out")
            return
        _require(bool(self.key), "key", f"mode '{self.mode}' needs this peer's secret key file; "
                 "create one with `swarmnet keys generate --out keys --name NAME`")
        fix = ("copy the swarm's key file here (a key generated anew would not be the swarm's)" if self.mode == "swarm-key"
               else "create one with `swarmnet keys generate --out keys --name NAME`")
        _require(os.path.isfile(self.key), "key", f"{self.key!r} is not a file{_where(self.key)}; give its path, or {fix}")
        if self.mode == "allow-list":
            _require(bool(self.allow), "allow", "mode 'allow-list' needs a directory of NAME.key "
                     "public key files (or a file of public keys, one per line)")
            _require(os.path.exists(self.allow), "allow", f"{self.allow!r} does not exist{_where(self.allow)}")
        else:
            _require(not self.allow, "allow", "only applies to mode = 'allow-list' (a swarm key "
                     "admits exactly its own public key)")


def _where(path: str) -> str:
    """Where a relative path was looked for, for an error about it (not the config's folder)."""
    return "" if os.path.isabs(path) else f" (relative paths start in the working directory, {os.getcwd()})"


@dataclass(kw_only=True, slots=True)
class SwarmConfig:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        # Each side of a symmetric merge screens on its own history, so each would clip by its own
        # factor: the two halves would no longer cancel and the swarm's sum would drift.
        _require(not (self.screening.clip_ratio and self.algorithm.symmetric), "screening.clip_ratio",
                 "cannot be combined with algorithm.symmetric = true (each side would clip its half by "
                 "its own factor, so the sum of the models would drift); turn one of them off")


@dataclass(kw_only=True, slots=True)
class PeerManifest:
    """peers/NAME.toml: who one peer is and where it listens."""

    name: str = ""
    """Peer name (default: the host name); its folder under the run directory."""
    listen: str = ""
    """network.listen for this peer."""
    advertise: str = ""
    """network.advertise for this peer."""
    device: str = ""
    """device.device for this peer (auto, cpu, cuda, cuda:N)."""
    seeds: list[str] = field(default_factory=list)
    """network.seeds for this peer."""
    rank: int = -1
    """Index of this peer in the swarm, for partition sharding (-1: from the environment)."""
    key: str = ""
    """This peer's secret key file (overrides security.key; allow-list swarms give each peer its own)."""

    def __post_init__(self) -> None:
        _require(self.rank >= -1, "rank", "must be >= 0, or -1 to read it from the environment")


PEER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_device(spec: str) -> None:
    """A torch device this machine has (cpu, cuda, cuda:N); a ConfigError naming the fix otherwise."""
    import torch  # here: reading a config does not need it

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but CUDA is not available here; use --device cpu, or "
                          "cpu where it was set (device.device in the config, device in a peer manifest)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) here")


def check_peer_name(name: str) -> str:
    """A peer's name names its directory <run.dir>/<name>: one path component, so it cannot escape."""
    if not PEER_NAME.fullmatch(name):
        raise ConfigError(f"peer name {name!r}: use 1-128 letters, digits, '.', '_' or '-' (not starting "
                          "with '.' or '-'); it names the peer's run directory")
    return name


def load_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None,
                origins: Mapping[str, str] | None = None) -> SwarmConfig:
    """Load a swarm config file (None: built-in defaults), then apply dotted ``overrides``
    such as {"train.steps": 100}; ``origins`` as in :func:`build_config`."""
    data = _read_toml(path) if path else {}
    return build_config(data, str(path) if path else "<defaults>", overrides, origins)


def load_section(path: str | os.PathLike[str], name: str) -> Any:
    """Section ``name`` of a config file, validated alone: for tools that need one part of a
    swarm's config (`swarmnet status` its [security] keys) without building the rest, whose codec
    section imports torch (1.5-2 s)."""
    hint = typing.get_type_hints(SwarmConfig).get(name)
    if hint is None:
        raise ValueError(f"a swarm config has no section {name!r}")
    data = _read_toml(path)
    return _build(hint, data.get(name, {}), str(path), f"{name}.", {})


def dotted_key(key: str) -> bool:
    """Whether ``key`` names a config key: section.key, or section.key.option (see build_config)."""
    parts = key.split(".")
    return len(parts) in (2, 3) and all(parts)


def build_config(data: dict[str, Any], source: str, overrides: dict[str, Any] | None = None,
                 origins: Mapping[str, str] | None = None) -> SwarmConfig:
    """A validated config from plain data (e.g. ``to_dict`` of another one) plus dotted overrides
    (``section.key``, or ``section.key.option`` for one entry of a table such as task.options);
    ``source`` names where the data came from in error messages, ``origins`` where each override
    came from (e.g. {"train.steps": "--steps"}; default "override KEY")."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    origins = {dotted: (origins or {}).get(dotted, f"override {dotted}") for dotted in overrides or {}}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        key, _, option = key.partition(".")  # task.options.hidden: one entry of a table of options
        table = data.setdefault(section, {})
        if not isinstance(table, dict):  # _build reports the file's bad section
            continue
        if option:
            inner = table.get(key)
            table[key] = {**(inner if isinstance(inner, dict) else {}), option: value}
        else:
            table[key] = value
    config = _build(SwarmConfig, data, source, "", origins)
    train = data.get("train", {})
    given = [name for name in BUDGETS if name in train]
    if given and not any(train[name] > 0 for name in given):
        key = f"train.{given[0]}"
        raise ConfigError(f"{_origin(source, origins, key)}: {key}: leaves no budget; set train.steps >= 1 "
                          f"or train.epochs > 0 (or none of them for {DEFAULT_STEPS} steps)")
    return config


def load_manifest(path: str | os.PathLike[str]) -> PeerManifest:
    manifest = _build(PeerManifest, _read_toml(path, "peer manifest"), str(path), "", {})
    if not manifest.name:
        manifest.name = Path(path).stem
    try:
        check_peer_name(manifest.name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return manifest


def manifest_settings(manifest: PeerManifest, path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The config keys a peer manifest sets, and their origins for error messages (a manifest's
    keys are named as it spells them: listen, not network.listen)."""
    given = {"network.listen": manifest.listen, "network.advertise": manifest.advertise,
             "network.seeds": manifest.seeds, "device.device": manifest.device, "security.key": manifest.key}
    settings = {key: value for key, value in given.items() if value not in ("", [])}
    return settings, {key: f"{path} ({key.rsplit('.', 1)[1]})" for key in settings}


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config (for logs, summaries and child processes)."""
    return dataclasses.asdict(config)


_EXAMPLES = {"config file": "configs/quickstart.toml", "peer manifest": "peers/peer0.toml"}
"""What each kind of TOML file this module reads is, with an example of it in the checkout."""


def _read_toml(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    example = _EXAMPLES[what]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}; check the path (relative paths start where you run the command; "
                          f"the examples are in the swarmnet checkout's {example.partition('/')[0]}/)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass a {what} such as {example}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or exc}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _build(cls: type, data: Any, source: str, prefix: str, origins: Mapping[str, str]) -> Any:
    where = f"[{prefix.rstrip('.')}]" if prefix else "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{_origin(source, origins, prefix + key)}: unknown key '{prefix}{key}' in {where}; {hint}")
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}", origins)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        key, _, why = str(exc).partition(": ")
        raise ConfigError(f"{_origin(source, origins, prefix + key)}: {prefix}{key}: {why or exc}") from None


def _origin(source: str, origins: Mapping[str, str], key: str) -> str:
    """Where ``key`` (or, for a section, any key in it) was set: an override's origin, else ``source``."""
    for dotted, origin in origins.items():
        if dotted == key or dotted.startswith(key + "."):
            return origin
    return source


def _coerce(hint: Any, value: Any, source: str, key: str, origins: Mapping[str, str]) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".", origins)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, key, origins)
    expected = origin or hint
    ok = isinstance(value, expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if expected in (int, float) and isinstance(value, bool):
        ok = False
    if not ok:
        raise ConfigError(
            f"{_origin(source, origins, key)}: {key} must be {getattr(expected, '__name__', expected)}, got {value!r}"
        )
    if origin is list:
        return [_coerce(args[0], item, source, key, origins) for item in value]
    return value


def _require(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {why}")


def _at_least(value: float, low: float) -> bool:
    return math.isfinite(value) and value >= low


def _above(value: float, low: float) -> bool:
    return math.isfinite(value) and value > low


IPC_PATH_MAX = 107
"""Bytes of a Unix socket path (sockaddr_un.sun_path, less its terminating zero) on Linux."""


def ipc_path_error(url: str) -> str | None:
    """What is wrong with an ipc:// address whose path no Unix socket can hold; None if nothing."""
    path = url.removeprefix("ipc://")
    if url.startswith("ipc://") and len(path.encode()) > IPC_PATH_MAX:
        return f"the socket path {path} is {len(path.encode())} bytes, over the {IPC_PATH_MAX} a Unix socket allows"
    return None


def _check_address(key: str, url: str, example: str, *, lowest_port: int = 1) -> None:
    """A URL with a scheme; a tcp:// one with a port a socket can use (0 only to bind any port)."""
    _require("://" in url, key, f"{url!r} must be a URL such as {example}")
    from swarmnet.transport.registry import known_schemes  # here: it imports pyzmq

    schemes = known_schemes() | ({"file"} if key == "seeds" else set())
    scheme = url.partition("://")[0]
    _require(scheme in schemes, key, f"{url!r}: no transport for {scheme}:// addresses; use one of "
                                     f"{', '.join(s + '://' for s in sorted(schemes))}, e.g. {example}")
    too_long = ipc_path_error(url)
    _require(too_long is None, key, f"{too_long}; use a shorter path")
    if url.startswith("tcp://"):
        try:
            host = urlsplit(url).hostname
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket
            raise ValueError(f"{key}: {url!r} is not a valid address ({exc}); e.g. {example} or tcp://[::1]:7000") from None
        _require(bool(host), key, f"{url!r} names no host; e.g. {example}")
        try:
            port = urlsplit(url).port
        except ValueError:
            port = None
        _require(port is not None and lowest_port <= port <= 65535, key,
                 f"{url!r} needs a port in {lowest_port}..65535, e.g. {example}")
