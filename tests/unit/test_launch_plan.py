"""What `swarmnet up` passes to the peers it launches."""

import logging

import pytest

from swarmnet.config import load_config
from swarmnet.errors import ConfigError
from swarmnet.launch import LaunchPlan
from swarmnet.testing import write_config


def plan(tmp_path, overrides, config_path=None):
    overrides = {"run.dir": str(tmp_path / "run"), **overrides}
    cfg = load_config(config_path, overrides)
    return LaunchPlan.build(cfg, config_path=config_path, overrides=overrides, manifests=None, transport="tcp",
                            fresh=True, log_level="WARNING")


def test_an_address_for_every_peer_at_once_is_refused(tmp_path):
    """Passed on to every peer, it beat each one's own --listen: all bound the same port, and the
    error blamed another program."""
    for key in ("network.listen", "network.advertise"):
        with pytest.raises(ConfigError, match=f"--set {key}: every peer `up` launches needs an address of its own"):
            plan(tmp_path, {key: "tcp://127.0.0.1:7394"})


def test_more_local_peers_than_the_machine_can_hold_are_refused_before_any_start(tmp_path):
    from swarmnet.launch import max_local_peers

    with pytest.raises(ConfigError, match=r"peers asked \(--peers or run.peers\), but this machine runs at most"):
        plan(tmp_path, {"run.peers": max_local_peers() + 1})
    assert not (tmp_path / "run").exists()


def test_an_epoch_budget_beyond_the_largest_step_count_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs comes to .* steps of .* past the largest budget"):
        plan(tmp_path, {"train.epochs": 1e15, "train.steps": 0})


def min_peers_set(p):
    """The network.min_peers the peers get on their command line (None: their config's)."""
    values = [arg.split("=", 1)[1] for arg in p.base_command if arg.startswith("network.min_peers=")]
    return values[-1] if values else None


def test_peers_launched_together_wait_for_each_other_unless_told_otherwise(tmp_path, caplog):
    lsq = {"task.spec": "swarmnet.tasks.lsq:task", "run.peers": 4}
    assert min_peers_set(plan(tmp_path, lsq)) == "3"
    # A count the user gave, with --set or in the config file, is kept (it used to be replaced).
    assert min_peers_set(plan(tmp_path, {**lsq, "network.min_peers": 0})) == "0"
    config = write_config(tmp_path / "two.toml", {"task": {"spec": "swarmnet.tasks.lsq:task"},
                                                    "network": {"min_peers": 2}})
    assert min_peers_set(plan(tmp_path, {"run.peers": 4}, config)) is None
    with caplog.at_level(logging.WARNING, logger="swarmnet.launch"):
        plan(tmp_path, {"run.peers": 2}, config)
    assert "network.min_peers = 2 but only 1 other peers are launched" in caplog.text


def test_ipc_sockets_under_a_run_dir_too_deep_for_them_are_refused_before_any_start(tmp_path):
    deep = tmp_path / ("d" * 110)
    cfg = load_config(None, {"run.dir": str(deep)})
    with pytest.raises(ConfigError, match=r"over the 107 a Unix socket allows; use a shorter --run-dir, or --transport tcp"):
        LaunchPlan.build(cfg, config_path=None, overrides={"run.dir": str(deep)}, manifests=None, transport="ipc",
                         fresh=True, log_level="WARNING")


