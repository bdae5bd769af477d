"""Command functions for ``swarmnet status``, ``swarmnet plot`` and ``swarmnet init``.

They are plain typer-compatible functions; ``swarmnet/cli.py`` registers them with
``app.command("status")(status_command)`` and so on. Bodies stay synchronous: parse, validate,
then run the event loop or write files.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from swarmnet.errors import ConfigError, disk_full
from swarmnet.log import counted

if TYPE_CHECKING:
    from swarmnet.ui.model import SwarmSnapshot


@contextlib.contextmanager
def _stdout_for_the_document(json_: bool) -> Iterator[TextIO]:
    """Where the output goes: with --json, stdout carries the document alone. Native libraries
    (UCX, when a peer advertises a ucx:// address) print their errors on file descriptor 1; while
    the status is collected, that descriptor points at stderr."""
    try:
        real = json_ and sys.stdout.fileno() == 1
    except (AttributeError, ValueError, OSError):  # a replaced stdout (tests, notebooks)
        real = False
    if not real:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(os.dup(saved), "w")
    try:
        yield out
    finally:
        out.close()
        sys.stdout.flush()  # what Python printed meanwhile belongs to stderr too
        os.dup2(saved, 1)
        os.close(saved)


def require_run_dir(path: Path, flag: str = "") -> None:
    """Exit naming ``path`` (given as ``flag``) when it is not an existing directory."""
    try:
        if not path.is_dir():
            _fail(f"{flag}{path}: {'not a directory' if path.exists() else 'no such directory'}; pass a run directory")
    except OSError as exc:  # a folder on the way that we may not look into (EACCES)
        _fail(f"{flag}{path}: cannot look at it ({exc.strerror or exc}); pass a run directory you may read")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def status_command(
    seed: Annotated[Optional[list[str]], typer.Option("--seed", "-s", help="Address of any peer of the swarm, e.g. tcp://10.0.0.1:7100 or file:///run/peer0/card.json (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="Run directory: seeds come from its */card.json files.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", "-i", help="Seconds between refreshes.")] = 1.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline of one STATUS request, seconds.")] = 0.8,
    key: Annotated[Optional[Path], typer.Option("--key", "-k", help=escape("Secret key file (NAME.key_secret) for a swarm with [security] enabled; in allow-list mode its public key must be admitted."))] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help=escape("Swarm config whose [security] key to use (when --key is not given)."))] = None,
) -> None:
    """Watch a running swarm: one row per peer, swarm totals and recent events, refreshed live."""
    from swarmnet.config import load_section
    from swarmnet.security import client_keys
    from swarmnet.ui.collect import (
        StatusCollector,
        check_seeds,
        nobody_answered,
        resolve_seed,
        seeds_from_run_dir,
    )
    from swarmnet.ui.live import run_status

    if not seed and run_dir is None:
        _fail("give --seed ADDRESS or --run-dir DIR")
    for s in seed or []:
        if "://" not in s:
            _fail(f"--seed {s!r} is not an address; use e.g. tcp://10.0.0.1:7100 or file:///run/peer0/card.json")
    try:
        check_seeds(seed or [])
    except ConfigError as exc:
        _fail(f"--seed: {exc}")
    if run_dir is not None:
        require_run_dir(run_dir, "--run-dir ")
    if not seed and run_dir is not None and not seeds_from_run_dir(run_dir):
        _fail(f"--run-dir {run_dir}: no */card.json yet (are the peers running?)")
    if seed and run_dir is None and not any(resolve_seed(s) for s in seed):
        _fail(f"--seed {' '.join(seed)}: no readable card.json (is the peer running?)")
    if not (0 < interval < math.inf and 0 < timeout < math.inf):
        _fail(f"--interval {interval:g} --timeout {timeout:g}: each must be a finite number of seconds > 0")
    try:
        curve = client_keys(key, load_section(config, "security") if config and not key else None)
    except ConfigError as exc:
        _fail(str(exc))

    async def main(out: TextIO) -> SwarmSnapshot:
        collector = StatusCollector(seed or [], timeout=timeout, run_dir=run_dir, curve=curve)
        return await run_status(collector, console=Console(file=out), interval=interval, once=once, as_json=json_)

    try:
        with _stdout_for_the_document(json_) as out:
            snap = asyncio.run(main(out))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not snap.alive:
        _fail(nobody_answered(snap, run_dir), code=1)


def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding <peer>/metrics.jsonl files.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="PNG to write (default: RUN_DIR/swarm.png).")] = None,
) -> None:
    """Plot loss (per peer and mean) against steps and time, consensus distance and bytes per interaction."""
    from swarmnet.ui.plots import plot_run

    require_run_dir(run_dir)
    target = output or run_dir / "swarm.png"
    try:
        target = plot_run(run_dir, target)
    except (FileNotFoundError, ConfigError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {exc.filename or target} ({exc.strerror or exc}); pass a writable path with -o")
    typer.echo(f"wrote {target}")


def init_command(
    hosts: Annotated[str, typer.Option("--hosts", help="Comma-separated host names or addresses; the first host's first peer is the seed.")],
    gpus_per_host: Annotated[int, typer.Option("--gpus-per-host", help="Peers per host, one per GPU (cuda:0 .. cuda:N-1).")] = 1,
    port_base: Annotated[int, typer.Option("--port-base", help="Port of GPU 0's peer on every host; GPU N listens on port-base + N.")] = 7100,
    codec: Annotated[str, typer.Option("--codec", help="Codec written into the swarm config, e.g. fp32 (see docs/codecs.md).")] = "fp32",
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write peers/, configs/swarm.toml, Procfile, the Slurm script and the Kubernetes manifest into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that already exist.")] = False,
) -> None:
    """Write peer manifests, a swarm config, a Procfile, a Slurm script and a Kubernetes manifest."""
    from swarmnet.bootstrap import SwarmPlan, write_bootstrap

    try:
        plan = SwarmPlan(hosts=tuple(h.strip() for h in hosts.split(",")), gpus_per_host=gpus_per_host,
                         port_base=port_base, codec=codec)
        written = write_bootstrap(plan, out, force=force)
    except ConfigError as exc:
        _fail(str(exc))
    except OSError as exc:
        fix = "free space and run it again with --force" if disk_full(exc) else \
            "pass a writable directory with --out"
        _fail(f"--out {out}: cannot write {exc.filename or out} ({exc.strerror or exc}); {fix}")
    typer.echo(f"wrote {len(written)} files for {counted(plan.size, 'peer')} under {out}; seed {plan.seed}")
