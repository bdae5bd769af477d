"""The ``swarmnet`` command line: peer, up, bench (and the tools registered by other modules).

Command bodies stay synchronous: parse, load and validate the config, set up logging, then run
the event loop. Behaviour lives below the CLI and is tested there.
"""

from __future__ import annotations

import enum
import json
import math
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from swarmnet import jsonsafe
from swarmnet.config import (
    PeerManifest,
    check_device,
    dotted_key,
    load_config,
    load_manifest,
    manifest_settings,
)
from swarmnet.errors import BenchFailed, ConfigError, SwarmError
from swarmnet.log import setup_logging

# Help texts are rich markup (escape() a literal "[word]"), whatever typer's default mode.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="Decentralized asynchronous data-parallel training (PopSGD, SwarmSGD).")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", help="Benchmarks: ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich", help="CURVE keys that close a swarm to strangers (docs/operations.md, Security).")
app.add_typer(keys_app, name="keys")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Swarm config (TOML), e.g. configs/quickstart.toml.")]


class Level(enum.StrEnum):
    """Written as --help shows the choices; setup_logging takes either case."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


LogLevel = Annotated[Level, typer.Option("--log-level", case_sensitive=False, help="How much to log.")]


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


FLAGS = {"network.listen": "--listen", "network.advertise": "--advertise", "network.interface": "--interface",
         "network.seeds": "--seed", "device.device": "--device", "run.dir": "--run-dir", "run.peers": "--peers",
         "security.key": "--key"}
"""The flag behind each config key a flag sets, named when its value is refused."""


def build_overrides(**flags: Any) -> dict[str, Any]:
    """CLI flags given as {'section.key': value}; None means not given."""
    return {key.replace("__", "."): value for key, value in flags.items() if value not in (None, [], "")}


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``section.key=VALUE`` (or ``section.key.option=VALUE`` for an entry of task.options or
    codec.options) pairs; VALUE is read as JSON when it parses, else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not dotted_key(key):
            raise ConfigError(f"--set {item!r}: expected section.key=VALUE, e.g. train.lr=0.05 (an entry of a "
                              "table: task.options.hidden=128)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def combine_overrides(flags: dict[str, Any], settings: dict[str, Any], budget: dict[str, Any],
                      budget_flag: str) -> dict[str, Any]:
    """The flags', ``--set``'s and a budget flag's overrides together. A key two of them set is
    an error: which value was meant is not for swarmnet to guess."""
    for key in settings:
        if key in flags:
            raise ConfigError(f"{FLAGS[key]} and --set {key} both set {key}; give one of them")
        if key in budget:
            raise ConfigError(f"{budget_flag} and --set {key} both set the budget; give one of them")
    return {**flags, **settings, **budget}


def budget_override(*, steps: int | None = None, epochs: float | None = None) -> dict[str, Any]:
    """A budget flag replaces whichever budget the config file set."""
    if steps is not None and epochs is not None:
        raise ConfigError(f"--steps {steps} and --epochs {epochs:g} both set the budget; give one of them")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs {epochs:g}: must be a finite number > 0")
    return {"train.steps": steps or 0, "train.epochs": float(epochs or 0.0), "train.sequential_epochs": 0.0}


@app.command()
def peer(
    config: ConfigOpt = None,
    peer_file: Annotated[Optional[Path], typer.Option("--peer", "-p", help="Peer manifest (peers/NAME.toml).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Peer name (default: manifest name or host name).")] = None,
    listen: Annotated[Optional[str], typer.Option(help="Bind address, e.g. tcp://0.0.0.0:7000 (port 0: any).")] = None,
    advertise: Annotated[Optional[str], typer.Option(help="Address others should dial, if not the bound one.")] = None,
    interface: Annotated[Optional[str], typer.Option(help="Advertise this interface's IPv4 address (e.g. ib0) with the bound port.")] = None,
    seed: Annotated[Optional[list[str]], typer.Option("--seed", "-s", help="Address of a peer already in the swarm (repeatable).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (the GPU that LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK names, else CPU), cpu or cuda:N.")] = None,
    run_dir: Annotated[Optional[str], typer.Option(help="Run directory (overrides run.dir).")] = None,
    rank: Annotated[int, typer.Option(help="Index in the swarm for partition sharding (-1: from SWARMNET_RANK, RANK, SLURM_PROCID or LOCAL_RANK).")] = -1,
    key: Annotated[Optional[str], typer.Option(help="This peer's secret key file (overrides security.key).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Budget in local steps (overrides train.*).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint instead of resuming from it.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=VALUE (VALUE as JSON or text), repeatable.")] = None,
    log_level: LogLevel = Level.INFO,
) -> None:
    """Run one peer daemon until its budget is spent or it is stopped (SIGINT/SIGTERM)."""
    from swarmnet.peer.node import PeerIdentity, resolve_rank, run_event_loop, run_peer

    setup_logging(log_level.value)
    try:
        manifest = load_manifest(peer_file) if peer_file else PeerManifest()
        listed, listed_origins = manifest_settings(manifest, peer_file) if peer_file else ({}, {})
        flags = build_overrides(network__listen=listen, network__advertise=advertise, network__interface=interface,
                                network__seeds=seed, device__device=device, run__dir=run_dir, security__key=key)
        settings = parse_settings(set_ or [])
        budget = budget_override(steps=steps) if steps is not None else {}
        overrides = {**listed, **combine_overrides(flags, settings, budget, "--steps")}
        origins = {**listed_origins, **{k: FLAGS[k] for k in flags},
                   **dict.fromkeys(settings, "--set"), **dict.fromkeys(budget, "--steps")}
        if seed and manifest.seeds and "network.seeds" not in settings:
            overrides["network.seeds"] = seed + manifest.seeds
            origins["network.seeds"] = f"--seed and {peer_file}"
        cfg = load_config(config, overrides, origins)
        identity = PeerIdentity(name or manifest.name or socket.gethostname(), resolve_rank(rank if rank >= 0 else manifest.rank))
    except ConfigError as exc:
        fail(str(exc))
    code = run_event_loop(run_peer(cfg, identity, resume=not fresh))
    # The loop is closed and its handlers are gone: a late SIGTERM (honcho stopping the others)
    # must not turn a clean exit into a death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise typer.Exit(code)


@app.command()
def up(
    config: ConfigOpt = Path("configs/quickstart.toml"),
    peers: Annotated[Optional[int], typer.Option("--peers", "-n", help="Number of local peers (default: run.peers).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Budget in local steps per peer.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Budget in epochs per peer (> 0).")] = None,
    summary: Annotated[Optional[Path], typer.Option(help="Write the JSON summary here.")] = None,
    run_dir: Annotated[Optional[str], typer.Option(help="Run directory (overrides run.dir).")] = None,
    peer_dir: Annotated[Optional[Path], typer.Option("--manifests", help="Start one peer per manifest in this folder instead of --peers.")] = None,
    transport: Annotated[str, typer.Option(help="tcp (127.0.0.1) or ipc (unix sockets under the run dir).")] = "tcp",
    no_fresh: Annotated[bool, typer.Option("--no-fresh", help="Resume each peer from its checkpoint in the run dir (default: start from scratch).")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=VALUE, repeatable.")] = None,
    start_timeout: Annotated[float, typer.Option("--start-timeout", help="Seconds the first peer may take to start (import the task, load its data, build its model).")] = 120.0,
    log_level: LogLevel = Level.WARNING,
) -> None:
    """Launch a local swarm as real processes, show progress, write a summary."""
    from swarmnet.launch import LaunchPlan, check_output_path, launch, launch_config, write_refusal

    setup_logging(log_level.value)
    flags = build_overrides(run__peers=peers, run__dir=run_dir)
    try:
        settings = parse_settings(set_ or [])
        budget = budget_override(steps=steps, epochs=epochs) if steps is not None or epochs is not None else {}
        overrides = combine_overrides(flags, settings, budget, "--steps" if steps is not None else "--epochs")
        origins = {**{k: FLAGS[k] for k in flags}, **dict.fromkeys(settings, "--set"),
                   **dict.fromkeys(budget, "--steps" if steps is not None else "--epochs")}
        cfg = launch_config(config, overrides, origins, peer_dir)
        if summary is not None:
            check_output_path(summary)
        plan = LaunchPlan.build(cfg, config_path=config, overrides=overrides, manifests=peer_dir,
                                transport=transport, fresh=not no_fresh, log_level=log_level.value,
                                start_timeout=start_timeout)
    except ConfigError as exc:
        if summary is not None:
            write_refusal(summary, str(exc))
        fail(str(exc))
    try:
        code = launch(plan, summary_path=summary)
    except SwarmError as exc:
        fail(str(exc))
    raise typer.Exit(code)



# Its help is one paragraph: typer keeps the line breaks inside any later paragraph.
@app.command("eval", short_help="Average the current models of a running swarm and evaluate the average.")
def eval_(
    config: ConfigOpt = Path("configs/quickstart.toml"),
    seed: Annotated[Optional[list[str]], typer.Option("--seed", "-s", help="Address of any peer of the swarm (tcp://... or file:///.../card.json), repeatable.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="Run directory: peers come from its */card.json files.")] = None,
    peers: Annotated[int, typer.Option("--peers", "-n", help="Average only the first N live peers by name (0: all).")] = 0,
    bn_batches: Annotated[int, typer.Option("--bn-batches", help="Training batches to recompute BatchNorm statistics on (0: keep none, leaves them reset).")] = 20,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="Also save the average model here (a state_dict).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline of one status request, seconds.")] = 5.0,
    key: Annotated[Optional[Path], typer.Option("--key", "-k", help=escape("Secret key file for a swarm with [security] (default: the config's key)."))] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=VALUE, repeatable.")] = None,
    log_level: LogLevel = Level.WARNING,
) -> None:
    """Average the current models of a running swarm and evaluate the average: pulls every live
    peer's snapshot (or N of them), averages the parameters, recomputes BatchNorm statistics on a
    few training batches and runs the task's evaluation. The config must be the swarm's (task and
    codec)."""
    from swarmnet.evaluation import evaluate_swarm

    setup_logging(log_level.value)
    if not seed and run_dir is None:
        fail("give --seed ADDRESS or --run-dir DIR")
    if peers < 0 or bn_batches < 0:
        fail("--peers and --bn-batches must be >= 0")
    if not 0 < timeout < math.inf:
        fail("--timeout must be a number of seconds > 0")
    if run_dir is not None:
        from swarmnet.ui.commands import require_run_dir

        require_run_dir(run_dir, "--run-dir ")
    _writable(json_path)
    _writable(save, "--save")
    try:
        settings = parse_settings(set_ or [])
        cfg = load_config(config, settings, dict.fromkeys(settings, "--set"))
        result = evaluate_swarm(cfg, seeds=seed or [], run_dir=run_dir, peers=peers, bn_batches=bn_batches,
                                timeout=timeout, key_file=key, save=save)
    except SwarmError as exc:
        fail(str(exc))
    text = jsonsafe.dumps(result, indent=2)
    typer.echo(text)
    if json_path is not None:
        try:
            from swarmnet.peer.checkpoint import write_atomic

            write_atomic(json_path, text.encode(), private=False)  # whole or not at all: never an empty file on a full disk
        except OSError as exc:
            fail(f"--json {json_path}: cannot write {exc.filename or json_path} ({exc.strerror or exc}); the result "
                 "is printed above, pass a writable path to keep a copy", code=1)
    if "model_error" in result:
        fail(f"--save {save}: {result['model_error']}", code=1)


def _writable(path: Path | None, flag: str = "--json") -> None:
    """Refuse an output file that cannot be written before a long run, not after it."""
    if path is None:
        return
    from swarmnet.launch import check_output_path

    try:
        check_output_path(path, flag)
    except ConfigError as exc:
        fail(str(exc))


def _span(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def _known_codecs(codecs: list[str] | None) -> None:
    """Refuse an unknown --codec before any run: a later codec's failure would lose the earlier
    ones' figures."""
    from swarmnet.codecs import CODECS

    unknown = [c for c in codecs or () if c not in CODECS]
    if unknown:
        fail(f"--codec {unknown[0]}: unknown codec; available: {', '.join(sorted(CODECS))}")


