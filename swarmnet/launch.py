"""``swarmnet up``: start a local swarm as real peer processes, watch it, summarize it.

Each peer is its own ``swarmnet peer`` process (the same code path as a hand-started daemon).
The first peer binds a free port and announces it in its peer card; the others get it as their
seed, and every peer waits (bounded) until it knows the rest before its first step, so nobody
gets a head start. Ctrl-C or SIGTERM forwards SIGTERM to every peer, which stops cleanly; a
second one kills them. Peers run in process groups of their own, so a terminal's Ctrl-C reaches
only the launcher (which forwards it once), and on Linux they get SIGTERM when the launcher dies,
even killed. They stay in the launcher's session: Linux's scheduler (autogroup) splits the CPU
between sessions first, and a peer alone in its session answers its neighbours' pulls late
(4 lsq peers on 2 cores merged 2-3 times less). When all have exited, the launcher averages
the peers' final models, evaluates the average and writes the summary.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from swarmnet import forked, jsonsafe
from swarmnet.bootstrap import GLIBC_TUNABLES
from swarmnet.codecs import kernels
from swarmnet.config import (
    SwarmConfig,
    ipc_path_error,
    load_config,
    load_manifest,
    manifest_settings,
    to_dict,
)
from swarmnet.errors import ConfigError, unwritable_run_dir
from swarmnet.evaluation import evaluate_averaged, saved_to
from swarmnet.log import counted, get_logger
from swarmnet.peer import checkpoint
from swarmnet.peer.budget import LOCAL_PEERS_VARIABLE
from swarmnet.peer.claim import check_free
from swarmnet.peer.compute import plan_training, unreached_milestones
from swarmnet.peer.data import batch_shortfall
from swarmnet.peer.earlier import AVERAGE_FILE, EARLIER, set_aside_average, set_aside_earlier_peers
from swarmnet.peer.metrics import read_metrics
from swarmnet.peer.node import FINISHED_WELL
from swarmnet.tasks import Task, build_seeded, load_task, what_failed

log = get_logger("launch")

PER_PEER_KEYS = ("network.listen", "network.advertise")
"""Config keys that name one peer's own address: not for overrides passed to every peer."""
PEER_FILES = ("card.json", "summary.json", "metrics.jsonl", "checkpoint.pt", "peer.log")
PEER_INTERPRETER = (sys.executable, "-m", "swarmnet")
"""How an exec'd peer's command line starts; a forked peer gets what follows it."""
CARD_TIMEOUT = 120.0
"""Seconds the first peer has to write its card (import the task, load its data, build its
model, bind) before `up` stops the launch; `up --start-timeout` sets it."""
STOP_GRACE = 20.0


@dataclass(slots=True)
class PeerProcess:
    name: str
    rank: int
    listen: str
    seeds: list[str]
    advertise: str = ""
    device: str = ""
    key: str = ""
    proc: subprocess.Popen[bytes] | forked.ForkedPeer | None = None
    exit_code: int | None = None
    killed: str = ""
    """Why `up` killed it (SIGKILL), if it did."""
    log_start: int = 0
    """Where this launch's lines begin in ``peer.log`` (appended to across runs of a run dir)."""
    metrics_start: int = 0
    """The same in ``metrics.jsonl`` (a resumed peer appends to it)."""
    earlier_summary: tuple[int, int] | None = None
    """(inode, mtime in ns) of the summary.json an earlier run left (--no-fresh): kept for as
    long as the peer has not accepted its checkpoint (a refused restart keeps it), and never
    taken for this launch's."""


