"""``swarmnet bench baselines``: swarmnet against what a user would pick instead, side by side.

Same model, data and number of local processes for every method, in one run: torch DDP (gloo
all-reduce every step; NCCL when every rank has its own GPU), local SGD with torch's
PeriodicModelAverager (parameters averaged every 5 steps), swarmnet SwarmSGD with fp32 and with
lattice snapshots; then the same with one straggler; optionally hivemind's averaging. The
processes and phases are described in :mod:`swarmnet.bench.baseline_workers`.

Definitions (also written into the JSON):
- step time: 1 / (steps per second of a process in the phase's common window: from the moment
  the last process is past its first 20 steps to the moment the first one is done), averaged over
  the processes; per repeat, then median and min-max over repeats.
- communication share: 1 - T_solo / T_method, clipped to [0, 1], where T_solo is the step time
  of the same processes running the same steps without communication, side by side (``solo``:
  plain torch SGD, the reference for DDP and local SGD; ``swarm-solo``: swarmnet peers with the
  exchange off, the reference for swarmnet). For swarmnet it is everything the exchange costs the
  compute loop (serving, decoding, merging, publishing), since no step ever waits on the network.
- straggler: the last process sleeps (slowdown - 1) times its step time after each step; the
  others' pace in that run over their pace in the solo run (1.0: unaffected).
- time to target: wall clock from the end of a process's first 10 steps to the end of its first
  10-step window with mean training loss <= target; the slowest process counts.
- bytes per step: what one process receives per training step (DDP/local SGD: the ring
  all-reduce formula 2(n-1)/n x model bytes, per averaging; swarmnet: measured by the peer).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from swarmnet.bench import write_json
from swarmnet.bench.baseline_workers import SWARM_CODECS, TORCH_METHODS, phases
from swarmnet.errors import BenchFailed
from swarmnet.launch import GLIBC_TUNABLES
from swarmnet.peer.budget import LOCAL_PEERS_VARIABLE

RESULT_VERSION = 1
TASK = "swarmnet.tasks.digits:task"
METHODS = (*TORCH_METHODS, *SWARM_CODECS)
SOLO_OF = {"ddp": "solo", "localsgd": "solo", "swarm-fp32": "swarm-solo", "swarm-lattice": "swarm-solo"}
HIVEMIND_SCRIPT = Path(__file__).with_name("hivemind_avg.py")
WARM_UP_RECORDS = 1
"""Records (one every 10 steps) of each rank that count as start-up: the common window opens at
the next one, after its first 20 steps."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    hidden: int
    """Width of the digits MLP (64 -> hidden -> hidden -> 10)."""
    steps: int
    """Training steps per process in each phase."""


@dataclass(frozen=True, slots=True)
class Suite:
    sizes: tuple[int, ...] = (2, 4, 8)
    repeats: int = 3
    models: tuple[ModelSpec, ...] = (ModelSpec("digits", 128, 600), ModelSpec("mlp-1M", 1024, 200))
    straggler_models: tuple[str, ...] | None = None
    """Models measured with a straggler too (None: all)."""
    straggler_methods: tuple[str, ...] = ("ddp", "localsgd", "swarm-fp32")
    slowdown: float = 3.0
    target_loss: float = 0.15
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    local_steps: int = 2
    average_every: int = 5
    threads: int = 1
    hivemind_sizes: tuple[int, ...] = (2, 4)
    hivemind_compressions: tuple[str, ...] = ("none", "fp16", "8bit")

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 2:
            raise ValueError(f"process counts {self.sizes}: give at least one, each >= 2")
        if self.repeats < 1:
            raise ValueError("repeats must be >= 1")
        if any(m.steps < 5 * 10 for m in self.models):
            raise ValueError("each model needs >= 50 steps per phase (the pace is read from 10-step records)")
        if self.slowdown < 1:
            raise ValueError("slowdown must be >= 1")
        # The others' pace beside a straggler is read while it steps too, past its warm-up.
        need = math.ceil(2 * self.slowdown * (WARM_UP_RECORDS + 1) * 10)
        slowed = [m for m in self.models if self.straggler_models is None or m.name in self.straggler_models]
        if self.straggler_methods and any(m.steps < need for m in slowed):
            raise ValueError(f"with a straggler {self.slowdown:g}x slower each model needs >= {need} steps per "
                             "phase (the others must still be stepping when it is past its warm-up)")


