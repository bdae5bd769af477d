"""run_simulation and the simulate command: files, columns, custom tasks, errors."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from swarmnet.errors import ConfigError
from swarmnet.sim.command import parse_options, simulate_command
from swarmnet.sim.problems import load_vector_task
from swarmnet.sim.runner import SimConfig, run_simulation, total_draws

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass(frozen=True)
class NoisyQuadratic:
    """A custom vectorized task: f(x) = ||x - centre||^2 / 2, gradient noise N(0, sigma^2)."""

    dim: int = 3
    sigma: float = 0.5
    name: str = "quadratic"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64

    def init(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(n, self.dim, dtype=self.dtype, device=self.device)

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return self.sigma * torch.randn(count, self.dim, generator=generator, dtype=self.dtype)

    def grad(self, x_K: torch.Tensor, draws_K: torch.Tensor) -> torch.Tensor:
        return x_K - 1.0 + draws_K

    def metrics(self, x_K: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": 0.5 * (x_K.double() - 1.0).pow(2).sum(dim=1)}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> NoisyQuadratic:
        return dataclasses.replace(self, device=torch.device(device), dtype=dtype)


def make_quadratic(batch: int, seed: int, sigma: float = 0.5) -> NoisyQuadratic:
    return NoisyQuadratic(sigma=sigma)


def test_run_writes_curves_plot_and_summary(tmp_path: Path) -> None:
    config = SimConfig(
        task="lsq",
        task_options={"dim": 4},
        algorithm="swarmsgd",
        nodes=(1, 6),
        codec="lattice",
        interactions_per_node=50,
        lr=0.05,
        records=10,
        baseline=True,
        out=tmp_path,
        progress=False,
    )
    result = run_simulation(config)
    assert [(r.algorithm, r.nodes) for r in result.runs] == [
        ("swarmsgd", 1),
        ("swarmsgd", 6),
        ("minibatch", 1),
        ("minibatch", 6),
    ]
    run = result.run("swarmsgd", 6)
    assert run.draws == total_draws("swarmsgd", 6, 50) == 150 and len(run.curve) == 11
    rows = list(csv.DictReader(run.files["csv"].open()))
    assert len(rows) == 11
    for column in (
        "nodes",
        "draws",
        "time",
        "node_steps",
        "loss_node",
        "loss_mean",
        "consensus",
        "bits_mean",
        "bits_max",
        "objective_node",
    ):
        assert column in rows[0]
    assert float(rows[-1]["draws"]) == 150 and float(rows[-1]["time"]) == pytest.approx(50)
    assert (rows[-1]["nodes"], rows[-1]["draws"]) == ("6", "150")  # counts read as integers
    lines = run.files["jsonl"].read_text().splitlines()
    assert json.loads(lines[0])["run"]["nodes"] == 6 and len(lines) == 12
    assert isinstance(json.loads(lines[-1])["draws"], int) and isinstance(json.loads(lines[-1])["time"], float)
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(result.summary.read_text())  # type: ignore[union-attr]
    assert len(summary["runs"]) == 4 and summary["config"]["codec"] == "lattice"
    assert float(rows[-1]["loss_node"]) < float(rows[0]["loss_node"])


def test_naive_flag_gives_the_same_curves() -> None:
    common = {
        "task": "logreg",
        "algorithm": "popsgd",
        "nodes": (40,),
        "interactions_per_node": 20,
        "lr": 0.5,
        "batch": 8,
        "records": 4,
        "progress": False,
    }
    fast = run_simulation(SimConfig(**common)).runs[0]  # type: ignore[arg-type]
    slow = run_simulation(SimConfig(naive=True, **common)).runs[0]  # type: ignore[arg-type]
    assert fast.curve == slow.curve


def test_a_lattice_run_that_diverges_ends_there_with_a_nan_loss(tmp_path: Path) -> None:
    """Its models grow past what the lattice's integers hold (or turn non-finite); the run stops
    there with a non-finite loss, which the summary reports as divergence, and the files of the
    sweep are still written."""
    config = SimConfig(task="lsq", task_options={"dim": 4}, algorithm="swarmsgd", nodes=(8,), codec="lattice",
                       interactions_per_node=200, lr=50.0, records=200, out=tmp_path, progress=False)
    run = run_simulation(config).run("swarmsgd", 8)
    assert math.isnan(run.final()["loss_node"]) and 0 < run.draws < total_draws("swarmsgd", 8, 200)
    assert (tmp_path / "lsq-swarmsgd-n8.csv").exists()


def test_custom_module_function_task() -> None:
    task = load_vector_task(
        "test_sim_runner:make_quadratic", batch=1, seed=0, options={"sigma": 0.1}
    )
    assert task.sigma == 0.1
    result = run_simulation(
        SimConfig(
            task="test_sim_runner:make_quadratic",
            algorithm="popsgd",
            nodes=(16,),
            interactions_per_node=200,
            lr=0.1,
            records=5,
            progress=False,
        )
    )
    curve = result.runs[0].curve
    assert curve[0]["loss_node"] == pytest.approx(1.5) and curve[-1]["loss_node"] < 0.05


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"algorithm": "gossipsgd"}, "algorithm"),
        ({"nodes": (0,)}, "nodes"),
        ({"dtype": "float16"}, "dtype"),
        ({"algorithm": "popsgd", "codec": "lattice"}, "SwarmSGD only"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"task": "nonsense"}, "module:function"),
        ({"task": "no_such_module_xyz:f"}, "cannot import"),
        ({"task": "lsq", "task_options": {"colour": 1}}, "bad --task-option .* unexpected keyword argument .colour."),
        # a class, not its factory: the message named --task-option, which nobody gave
        ({"task": "test_sim_runner:NoisyQuadratic"}, r"swarmnet calls it with batch=, seed=, and its signature "
                                                     r"\(dim.* takes no batch=, seed=: point the spec at a function"),
        ({"algorithm": "swarmsgd", "codec": "zip"}, "codec"),
        ({"algorithm": "swarmsgd", "lr_decay": 10.0}, "PopSGD"),
        ({"algorithm": "swarmsgd", "topology": "torus"}, "topology"),
    ],
)
def test_run_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_simulation(SimConfig(nodes=(4,), interactions_per_node=2, progress=False, **kwargs))


def test_a_short_run_records_each_draw_once() -> None:
    """More curve points asked than the run has draws: one point per draw, not repeats of the
    same state (which skewed --window's statistic)."""
    result = run_simulation(SimConfig(nodes=(4,), interactions_per_node=2, records=50, progress=False))
    run = result.runs[0]
    draws = [p["draws"] for p in run.curve]
    assert draws == sorted(set(draws)) and draws[-1] == run.draws and len(draws) == run.draws + 1


def test_cli_parses_flags_and_runs(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    args = [
        "simulate",
        "--task",
        "lsq",
        "--task-option",
        "dim=3",
        "--algorithm",
        "swarmsgd",
        "--nodes",
        "1,5",
        "--topology",
        "ring",
        "--local-steps",
        "2",
        "--geometric",
        "--interactions-per-node",
        "10",
        "--records",
        "3",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--window",
        "2:10",
    ]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert "2-10" in outcome.output  # the window columns
    assert (tmp_path / "lsq-swarmsgd-n5.csv").exists() and (tmp_path / "lsq-swarmsgd.png").exists()
    for wrong in (["--nodes", "1,x"], ["--window", "5"], ["--task-option", "dim"]):
        bad = CliRunner().invoke(app, ["simulate", *wrong, "--out", str(tmp_path), "--no-progress"])
        assert bad.exit_code != 0 and "Invalid value" in bad.output


def test_a_rerun_into_the_same_folder_replaces_the_earlier_runs_curves(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    common = ["simulate", "--algorithm", "swarmsgd", "--interactions-per-node", "20", "--no-progress", "--out", str(tmp_path)]
    mine = tmp_path / "notes.csv"
    mine.write_text("kept\n")
    assert CliRunner().invoke(app, [*common, "--nodes", "1,2,8", "--baseline"]).exit_code == 0
    assert CliRunner().invoke(app, [*common, "--nodes", "2", "--lr", "0.05"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lsq-swarmsgd-n2.csv", "lsq-swarmsgd-n2.jsonl", "lsq-swarmsgd-summary.json", "lsq-swarmsgd.png", "notes.csv"]
    assert mine.read_text() == "kept\n"


def test_the_table_says_why_a_figure_is_nan(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    common = ["simulate", "--nodes", "2", "--interactions-per-node", "200", "--no-progress", "--out", str(tmp_path)]
    diverged = CliRunner().invoke(app, [*common, "--lr", "50", "--window", "50:150"])
    # exit status 1: a script running sweeps learns that a run diverged without reading the table
    assert diverged.exit_code == 1 and "popsgd n=2: the loss is not finite (the run diverged); lower --lr" in diverged.output
    assert "no curve point falls" not in diverged.output
    outside = CliRunner().invoke(app, [*common, "--window", "300:400"])
    assert outside.exit_code == 0 and "no curve point falls in --window 300:400 for popsgd n=2" in outside.output
    assert "diverged" not in outside.output


def test_option_values_are_typed() -> None:
    assert parse_options(["dim=90", "noise=0.5", "flag=true", "name=abc"]) == {
        "dim": 90,
        "noise": 0.5,
        "flag": True,
        "name": "abc",
    }
    with pytest.raises(ConfigError):
        parse_options(["novalue"])


def test_a_swarm_too_large_for_memory_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    """10^8 nodes of a 32-float problem need tens of GB: under a 6 GiB address-space limit (a
    machine with less memory) the allocation fails, and the command says what to change."""
    import resource
    import subprocess
    import sys

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))

    result = subprocess.run(
        [sys.executable, "-m", "swarmnet", "simulate", "--nodes", "100000000", "--interactions-per-node", "0.001",
         "--out", str(tmp_path / "out"), "--no-progress"],
        preexec_fn=limit_memory, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: the simulation does not fit in memory (" in result.stderr
    assert "here --nodes 100000000, --batch 1: lower the one that is large" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.timeout(10)
def test_far_more_records_than_draws_returns_at_once_with_one_point_per_draw() -> None:
    """--records 10^12 on a run of a few draws looped over every record index (hours at 100% CPU)."""
    run = run_simulation(SimConfig(nodes=(2,), interactions_per_node=3, records=10**12, progress=False)).runs[0]
    draws = [p["draws"] for p in run.curve]
    assert draws == sorted(set(draws)) and draws[-1] == run.draws and len(draws) == run.draws + 1


def strict_json(text: str) -> dict:
    """JSON as other readers (jq, JavaScript) take it: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_is_null_in_the_summary_not_nan(tmp_path: Path) -> None:
    result = run_simulation(SimConfig(nodes=(2,), interactions_per_node=200, lr=50.0, records=20, out=tmp_path,
                                      progress=False))
    assert math.isnan(result.runs[0].final()["loss_node"])
    summary = strict_json(result.summary.read_text())  # type: ignore[union-attr]
    assert summary["runs"][0]["final"]["loss_node"] is None
    lines = result.runs[0].files["jsonl"].read_text().splitlines()
    assert [strict_json(line) for line in lines][-1]["loss_node"] is None


def listed(summary: Path) -> set[str]:
    """The names of the curve files a sweep's summary lists."""
    return {Path(f).name for run in json.loads(summary.read_text())["runs"] for f in run["files"].values()}


def test_two_sweeps_in_one_folder_never_touch_each_others_files(tmp_path: Path) -> None:
    """A --baseline sweep's mini-batch curves were named like a minibatch sweep's: the minibatch
    sweep overwrote them, and a later popsgd sweep deleted files the minibatch summary lists."""
    common = {"task_options": {"dim": 3}, "nodes": (2,), "interactions_per_node": 5, "records": 3, "out": tmp_path,
              "progress": False}
    run_simulation(SimConfig(algorithm="popsgd", baseline=True, **common))  # type: ignore[arg-type]
    popsgd = listed(tmp_path / "lsq-popsgd-summary.json")
    before = {name: (tmp_path / name).read_bytes() for name in popsgd}
    run_simulation(SimConfig(algorithm="minibatch", lr=0.02, **common))  # type: ignore[arg-type]
    minibatch = listed(tmp_path / "lsq-minibatch-summary.json")
    assert not popsgd & minibatch
    assert {name: (tmp_path / name).read_bytes() for name in popsgd} == before
    run_simulation(SimConfig(algorithm="popsgd", **common))  # type: ignore[arg-type]
    assert all((tmp_path / name).exists() for name in minibatch | listed(tmp_path / "lsq-popsgd-summary.json"))
    assert not any((tmp_path / name).exists() for name in popsgd - listed(tmp_path / "lsq-popsgd-summary.json"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 400 KiB tmpfs: writes on it fail with ENOSPC once it is full."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take the disk's free space but ``leave`` bytes."""
    vfs = os.statvfs(disk)
    left = vfs.f_bavail * vfs.f_frsize - leave
    with open(disk / "filler", "wb", buffering=0) as fh:
        while left > 0:
            left -= fh.write(b"\0" * min(65536, left))


def test_a_sweep_that_cannot_be_written_leaves_the_earlier_one_whole(small_disk: Path) -> None:
    """The earlier sweep's curves were removed before the new ones were written: a full disk
    left new CSVs beside the old summary and plot, and the earlier sweep's other curves gone."""
    out = small_disk / "sim"
    common = {"task_options": {"dim": 3}, "interactions_per_node": 20, "out": out, "progress": False}
    run_simulation(SimConfig(nodes=(2, 4), records=5, **common))  # type: ignore[arg-type]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill(small_disk, leave=12 * 1024)  # room for a curve or two, not for the plot
    with pytest.raises(OSError) as failed:
        run_simulation(SimConfig(nodes=(2, 4, 8), records=40, **common))  # type: ignore[arg-type]
    assert failed.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left either


def test_ctrl_c_keeps_the_runs_that_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the third run of a sweep: the two finished runs are written as a sweep marked
    interrupted, the command says so, and exits with 130 (before: an empty --out, no word)."""
    from swarmnet.sim import runner

    made = []

    def make_engine(config, task):  # type: ignore[no-untyped-def]
        made.append(config.nodes)
        if len(made) == 3:
            raise KeyboardInterrupt
        return real(config, task)

    real = runner.make_engine
    monkeypatch.setattr(runner, "make_engine", make_engine)
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "sim"
    outcome = CliRunner().invoke(app, ["simulate", "--nodes", "1,2,8", "--interactions-per-node", "5",
                                       "--task-option", "dim=3", "--no-progress", "--out", str(out)])
    assert outcome.exit_code == 130, outcome.output
    assert f"interrupted: wrote the 2 finished runs (n=1, 2) to {out}" in " ".join(outcome.output.split())
    summary = json.loads((out / "lsq-popsgd-summary.json").read_text())
    assert summary["interrupted"] is True and [run["nodes"] for run in summary["runs"]] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        "lsq-popsgd-n1.csv", "lsq-popsgd-n1.jsonl", "lsq-popsgd-n2.csv", "lsq-popsgd-n2.jsonl",
        "lsq-popsgd-summary.json", "lsq-popsgd.png"]


def test_a_lattice_step_too_small_for_the_models_is_named_not_called_divergence(tmp_path: Path) -> None:
    """--lattice-eps 1e-30: the models' lattice coordinates overflow at once. That was reported
    as a diverged run with "lower --lr"; the run stops, its curve stays finite, and the note
    says to raise --lattice-eps."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    outcome = CliRunner().invoke(app, ["simulate", "--algorithm", "swarmsgd", "--codec", "lattice", "--lattice-eps",
                                       "1e-30", "--nodes", "4", "--interactions-per-node", "20", "--task-option",
                                       "dim=3", "--no-progress", "--out", str(tmp_path)])
    text = " ".join(outcome.output.split())
    assert outcome.exit_code == 1, outcome.output
    assert "swarmsgd n=4: stopped at draw" in text and "the lattice step eps = 1e-30 is too small" in text
    assert "raise --lattice-eps (or leave it out for the adaptive lr x H x 6/11)" in text
    assert "lower --lr" not in text and "diverged" not in text
    summary = strict_json((tmp_path / "lsq-swarmsgd-summary.json").read_text())
    assert "lattice step" in summary["runs"][0]["stopped"] and summary["runs"][0]["final"]["loss_node"] is not None


def test_a_full_disk_names_the_file_and_says_to_free_space(small_disk: Path) -> None:
    """The message named the folder and said "pass a writable directory" of one that is."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    fill(small_disk, leave=0)
    out = small_disk / "sim"
    outcome = CliRunner().invoke(app, ["simulate", "--nodes", "2", "--interactions-per-node", "5", "--task-option",
                                       "dim=3", "--no-progress", "--out", str(out)])
    text = " ".join(outcome.output.split())
    assert outcome.exit_code == 1, outcome.output
    assert f"error: writing {out / 'lsq-popsgd-n2.csv'} failed: No space left on device; free space or pass another --out" in text
    assert "writable" not in text and list(out.iterdir()) == []


def test_a_write_refused_by_permissions_keeps_the_writable_directory_hint(tmp_path: Path) -> None:
    from swarmnet.sim.command import write_failure

    refused = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "lsq-popsgd.png"))
    assert write_failure(refused, tmp_path) == (
        f"error: writing {tmp_path / 'lsq-popsgd.png'} failed: Permission denied; pass a writable directory with --out")


def test_a_node_count_beyond_any_machine_is_refused_with_the_largest_accepted() -> None:
    """--nodes 99999999999999999999 reached torch.zeros and ended in an overflow traceback."""
    from swarmnet.sim.command import MAX_NODES, parse_nodes

    assert parse_nodes(f"1,{MAX_NODES}") == (1, MAX_NODES)
    with pytest.raises(ConfigError, match=r"--nodes 99999999999999999999: at most 1,099,511,627,776 \(2\^40\) nodes"):
        parse_nodes("2,99999999999999999999")


@pytest.mark.parametrize("args,named", [
    (["--algorithm", "swarmsgd", "--local-steps", "1e9"], "here --nodes 8, --batch 1, --local-steps 1e+09"),
    (["--batch", "1000000000"], "here --nodes 8, --batch 1000000000"),
])
def test_out_of_memory_names_the_flags_that_set_the_size(args: list[str], named: str, tmp_path: Path) -> None:
    """A block of draws too large for memory at --nodes 8 said "use fewer --nodes"."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    outcome = CliRunner().invoke(app, ["simulate", "--nodes", "8", "--interactions-per-node", "1", *args,
                                       "--no-progress", "--out", str(tmp_path)])
    text = " ".join(outcome.output.split())
    assert outcome.exit_code == 1 and "error: the simulation does not fit in memory (" in text, outcome.output
    assert named in text and "fewer --nodes" not in text


@pytest.mark.parametrize("args,message", [
    (["--lr", "-0.01"], "--lr must be a finite number >= 0, got -0.01"),
    (["--lr-decay", "0"], "--lr-decay V0 must be a finite number > 0, got 0"),
    (["--algorithm", "swarmsgd", "--local-steps", "0"], "--local-steps 0: local steps must be a finite number >= 1"),
    (["--algorithm", "swarmsgd", "--codec", "lattice", "--lattice-eps", "0"], "--lattice-eps must be a finite number > 0"),
    (["--algorithm", "swarmsgd", "--codec", "zstd"], "--codec must be one of none, lattice, got 'zstd'"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--algorithm", "minibatch", "--topology", "ring"],
     "--topology, --local-steps and --geometric are SwarmSGD's; the mini-batch baseline has one model"),
    (["--algorithm", "popsgd", "--topology", "ring"], "SwarmSGD's; PopSGD pairs any two nodes"),
    (["--task", "no_such_module_xyz:f"], "must be importable where swarmnet simulate runs"),
])
def test_option_errors_name_the_flag(args: list[str], message: str, tmp_path: Path) -> None:
    """They named internal settings ("lr decay clock scale V0", "lsq: batch") or the wrong thing."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    outcome = CliRunner().invoke(app, ["simulate", "--nodes", "4", *args, "--no-progress", "--out", str(tmp_path)])
    text = " ".join(outcome.output.replace("│", " ").split())
    assert outcome.exit_code == 2 and message in text, outcome.output


def test_a_window_of_non_finite_bounds_is_refused() -> None:
    from swarmnet.sim.command import parse_window

    for text in ("nan:nan", "0:nan", "-inf:inf"):
        with pytest.raises(ConfigError, match="--window needs START:STOP"):
            parse_window(text)


def test_the_files_record_the_batch_used_not_null(tmp_path: Path) -> None:
    result = run_simulation(SimConfig(nodes=(2,), interactions_per_node=2, task_options={"dim": 3}, out=tmp_path,
                                      progress=False))
    summary = json.loads(result.summary.read_text())  # type: ignore[union-attr]
    meta = json.loads(result.runs[0].files["jsonl"].read_text().splitlines()[0])["run"]
    assert summary["config"]["batch"] == meta["batch"] == 1  # lsq's default


def test_the_consensus_panel_names_the_runs_it_leaves_out() -> None:
    """Its title said "PopSGD at n <= 2" on SwarmSGD plots too."""
    from swarmnet.sim.output import consensus_title

    def curve(*values: float) -> list[dict[str, float]]:
        return [{"consensus": v} for v in values]

    swarm = [("swarmsgd", 1, curve(0.0, 0.0)), ("swarmsgd", 4, curve(0.0, 0.3)), ("minibatch", 4, curve(0.0))]
    assert consensus_title(swarm) == "consensus distance (always zero, not drawn: swarmsgd n=1)"
    pop = [("popsgd", 1, curve(0.0)), ("popsgd", 2, curve(0.0, 0.0)), ("popsgd", 8, curve(0.0, 0.1))]
    assert consensus_title(pop) == "consensus distance (always zero, not drawn: popsgd n=1, 2)"
    assert consensus_title([("popsgd", 8, curve(0.0, 0.1))]) == "consensus distance"
