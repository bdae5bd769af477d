"""How much CPU a peer may spend outside its training steps.

Everything a peer does besides stepping (pulling, decoding, computing deltas, merging and
republishing, serving neighbours' pulls, gossip, metrics) competes with the compute loop for the
same cores. Where cores are plentiful that costs nothing; where peers already fill every core
(several peers per CPU socket, small models with millisecond steps), each interaction's fixed
cost comes straight out of training. :class:`CpuBudget` caps that cost: the exchange starts its
next interaction only while the CPU time of the exchange's own work (the event-loop thread,
which also serves neighbours, the decode worker, the compute thread's merges and libzmq's I/O
thread) stays within
``cores`` CPU-seconds per wall-clock second (a token bucket over about one second), so short
steps stretch the effective H instead of slowing the steps themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch

from swarmnet.errors import ConfigError
from swarmnet.log import counted

LOCAL_PEERS_VARIABLE = "SWARMNET_LOCAL_PEERS"
"""How many peers share this machine: `swarmnet up` and the Procfiles set it."""
LOCAL_PEERS_SOURCES = (LOCAL_PEERS_VARIABLE, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
"""Where the count of peers sharing this machine comes from, first found first."""
MIN_SHARE = 0.05
"""With no spare core, overhead may still take this fraction of the peer's share of the CPU."""
MIN_CORES = 0.01
"""Nor less than this share of a core, however many peers share one: a peer's background work
(gossip, heartbeats) is charged too and costs about 0.5% of a core with 16 peers on 2 cores,
where 5% of a peer's share (0.6% of a core) left almost nothing for merges."""


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity and its container's CPU quota (cgroup v1
    or v2), which the affinity does not show: a pod limited to 4 CPUs on a 64-core node has all
    64 in its affinity. loky (joblib's process pool) counts both, and LOKY_MAX_CPU_COUNT, which
    caps it where set."""
    from joblib.externals.loky import cpu_count  # a tenth of a second to import, once per peer

    try:
        return cpu_count()
    except ValueError:  # LOKY_MAX_CPU_COUNT is not a number
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _count(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def local_peers(environ: Mapping[str, str]) -> tuple[int, str | None]:
    """Peers sharing this machine, as `swarmnet up`, torchrun or Slurm set it, and the variable
    that gave it; (1, None) when unknown. A bad value of swarmnet's own variable is an error:
    the user set it (the others, set by a launcher or a scheduler, count as not given)."""
    mine = environ.get(LOCAL_PEERS_VARIABLE, "")
    if mine.strip() and _count(environ, LOCAL_PEERS_VARIABLE) is None:
        raise ConfigError(f"{LOCAL_PEERS_VARIABLE}={mine!r}: give the number of peers on this machine, a whole "
                          "number >= 1 (each peer's exchange budget is its share of the cores), or unset it")
    for name in LOCAL_PEERS_SOURCES:
        if (peers := _count(environ, name)) is not None:
            return peers, name
    return 1, None


def peer_share(environ: Mapping[str, str] = os.environ, cores: int | None = None) -> tuple[float, str]:
    """The cores this peer may count as its own, and how they were counted (for its log).

    A Slurm task that no launcher of its own counted owns what Slurm allocated it:
    SLURM_CPUS_PER_TASK, else the node's allocation over its tasks. Where the cluster binds
    tasks to CPUs, a task's usable cores are that share already: dividing them by the node's
    tasks again left a GPU peer with 4 CPUs 5% of a core for its exchange instead of 3 cores.
    Elsewhere, the usable cores over the local peers."""
    cores = cores or usable_cores()
    peers, source = local_peers(environ)
    if source in (None, "SLURM_NTASKS_PER_NODE") and "SLURM_PROCID" in environ:
        if (per_task := _count(environ, "SLURM_CPUS_PER_TASK")) is not None:
            share = min(per_task, cores)
            return share, f"this Slurm task's {counted(share, 'core')} (SLURM_CPUS_PER_TASK)"
        if source is not None and (on_node := _count(environ, "SLURM_CPUS_ON_NODE")) is not None:
            return min(on_node / peers, cores), (f"the {counted(on_node, 'core')} Slurm gave this node's "
                                                 f"{counted(peers, 'task')} (SLURM_CPUS_ON_NODE)")
    given = source or f"no count given: set {LOCAL_PEERS_VARIABLE}=N for N peers on this machine"
    return cores / peers, f"{counted(cores, 'core')} shared by {counted(peers, 'local peer')} ({given})"


def auto_cores(device: torch.device, threads: int, share: float) -> float:
    """The spare cores of this peer's ``share`` of the machine (:func:`peer_share`), at least
    MIN_SHARE of the share and MIN_CORES.

    A CPU peer's steps use ``threads`` cores; a GPU peer's compute thread needs about one.
    """
    busy = threads if device.type == "cpu" else 1
    return max(MIN_SHARE * share, MIN_CORES, share - busy)


def _clock_reader(clock: int) -> Callable[[], float]:
    """Reads a thread's CPU clock; once the thread has ended, what it used stays counted."""
    last = [0.0]

    def read() -> float:
        try:
            last[0] = time.clock_gettime(clock)
        except OSError:  # the thread has ended: its time no longer grows
            pass
        return last[0]
    return read


def thread_cpu_clock(ident: int) -> Callable[[], float]:
    """CPU seconds one thread of this process has used so far (``threading.get_ident()``)."""
    return _clock_reader(time.pthread_getcpuclockid(ident))


def _linux_thread_clock(tid: int) -> int:
    """The CPU clock of thread ``tid`` of this process, encoded as Linux encodes it (what glibc's
    pthread_getcpuclockid returns): nanoseconds for a few microseconds a read, where its /proc
    stat file costs tens of microseconds and counts 10 ms ticks."""
    return (~tid << 3) | 6  # per-thread (4) scheduler clock (2)


def linux_process_clock(pid: int) -> int:
    """The CPU clock of process ``pid``, all its threads (Linux's clock_getcpuclockid, which
    Python does not offer): any process's, where thread clocks are only this process's."""
    return (~pid << 3) | 2  # scheduler clock (2) of a whole process


def named_threads_cpu(prefix: str | tuple[str, ...], rescan_s: float = 1.0) -> Callable[[], float]:
    """CPU seconds used so far by this process's threads whose name starts with ``prefix`` (or
    one of them; Linux; 0 elsewhere). For threads Python did not start or does not keep, e.g.
    libzmq's "ZMQbg/IO/0", which copies every byte the peer sends and receives.

    Such a thread names itself only once it runs, which may be after this clock is made, and
    contexts made later bring their own: the thread list (/proc) is read again at most every
    ``rescan_s`` seconds. Threads that have ended keep counting what they used.
    """
    task_dir = "/proc/self/task"
    clocks: dict[str, Callable[[], float]] = {}
    scanned = [-float("inf")]

    def rescan() -> None:
        try:
            for tid in os.listdir(task_dir):
                if tid not in clocks and _read(f"{task_dir}/{tid}/comm").startswith(prefix):
                    clocks[tid] = _clock_reader(_linux_thread_clock(int(tid)))
        except OSError:  # no /proc, or a thread ended while we looked
            pass

    def read() -> float:
        now = time.monotonic()
        if now - scanned[0] >= rescan_s:
            scanned[0] = now
            rescan()
        return sum(clock() for clock in clocks.values())
    return read


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


class CpuBudget:
    """Token bucket on the CPU time of the exchange's work.

    ``cores <= 0`` means no limit. ``spent`` returns the CPU seconds that work has used so far;
    it may read clocks of other threads.
    """

    def __init__(self, cores: float, spent: Callable[[], float], window: float = 1.0) -> None:
        self.cores = cores
        self._spent_so_far = spent
        self._capacity = max(cores, 0.0) * window
        self.start()
        self.waited = 0.0
        """Seconds the exchange has waited for the budget so far."""
        self.used = 0.0
        """CPU seconds the work has used since the budget was made or started, as of the last ``delay``."""
        self.pressure = 0.0
        """Moving average, over the last ten or so ``delay`` calls, of whether the budget asked
        for a wait: near 1 when CPU time, not the network, sets the pace of the interactions."""

    def start(self) -> None:
        """Count from now, with a full bucket: what the charged threads spent before (a peer's
        start: joining the swarm, a newcomer's adoption) is not the exchange's work, and charged,
        it held back the first pulls for seconds (4-6 s of an 11 s run with 16 peers on 2 cores,
        docs/operations.md)."""
        self._credit = self._capacity
        self._at = time.monotonic()
        self._spent = self._start = self._spent_so_far()

    def delay(self) -> float:
        """Seconds to wait before the next interaction (0 when within budget)."""
        now, spent = time.monotonic(), self._spent_so_far()
        self.used = spent - self._start
        if self.cores <= 0:
            return 0.0
        refill = self.cores * (now - self._at)
        self._credit = min(self._capacity, self._credit + refill) - (spent - self._spent)
        self._at, self._spent = now, spent
        wait = max(0.0, -self._credit / self.cores)
        self.waited += wait
        self.pressure = 0.9 * self.pressure + 0.1 * (wait > 0)
        return wait