@bench_app.command("exchange")
def bench_exchange(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shorter runs.")] = False,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of off / on / unlimited runs (median ratio).")] = 3,
    peers: Annotated[int, typer.Option(min=2, help="Peers in the compute runs' swarm.")] = 2,
    device: Annotated[str, typer.Option(help="The compute runs' peers' device: auto, cpu or cuda:N (all peers on that GPU).")] = "auto",
) -> None:
    """Compute steps/s with the exchange on vs off, snapshot pulls vs raw pyzmq, and what a snapshot
    streamed in pieces would gain."""
    _writable(json_path)
    from rich.console import Console

    from swarmnet.bench.exchange import run

    try:
        if device != "auto":
            check_device(device)
        result = run(json_path=json_path, quick=quick, rounds=rounds, peers=peers, device=device)
    except (ConfigError, BenchFailed) as exc:
        fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)
    p = result["pull"]
    console = Console()
    for c in (result["compute"], result["compute_large_batch"]):
        rate, per_merge = c["steps_per_s"], c["steps_per_merge"]
        console.print(f"compute ({c['peers']} peers, device {c['device']}, batch {c['batch_size']}, H = {c['local_steps']}): {rate['on']:.1f} steps/s with the "
                      f"exchange (a merge every {per_merge['on']:.1f} steps), {rate['off']:.1f} without -> ratio "
                      f"{c['ratio']:.3f} (median of {c['rounds']}: {_span(c['ratio_rounds'])}; target >= 0.95); "
                      f"no CPU budget: {rate['unlimited']:.1f} steps/s, a merge "
                      f"every {per_merge['unlimited']:.1f} steps, ratio {c['ratio_unlimited']:.3f}")
        share, per_step = c["compute_share"], c["cpu_ms_per_step"]
        console.print(f"  split: the training thread kept {c['share_ratio']:.3f} of its share of a core "
                      f"({share['on']:.3f} vs {share['off']:.3f}; the exchange used {c['exchange_share']['on']:.3f}) and "
                      f"took {c['cpu_per_step_ratio']:.3f}x the CPU per step ({per_step['on']:.2f} vs {per_step['off']:.2f} ms)")
    console.print(f"pull {p['bytes'] / 1e6:.1f} MB: swarmnet {p['swarmnet_pull_ms']:.1f} ms, raw pyzmq "
                  f"{p['raw_pyzmq_ms']:.1f} ms -> ratio {p['ratio']:.3f} (target >= 0.8); reading the vector in place "
                  f"+{p['view_ms']:.2f} ms (ratio {p['ratio_with_view']:.3f}; a copying decode "
                  f"+{p['copying_decode_ms']:.1f} ms, {p['ratio_with_copying_decode']:.3f}); the merge's delta and norm "
                  f"+{p['delta_ms']:.1f} ms ({p['ratio_with_view_and_delta']:.3f} with them; after a copying decode "
                  f"+{p['delta_after_copy_ms']:.1f} ms, {p['ratio_with_copying_decode_and_delta']:.3f}); applying the "
                  f"delta to the live model +{p['apply_ms']:.1f} ms (the whole merge: {p['ratio_with_merge']:.3f})")
    console.print(f"  the whole merge's floor here: raw pyzmq's transfer costs {p['raw_cpu_ms']['client']:.1f} ms of CPU "
                  f"at the client and {p['raw_cpu_ms']['server']:.1f} ms at the server, with the raw server's training "
                  f"{p['raw_busy_cores']:.2f} of {p['cores']} cores busy; with the merge's two passes a whole merge takes "
                  f"at least {p['merge_floor_ms']:.1f} ms (ratio {p['merge_floor_ratio']:.3f} at best)")
    s = result["streamed_merge"]
    console.print(f"streamed merge, raw pyzmq, {s['bytes'] / 1e6:.1f} MB in {s['pieces']} pieces against one message, "
                  "transfer, gap and add: " + "; ".join(
                      f"server {mode}: {s[mode]['streamed_ms']:.1f} vs {s[mode]['whole_ms']:.1f} ms -> gain {s[mode]['gain']:.2f}"
                      for mode in ("idle", "busy")))


