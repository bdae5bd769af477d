"""Commands given a path they cannot write, or a swarm that does not answer: a message and an exit
status, never a traceback, and no result lost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from swarmnet.cli import app
from swarmnet.testing.ports import unused_port

pytestmark = pytest.mark.timeout(60)


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("x")
    return path


def test_status_exits_non_zero_when_no_peer_answers() -> None:
    runner = CliRunner()
    for mode in ("--once", "--json"):
        result = runner.invoke(app, ["status", "--seed", "tcp://127.0.0.1:1", mode, "--timeout", "0.2"])
        assert result.exit_code == 1 and "no peer answered" in result.output
    bad = runner.invoke(app, ["status", "--seed", "foo", "--once"])
    assert bad.exit_code == 2 and "--seed 'foo' is not an address" in bad.output
    for flag, value in (("--interval", "nan"), ("--interval", "inf"), ("--timeout", "inf"), ("--timeout", "0")):
        bad = runner.invoke(app, ["status", "--seed", "tcp://127.0.0.1:1", "--once", flag, value])
        assert bad.exit_code == 2 and "each must be a finite number of seconds > 0" in bad.output, (flag, bad.output)


def test_status_of_a_swarm_that_has_ended_says_so(tmp_path: Path) -> None:
    """A peer removes its summary.json as it starts and writes it as it stops: one there means
    the peer has ended, not that the swarm is out of reach."""
    for name in ("peer0", "peer1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps({"addr": f"tcp://127.0.0.1:{unused_port()}", "name": name}))
    (tmp_path / "peer0" / "summary.json").write_text("{}")
    result = CliRunner().invoke(app, ["status", "--run-dir", str(tmp_path), "--once", "--timeout", "0.5"])
    assert result.exit_code == 1, result.output
    assert f"no peer answered: 1 of the 2 peers in {tmp_path} has ended" in result.output
    assert "the other 1 wrote no summary (killed, or out of reach): check --seed" in result.output
    (tmp_path / "peer0" / "summary.json").unlink()
    result = CliRunner().invoke(app, ["status", "--run-dir", str(tmp_path), "--once", "--timeout", "0.5"])
    assert result.exit_code == 1 and "no peer answered; check --seed / --run-dir" in result.output


@pytest.mark.parametrize(("command", "nobody"), [(["status", "--once"], 1), (["eval"], 2)])
def test_seeds_no_transport_dials_or_whose_host_does_not_resolve_are_named(command, nobody) -> None:
    runner = CliRunner()
    typo = runner.invoke(app, [*command, "--seed", "tpc://127.0.0.1:1", "--timeout", "0.2"])
    assert typo.exit_code == 2 and "no transport for tpc:// addresses; installed:" in typo.output, typo.output
    unknown = runner.invoke(app, [*command, "--seed", "tcp://no-such-host.invalid:7000", "--timeout", "0.2"])
    assert unknown.exit_code == nobody and "its host 'no-such-host.invalid' does not resolve" in unknown.output, unknown.output


def test_plot_writes_a_png_where_it_says(tmp_path: Path) -> None:
    from tests.ui.test_plots import write_run

    write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").is_file() and f"wrote {tmp_path / 'out.png'}" in result.output
    blocked = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(a_file(tmp_path) / "x.png")])
    assert blocked.exit_code == 2 and "cannot write" in blocked.output and "-o" in blocked.output
    assert blocked.exception is None or isinstance(blocked.exception, SystemExit)
    metrics = tmp_path / "run" / "peer1" / "metrics.jsonl"
    metrics.unlink()
    metrics.mkdir()  # what cannot be read is named as such, not as a write that failed
    unreadable = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(tmp_path / "out")])
    assert unreadable.exit_code == 2 and f"cannot read {metrics} (Is a directory)" in unreadable.output, \
        unreadable.output


def test_init_into_a_file_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["init", "--hosts", "h1", "--out", str(a_file(tmp_path))])
    assert result.exit_code == 2 and "cannot write" in result.output and "--out" in result.output
    assert isinstance(result.exception, SystemExit)


def test_simulate_into_a_file_is_refused_before_it_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", "--nodes", "2", "--interactions-per-node", "5", "--no-progress",
                                      "--out", str(a_file(tmp_path))], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "exists and is not a directory" in result.output
    assert isinstance(result.exception, SystemExit)


def commands(command: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[list[str], Any]]:
    """Every command of the CLI (groups included) with the words that invoke it."""
    import typer

    command = typer.main.get_command(app) if command is None else command
    yield list(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


def test_every_help_text_shows_its_bracketed_words() -> None:
    """Help texts are rich markup: a literal "[security]" left unescaped vanishes from --help."""
    import re

    checked = 0
    for path, command in commands():
        texts = [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]
        words = {word for text in texts for word in re.findall(r"\[[a-z_.]+\]", text)}
        if not words:
            continue
        shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=200).output
        for word in words:
            assert word in shown, f"swarmnet {' '.join(path)} --help lost {word!r}"
            checked += 1
    assert checked >= 2  # "[security]" in status and eval


def test_every_help_fits_an_80_column_terminal() -> None:
    """No option name or description cut short with an ellipsis (a --no-X twin of every flag
    once squeezed '--interactions-per-node' to '--interactions-per-n…')."""
    for path, _ in commands():
        shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=80).output
        assert "…" not in shown, f"swarmnet {' '.join(path)} --help:\n{shown}"


def test_an_unknown_log_level_is_refused_naming_the_levels() -> None:
    for command in ("peer", "up"):
        result = CliRunner().invoke(app, [command, "--log-level", "LOUD"])
        assert result.exit_code == 2 and "'LOUD' is not one of" in result.output
        assert isinstance(result.exception, SystemExit)


def test_with_json_what_native_code_prints_on_stdout_goes_to_stderr() -> None:
    import subprocess
    import sys

    script = ("import os, sys\n"
              "from swarmnet.ui.commands import _stdout_for_the_document\n"
              "with _stdout_for_the_document(True) as out:\n"
              "    os.write(1, b'native noise\\n')\n"
              "    print('python noise')\n"
              "    out.write('{\"doc\": 1}\\n')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"doc": 1}\n'
    assert "native noise" in result.stderr and "python noise" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["simulate", "--nodes", "4", "--threads", "0", "--no-progress"], "--threads must be >= 1"),
    (["simulate", "--nodes", "4", "--device", "gpu", "--no-progress"], "device 'gpu': not a torch device"),
    (["simulate", "--nodes", "4,8,4", "--no-progress"], "lists a node count twice"),
    # Before 2026-12-06: tracebacks from numpy or torch, or NaN curves with exit status 0.
    (["simulate", "--nodes", "4", "--seed", "-1", "--no-progress"], "--seed must be in [0, 2^62)"),
    (["simulate", "--nodes", "4", "--interactions-per-node", "nan", "--no-progress"], "(a finite number)"),
    (["simulate", "--nodes", "4", "--interactions-per-node", "inf", "--no-progress"], "(a finite number)"),
    (["simulate", "--nodes", "4", "--lr", "nan", "--no-progress"], "lr must be a finite number >= 0"),
    (["simulate", "--nodes", "4", "--lr-decay", "nan", "--no-progress"], "V0 must be a finite number > 0"),
    (["simulate", "--nodes", "4", "--algorithm", "swarmsgd", "--geometric", "--local-steps", "inf", "--no-progress"],
     "local steps must be a finite number >= 1"),
    (["simulate", "--nodes", "4", "--task-option", "dim=0", "--no-progress"], "dim must be >= 1"),
    (["simulate", "--nodes", "4", "--task-option", "samples=0", "--no-progress"], "samples=0"),
    (["simulate", "--nodes", "4", "--task-option", "dim=x", "--no-progress"], "--task-option dim='x' must be of type int"),
    (["simulate", "--nodes", "4", "--task", "logreg", "--task-option", "l2=-1", "--no-progress"], "l2 must be"),
    (["simulate", "--nodes", "4", "--task", "gossip", "--task-option", "dim=0", "--no-progress"], "dim must be >= 1"),
    (["simulate", "--nodes", "4", "--topology", "ring", "--no-progress"], "are SwarmSGD's"),
    (["simulate", "--nodes", "4", "--local-steps", "5", "--no-progress"], "are SwarmSGD's"),
    (["simulate", "--nodes", "4", "--algorithm", "swarmsgd", "--rounding", "dither", "--no-progress"],
     "add --codec lattice"),
    (["simulate", "--nodes", "4", "--algorithm", "swarmsgd", "--codec", "lattice", "--lattice-eps", "inf",
      "--no-progress"], "eps must be a finite number > 0"),
    (["simulate", "--nodes", "1,4", "--algorithm", "swarmsgd", "--codec", "lattice", "--lattice-eps", "-1",
      "--no-progress"], "eps must be a finite number > 0"),  # before the n = 1 run, which reads no lattice
    (["simulate", "--nodes", "1", "--algorithm", "swarmsgd", "--codec", "lattice", "--lattice-eps", "-5",
      "--no-progress"], "eps must be a finite number > 0"),
    (["simulate", "--nodes", "4", "--algorithm", "swarmsgd", "--codec", "lattice", "--lr", "0", "--no-progress"],
     "give --lr > 0, or set --lattice-eps"),
    (["simulate", "--nodes", "2", "--seed", str(2**64 - 1), "--no-progress"], "--seed must be in [0, 2^62)"),
    (["bench", "sim", "--nodes", "0"], "--nodes must be >= 1"),
    (["bench", "sim", "--interactions", "-1"], "--interactions must be >= 1"),
    (["bench", "codecs", "--size", "0"], "--size must be >= 1"),
    (["bench", "codecs", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "codecs", "--device", "cuda:7"], "device 'cuda:7'"),
])
def test_bad_simulator_and_benchmark_values_are_refused_before_any_work(args, message, tmp_path) -> None:
    if args[0] == "simulate":  # a value refused only once --out is made: not in the working directory
        args = [*args, "--out", str(tmp_path / "sim")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output
    assert isinstance(result.exception, SystemExit)


def test_plot_and_eval_name_a_run_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for args in (["plot", str(missing)], ["eval", "--run-dir", str(missing)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and f"{missing}: no such directory" in result.output, result.output


@pytest.mark.parametrize("command", [
    ["eval", "--seed", "tcp://127.0.0.1:1", "--timeout", "0.2"], ["bench", "codecs"], ["bench", "sim"],
    ["bench", "exchange", "--quick"], ["bench", "memory"], ["bench", "baselines", "--quick"], ["bench", "link"],
])
def test_a_json_path_that_is_a_directory_is_refused_before_the_run(tmp_path: Path, command: list[str]) -> None:
    """Found only at the end, it cost a whole benchmark's figures, or named a temporary file."""
    result = CliRunner().invoke(app, [*command, "--json", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert f"--json {tmp_path}: is a directory; name a file in it" in result.output, result.output


def test_a_json_file_that_cannot_be_written_after_the_run_keeps_the_figures_on_screen(tmp_path: Path) -> None:
    """A name that fits the file system while its temporary twin (".NAME.XXXXXXXX.tmp") does not
    passes the check before the run and fails only once the figures are measured: it was a
    traceback, their JSON lost."""
    target = tmp_path / ("x" * 245 + ".json")
    result = CliRunner().invoke(app, ["bench", "sim", "--nodes", "10", "--interactions", "200", "--json", str(target)])
    assert result.exit_code == 1, result.output
    assert "interactions/s" in result.output and "the figures measured are printed above" in result.output
    assert f"--json {target}: cannot write" in result.output and "File name too long" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_bench_arguments_are_checked_before_any_run() -> None:
    runner = CliRunner()
    memory = runner.invoke(app, ["bench", "memory", "--codec", "fp32", "--codec", "fp8"])
    assert memory.exit_code == 2 and "--codec fp8: unknown codec; available:" in memory.output, memory.output
    exchange = runner.invoke(app, ["bench", "exchange", "--device", "cpux"])
    assert exchange.exit_code == 2 and "device 'cpux': not a torch device" in exchange.output, exchange.output
    link = runner.invoke(app, ["bench", "link", "--rate", "1gbit", "--rate", "fast"])
    assert link.exit_code == 2 and "--rate: 'fast' is not a link rate; write it as tc does" in link.output, link.output
    codec = runner.invoke(app, ["bench", "link", "--codec", "fp8"])
    assert codec.exit_code == 2 and "--codec fp8: unknown codec" in codec.output, codec.output


@pytest.mark.parametrize("args,message", [
    (["up", "--run-dir", "A", "--set", "run.dir=B"], "--run-dir and --set run.dir both set run.dir"),
    (["up", "--peers", "2", "--set", "run.peers=3"], "--peers and --set run.peers both set run.peers"),
    (["up", "--steps", "30", "--set", "train.steps=200"], "--steps and --set train.steps both set the budget"),
    (["up", "--epochs", "2", "--set", "train.epochs=3"], "--epochs and --set train.epochs both set the budget"),
    (["peer", "--steps", "30", "--set", "train.sequential_epochs=1"], "--steps and --set train.sequential_epochs"),
    (["peer", "--device", "cpu", "--set", "device.device=auto"], "--device and --set device.device both set"),
])
def test_a_flag_and_a_set_of_the_same_key_are_refused_naming_both(args, message) -> None:
    """Before 2026-12-07 one silently won: --set over --run-dir, but --steps over --set."""
    result = CliRunner().invoke(app, [*args, "--config", "configs/quickstart.toml"])
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split()), result.output