def test_a_fresh_run_sets_aside_the_folders_of_earlier_peers(tmp_path):
    """An earlier run of 4 peers, then 2: peer2's card and metrics left in place would pass for
    this run's in `status` and `plot`, and peer0's checkpoint may be all an interrupted run has.
    Moved aside, checkpoints and all, with the earlier average model (which would pass for this
    run's result); peer3, which a running process holds, is left where it is."""
    from swarmnet.peer.claim import DirectoryClaim
    from swarmnet.ui.collect import seeds_from_run_dir

    run = tmp_path / "run"
    for i in range(4):
        (run / f"peer{i}").mkdir(parents=True)
        for name in ("card.json", "metrics.jsonl", "checkpoint.pt"):
            (run / f"peer{i}" / name).write_text('{"addr": "tcp://127.0.0.1:9"}' if name == "card.json" else name)
    (run / "average.pt").write_text("first")
    held = DirectoryClaim(run / "peer3", logging.getLogger("test"))
    try:
        plan(tmp_path, {"task.spec": "swarmnet.tasks.lsq:task", "run.peers": 2})
    finally:
        held.release()
    assert not (run / "peer2").exists()
    assert (run / ".earlier" / "peer2" / "checkpoint.pt").read_text() == "checkpoint.pt"
    assert (run / "peer3" / "card.json").exists()  # in use: not ours to move
    assert not any((run / f"peer{i}" / "card.json").exists() for i in (0, 1))  # the launched ones start afresh
    assert all((run / ".earlier" / f"peer{i}" / "checkpoint.pt").read_text() == "checkpoint.pt" for i in (0, 1))
    assert seeds_from_run_dir(run) == ["tcp://127.0.0.1:9"]  # peer3's only
    assert not (run / "average.pt").exists() and (run / ".earlier" / "average.pt").read_text() == "first"
    (run / "peer2").mkdir()
    (run / "peer2" / "metrics.jsonl").write_text("again")
    (run / "average.pt").write_text("second")
    plan(tmp_path, {"task.spec": "swarmnet.tasks.lsq:task", "run.peers": 2})  # an older one there is replaced
    assert (run / ".earlier" / "peer2" / "metrics.jsonl").read_text() == "again"
    assert (run / ".earlier" / "average.pt").read_text() == "second"
    assert not (run / "peer3").exists()


def test_a_peer_count_that_disagrees_with_the_manifests_is_refused(tmp_path):
    folder = tmp_path / "peers"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.toml").write_text(f'name = "p{i}"\n')
    overrides = {"run.dir": str(tmp_path / "run"), "task.spec": "swarmnet.tasks.lsq:task"}

    def build(extra):
        settings = {**overrides, **extra}
        return LaunchPlan.build(load_config(None, settings), config_path=None, overrides=settings, manifests=folder,
                                transport="tcp", fresh=True, log_level="WARNING")

    assert [p.name for p in build({}).peers] == ["p0", "p1", "p2"]
    assert len(build({"run.peers": 3}).peers) == 3
    with pytest.raises(ConfigError, match=r"2 peers asked \(--peers or --set run.peers\) but .*peers holds 3 peer manifests: .*drop the count"):
        build({"run.peers": 2})


def test_manifests_naming_one_peer_twice_are_refused_naming_it(tmp_path):
    folder = tmp_path / "peers"
    folder.mkdir()
    (folder / "a.toml").write_text('name = "same"\n')
    (folder / "b.toml").write_text('name = "same"\n')
    (folder / "same.toml").write_text("")  # named after its file
    overrides = {"run.dir": str(tmp_path / "run"), "task.spec": "swarmnet.tasks.lsq:task"}
    with pytest.raises(ConfigError, match=r"peers: more than one manifest names peer 'same'; each peer .* a name of its own"):
        LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides, manifests=folder,
                         transport="tcp", fresh=True, log_level="WARNING")


def test_a_transport_the_manifests_override_is_named(tmp_path, caplog):
    folder = tmp_path / "peers"
    folder.mkdir()
    (folder / "p0.toml").write_text('name = "p0"\nlisten = "tcp://127.0.0.1:0"\n')
    (folder / "p1.toml").write_text('name = "p1"\n')
    overrides = {"run.dir": str(tmp_path / "run"), "task.spec": "swarmnet.tasks.lsq:task"}
    with caplog.at_level(logging.WARNING, logger="swarmnet.launch"):
        built = LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides,
                                 manifests=folder, transport="ipc", fresh=True, log_level="WARNING")
    assert [p.listen.split(":")[0] for p in built.peers] == ["tcp", "ipc"]
    assert "--transport ipc does not apply to p0" in caplog.text and "p1" not in caplog.text


def test_the_files_a_peer_could_not_write_are_named_after_the_summary():
    from swarmnet.launch import unwritten

    assert unwritten({"checkpoint_errors": 0, "metrics_errors": 0}) == unwritten({}) == ""
    assert unwritten({"checkpoint_errors": 4, "metrics_errors": 1}) == "4 checkpoints and 1 metrics row"