@dataclass(slots=True)
class LaunchPlan:
    cfg: SwarmConfig
    run_dir: Path
    peers: list[PeerProcess]
    base_command: list[str]
    task: Task
    """The task, loaded once by :meth:`build` (its factory may load a data set) for the summary's
    metric and the average model; the peers load their own."""
    env: dict[str, str] = field(default_factory=dict)
    total_steps: int = 0
    fork: bool = False
    """Whether the peers are forked from a fork server (swarmnet.forked) rather than exec'd."""
    start_timeout: float = CARD_TIMEOUT
    """Seconds the first peer has to come up (write its card)."""

    @classmethod
    def build(cls, cfg: SwarmConfig, *, config_path: Path | None, overrides: dict[str, Any],
              manifests: Path | None, transport: str, fresh: bool, log_level: str,
              start_timeout: float = CARD_TIMEOUT) -> LaunchPlan:
        if not 0 < start_timeout < math.inf:
            raise ConfigError(f"--start-timeout {start_timeout}: must be a number of seconds > 0")
        run_dir = Path(cfg.run.dir)
        for key in PER_PEER_KEYS:
            if key in overrides:  # passed on to every peer, it would beat each one's own address
                raise ConfigError(f"--set {key}: every peer `up` launches needs an address of its own, and this "
                                  "would give all of them the same; give each peer's in a manifest (--manifests DIR, "
                                  "keys listen / advertise) or choose --transport tcp|ipc")
        if manifests is not None:
            if not manifests.is_dir():
                raise ConfigError(f"--manifests {manifests}: no such folder; `swarmnet init` writes peers/*.toml")
            files = sorted(manifests.glob("*.toml"))
            if not files:
                raise ConfigError(f"{manifests}: no peer manifests (*.toml) found; `swarmnet init` writes them")
            asked = overrides.get("run.peers")
            if asked is not None and asked != len(files):
                raise ConfigError(f"{asked} peers asked (--peers or --set run.peers) but {manifests} holds "
                                  f"{len(files)} peer manifests: --manifests starts one peer per manifest; drop the "
                                  "count, or add or remove manifests")
            peers = []
            for i, path in enumerate(files):
                m = load_manifest(path)
                listed, origins = manifest_settings(m, path)
                load_config(config_path, {**overrides, **listed}, origins)  # refused here, not in a child after launch
                peers.append(PeerProcess(m.name, m.rank if m.rank >= 0 else i, m.listen or _listen(transport, run_dir, m.name),
                                         m.seeds, m.advertise, m.device, m.key))
                if m.listen and transport != "tcp":  # tcp: the default, not asked for
                    log.warning("--transport %s does not apply to %s: its manifest %s sets listen = %s", transport,
                                m.name, path, m.listen)
        else:
            most = max_local_peers()
            if cfg.run.peers > most:
                raise ConfigError(f"{cfg.run.peers} peers asked (--peers or run.peers), but this machine runs at most "
                                  f"{most} ({os.cpu_count()} cores): each peer is a process of its own with torch "
                                  "loaded (about 300 MB); spread a larger swarm over hosts (`swarmnet init`), or study "
                                  "one of 10^4+ nodes with `swarmnet simulate`")
            peers = [PeerProcess(f"peer{i}", i, _listen(transport, run_dir, f"peer{i}"), []) for i in range(cfg.run.peers)]
        if repeated := sorted(name for name, count in Counter(p.name for p in peers).items() if count > 1):
            raise ConfigError(f"{manifests}: more than one manifest names peer {', '.join(map(repr, repeated))}; "
                              "each peer of a swarm needs a name of its own (key name, or the file's name)")
        n = len(peers)
        settings = dict(overrides)
        settings.update({"run.peers": n, "run.dir": str(run_dir)})
        if "network.min_peers" not in overrides and cfg.network.min_peers == 0:
            # Peers launched together start together: each waits (join_timeout at most) to know
            # the others, unless the config or --set says how many to wait for.
            settings["network.min_peers"] = n - 1
        elif cfg.network.min_peers > n - 1:
            log.warning("network.min_peers = %d but only %d other peers are launched: each peer waits "
                        "network.join_timeout (%gs) for the rest, then trains anyway", cfg.network.min_peers,
                        n - 1, cfg.network.join_timeout)
        base = [*PEER_INTERPRETER, "peer", "--log-level", log_level]
        if config_path is not None:
            base += ["--config", str(config_path)]
        for key, value in settings.items():
            base += ["--set", f"{key}={json.dumps(value)}"]
        if fresh:
            base.append("--fresh")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(cfg.device.threads))
        env[LOCAL_PEERS_VARIABLE] = str(n)
        env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
        for p in peers:  # first: a second `up` must neither wipe a running swarm nor load its data again
            check_free(run_dir / p.name)
        task = load_task(cfg.task.spec, cfg.task.options)
        plan = cls(cfg, run_dir, peers, base, task, env, start_timeout=start_timeout)
        plan.fork = forked.forkable(peer.device or cfg.device.device for peer in peers)
        # Built once here, as every peer will build it: a build_model that fails (a bad option,
        # a wrong return) is refused before launch, not as a peer that "did not come up". Cheap
        # for most tasks; a model costly to build costs it once more, at start.
        build_seeded(task, cfg.run.seed)
        training = plan_training(cfg.train, n, task.num_samples)
        plan.total_steps = training.total_steps
        # Each peer's log says these too; here they show before the peers start.
        if (late := unreached_milestones(cfg.train, training)) is not None:
            log.warning("%s", late)
        if (short := batch_shortfall(cfg.train.batch_size, task.num_samples, cfg.train.shard, n)) is not None:
            log.warning("%s", short)
        # A card left by an earlier run would pass for the new peer's (its address, its being up).
        # Its summary stays until the peer has accepted its checkpoint (a refused restart keeps
        # it), and is never taken for this launch's result (PeerProcess.earlier_summary).
        stale = PEER_FILES if fresh else ("card.json",)
        if fresh:
            set_aside_earlier_peers(run_dir, log)
        for p in peers:
            try:
                (run_dir / p.name).mkdir(parents=True, exist_ok=True)
                for name in stale:
                    (run_dir / p.name / name).unlink(missing_ok=True)
            except OSError as exc:
                raise unwritable_run_dir(run_dir / p.name, exc) from None
            p.earlier_summary = _file_identity(run_dir / p.name / "summary.json")
        return plan


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, None where there is none: a peer writes its summary by
    renaming a new file over it, which changes both."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def launch_config(config_path: Path | None, overrides: dict[str, Any], origins: dict[str, str],
                  manifests: Path | None) -> SwarmConfig:
    """The swarm's config as `up` reads it. With --manifests, completed by the first manifest's
    ``key``: in allow-list mode each manifest names its peer's own key, which the shared config
    then need not name (LaunchPlan.build checks every manifest's own config)."""
    files = sorted(manifests.glob("*.toml")) if manifests is not None and manifests.is_dir() else []
    if files:
        listed, listed_origins = manifest_settings(load_manifest(files[0]), files[0])
        if "security.key" in listed and "security.key" not in overrides:
            overrides = {**overrides, "security.key": listed["security.key"]}
            origins = {**origins, "security.key": listed_origins["security.key"]}
    return load_config(config_path, overrides, origins)