QUICK = Suite(sizes=(2, 4), repeats=2, models=(ModelSpec("digits", 128, 400), ModelSpec("mlp-1M", 1024, 100)),
              straggler_models=("digits",), hivemind_sizes=(2,), hivemind_compressions=("none", "8bit"))
FULL = Suite()


def backend_for(world: int) -> str:
    """NCCL when every rank can have its own GPU, else gloo (CPU tensors over loopback TCP)."""
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def _plan(suite: Suite, world: int, work: Path | None = None) -> dict[str, Any]:
    """``work``: the ranks' directory, where they meet through a file (a free TCP port picked here
    could be taken by the time rank 0 binds it: EADDRINUSE seen in a loaded test run)."""
    return {
        "world": world, "backend": backend_for(world),
        "init_method": (work / "rendezvous").resolve().as_uri() if work is not None else None,
        "task": TASK, "seed": 0, "repeats": suite.repeats, "models": [asdict(m) for m in suite.models],
        "straggler_models": [m.name for m in suite.models if suite.straggler_models is None
                             or m.name in suite.straggler_models],
        "straggler_methods": list(suite.straggler_methods),
        "slowdown": suite.slowdown, "target_loss": suite.target_loss, "lr": suite.lr,
        "momentum": suite.momentum, "batch_size": suite.batch_size, "local_steps": suite.local_steps,
        "average_every": suite.average_every, "threads": suite.threads,
    }