def test_a_peer_without_a_summary_is_reported_from_this_launchs_metrics_only(tmp_path):
    """Under --no-fresh a peer appends to its earlier run's metrics: one that dies before its
    first row must not be shown with the earlier run's steps and merges."""
    from swarmnet.launch import _last_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 900, "loss": 0.1, "interactions": 77}\n')
    start = path.stat().st_size
    assert _last_metrics(path, start) is None and _last_metrics(path)["step"] == 900
    with path.open("a") as fh:
        fh.write('{"step": 5, "loss": 2.0, "interactions": 0}\n')
    assert _last_metrics(path, start)["step"] == 5


def test_a_bad_manifest_is_refused_before_any_peer_starts(tmp_path):
    """Before, `up` copied a manifest's values onto the child's command line unchecked: a peer
    listed after the first failed only once launched, and the others trained their whole budget."""
    folder = tmp_path / "peers"
    folder.mkdir()
    (folder / "a.toml").write_text('listen = "tcp://127.0.0.1:7300"\n')
    (folder / "b.toml").write_text('listen = "tcp://127.0.0.1"\n')
    overrides = {"run.dir": str(tmp_path / "run"), "task.spec": "swarmnet.tasks.lsq:task"}
    with pytest.raises(ConfigError, match=r"b.toml \(listen\): network.listen: 'tcp://127.0.0.1' needs a port"):
        LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides, manifests=folder,
                         transport="tcp", fresh=True, log_level="WARNING")
    assert not (tmp_path / "run").exists()


def test_a_peer_stopped_from_outside_the_launcher_has_not_ended_well(tmp_path):
    """`up` stops its peers only when it is interrupted itself: a peer that reports "stopped"
    otherwise was stopped by someone else before its budget, and the run must not read as done."""
    import json

    from swarmnet.launch import summarize

    built = plan(tmp_path, {"run.peers": 2, "task.spec": "swarmnet.tasks.lsq:task"})
    for p, reason in zip(built.peers, ("budget", "stopped")):
        p.exit_code = 0
        (built.run_dir / p.name).mkdir(parents=True, exist_ok=True)
        (built.run_dir / p.name / "summary.json").write_text(json.dumps({"reason": reason, "steps": 10}))
    rows = summarize(built, 1.0, interrupted=False)["peers"]
    assert rows[0]["ok"] and not rows[1]["ok"] and "from outside `swarmnet up`" in rows[1]["reason"]
    result = summarize(built, 1.0, interrupted=True)
    assert [r["ok"] for r in result["peers"]] == [True, True] and not result["ok"]


def test_a_peer_stopped_by_the_launcher_with_its_configured_status_has_ended_well(tmp_path):
    """run.stopped_exit_code (a Kubernetes Job's 143) is how a peer stopped before its budget
    exits; under `up`, interrupted, that is a clean stop, any other status is not."""
    import json

    from swarmnet.launch import summarize

    built = plan(tmp_path, {"run.peers": 2, "task.spec": "swarmnet.tasks.lsq:task", "run.stopped_exit_code": 143})
    for p, code in zip(built.peers, (143, 1)):
        p.exit_code = code
        (built.run_dir / p.name).mkdir(parents=True, exist_ok=True)
        (built.run_dir / p.name / "summary.json").write_text(json.dumps({"reason": "stopped", "steps": 10}))
    assert [r["ok"] for r in summarize(built, 1.0, interrupted=True)["peers"]] == [True, False]


def test_only_peers_all_on_the_cpu_are_forked(monkeypatch):
    """A fork of a process that touched CUDA cannot use it, and the GPU path was never tried forked:
    GPU peers keep being exec'd; SWARMNET_EXEC_PEERS=1 exec's CPU peers too."""
    import sys

    import torch

    from swarmnet.forked import EXEC_VARIABLE, forkable

    monkeypatch.delenv(EXEC_VARIABLE, raising=False)
    linux = sys.platform.startswith("linux")
    assert forkable(["cpu", "cpu"]) is linux
    assert forkable(["auto"]) is (linux and not torch.cuda.is_available())
    assert not forkable(["cpu", "cuda:1"])
    monkeypatch.setenv(EXEC_VARIABLE, "1")
    assert not forkable(["cpu"])
    monkeypatch.setenv(EXEC_VARIABLE, "0")
    assert forkable(["cpu"]) is linux