def max_local_peers() -> int:
    """The most peers `up` starts on this machine: 8 per core, at least 16."""
    return max(16, 8 * (os.cpu_count() or 1))


def _listen(transport: str, run_dir: Path, name: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:0"
    if transport == "ipc":
        address = f"ipc://{(run_dir / name / 'peer.sock').resolve()}"
        too_long = ipc_path_error(address)
        if too_long:
            raise ConfigError(f"--transport ipc: {too_long}; use a shorter --run-dir, or --transport tcp")
        return address
    raise ConfigError(f"--transport {transport!r}: use tcp or ipc")


def _start(plan: LaunchPlan, peer: PeerProcess, seeds: list[str]) -> None:
    cmd = [*plan.base_command, "--name", peer.name, "--rank", str(peer.rank), "--listen", peer.listen]
    for seed in [*peer.seeds, *seeds]:
        cmd += ["--seed", seed]
    if peer.advertise:
        cmd += ["--advertise", peer.advertise]
    if peer.device:
        cmd += ["--device", peer.device]
    if peer.key:
        cmd += ["--key", peer.key]
    folder = plan.run_dir / peer.name
    try:
        log = open(folder / "peer.log", "ab")
    except OSError as exc:
        raise unwritable_run_dir(folder, exc) from None
    with log:
        peer.log_start = log.seek(0, os.SEEK_END)
        with contextlib.suppress(OSError):
            peer.metrics_start = (folder / "metrics.jsonl").stat().st_size
        if plan.fork:
            peer.proc = forked.start_peer(peer.name, cmd[len(PEER_INTERPRETER):], plan.env, folder / "peer.log")
        else:
            peer.proc = subprocess.Popen(cmd, env=plan.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, process_group=0, preexec_fn=die_with_parent())


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send the child SIGTERM once the thread that started it
    dies, however it dies (Linux prctl; None where there is no prctl). ``parent``: the child's
    parent process, where it is not this one."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    starter = parent or os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != starter:  # the parent died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child if prctl is not None else None


def _card(plan: LaunchPlan, peer: PeerProcess, deadline: float, interrupt: _Interrupt) -> str | None:
    """The peer's address once its card is written; None on Ctrl-C or SIGTERM meanwhile."""
    path = plan.run_dir / peer.name / "card.json"
    while time.monotonic() < deadline:
        if interrupt.count:
            return None
        if path.exists():
            return str(json.loads(path.read_text())["addr"])
        if peer.proc is not None and peer.proc.poll() is not None:
            break
        time.sleep(0.05)
    exit_code = peer.proc.poll() if peer.proc else "?"
    tail = _log_tail(plan, peer)
    if exit_code is None:  # still starting: launch() stops it with the rest
        ends = f"; its log ends:\n{tail}" if tail else ""
        raise ConfigError(f"peer {peer.name} was still starting after {plan.start_timeout:g} s and was stopped: "
                          "importing the task, loading its data or building its model took longer; allow more "
                          f"with --start-timeout SECONDS{ends}")
    if tail:
        raise ConfigError(f"peer {peer.name} did not come up (exit {exit_code}); its log ends:\n{tail}")
    why = _disk_trouble(plan.run_dir / peer.name) or "it wrote no log"
    raise ConfigError(f"peer {peer.name} did not come up (exit {exit_code}): {why}")


def _log_tail(plan: LaunchPlan, peer: PeerProcess, lines: int = 15) -> str:
    """The last lines this launch's peer wrote to its log ("" if none)."""
    try:
        with (plan.run_dir / peer.name / "peer.log").open("rb") as f:
            f.seek(peer.log_start)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class _Interrupt:
    """First SIGINT/SIGTERM: stop peers gracefully; second: kill them."""

    def __init__(self) -> None:
        self.count = 0
        self.signum = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.signum = self.signum or signum


def launch(plan: LaunchPlan, *, summary_path: Path | None = None, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    interrupt = _Interrupt()
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        if plan.fork:
            forked.start_server(plan.env)  # it imports torch and swarmnet while this process goes on
        on_cpu = not plan.cfg.device.device.startswith("cuda")
        if plan.cfg.codec.name in kernels.FUSED_CODECS and on_cpu:
            kernels.warm_up([plan.cfg.codec.name])  # compile the codec's CPU loops once here, not once per peer
        # All peers start at once; the first one's card (written once it is bound) is the seed.
        first = plan.peers[0]
        seed = f"file://{(plan.run_dir / first.name / 'card.json').resolve()}"
        for peer in plan.peers:
            _start(plan, peer, [] if peer is first else [seed])
        address = _card(plan, first, time.monotonic() + plan.start_timeout, interrupt)
        if address is not None:
            console.print(f"swarmnet: {len(plan.peers)} peers, seed {address}, run dir {plan.run_dir}", markup=False)
        interrupted = _supervise(plan, interrupt, console)
    except ConfigError as exc:
        _stop_all(plan, kill=True, why="the launch failed")
        if summary_path is not None:  # scripts reading it learn why, as from a run that ended badly
            _wait_all(plan)
            result = summarize(plan, time.monotonic() - started, False)
            result.update(ok=False, error=str(exc))
            with contextlib.suppress(ConfigError):
                _write_summary(summary_path, result)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = summarize(plan, time.monotonic() - started, interrupted)
    console.print(render_summary(result))
    if "model" in result["average"]:
        console.print(f"average model (a state_dict): {result['average']['model']}", markup=False, highlight=False)
    for line in after_table(result):
        console.print(line, markup=False, highlight=False)
    if summary_path is not None:
        _write_summary(summary_path, result)
    if interrupted:
        return 128 + interrupt.signum
    return 0 if result["ok"] else 1


def after_table(result: dict[str, Any]) -> list[str]:
    """The lines under the summary table: why each peer that ended badly did (the table keeps
    the reason's head), and which of its files it could not write."""
    lines = []
    for r in result["peers"]:
        if not r["ok"] and ": " in str(r.get("reason", "")):
            lines.append(f"{r['name']}: {r['reason']}")
        elif not r["ok"] and r.get("error"):  # "diverged" says no more; the peer's summary says why
            lines.append(f"{r['name']}: {r.get('reason', '?')}: {r['error']}")
        if lost := unwritten(r):
            lines.append(f"{r['name']}: writing {lost} failed (a full or read-only disk?)")
    return lines


def check_output_path(path: Path, flag: str = "--summary") -> None:
    """Refuse an output file (``flag``: the option that names it) that cannot be written before
    the run, not after it."""
    try:
        _check_output_path(path, flag)
    except OSError as exc:  # a folder on the way that we may not look into (EACCES)
        raise ConfigError(f"{flag} {path}: cannot look at {exc.filename or path} ({exc.strerror or exc}); "
                          "choose a writable path") from None


def _check_output_path(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; name a file in it, e.g. {path / 'result.json'}")
    existing = next(p for p in path.absolute().parents if p.exists())  # the rest is made at the end
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create it under {existing}, which is not a directory; "
                          "choose a writable path")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; choose a writable path")


def write_refusal(path: Path, error: str) -> None:
    """A summary for a run refused before any peer started, so that a script reading ``path``
    learns why rather than reading an earlier run's result there."""
    try:
        if not path.parent.is_dir():  # nothing earlier to replace, and a refused run makes no folders
            return
    except OSError:  # a folder on the way we may not look into: the refusal itself, maybe
        return
    with contextlib.suppress(ConfigError):  # the path itself may be what was refused
        _write_summary(path, {"ok": False, "interrupted": False, "elapsed_s": 0.0, "peers": [], "error": error})


def _write_summary(path: Path, result: dict[str, Any]) -> None:
    try:
        checkpoint.write_atomic(path, jsonsafe.dumps(result, indent=2, default=str).encode(), private=False)
    except OSError as exc:
        raise ConfigError(f"could not write the summary to {path}: {exc.strerror or exc}; the table "
                          "above has the results (each peer's are in its summary.json); choose a writable "
                          "--summary path next time") from None


def _wait_all(plan: LaunchPlan, timeout: float = 10.0) -> None:
    """Reap the peers (after _stop_all) and record their exit codes."""
    for p in plan.peers:
        if p.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout)
            p.exit_code = p.proc.poll()


def _supervise(plan: LaunchPlan, interrupt: _Interrupt, console: Console) -> bool:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal)
    tasks = {p.name: progress.add_task(p.name, total=plan.total_steps, info="") for p in plan.peers}
    offsets = {p.name: 0 for p in plan.peers}
    last_line = time.monotonic()  # without a terminal: a line every 5 s, the first once there is progress to show
    stop_sent_at: float | None = None
    with progress:
        while any(p.exit_code is None for p in plan.peers):
            if interrupt.count and stop_sent_at is None:
                console.print("stopping the swarm (again to kill)...")
                _stop_all(plan, kill=False)
                stop_sent_at = time.monotonic()
            if interrupt.count > 1:
                _stop_all(plan, kill=True, why="a second stop request", console=console)
            elif stop_sent_at and time.monotonic() - stop_sent_at > STOP_GRACE:
                _stop_all(plan, kill=True, why=f"not stopped {STOP_GRACE:g} s after the stop request", console=console)
            for p in plan.peers:
                if p.exit_code is None and p.proc is not None:
                    p.exit_code = p.proc.poll()
                latest = _tail_metrics(plan.run_dir / p.name / "metrics.jsonl", offsets, p.name)
                if latest:
                    loss = latest.get("loss")  # null once the loss is no longer finite
                    shown = "not finite" if loss is None else f"{loss:.4g}"
                    info = f"loss {shown}  merges {latest.get('interactions', 0)}"
                    progress.update(tasks[p.name], completed=latest.get("step", 0), info=info)
                if p.exit_code is not None:
                    state = "done" if p.exit_code == 0 else f"exit {p.exit_code}"
                    progress.update(tasks[p.name], info=state)
            if not console.is_terminal and time.monotonic() - last_line > 5:
                last_line = time.monotonic()
                steps = [progress.tasks[tasks[p.name]].completed for p in plan.peers]
                console.print(f"steps per peer: {', '.join(str(int(s)) for s in steps)} / {plan.total_steps}")
            time.sleep(0.2)
    return interrupt.count > 0