def run_world(suite: Suite, world: int, work: Path, *, on_phase: Any = None, timeout: float = 3600) -> list[dict[str, Any]]:
    """Start ``world`` rank processes that run every phase; returns their per-rank, per-phase records."""
    out = work / f"n{world}"
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan = _plan(suite, world, out)
    plan_path.write_text(json.dumps(plan))
    # As `swarmnet up` starts its peers: one intra-op thread each, hugepage-backed receive buffers,
    # and the count of local peers the exchange's CPU budget divides the machine by.
    env = dict(os.environ, OMP_NUM_THREADS=str(suite.threads), PYTHONUNBUFFERED="1")
    env[LOCAL_PEERS_VARIABLE] = str(world)
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    # The ranks share this machine: gloo on loopback, not on the interface the host name
    # resolves to (a LAN address on many hosts), as the swarm's peers listen on 127.0.0.1.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    procs = []
    for rank in range(world):
        # All ranks stay in this session, as `swarmnet up` keeps its peers in its own: with the
        # kernel's autogroup scheduling a session per rank would let each compete with the rest
        # of the machine on its own (uneven paces between ranks on a loaded machine).
        with open(out / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "swarmnet.bench.baseline_workers", str(rank), str(plan_path), str(out)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while any(p.poll() is None for p in procs):
            _raise_if_failed(procs, out)
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench baselines with {world} processes did not finish in {timeout:g}s")
            if on_phase is not None and (lines := _count_lines(out / "rank0.jsonl")) > done:
                on_phase(lines - done)
                done = lines
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    _raise_if_failed(procs, out)
    if on_phase is not None:
        on_phase(_count_lines(out / "rank0.jsonl") - done)
    records = []
    for rank in range(world):
        with open(out / f"rank{rank}.jsonl", encoding="utf-8") as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    for r in records:
        r["backend"] = plan["backend"]
    return records


def _raise_if_failed(procs: list[subprocess.Popen[bytes]], out: Path) -> None:
    """The first rank that exited with an error, with the tail of its log."""
    for rank, p in enumerate(procs):
        if p.returncode not in (None, 0):
            log = (out / f"rank{rank}.log").read_text(errors="replace")[-3000:]
            raise BenchFailed(f"bench baselines: rank {rank} of {len(procs)} exited with {p.returncode}:\n{log}")


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


# -- aggregation -------------------------------------------------------------------------------


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median and min-max of the repeats; None when a value is missing (e.g. target not reached)
    or not a number (a run too short to measure)."""
    vals = list(values)
    if not vals or any(v is None or math.isnan(v) for v in vals):
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}  # type: ignore[type-var]


def _mean(values: Iterable[float]) -> float:
    return statistics.fmean(values)


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean, or None when some value is missing (the table then shows "-")."""
    vals = list(values)
    return None if not vals or None in vals else statistics.fmean(vals)  # type: ignore[arg-type]


Records = dict[tuple[str, int, str, int], list[dict[str, Any]]]


def common_window(rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The wall-clock span in which every rank of one phase was stepping: from the last rank
    past its warm-up to the first rank done. None when they never stepped at the same time.

    Paces taken over each rank's own run would credit a rank that stepped while the others were
    still starting (or already done) with a core of its own: peers meet their start condition up
    to a gossip round apart, which is the whole of a short phase."""
    if any(len(r["points"]) <= WARM_UP_RECORDS for r in rows):
        return None
    start = max(r["points"][WARM_UP_RECORDS][1] for r in rows)
    end = min(r["points"][-1][1] for r in rows)
    return (start, end) if end > start else None


def _step_at(points: list[tuple[int, float]], when: float) -> float:
    """The step a rank had reached at wall-clock time ``when``, interpolated between records."""
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if t0 <= when <= t1:
            return s0 + (s1 - s0) * (when - t0) / max(1e-12, t1 - t0)
    raise ValueError(f"{when} lies outside the records")


def paces(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Each rank's steps per second in the phase's common window (NaN for all without one)."""
    window = common_window(rows)
    if window is None:
        return {r["rank"]: math.nan for r in rows}
    start, end = window
    return {r["rank"]: (_step_at(r["points"], end) - _step_at(r["points"], start)) / (end - start) for r in rows}


def _step_s(rows: list[dict[str, Any]], among: list[dict[str, Any]] | None = None) -> float:
    """Mean step time of ``rows``, measured in the common window of ``among`` (default: rows)."""
    pace = paces(among or rows)
    return _mean(1 / pace[r["rank"]] for r in rows)


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-rank phase records -> rows per (model, processes, method) with median and min-max."""
    by: Records = defaultdict(list)
    for r in records:
        by[(r["model"], r["world"], r["phase"], r["repeat"])].append(r)
    for rows in by.values():
        rows.sort(key=lambda r: r["rank"])
    repeats = sorted({rep for *_, rep in by})
    parameters = {r["model"]: r["parameters"] for r in records if "parameters" in r}
    out: dict[str, list[dict[str, Any]]] = {"methods": [], "straggler": [], "allreduce": []}
    for model, world in sorted({(m, w) for m, w, _, _ in by}):
        def ranks(phase: str, rep: int, key: tuple[str, int] = (model, world)) -> list[dict[str, Any]]:
            return by.get((*key, phase, rep), [])

        for method in ("solo", "swarm-solo", *METHODS):
            if ranks(method, repeats[0]):
                row = _method_row(method, [ranks(method, rep) for rep in repeats],
                                  [ranks(SOLO_OF.get(method, method), rep) for rep in repeats])
                out["methods"].append({"model": model, "parameters": parameters.get(model), "processes": world,
                                       "method": method, **row})
        for method in METHODS:
            if ranks(f"{method}+straggler", repeats[0]):
                row = _straggler_row([ranks(f"{method}+straggler", rep) for rep in repeats],
                                     [ranks(SOLO_OF[method], rep) for rep in repeats],
                                     [ranks(method, rep) for rep in repeats])
                out["straggler"].append({"model": model, "processes": world, "method": method, **row})
        if ranks("allreduce", repeats[0]):
            first = ranks("allreduce", repeats[0])[0]
            seconds = spread(max(r["allreduce_s"] for r in ranks("allreduce", rep)) for rep in repeats)
            out["allreduce"].append({"model": model, "processes": world, "numel": first["numel"],
                                     "backend": first["backend"], "seconds": seconds})
    return out


def _method_row(method: str, runs: list[list[dict[str, Any]]], solos: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One method over the repeats: ``runs[i]`` and ``solos[i]`` hold repeat i's rank records."""
    step, share, vs_solo, target, nbytes, loss, window = [], [], [], [], [], [], []
    for rows, solo in zip(runs, solos):
        t, t0 = _step_s(rows), _step_s(solo)
        span = common_window(rows)
        window.append(span[1] - span[0] if span else None)
        step.append(t)
        measured = math.isfinite(t) and math.isfinite(t0) and t > 0  # max(0.0, nan) would read 0.0
        share.append(min(1.0, max(0.0, 1 - t0 / t)) if measured else math.nan)
        vs_solo.append(t / t0)
        reached = [r["time_to_target_s"] for r in rows]
        target.append(None if None in reached else max(reached))
        nbytes.append(_mean(r["bytes_per_step"] for r in rows))
        loss.append(_mean_or_none(r["final_loss"] for r in rows))
    return {"backend": runs[0][0]["backend"], "step_time_s": spread(step),
            "comm_share": spread(share) if method in SOLO_OF else None,
            "step_vs_solo": spread(vs_solo) if method in SOLO_OF else None,
            "time_to_target_s": spread(target), "bytes_per_step": spread(nbytes), "final_loss": spread(loss),
            "common_window_s": spread(window), "bytes_per_step_source": runs[0][0].get("bytes_per_step_source", "")}


def _straggler_row(runs: list[list[dict[str, Any]]], solos: list[list[dict[str, Any]]],
                   normals: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The last rank is the straggler; the others' pace is compared with their own pace in the
    compute-only phase (``solos``) and in the same method's phase without a straggler."""
    ratios, own, others_step, straggler_step = [], [], [], []
    for rows, solo, normal in zip(runs, solos, normals):
        pace, solo_pace, normal_pace = paces(rows), paces(solo), paces(normal)
        others = rows[:-1]
        ratios.append(_mean(pace[r["rank"]] / solo_pace[r["rank"]] for r in others))
        own.append(_mean(pace[r["rank"]] / normal_pace[r["rank"]] for r in others))
        others_step.append(_step_s(others, among=rows))
        straggler_step.append(_step_s(rows[-1:], among=rows))
    return {"others_step_time_s": spread(others_step), "straggler_step_time_s": spread(straggler_step),
            "others_pace_vs_solo": spread(ratios), "others_pace_vs_no_straggler": spread(own)}


# -- hivemind ----------------------------------------------------------------------------------


def find_hivemind_python(explicit: str | None) -> str | None:
    """The interpreter to run hivemind's averaging with: given, else this one if it has hivemind."""
    if explicit:
        return explicit
    return sys.executable if importlib.util.find_spec("hivemind") is not None else None


def run_hivemind(python: str | None, *, sizes: Sequence[int], compressions: Sequence[str], numel: int,
                 steps: int = 5, timeout: float = 600) -> dict[str, Any]:
    if python is None:
        return {"skipped": "hivemind is not installed here: pip install 'swarmnet[bench-hivemind]' (or pass "
                           "--hivemind-python with an interpreter that has it)"}
    rows, env = [], dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script needs only torch and hivemind, from that interpreter
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)  # as for the ranks
    for n in sizes:
        for compression in compressions:
            cmd = [python, str(HIVEMIND_SCRIPT), "--peers", str(n), "--numel", str(numel),
                   "--compression", compression, "--steps", str(steps)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                     stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                rows.append({"peers": n, "compression": compression, "error": f"timed out after {timeout:g}s"})
                continue
            if out.returncode != 0:
                rows.append({"peers": n, "compression": compression, "error": out.stderr.strip()[-600:]})
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["seconds"] = spread(row.get("allreduce_s_steps", [row["allreduce_s"]]))
            rows.append(row)
    return {"python": python, "rows": rows}


# -- the suite ---------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch
    import zmq

    return {"python": platform.python_version(), "torch": torch.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "load_average_start": list(os.getloadavg())}


DEFINITIONS = {
    "step_time_s": "1 / steps per second of a process while all processes step (from the last one past its "
                   "first 20 steps to the first one done), mean over processes",
    "comm_share": "1 - T_solo / T_method, clipped to [0, 1]; T_solo: same processes and steps without "
                  "communication (solo for ddp/localsgd, swarm-solo = exchange off for swarmnet)",
    "step_vs_solo": "T_method / T_solo, unclipped (below 1: faster than its own compute-only run, i.e. noise "
                    "or the scheduler favouring it on a shared machine)",
    "others_pace_vs_solo": "non-straggler processes' steps/s with one process slowed down, over their solo steps/s",
    "others_pace_vs_no_straggler": "non-straggler processes' steps/s with one process slowed down, over their "
                                   "steps/s in the same method without it (what the straggler costs them)",
    "time_to_target_s": "end of the first 10 steps to the end of the first 10-step window with mean training "
                        "loss <= target, slowest process",
    "bytes_per_step": "bytes one process receives per training step (ring formula for torch, measured for swarmnet)",
    "common_window_s": "length of the span in which every process stepped, over which the paces are read",
}


def run(suite: Suite = FULL, *, json_path: Path | None = None, chart_path: Path | None = None,
        hivemind_python: str | None = None, progress: bool = True, command: str = "") -> dict[str, Any]:
    from rich.progress import Progress

    started = time.monotonic()
    result: dict[str, Any] = {"version": RESULT_VERSION, "command": command, "environment": environment(),
                              "suite": asdict(suite), "definitions": DEFINITIONS}
    records: list[dict[str, Any]] = []
    plan = _plan(suite, 2)
    per_world = suite.repeats * sum(len(phases(plan, m.name)) for m in suite.models)
    with tempfile.TemporaryDirectory(prefix="swarmnet-baselines-") as tmp, Progress(disable=not progress) as bar:
        task = bar.add_task("bench baselines", total=per_world * len(suite.sizes))
        for world in suite.sizes:
            bar.update(task, description=f"bench baselines: {world} processes")
            records += run_world(suite, world, Path(tmp), on_phase=lambda k: bar.advance(task, k))
            if json_path is not None:  # what is measured so far survives a later failure
                write_json(json_path, {**result, "partial": True, "records": records})
    result.update(aggregate(records))
    python = find_hivemind_python(hivemind_python)
    if suite.hivemind_sizes:
        numel = max((r["parameters"] or 0) for r in result["methods"])
        result["hivemind"] = run_hivemind(python, sizes=suite.hivemind_sizes,
                                          compressions=suite.hivemind_compressions, numel=numel)
    result["environment"]["load_average_end"] = list(os.getloadavg())
    result["records"] = records  # per rank and phase: what the rows above were computed from
    result["elapsed_s"] = time.monotonic() - started
    if json_path is not None:
        write_json(json_path, result)
    if chart_path is not None:
        plot(result, chart_path)
    return result


# -- presentation ------------------------------------------------------------------------------


def _fmt(s: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if s is None:
        return "-"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"


def methods_table(result: dict[str, Any]) -> Table:
    table = Table(title=escape("time per step and the rest: median [min-max] over repeats"))
    for col in ("model", "n", "method", "step ms", "vs solo", "comm share", "to target s", "KB in/step", "final loss"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for row in result["methods"]:
        method = row["method"] + (f" ({row['backend']})" if row.get("backend", "gloo") != "gloo" else "")
        table.add_row(row["model"], str(row["processes"]), method, _fmt(row["step_time_s"], 1e3, 2),
                      _fmt(row["step_vs_solo"], 1, 2), _fmt(row["comm_share"], 1, 2), _fmt(row["time_to_target_s"], 1, 2) if row["time_to_target_s"]
                      else "not reached",
                      _fmt(row["bytes_per_step"], 1e-3, 0), _fmt(row["final_loss"], 1, 3))
    return table


def straggler_table(result: dict[str, Any]) -> Table:
    slowdown = result["suite"]["slowdown"]
    table = Table(title=f"one process {slowdown:g}x slower: the others' pace vs their solo pace (target >= 0.9)")
    for col in ("model", "n", "method", "others step ms", "straggler step ms", "others pace / solo",
                "others pace / no straggler"):
        table.add_column(col, justify="left" if col in ("model", "method") else "right")
    for row in result["straggler"]:
        table.add_row(row["model"], str(row["processes"]), row["method"], _fmt(row["others_step_time_s"], 1e3, 2),
                      _fmt(row["straggler_step_time_s"], 1e3, 2), _fmt(row["others_pace_vs_solo"], 1, 2),
                      _fmt(row.get("others_pace_vs_no_straggler"), 1, 2))
    return table


def averaging_table(result: dict[str, Any]) -> Table:
    table = Table(title=escape("one averaging of a model-sized fp32 tensor: median [min-max] over repeats (gloo) "
                               "or steps (hivemind)"))
    for col in ("method", "n", "coordinates", "ms"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for row in result["allreduce"]:
        table.add_row(f"torch all-reduce ({row.get('backend', 'gloo')})", str(row["processes"]), f"{row['numel']:,}",
                      _fmt(row["seconds"], 1e3, 1))
    hm = result.get("hivemind") or {}
    for row in hm.get("rows", []):
        ms = ("error: " + escape(row["error"][-80:]) if "error" in row
              else f"{_fmt(row['seconds'], 1e3, 1)} (max error {row['max_error']:.2g})")
        table.add_row(f"hivemind ({row['compression']})", str(row["peers"]), f"{row.get('numel', 0):,}", ms)
    if "skipped" in hm:
        table.caption = escape(f"hivemind: {hm['skipped']}")  # its [extra] is not markup
    return table


def plot(result: dict[str, Any], output: Path) -> Path:
    """Time per step vs number of processes, one panel per model, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["methods"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in ("solo", "swarm-solo", *METHODS):
            rows = sorted((r for r in result["methods"] if r["model"] == model and r["method"] == method
                           and r["step_time_s"] is not None),  # None: not measured (no common window)
                          key=lambda r: r["processes"])
            if not rows:
                continue
            xs = [r["processes"] for r in rows]
            med = [r["step_time_s"]["median"] * 1e3 for r in rows]
            err = [[m - r["step_time_s"]["min"] * 1e3 for m, r in zip(med, rows)],
                   [r["step_time_s"]["max"] * 1e3 - m for m, r in zip(med, rows)]]
            label = {"solo": "compute only (torch)", "swarm-solo": "compute only (swarmnet peer)"}.get(method, method)
            backends = sorted({r.get("backend", "gloo") for r in rows} - {"gloo"})  # as the table labels them
            label += f" [{'/'.join(backends)}]" if backends else ""
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=label,
                        linestyle="--" if method.endswith("solo") else "-")
        params = next(r["parameters"] for r in result["methods"] if r["model"] == model)
        ax.set_title(f"{model} ({params:,} parameters)" if params else model)
        ax.set_xlabel("processes")
        ax.set_ylabel("time per step (ms), median, min-max")
        ax.set_xticks(sorted({r["processes"] for r in result["methods"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"swarmnet bench baselines: {env['cpus']} CPUs, torch {env['torch']}, shared machine", fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