@pytest.mark.parametrize("breakage, said, shown", [
    ("forked.PRELOAD = (*forked.PRELOAD, 'breaks_on_import')",
     "peer peer0 could not be forked: the fork server failed", "this module breaks the fork server"),
    ("import tempfile; tempfile.tempdir = '/nonexistent/tmp'",
     "the fork server for the peers could not start ([Errno 2] No such file or directory", ""),
], ids=["dies-while-importing", "no-temporary-directory"])
def test_a_fork_server_that_fails_is_reported_with_the_way_around_it(tmp_path, breakage, said, shown):
    """A fork server that dies while it imports (here a module raising on import), or cannot start
    (nowhere to put its socket), leaves `up` a ConfigError that names SWARMNET_EXEC_PEERS, not a
    traceback of multiprocessing's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "breaks_on_import.py").write_text("raise RuntimeError('this module breaks the fork server')\n")
    script = (
        "import os, sys\nfrom pathlib import Path\nfrom swarmnet import forked\nfrom swarmnet.errors import ConfigError\n"
        f"{breakage}\n"
        "try:\n"
        "    forked.start_peer('peer0', ['peer', '--help'], dict(os.environ), Path(sys.argv[1]))\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)]))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "peer.log")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert said in done.stdout and "set SWARMNET_EXEC_PEERS=1" in done.stdout, done.stdout
    assert shown in done.stderr  # the server's own error, shown above


def test_allow_list_manifests_each_naming_a_key_need_none_in_the_shared_config(tmp_path):
    """docs/operations.md: with --manifests, a manifest's key gives that peer its own key. `up`
    used to check the shared config alone first, and refused it for naming no key."""
    from swarmnet.launch import launch_config
    from swarmnet.security import generate_keys

    allowed, folder = tmp_path / "allowed", tmp_path / "peers"
    folder.mkdir()
    for name in ("p0", "p1"):
        public, secret = generate_keys(tmp_path / "keys", name)
        allowed.mkdir(exist_ok=True)
        (allowed / public.name).write_bytes(public.read_bytes())
        (folder / f"{name}.toml").write_text(f'name = "{name}"\nkey = "{secret}"\n')
    overrides = {"run.dir": str(tmp_path / "run"), "task.spec": "swarmnet.tasks.lsq:task",
                 "security.mode": "allow-list", "security.allow": str(allowed)}
    origins = dict.fromkeys(overrides, "--set")
    with pytest.raises(ConfigError, match="security.key: mode 'allow-list' needs this peer's secret key file"):
        launch_config(None, overrides, origins, None)  # without manifests the config must name one
    cfg = launch_config(None, overrides, origins, folder)
    built = LaunchPlan.build(cfg, config_path=None, overrides=overrides, manifests=folder, transport="tcp",
                             fresh=True, log_level="WARNING")
    assert [(p.name, p.key) for p in built.peers] == [(n, str(tmp_path / "keys" / f"{n}.key_secret")) for n in ("p0", "p1")]
    assert not any("security.key" in arg for arg in built.base_command)  # each peer gets its own, not the first one's


COUNTED_TASK = """\
import os
import sys

from swarmnet.tasks.lsq import task as lsq


def task(**options):
    with open(os.environ["TASK_CALLS"], "a") as fh:
        fh.write(" ".join(sys.argv[1:2]) + "\\n")
    return lsq(samples=64, dim=8, **options)
