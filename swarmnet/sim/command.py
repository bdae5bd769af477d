"""The ``swarmnet simulate`` command: flags -> :class:`SimConfig` -> :func:`run_simulation`.

Registered by the CLI module with ``app.command("simulate")(simulate_command)``. The body only
parses; behaviour lives in :mod:`swarmnet.sim.runner` and is tested there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from swarmnet.errors import ConfigError, disk_full

if TYPE_CHECKING:
    from swarmnet.sim.runner import SimConfig, SimResult


def simulate_command(
    task: Annotated[
        str,
        typer.Option(help="lsq, logreg, gossip, or module:function returning a vectorized task."),
    ] = "lsq",
    algorithm: Annotated[
        str, typer.Option(help="popsgd, swarmsgd, or minibatch (sequential SGD with batch n x B).")
    ] = "popsgd",
    nodes: Annotated[
        str, typer.Option(help="Comma-separated node counts, one run each.")
    ] = "1,2,8,32,128",
    topology: Annotated[
        str, typer.Option(help="SwarmSGD graph: complete, ring or random-regular:K (K is lowered to n - 1 "
                          "where K >= n; where n x K is odd, one node has K - 1).")
    ] = "complete",
    local_steps: Annotated[
        float, typer.Option(help="SwarmSGD local steps H (the mean if --geometric).")
    ] = 1,
    geometric: Annotated[
        bool, typer.Option("--geometric", help="Geometric H with mean --local-steps (SPEC 2.3).")
    ] = False,
    codec: Annotated[
        str, typer.Option(help="SwarmSGD registers: none, or lattice (quantized, SPEC 3.2-3.4).")
    ] = "none",
    lattice_eps: Annotated[
        float | None, typer.Option(help="Lattice step; default lr * H * 6/11 (SPEC 3.4).")
    ] = None,
    rounding: Annotated[
        str, typer.Option(help="Lattice rounding: stochastic or dither.")
    ] = "stochastic",
    interactions_per_node: Annotated[
        float, typer.Option(help="Run length: interactions each node takes part in, on average.")
    ] = 1000,
    lr: Annotated[float, typer.Option(help="Learning rate eta0.")] = 0.01,
    lr_decay: Annotated[
        float | None,
        typer.Option(help="PopSGD: V0 of eta0 / (1 + V / V0) on each node's phase clock."),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(help="Samples per stochastic gradient (default: lsq 1, logreg 128)."),
    ] = None,
    task_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE passed to the task factory, e.g. dim=90; repeat the flag for each option.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice of the run.")] = 0,
    records: Annotated[int, typer.Option(help="Curve points per run (at most one per draw).")] = 200,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also run mini-batch SGD with batch n x B for each n (SPEC 1.5).")
    ] = False,
    naive: Annotated[
        bool, typer.Option("--naive", help="Use the one-pair-at-a-time reference loop (identical results).")
    ] = False,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or float64 models.")] = "float32",
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads (1 is fastest on a busy shared machine).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for CSV/JSONL curves, the PNG and a summary.")
    ] = Path("runs/simulate"),
    window: Annotated[
        str | None,
        typer.Option(
            help="START:STOP node-0 steps: also print mean (std) of the losses at the curve points "
            "(--records) in that span."
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Simulate PopSGD or SwarmSGD on many nodes with exact sequential semantics (SPEC 1, 2)."""
    try:
        from swarmnet.sim.runner import (  # torch: when it runs
            SimConfig,
            SimulationInterrupted,
            run_simulation,
        )

        config = SimConfig(
            task=task,
            task_options=parse_options(task_option or []),
            algorithm=algorithm,
            nodes=parse_nodes(nodes),
            topology=topology,
            local_steps=local_steps,
            geometric=geometric,
            codec=codec,
            lattice_eps=lattice_eps,
            rounding=rounding,
            interactions_per_node=interactions_per_node,
            lr=lr,
            lr_decay=lr_decay,
            batch=batch,
            seed=seed,
            records=records,
            baseline=baseline,
            naive=naive,
            device=device,
            dtype=dtype,
            threads=threads,
            out=out,
            progress=not no_progress,
        )
        span = parse_window(window) if window else None
        prepare_out(out)
        result = run_simulation(config)
    except SimulationInterrupted as stop:
        typer.secho(interrupted_note(stop.result, out), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    except OSError as exc:
        typer.secho(write_failure(exc, out), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        typer.secho(f"error: the simulation does not fit in memory ({first}). {memory_note(config)}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    print_summary(result, span)
    if diverged(result) or any(run.stopped for run in result.runs):
        raise typer.Exit(1)  # the table's note says which runs and what to change


def write_failure(exc: OSError, out: Path) -> str:
    """The file that could not be written, the OS's reason, and what to do: free space on a
    full disk (another directory there would fill the same), another directory otherwise."""
    where = exc.filename or f"the results under {out}"
    full = disk_full(exc)
    hint = "free space or pass another --out" if full else "pass a writable directory with --out"
    return f"error: writing {where} failed: {exc.strerror or exc}; {hint}"


def interrupted_note(result: SimResult, out: Path) -> str:
    """What Ctrl-C kept: the finished runs, by node count (and algorithm, with --baseline)."""
    if not result.runs:
        return f"interrupted: no run had finished; nothing written to {out}"
    algorithms = list(dict.fromkeys(run.algorithm for run in result.runs))
    counts = {a: ", ".join(str(run.nodes) for run in result.runs if run.algorithm == a) for a in algorithms}
    which = f"n={counts[algorithms[0]]}" if len(algorithms) == 1 else "; ".join(f"{a} n={c}" for a, c in counts.items())
    runs = "the finished run" if len(result.runs) == 1 else f"the {len(result.runs)} finished runs"
    return f"interrupted: wrote {runs} ({which}) to {out}"


def memory_note(config: SimConfig) -> str:
    """What sets a run's memory, with this run's values: the models scale with the node count,
    the gradient inputs drawn ahead for a block of draws with the batch (and SwarmSGD's local
    steps), whatever the node count. One message blaming --nodes misled at --nodes 8."""
    from swarmnet.sim.runner import task_batch

    swarm = config.algorithm == "swarmsgd"
    models = "the models, two copies for SwarmSGD" if swarm else "the models"
    inputs = "--batch x --local-steps" if swarm else "--batch"
    values = f"--nodes {max(config.nodes)}, --batch {task_batch(config)}"
    if swarm:
        values += f", --local-steps {config.local_steps:g}"
    return (f"Its size grows with --nodes x the task's dimension ({models}) and with {inputs} (the "
            "gradient inputs drawn ahead for each block of 4,096-65,536 draws, whatever the node count); "
            f"here {values}: lower the one that is large (or use --device cpu where a GPU ran out)")


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's out-of-memory error on a GPU, its CPU allocator's, or Python's."""
    import torch

    text = str(exc)
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in text or "out of memory" in text)


def prepare_out(out: Path) -> None:
    """Create ``--out`` before the run, so a bad path fails before the simulation, not after it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {out}: exists and is not a directory; pass a directory") from None
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create this directory ({exc.strerror or exc}); "
                          "pass a writable directory") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out}: the directory is not writable; pass a writable directory")


MAX_NODES = 2**40
"""Far beyond any machine (their clocks alone take 8 TB), still far from overflowing the int64
sizes of tensors and index arrays: larger counts ended in torch overflow tracebacks."""


def parse_nodes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--nodes must be comma-separated integers, e.g. 1,2,8 (got {text!r})"
        ) from None
    if not values:
        raise ConfigError("--nodes is empty")
    if too_many := [n for n in values if n > MAX_NODES]:
        raise ConfigError(f"--nodes {too_many[0]}: at most {MAX_NODES:,} (2^40) nodes per run")
    if len(set(values)) < len(values):
        raise ConfigError(f"--nodes {text}: lists a node count twice (each run writes its files by node count)")
    return values


def parse_window(text: str) -> tuple[float, float]:
    start, sep, stop = text.partition(":")
    try:
        span = (float(start), float(stop))
    except ValueError:
        span = (1.0, 0.0)
    if not sep or not all(math.isfinite(v) for v in span) or span[0] > span[1]:
        raise ConfigError(
            f"--window needs START:STOP in node-0 steps, e.g. 2000:6000 (got {text!r})"
        )
    return span


def parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values become int, float, bool or stay strings."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task-option needs KEY=VALUE, got {item!r}")
        options[key.strip()] = _value(raw.strip())
    return options


def _value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def diverged(result: SimResult) -> list[str]:
    """The runs whose final loss is not finite: the command then exits with status 1."""
    return [run.label for run in result.runs if not math.isfinite(run.final()["loss_node"])]


def _explain_nans(console: Any, result: SimResult, window: tuple[float, float] | None) -> None:
    """Say why figures read nan: the run diverged, or no curve point lies in the window."""
    if labels := diverged(result):
        console.print(f"{', '.join(labels)}: the loss is not finite (the run diverged); lower --lr", markup=False)
    for run in result.runs:
        if run.stopped:
            console.print(f"{run.label}: {run.stopped}", markup=False)
    if window:
        start, stop = window
        outside = [run.label for run in result.runs if not any(start <= p["node_steps"] <= stop for p in run.curve)]
        if outside:
            console.print(f"no curve point falls in --window {start:g}:{stop:g} for {', '.join(outside)}: "
                          "give a span inside the run's node-0 steps (see the CSV's node_steps)", markup=False)


def print_summary(result: SimResult, window: tuple[float, float] | None = None) -> None:
    """One row per run: final losses, consensus, bits; with ``window``, mean (std) of the node-0
    and mean-model losses at the curve points whose node-0 steps fall in the window (the SPEC
    1.5 table's statistic)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="swarmnet simulate")
    names = ["run", "draws", "draws/s", "loss node 0", "loss mean", "consensus", "bits mean/max"]
    if window:
        names += [f"node 0 over {window[0]:g}-{window[1]:g}", "mean model over it"]
    for name in names:
        table.add_column(name, justify="right")
    for run in result.runs:
        last = run.final()
        means = [p["bits_mean"] for p in run.curve if math.isfinite(p.get("bits_mean", math.nan))]
        peaks = [p["bits_max"] for p in run.curve if math.isfinite(p.get("bits_max", math.nan))]
        bits_text = f"{sum(means) / len(means):.2f}/{max(peaks):.0f}" if means else ""
        cells = [
            run.label,
            f"{run.draws:,}",
            f"{run.rate:,.0f}",
            f"{last['loss_node']:.4g}",
            f"{last['loss_mean']:.4g}",
            f"{last['consensus']:.3g}",
            bits_text,
        ]
        if window:
            for key in ("loss_node", "loss_mean"):
                mean, std = run.window(key, *window)
                cells.append(f"{mean:.4g} ({std:.2g})")
        table.add_row(*cells)
    terminal = Console()
    # Piped or redirected, rich assumes 80 columns and would cut the figures short.
    console = Console(width=max(100, terminal.width) if terminal.is_terminal else 240)
    console.print(table)
    _explain_nans(console, result, window)
    if result.plot is not None:
        console.print(f"curves and plot in {result.plot.parent} ({result.plot.name})", markup=False)
