"""``run_simulation``: a sweep over node counts, with curves, files and a progress bar.

The plain-Python entry point behind ``swarmnet simulate``::

    from swarmnet.sim.runner import SimConfig, run_simulation
    result = run_simulation(SimConfig(task="lsq", algorithm="popsgd", nodes=(1, 8, 32),
                                      interactions_per_node=6000, lr=0.01, baseline=True,
                                      out=Path("runs/sim")))
    for run in result.runs:
        print(run.label, run.window("loss_node", 2000, 6000))

Run length: ``interactions_per_node`` = T means every node takes part in T interactions on
average: T x n / (2 (1 - 1/n)) draws for PopSGD (a drawn self-pair is dropped), T x n / 2
for SwarmSGD, T draws for n = 1 and T steps for the mini-batch baseline. So the x-axis
``time`` (interactions per node) equals the local SGD steps per node for PopSGD and the steps
of the baseline model, which makes "at equal local step counts" comparisons direct (SPEC 1.5).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from swarmnet.algorithms.local_steps import LocalSteps
from swarmnet.algorithms.topology import Topology, parse_topology
from swarmnet.codecs import lattice
from swarmnet.config import check_device
from swarmnet.errors import ConfigError
from swarmnet.sim import output
from swarmnet.sim.engine import ALGORITHMS, Engine, EngineConfig, make_engine
from swarmnet.sim.errors import SettingError
from swarmnet.sim.problems import load_vector_task

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FLAGS = {"lr": "--lr", "lr_clock_scale": "--lr-decay", "codec": "--codec", "lattice_eps": "--lattice-eps",
         "rounding": "--rounding"}
"""The flag of each engine setting a :class:`SettingError` names."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    task: str = "lsq"
    """lsq, logreg, gossip or module:function (see :mod:`swarmnet.sim.problems`)."""
    task_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the task factory (e.g. dim=90 for lsq)."""
    algorithm: str = "popsgd"
    nodes: Sequence[int] = (1, 2, 8, 32, 128)
    topology: str = "complete"
    local_steps: float = 1
    geometric: bool = False
    codec: str = "none"
    lattice_eps: float | None = None
    rounding: str = "stochastic"
    interactions_per_node: float = 1000
    lr: float = 0.01
    lr_decay: float | None = None
    """V0 of PopSGD's eta0 / (1 + V / V0); None: constant rate."""
    batch: int | None = None
    """Samples per stochastic gradient; None: the task's default (lsq 1, logreg 128)."""
    seed: int = 0
    records: int = 200
    """Curve points per run (plus the initial one)."""
    baseline: bool = False
    """Also run sequential mini-batch SGD with batch n x B for every n (SPEC 1.5)."""
    naive: bool = False
    """Run the one-pair-at-a-time reference loop instead of layers (same results, slower)."""
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    """torch CPU threads (None: leave torch's setting)."""
    out: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"--algorithm must be one of {', '.join(ALGORITHMS)}")
        if not self.nodes or any(int(n) < 1 for n in self.nodes):
            raise ConfigError(f"--nodes needs positive node counts, got {list(self.nodes)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
        if not (math.isfinite(self.interactions_per_node) and self.interactions_per_node > 0) or self.records < 1:
            raise ConfigError("--interactions-per-node (a finite number) and --records must be positive")
        if not 0 <= self.seed < 2**62:  # the streams of a run are seeded at fixed offsets from it
            raise ConfigError(f"--seed must be in [0, 2^62), got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        check_device(self.device)
        if self.codec != "none" and self.algorithm != "swarmsgd":
            raise ConfigError(
                "--codec lattice: quantized registers are simulated for SwarmSGD only"
            )
        if self.algorithm != "swarmsgd" and (self.topology != "complete" or self.local_steps != 1 or self.geometric):
            what = ("PopSGD pairs any two nodes and takes one step per interaction" if self.algorithm == "popsgd"
                    else "the mini-batch baseline has one model and takes one step per draw")
            raise ConfigError(f"--topology, --local-steps and --geometric are SwarmSGD's; {what}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {self.batch}")
        if self.codec == "none" and (self.lattice_eps is not None or self.rounding != "stochastic"):
            raise ConfigError("--lattice-eps and --rounding set the lattice registers: add --codec lattice")

    def engine_config(self, algorithm: str, nodes: int) -> EngineConfig:
        """The engine's settings, refused values named by their flags."""
        try:
            topology = parse_topology(self.topology, seed=self.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            steps = LocalSteps(self.local_steps, self.geometric)
        except ValueError as exc:
            raise ConfigError(f"--local-steps {self.local_steps:g}: {exc}") from None
        try:
            return self._engine_config(algorithm, nodes, topology, steps)
        except SettingError as exc:
            raise ConfigError(exc.naming(FLAGS[exc.setting])) from None

    def _engine_config(self, algorithm: str, nodes: int, topology: Topology, steps: LocalSteps) -> EngineConfig:
        swarm = algorithm == "swarmsgd"
        return EngineConfig(
            algorithm=algorithm,
            nodes=nodes,
            lr=self.lr,
            lr_clock_scale=self.lr_decay,
            topology=topology,
            local_steps=steps if swarm else LocalSteps(1),
            codec=self.codec if swarm else "none",
            lattice_eps=self.lattice_eps,
            rounding=self.rounding,
            seed=self.seed,
            device=self.device,
            dtype=DTYPES[self.dtype],
            naive=self.naive,
        )


def total_draws(algorithm: str, nodes: int, interactions_per_node: float) -> int:
    """Draws that give every node ``interactions_per_node`` interactions on average."""
    if nodes == 1 or algorithm == "minibatch":
        return math.ceil(interactions_per_node)
    if algorithm == "popsgd":
        return math.ceil(interactions_per_node * nodes * nodes / (2 * (nodes - 1)))
    return math.ceil(interactions_per_node * nodes / 2)


@dataclass
class RunResult:
    algorithm: str
    nodes: int
    curve: list[dict[str, float]]
    seconds: float
    draws: int
    files: dict[str, Path] = field(default_factory=dict)
    stopped: str | None = None
    """Why the run ended before its last draw, other than divergence (its loss is then NaN)."""

    @property
    def label(self) -> str:
        return f"{self.algorithm} n={self.nodes}"

    @property
    def rate(self) -> float:
        """Draws (interactions) per second of wall time, curve points included."""
        return self.draws / self.seconds if self.seconds > 0 else math.nan

    def window(
        self, key: str, start: float, stop: float, by: str = "node_steps"
    ) -> tuple[float, float]:
        """Mean and standard deviation of ``key`` over the points with start <= ``by`` <= stop."""
        values = [
            p[key]
            for p in self.curve
            if start <= p[by] <= stop and math.isfinite(p.get(key, math.nan))
        ]
        if not values:
            return math.nan, math.nan
        return statistics.fmean(values), statistics.pstdev(values)

    def final(self) -> dict[str, float]:
        return self.curve[-1]


@dataclass
class SimResult:
    config: SimConfig
    runs: list[RunResult]
    plot: Path | None = None
    summary: Path | None = None
    interrupted: bool = False
    """Ctrl-C stopped the sweep: ``runs`` holds the runs that had finished."""

    def run(self, algorithm: str, nodes: int) -> RunResult:
        for run in self.runs:
            if run.algorithm == algorithm and run.nodes == nodes:
                return run
        raise KeyError((algorithm, nodes))


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep. ``result`` holds the runs that had finished, already written (as
    a sweep marked interrupted) when ``config.out`` is set; hours of finished runs are not lost."""

    def __init__(self, result: SimResult) -> None:
        super().__init__()
        self.result = result


def run_simulation(config: SimConfig) -> SimResult:
    """Run ``config.algorithm`` (and the baseline if asked) for every node count; write the
    files when ``config.out`` is set; return the curves. On Ctrl-C: write the finished runs and
    raise :class:`SimulationInterrupted`."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = load_vector_task(
        config.task, batch=task_batch(config), seed=config.seed, options=config.task_options
    )
    plan = [(config.algorithm, int(n)) for n in config.nodes]
    if config.baseline and config.algorithm != "minibatch":
        plan += [("minibatch", int(n)) for n in config.nodes]
    engines = {key: config.engine_config(*key) for key in plan}  # validate everything up front
    budgets = {key: total_draws(key[0], key[1], config.interactions_per_node) for key in plan}
    runs: list[RunResult] = []
    try:
        _run_plan(config, task, plan, engines, budgets, runs)
    except KeyboardInterrupt:
        result = SimResult(config, runs, interrupted=True)
        if config.out is not None and runs:
            _write(result, task.name)
        raise SimulationInterrupted(result) from None
    result = SimResult(config, runs)
    if config.out is not None:
        _write(result, task.name)
    return result


def _run_plan(config: SimConfig, task: Any, plan: list[tuple[str, int]], engines: dict[tuple[str, int], EngineConfig],
              budgets: dict[tuple[str, int], int], runs: list[RunResult]) -> None:
    """Run the plan in order, appending each run to ``runs`` once it has finished."""
    with _progress(config.progress) as bar:
        overall = bar.add_task("simulate", total=sum(budgets.values())) if bar else None
        for key in plan:
            algorithm, nodes = key
            if bar:
                bar.update(overall, description=f"{algorithm} n={nodes}")
            engine = make_engine(engines[key], task)
            draws = budgets[key]
            curve = [_with_nodes(engine.observe(), nodes)]
            started = time.perf_counter()
            done = 0
            stopped = None
            records = min(config.records, draws)  # more asked than the run has draws: one point per draw
            for k in range(1, records + 1):
                target = draws * k // records  # strictly increasing, as records <= draws
                try:
                    engine.advance(target - done)
                except lattice.OutOfRange:  # models too large for the lattice step, or not finite
                    assert isinstance(engine, Engine) and engine.registers is not None
                    point = engine.observe()
                    if _diverged(engine.models, point, curve[0]):
                        curve.append(_with_nodes({**curve[-1], "loss_node": math.nan, "loss_mean": math.nan}, nodes))
                        draws = done  # the summary's figures stop where the run did
                    else:
                        curve.append(_with_nodes(point, nodes))
                        draws = engine.draws
                        stopped = _lattice_overflow(config, engine.registers.eps, engine.models, draws)
                    break
                curve.append(_with_nodes(engine.observe(), nodes))
                if bar:
                    bar.advance(overall, target - done)
                done = target
            runs.append(RunResult(algorithm, nodes, curve, time.perf_counter() - started, draws, stopped=stopped))


def _diverged(models: torch.Tensor, point: dict[str, float], first: dict[str, float]) -> bool:
    """Whether models the lattice could not quantize diverged (not finite, or the mean model's
    loss above where it started) rather than met a lattice step too small for their values."""
    if not bool(torch.isfinite(models).all()):
        return True
    return not point["loss_mean"] <= first["loss_mean"]


def _lattice_overflow(config: SimConfig, eps: float, models: torch.Tensor, draws: int) -> str:
    hint = ("raise --lattice-eps (or leave it out for the adaptive lr x H x 6/11)" if config.lattice_eps is not None
            else "set --lattice-eps above the adaptive lr x H x 6/11")
    return (f"stopped at draw {draws:,}: the lattice step eps = {eps:g} is too small for the models' values "
            f"(max |x| = {float(models.abs().max()):.3g}): their integer coordinates x / eps overflow "
            f"(|x / eps| must stay below 2^46); {hint}")


def task_batch(config: SimConfig) -> int:
    """Samples per stochastic gradient: --batch, or the task's default."""
    if config.batch is not None:
        return config.batch
    return 128 if config.task == "logreg" else 1


def _with_nodes(point: dict[str, float], nodes: int) -> dict[str, float]:
    point["nodes"] = float(nodes)
    return point


def _write(result: SimResult, task_name: str) -> None:
    """Write the sweep's files all or nothing: every one goes into a staging folder inside
    ``--out`` (the same file system) first, and only once all are written are they moved into
    place and the earlier sweep's files that this one does not replace removed. A write that
    fails (a full disk) removes the staging folder and leaves the earlier sweep whole."""
    config = result.config
    assert config.out is not None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{task_name}-{config.algorithm}"
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}-", suffix=".staging", dir=out))
    try:
        try:
            names = _write_files(result, task_name, stem, staging)
        except OSError as exc:
            if exc.filename and Path(exc.filename).parent == staging:
                exc.filename = str(out / Path(exc.filename).name)  # the file it was to be
            raise
        earlier = _earlier_files(out / f"{stem}-summary.json", stem)
        for name in names:  # the summary last: it lists the others
            os.replace(staging / name, out / name)
        for name in earlier - set(names):
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for run in result.runs:
        run.files = {kind: out / path.name for kind, path in run.files.items()}
    result.plot = out / f"{stem}.png"
    result.summary = out / f"{stem}-summary.json"


def _write_files(result: SimResult, task_name: str, stem: str, folder: Path) -> list[str]:
    """Every file of the sweep into ``folder``; their names, the summary's last."""
    config = result.config
    meta_common = {k: v for k, v in asdict(config).items() if k not in ("out", "progress")}
    meta_common["batch"] = task_batch(config)  # the one used, where --batch left it to the task
    names: list[str] = []
    for run in result.runs:
        base = folder / run_name(stem, config.algorithm, run)
        run.files = {"csv": base.with_suffix(".csv"), "jsonl": base.with_suffix(".jsonl")}
        output.write_csv(run.files["csv"], run.curve)
        meta = {
            **meta_common,
            "algorithm": run.algorithm,
            "nodes": run.nodes,
            "draws": run.draws,
            "seconds": run.seconds,
        }
        output.write_jsonl(run.files["jsonl"], run.curve, meta)
        names += [path.name for path in run.files.values()]
    title = f"{task_name}: {config.algorithm}" + (
        f" ({config.codec})" if config.codec != "none" else ""
    )
    output.plot(folder / f"{stem}.png", [(run.algorithm, run.nodes, run.curve) for run in result.runs], title)
    output.write_summary(
        folder / f"{stem}-summary.json",
        {
            "config": meta_common,
            "interrupted": result.interrupted,  # by Ctrl-C: the runs that had finished
            "runs": [
                {
                    "algorithm": r.algorithm,
                    "nodes": r.nodes,
                    "draws": r.draws,
                    "seconds": r.seconds,
                    "draws_per_second": r.rate,
                    "final": r.final(),
                    "stopped": r.stopped,
                    "files": {k: v.name for k, v in r.files.items()},  # beside the summary
                }
                for r in result.runs
            ],
        },
    )
    return [*names, f"{stem}.png", f"{stem}-summary.json"]


def run_name(stem: str, algorithm: str, run: RunResult) -> str:
    """A run's file name without suffix: ``<task>-<algorithm>-n<N>``, and for the mini-batch
    baseline of a --baseline sweep ``<task>-<algorithm>-baseline-n<N>``. Every file of a sweep
    starts with its stem, so a minibatch sweep in the same folder never writes over them."""
    return f"{stem}-n{run.nodes}" if run.algorithm == algorithm else f"{stem}-baseline-n{run.nodes}"


def _earlier_files(summary: Path, stem: str) -> set[str]:
    """The curves an earlier sweep of the same task and algorithm wrote into this folder (its
    summary lists them), to remove once this sweep is in place, so the folder holds this sweep's
    node counts only, not a mix of two sweeps' under one plot and summary. Only names of this
    sweep's own (``<stem>-...``): a summary written before the baseline had names of its own
    lists another sweep's files."""
    try:
        runs = json.loads(summary.read_text())["runs"]
        names = {Path(f).name for run in runs for f in run["files"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # none, or not one of ours: nothing to remove
    return {name for name in names if name.startswith(f"{stem}-") and name.endswith((".csv", ".jsonl"))}


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("interactions"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