@bench_app.command("link")
def bench_link(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    rate: Annotated[Optional[list[str]], typer.Option("--rate", help="Link rate each way, as tc writes it (repeatable; default 1gbit and 10gbit; 'unlimited': the veth's own pace).")] = None,
    codec: Annotated[Optional[list[str]], typer.Option("--codec", help="Snapshot codec (repeatable; default fp32 and lattice).")] = None,
    hidden: Annotated[int, typer.Option(min=32, help="Hidden width of the digits MLP (3,000: 36.9 MB in fp32).")] = 3000,
    steps: Annotated[int, typer.Option(min=100, help="Steps per peer in each codec's run.")] = 1000,
    repeats: Annotated[int, typer.Option(min=1, help="Raw pyzmq transfers per rate and host (mean).")] = 30,
) -> None:
    """A merge between two hosts (network namespaces, a rate-limited link) against raw pyzmq moving
    the model's fp32 bytes over the same link. Needs root or CAP_NET_ADMIN."""
    _writable(json_path)
    from swarmnet.bench.link import run
    from swarmnet.testing.netns import rate_bits

    rates = tuple(rate or ("1gbit", "10gbit"))
    for r in rates:
        if r != "unlimited":
            try:
                rate_bits(r)
            except ValueError as exc:
                fail(f"--rate: {exc}")
    _known_codecs(codec)
    try:
        result = run(rates=rates, codecs=tuple(codec or ("fp32", "lattice")), hidden=hidden, steps=steps,
                     repeats=repeats, json_path=json_path)
    except BenchFailed as exc:
        fail(str(exc), 1)
    typer.echo(f"{result['model']} ({result['bytes'] / 1e6:.1f} MB in fp32), 2 peers on 2 hosts, "
               f"pulls back to back")
    for r, row in result["rates"].items():
        typer.echo(f"{r}: raw pyzmq moves the fp32 bytes in {row['raw_ms']:.1f} ms (mean of {row['raw_transfers']}; "
                   f"median {row['raw_ms_median']:.1f})")
        for name, m in row.items():
            if isinstance(m, dict):
                typer.echo(f"  {name}: a merge takes {m['merge_ms']:.1f} ms (pull {m['pull_ms']:.1f}, add "
                           f"{m['apply_ms']:.2f}; {m['bytes_share']:.1%} of the fp32 bytes, {m['requests_per_pull']:.2f} "
                           f"requests a pull) -> ratio {m['ratio']:.2f}")