"""


def test_up_loads_the_task_once_in_its_own_process(tmp_path, monkeypatch):
    """A factory that loads a real data set paid it three times in the launcher alone (the plan,
    the summary's metric, the average model); the peers load their own."""
    import json

    from swarmnet.launch import summarize
    from swarmnet.peer import checkpoint

    (tmp_path / "counted_task.py").write_text(COUNTED_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = tmp_path / "calls"
    monkeypatch.setenv("TASK_CALLS", str(calls))
    built = plan(tmp_path, {"run.peers": 2, "task.spec": "counted_task:task"})
    model = built.task.build_model()
    for p in built.peers:
        p.exit_code = 0
        (built.run_dir / p.name / "summary.json").write_text(json.dumps({"reason": "budget", "steps": 10}))
        checkpoint.save_atomic({"model": model.state_dict()}, built.run_dir / p.name / "checkpoint.pt")
    result = summarize(built, 1.0, interrupted=False)
    assert result["average"]["peers_averaged"] == 2 and result["metric"] == "excess_loss"
    assert len(calls.read_text().splitlines()) == 1


def test_a_build_model_that_fails_is_refused_before_any_peer_starts(tmp_path, monkeypatch):
    (tmp_path / "unbuilt_launch_task.py").write_text(
        "from swarmnet.tasks.lsq import task as lsq\n"
        "def task():\n"
        "    base = lsq(samples=64)\n"
        "    return type(base)(name='x', build_model=lambda: type, train=base.train, loss=base.loss)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"build_model returned type, expected a torch.nn.Module"):
        plan(tmp_path, {"run.peers": 2, "task.spec": "unbuilt_launch_task:task"})
    assert not (tmp_path / "run").exists()  # refused before any peer's folder is made
    with pytest.raises(ConfigError, match=r"task.options \{'hidden': -5\}: building the model failed"):
        plan(tmp_path, {"task.spec": "swarmnet.tasks.digits:task", "task.options": {"hidden": -5}})


def test_the_summary_table_names_the_training_loss_and_the_evaluation_apart_and_shows_unknowns_alike():
    from rich.console import Console

    from swarmnet.launch import render_summary

    result = {"interrupted": False, "metric": "loss", "average": {
        "peers_averaged": 2, "consensus_distance": 0.1, "eval": {"loss": float("nan")}},
        "peers": [{"name": "peer0", "ok": True, "reason": "budget", "exit_code": 0, "steps": 5, "interactions": 1,
                   "final_loss": 0.25, "eval": {"loss": None}},
                  {"name": "peer1", "ok": True, "reason": "budget", "exit_code": 0, "steps": 5, "interactions": 1,
                   "final_loss": float("inf"), "eval": {"loss": 0.5}}]}
    console = Console(width=200, record=True)
    console.print(render_summary(result))
    text = console.export_text()
    cells = [[cell.strip() for cell in line.strip("│┃ ").replace("┃", "│").split("│")] for line in text.splitlines()]
    header = next(row for row in cells if row[0] == "peer")
    assert header[-2:] == ["train loss", "eval loss"], text
    rows = {row[0]: row for row in cells}
    assert rows["peer0"][-2:] == ["0.25", "?"] and rows["peer1"][-2:] == ["?", "0.5000"], text
    assert rows["average"][-1] == "?" and "nan" not in text, text


def test_a_diverged_peer_is_reported_with_why_from_its_summary(tmp_path):
    """"diverged" says no more: the peer's summary carries the cause, which `up` prints under its
    table; an unrelated error earlier in its log (a failed evaluation) is not taken for it."""
    import json

    from swarmnet.launch import after_table, summarize

    built = plan(tmp_path, {"run.peers": 2, "task.spec": "swarmnet.tasks.lsq:task"})
    why = "training loss is nan at step 50: the model diverged; lower train.lr or check the data"
    for p, reason in zip(built.peers, ("budget", "diverged")):
        p.exit_code = 0 if reason == "budget" else 1
        summary = {"reason": reason, "steps": 50} | ({"error": why} if reason == "diverged" else {})
        (built.run_dir / p.name / "summary.json").write_text(json.dumps(summary))
    (built.run_dir / "peer1" / "peer.log").write_text(
        "12:00:01 ERROR [peer1] the task's evaluation failed at step 40; training goes on without it\n"
        f"12:00:02 ERROR [peer1] {why}\n")
    result = summarize(built, 1.0, interrupted=False)
    assert after_table(result) == [f"peer1: diverged: {why}"]


def test_an_earlier_average_never_passes_for_a_run_that_averaged_nothing(tmp_path):
    """--no-fresh leaves the run directory as it is: a run whose peers all ended badly wrote no
    average, and the earlier run's average.pt stood there as its result."""
    from swarmnet.launch import summarize

    built = plan(tmp_path, {"run.peers": 2, "task.spec": "swarmnet.tasks.lsq:task"})
    (built.run_dir / "average.pt").write_text("the earlier run's")
    for p in built.peers:
        p.exit_code = 1  # no summary of their own: not ended well
    result = summarize(built, 1.0, interrupted=False)
    assert result["average"] == {"peers_averaged": 0}
    assert not (built.run_dir / "average.pt").exists()
    assert (built.run_dir / ".earlier" / "average.pt").read_text() == "the earlier run's"


def test_a_batch_larger_than_the_data_is_named_at_start(tmp_path, caplog):
    from swarmnet.peer.data import batch_shortfall

    with caplog.at_level(logging.WARNING):
        plan(tmp_path, {"run.peers": 2, "task.spec": "swarmnet.tasks.lsq:task", "task.options": {"samples": 100},
                        "train.batch_size": 256})
    assert "train.batch_size = 256, but the task has 100 training samples" in caplog.text
    assert batch_shortfall(64, 100, "random", 4) is None
    assert "as few as 25 training samples (100 cut into 4 shards)" in batch_shortfall(64, 100, "partition", 8)


def test_an_earlier_runs_summary_survives_until_the_peer_replaces_it_and_never_passes_for_this_launchs(tmp_path):
    """--no-fresh: a restart that is refused (its checkpoint does not fit) must leave the earlier
    run's result; `up` must not report it as this launch's."""
    import json

    from swarmnet.launch import summarize

    earlier = tmp_path / "run" / "peer0" / "summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"reason": "budget", "steps": 900}))
    overrides = {"run.dir": str(tmp_path / "run"), "run.peers": 1, "task.spec": "swarmnet.tasks.lsq:task"}
    built = LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides, manifests=None,
                             transport="tcp", fresh=False, log_level="WARNING")
    assert json.loads(earlier.read_text())["steps"] == 900
    built.peers[0].exit_code = 2
    row = summarize(built, 1.0, interrupted=False)["peers"][0]
    assert row["reason"].startswith("no summary") and row.get("steps") != 900, row
    earlier.unlink()
    (earlier.parent / "new.json").write_text(json.dumps({"reason": "budget", "steps": 10}))
    (earlier.parent / "new.json").rename(earlier)  # as a peer writes it
    built.peers[0].exit_code = 0
    assert summarize(built, 1.0, interrupted=False)["peers"][0]["steps"] == 10


SLOW_TASK = """\
import sys
import time

from swarmnet.tasks.lsq import task as lsq


def task(**options):
    if sys.argv[1:2] == ["peer"]:  # a peer, not `up` itself
        time.sleep(60)
    return lsq(samples=64, dim=8)
"""


def test_a_peer_still_starting_after_the_start_timeout_is_stopped_naming_the_option(tmp_path, monkeypatch):
    import json
    import os

    from rich.console import Console

    from swarmnet.forked import EXEC_VARIABLE
    from swarmnet.launch import launch

    (tmp_path / "sleepy_task.py").write_text(SLOW_TASK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(EXEC_VARIABLE, "1")  # a fresh interpreter, as a GPU peer is started
    overrides = {"run.dir": str(tmp_path / "run"), "run.peers": 1, "task.spec": "sleepy_task:task"}
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match=r"--start-timeout .*: must be a number of seconds > 0"):
            LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides, manifests=None,
                             transport="tcp", fresh=True, log_level="WARNING", start_timeout=bad)
    built = LaunchPlan.build(load_config(None, overrides), config_path=None, overrides=overrides, manifests=None,
                             transport="tcp", fresh=True, log_level="WARNING", start_timeout=4)
    with pytest.raises(ConfigError) as refused:
        launch(built, summary_path=tmp_path / "summary.json", console=Console(file=open(os.devnull, "w")))
    said = str(refused.value)
    assert said.startswith("peer peer0 was still starting after 4 s and was stopped: importing the task, loading its "
                           "data or building its model took longer; allow more with --start-timeout SECONDS"), said
    assert built.peers[0].exit_code is not None  # stopped, not left running
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == said