def _tail_metrics(path: Path, offsets: dict[str, int], key: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            fh.seek(offsets[key])
            chunk = fh.read()
    except OSError:
        return None
    complete = chunk[: chunk.rfind("\n") + 1]
    offsets[key] += len(complete.encode())
    latest = None
    for line in complete.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "loss" in record:
            latest = record
    return latest


def _stop_all(plan: LaunchPlan, *, kill: bool, why: str = "", console: Console | None = None) -> None:
    """SIGTERM, or SIGKILL (``kill``) for ``why``, to every peer still running."""
    for p in plan.peers:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            if kill and not p.killed:
                p.killed = why
                if console is not None:
                    console.print(f"{p.name}: killed ({why})", markup=False, highlight=False)


def summarize(plan: LaunchPlan, elapsed: float, interrupted: bool) -> dict[str, Any]:
    """Per-peer results plus the evaluation of the average of all final models."""
    rows = []
    for p in plan.peers:
        peer_dir = plan.run_dir / p.name
        code = p.exit_code
        row: dict[str, Any] = {"name": p.name, "exit_code": code}
        if code is not None and code < 0:
            row["signal"] = signal.Signals(-code).name
        try:
            if _file_identity(peer_dir / "summary.json") == p.earlier_summary:  # None == None: none written
                raise FileNotFoundError("an earlier run's summary, or none")
            peer_summary = json.loads((peer_dir / "summary.json").read_text())
            peer_summary.pop("config", None)
            row.update(peer_summary)
        except (OSError, json.JSONDecodeError):
            error = _last_error(plan.run_dir / p.name / "peer.log", p.log_start) or _disk_trouble(peer_dir)
            how = ("stopped on an error" if code is not None and code > 0 else
                   f"was killed by `swarmnet up`: {p.killed}" if p.killed else
                   # SIGTERM ends a peer by default only until it handles it: while it starts
                   "got SIGTERM while it started, before it had anything to save" if code == -signal.SIGTERM else
                   "died before finishing")
            row["reason"] = f"no summary (the peer {how})" + (f": {error}" if error else "")
            metrics = _last_metrics(peer_dir / "metrics.jsonl", p.metrics_start)
            if metrics:
                row.update(steps=metrics.get("step"), final_loss=metrics.get("loss"),
                           interactions=metrics.get("interactions"), bytes_sent=metrics.get("bytes_out"),
                           bytes_received=metrics.get("bytes_in"))
        stopped = row.get("reason") == "stopped"
        if stopped and not interrupted:  # `up` stops its peers only when interrupted
            row["reason"] = "stopped by a signal from outside `swarmnet up`, before its budget"
        clean = code == 0 or (stopped and code == plan.cfg.run.stopped_exit_code)
        row["ok"] = clean and row.get("reason") in FINISHED_WELL
        rows.append(row)
    finished = [p for p, r in zip(plan.peers, rows) if r["ok"]]
    result: dict[str, Any] = {
        "ok": all(r["ok"] for r in rows) and not interrupted,
        "interrupted": interrupted,
        "elapsed_s": elapsed,
        "peers": rows,
        "metric": plan.task.metric,
        "average": average_models(plan, finished),
        "config": to_dict(plan.cfg),
    }
    return result


def _last_error(log: Path, start: int = 0) -> str | None:
    """The message of the last ERROR line of a peer's log from byte ``start`` on (this launch's
    part), which says why it stopped."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.split(" ERROR ", 1)[1] for line in lines if " ERROR " in line]
    return errors[-1].split("] ", 1)[-1] if errors else None


def _disk_trouble(path: Path) -> str | None:
    """Why nothing may have been written under ``path`` (its log included): a full or read-only disk."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return None
    if vfs.f_flag & os.ST_RDONLY:
        return f"{path} is on a read-only file system"
    if vfs.f_bavail * vfs.f_frsize < 1 << 20:
        return f"the disk of {path} is full; free space and check its checkpoint"
    return None


def _last_metrics(path: Path, start: int = 0) -> dict[str, Any] | None:
    """The last progress row written from byte ``start`` on (this launch's rows)."""
    try:
        records = [r for r in read_metrics(path, start) if "loss" in r]
    except OSError:
        return None
    return records[-1] if records else None


def average_models(plan: LaunchPlan, peers: list[PeerProcess]) -> dict[str, Any]:
    """Average the float parameters of the given peers' final checkpoints and evaluate it, with
    BatchNorm statistics recomputed on a few training batches (swarmnet.evaluation), and save it
    as the run's result, ``<run dir>/average.pt``."""
    states = []
    for p in peers:
        path = plan.run_dir / p.name / "checkpoint.pt"
        try:
            states.append(checkpoint.load(path)["model"])
        except Exception as exc:  # unreadable, truncated or refused (objects other than tensors)
            log.warning("%s left out of the average model: %s cannot be read (%s)", p.name, path,
                        type(exc).__name__)
            continue
    if not states:
        try:
            if set_aside_average(plan.run_dir) is not None:  # --no-fresh: an earlier run's would pass for this one's
                log.warning("no peer ended well, so there is no average model: the earlier run's %s moved to %s",
                            AVERAGE_FILE, plan.run_dir / EARLIER)
        except ConfigError as exc:
            log.warning("%s", exc)
        return {"peers_averaged": 0}
    task = plan.task
    model = build_seeded(task, plan.cfg.run.seed)
    params = {name for name, _ in model.named_parameters()}
    merged = dict(states[0])
    squared = 0.0
    for name in params:
        stack = torch.stack([s[name].float() for s in states])
        mean = stack.mean(0)
        merged[name] = mean
        squared += float((stack - mean).pow(2).sum())
    model.load_state_dict(merged)
    result = {"peers_averaged": len(states), "consensus_distance": math.sqrt(squared / len(states))}
    try:
        result.update(evaluate_averaged(model, task, batch_size=plan.cfg.train.batch_size, seed=plan.cfg.run.seed))
    except Exception as exc:  # the task's own evaluation: its failure must cost neither the summary nor the model
        error = what_failed(exc)
        log.warning("the average model could not be evaluated: the task's evaluation raised %s", error)
        result["eval_error"] = error
    return {**result, **saved_to(model, plan.run_dir / AVERAGE_FILE)}


def unwritten(row: dict[str, Any]) -> str:
    """What of a peer's files its run could not write, in words ("" if nothing)."""
    parts = [counted(row[key], what) for key, what in (("checkpoint_errors", "checkpoint"),
                                                        ("metrics_errors", "metrics row"))
             if isinstance(row.get(key), int) and row[key] > 0]
    return " and ".join(parts)


def _number_cell(value: Any, spec: str) -> str:
    """A number of the table in ``spec``; "?" where it is unknown or not finite, alike for the
    peers (whose summaries, strict JSON, hold null for both) and the average."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "?"


def render_summary(result: dict[str, Any]) -> Table:
    table = Table(title="swarm summary" + (" (interrupted)" if result["interrupted"] else ""))
    metric = result["metric"]
    # The last window's training loss and the held-out metric: both "loss" by default.
    for col in ("peer", "status", "steps", "merges", "MB out", "MB in", "train loss", f"eval {metric}"):
        table.add_column(col, justify="right" if col not in ("peer", "status") else "left")

    def fmt_eval(ev: dict[str, Any] | None) -> str:
        return _number_cell((ev or {}).get(metric), ".4f")

    for r in result["peers"]:
        # The table keeps the reason's head; the whole of it (why the peer stopped) follows the table.
        reason = str(r.get("reason", "?")).split(": ", 1)[0]
        status = reason if r["ok"] else f"{r.get('signal') or 'exit ' + str(r['exit_code'])}: {reason}"
        table.add_row(r["name"], status, str(r.get("steps", "?")), str(r.get("interactions", "?")),
                      f"{(r.get('bytes_sent') or 0) / 1e6:.1f}", f"{(r.get('bytes_received') or 0) / 1e6:.1f}",
                      _number_cell(r.get("final_loss"), ".4g"), fmt_eval(r.get("eval")))
    avg = result["average"]
    if avg.get("peers_averaged"):
        table.add_row("average", f"{counted(avg['peers_averaged'], 'model')}, spread {avg['consensus_distance']:.3g}",
                      "", "", "", "", "", fmt_eval(avg.get("eval")))
    return table