@bench_app.command("memory")
def bench_memory(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    codec: Annotated[Optional[list[str]], typer.Option("--codec", help="Snapshot codec (repeatable).")] = None,
    hidden: Annotated[int, typer.Option(min=32, help="Hidden width of the larger digits MLP (3,000: 9.2M parameters); the other has half.")] = 3000,
    steps: Annotated[int, typer.Option(min=50, help="Steps per peer.")] = 300,
) -> None:
    """A peer's peak host memory in copies of its model, per snapshot codec."""
    _writable(json_path)
    from swarmnet.bench.memory import run

    _known_codecs(codec)
    try:
        result = run(codecs=tuple(codec or ("fp32", "lattice")), hidden=hidden, steps=steps, json_path=json_path)
    except BenchFailed as exc:
        fail(str(exc), 1)
    (half, full), (small_mb, large_mb) = result["hidden"], (b / 1e6 for b in result["model_bytes"])
    typer.echo(f"digits MLP, hidden {half} and {full} ({small_mb:.1f} and {large_mb:.1f} MB of fp32 parameters); "
               f"2 peers, {steps} steps each")
    for name, c in result["codecs"].items():
        typer.echo(f"{name}: peak RSS per peer {max(c['peak_rss_mb'][0]):.0f} and {max(c['peak_rss_mb'][1]):.0f} MB "
                   f"-> {c['model_copies']:.1f} copies of the model")


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")


@bench_app.command("codecs")
def bench_codecs(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    size: Annotated[int, typer.Option(help="Coordinates of the test vector (10M: a 40 MB model).")] = 10_000_000,
    repeats: Annotated[int, typer.Option(help="Timed repeats per codec (median reported).")] = 5,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
) -> None:
    """Encode/decode throughput per codec, and lattice bytes per pull against key distance."""
    _writable(json_path)
    from swarmnet.bench.codecs import run

    try:
        _require_positive(size=size, repeats=repeats)
        check_device(device)
    except ConfigError as exc:
        fail(str(exc))
    try:
        run(size=size, repeats=repeats, device=device, json_path=json_path, progress=True)
    except BenchFailed as exc:  # its --json could not be written
        fail(str(exc), 1)


@bench_app.command("transports")
def bench_transports(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    repeats: Annotated[int, typer.Option(help="Pulls per size and transport (median reported).")] = 5,
    sizes_mb: Annotated[Optional[list[int]], typer.Option("--size-mb", help="Payload sizes in MiB (repeatable).")] = None,
) -> None:
    """Pull time per transport against the raw library moving the same bytes."""
    _writable(json_path)
    from swarmnet.bench.transports import run

    try:
        _require_positive(repeats=repeats, **{"size-mb": min(sizes_mb or [1])})
    except ConfigError as exc:
        fail(str(exc))
    try:
        run(sizes_mb=tuple(sizes_mb or (40, 400)), repeats=repeats, json_path=json_path)
    except BenchFailed as exc:  # its --json could not be written
        fail(str(exc), 1)


@bench_app.command("sim")
def bench_sim(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    nodes: Annotated[int, typer.Option(help="Simulated nodes.")] = 10_000,
    interactions: Annotated[int, typer.Option(help="Interactions per path.")] = 200_000,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Simulator interactions per second: layers of disjoint pairs vs the one-pair loop."""
    _writable(json_path)
    from swarmnet.bench.sim import run

    try:
        _require_positive(nodes=nodes, interactions=interactions)
        check_device(device)
    except ConfigError as exc:
        fail(str(exc))
    try:
        run(nodes=nodes, interactions=interactions, device=device, json_path=json_path, progress=True)
    except BenchFailed as exc:  # its --json could not be written
        fail(str(exc), 1)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write NAME.key and NAME.key_secret into.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Key name, e.g. the peer's name, or 'swarm' for a shared swarm key.")],
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Write a new keypair: NAME.key (public, for allow-lists) and NAME.key_secret (owner-only)."""
    from swarmnet.security import generate_keys

    try:
        public, secret = generate_keys(out, name, force=force)
    except (ConfigError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {secret} (secret, mode 0600: security.key of the peer it names, or of every peer in "
               "swarm-key mode; never share it beyond them)")
    typer.echo(f"wrote {public} (public: in allow-list mode, list it in every peer's allow-list that should "
               "admit this one)")


@bench_app.command("baselines")
def bench_baselines(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON here.")] = None,
    chart: Annotated[Optional[Path], typer.Option(help="PNG chart of time per step vs processes (default: next to --json).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Reduced suite: 2 and 4 processes, shorter phases (under 10 min on 2 cores).")] = False,
    hivemind_python: Annotated[Optional[str], typer.Option(help="Python with hivemind installed (default: this one, if it has it).")] = None,
    processes: Annotated[Optional[list[int]], typer.Option("--processes", "-n", help="Process counts to measure (repeatable; default 2, 4, 8; 2, 4 with --quick).")] = None,
) -> None:
    """DDP, local SGD and hivemind against swarmnet: same model, data and processes, one run."""
    _writable(json_path)
    import dataclasses

    from rich.console import Console

    from swarmnet.bench.baselines import (
        FULL,
        QUICK,
        averaging_table,
        methods_table,
        run,
        straggler_table,
    )

    suite = QUICK if quick else FULL
    if processes:
        try:
            suite = dataclasses.replace(suite, sizes=tuple(processes))
        except ValueError as exc:
            fail(f"--processes: {exc}")
    if chart is None and json_path is not None:
        chart = json_path.with_suffix(".png")
    _writable(chart, "--chart")
    try:
        result = run(suite, json_path=json_path, chart_path=chart, hivemind_python=hivemind_python,
                     command=" ".join(["swarmnet", *sys.argv[1:]]))
    except BenchFailed as exc:
        fail(str(exc), 1)
    console = Console(width=None if sys.stdout.isatty() else 150)
    for table in (methods_table(result), straggler_table(result), averaging_table(result)):
        console.print(table)


def _register_tools() -> None:
    from swarmnet.sim.command import simulate_command
    from swarmnet.ui.commands import init_command, plot_command, status_command

    app.command("simulate")(simulate_command)
    app.command("status")(status_command)
    app.command("plot")(plot_command)
    app.command("init")(init_command)


_register_tools()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
