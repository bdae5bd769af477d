"""Run directories and checkpoints a peer cannot use: a clear error naming the path and the fix,
exit status 2, nothing lost."""

import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from swarmnet.peer import checkpoint
from swarmnet.testing import PeerProcessHandle, wait_until

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FIX = ("start with --fresh (under swarmnet up: without --no-fresh), or use another --run-dir, or the config "
       "the run was made with")


def swarmnet(*args, timeout=120, prefix=()):
    """Run the CLI to its end; its output (logs included) as one text."""
    result = subprocess.run([*prefix, sys.executable, "-m", "swarmnet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout


def config(tmp_path, task="digits"):
    return write_config(tmp_path / f"{task}.toml", {
        "run": {"peers": 2},
        "task": {"spec": f"swarmnet.tasks.{task}:task"},
        "train": {"batch_size": 32, "lr": 0.01, "steps": 30, "checkpoint_every": 0.0, "tensorboard": False},
        "network": {"min_peers": 0, "linger": 0.5},
    })


def peer(cfg, run_dir, *args):
    return swarmnet("peer", "--config", str(cfg), "--name", "solo", "--run-dir", str(run_dir), *args)


@pytest.fixture
def read_only(tmp_path):
    """A directory nobody may write to, holding a peer directory ``solo``: a read-only tmpfs for
    root (who ignores permission bits), else mode 0555."""
    path = tmp_path / "read-only"
    (path / "solo").mkdir(parents=True)
    if os.geteuid() != 0:
        for p in (path / "solo", path):
            p.chmod(0o555)
        yield path
        for p in (path, path / "solo"):
            p.chmod(0o755)
        return
    try:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        (path / "solo").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True, timeout=20)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


@pytest.mark.parametrize("where", ["a file", "read-only", "read-only peer directory"])
def test_peer_refuses_a_run_dir_it_cannot_write(tmp_path, where, request):
    if where == "a file":
        run_dir = request.getfixturevalue("a_file")
    else:
        run_dir = request.getfixturevalue("read_only")
        if where == "read-only":  # the peer must create its directory there (not only write in it)
            run_dir = run_dir / "new"
    code, out = peer(config(tmp_path), run_dir)
    assert code == 2, out
    assert f"{run_dir}/solo" in out and "choose a writable --run-dir" in out and "Traceback" not in out, out


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_up_refuses_a_run_dir_it_cannot_write(tmp_path, where, request):
    run_dir = request.getfixturevalue("a_file" if where == "a file" else "read_only")
    code, out = swarmnet("up", "--config", str(config(tmp_path)), "--run-dir", str(run_dir))
    assert code == 2, out
    assert f"{run_dir}/peer0" in out and "choose a writable --run-dir" in out and "Traceback" not in out, out


def test_up_refuses_a_summary_path_it_cannot_write_before_the_run(tmp_path, a_file):
    for path, why in ((a_file / "summary.json", "cannot create it under"), (tmp_path, "is a directory")):
        code, out = swarmnet("up", "--config", str(config(tmp_path)), "--run-dir", str(tmp_path / "run"),
                             "--summary", str(path))
        assert code == 2, out
        assert f"--summary {path}: {why}" in out and "Traceback" not in out, out
        assert not (tmp_path / "run").exists()  # refused before any peer started


def test_a_refused_up_replaces_an_earlier_runs_summary_with_its_reason(tmp_path):
    """A script reading --summary after a refused run read the earlier run's result there."""
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"ok": True, "peers": [{"name": "peer0", "ok": True}]}))
    code, out = swarmnet("up", "--config", str(config(tmp_path)), "--run-dir", str(tmp_path / "run"),
                         "--summary", str(summary), "--set", "train.lr=-1")
    assert code == 2 and "train.lr" in out, out
    written = json.loads(summary.read_text())
    assert written["ok"] is False and written["peers"] == [] and "train.lr" in written["error"], written


def test_a_path_under_a_folder_it_may_not_look_into_is_refused_with_the_fix(tmp_path):
    """EACCES on the way to --summary or --run-dir: an error naming the path, not a traceback.
    Root ignores permission bits, so as root the CLI runs without the capabilities that do."""
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    prefix = ()
    if os.geteuid() == 0:
        os.chown(locked, 65534, 65534)  # nobody's, where root without its overrides may not look
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search", "--")
        if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("setpriv cannot drop root's file-permission overrides here")
    locked.chmod(0o700)
    try:
        code, out = swarmnet("up", "--config", str(config(tmp_path)), "--run-dir", str(tmp_path / "run"),
                             "--summary", str(locked / "sub" / "summary.json"), prefix=prefix)
        assert code == 2 and "cannot look at" in out and "choose a writable path" in out, out
        assert "Traceback" not in out and not (tmp_path / "run").exists(), out
        code, out = swarmnet("status", "--run-dir", str(locked / "sub"), "--once", prefix=prefix)
        assert code == 2 and "cannot look at it" in out and "Traceback" not in out, out
    finally:
        locked.chmod(0o755)


def test_partition_sharding_without_a_rank_is_refused_not_shard_0_for_everyone(tmp_path, monkeypatch):
    from swarmnet.peer.node import RANK_VARIABLES

    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = write_config(tmp_path / "partition.toml", {"run": {"peers": 4}, "train": {"shard": "partition", "steps": 5}})
    code, out = peer(cfg, tmp_path / "run")
    assert code == 2 and "was given none: pass --rank N (0 to 3)" in out and "Traceback" not in out, out


def test_partition_rank_beyond_the_swarm_size_is_refused_not_wrapped_onto_another_shard(tmp_path):
    cfg = write_config(tmp_path / "partition.toml", {"run": {"peers": 4}, "train": {"shard": "partition", "steps": 5}})
    code, out = peer(cfg, tmp_path / "run", "--rank", "4")
    assert code == 2 and "has rank 4, but run.peers = 4" in out and "shard of rank 0" in out, out
    assert "Traceback" not in out, out


def test_resume_refuses_the_checkpoint_of_another_task_and_fresh_sets_it_aside(tmp_path):
    """--fresh once wrote over the earlier run's checkpoint and appended to its metrics, without a
    word (the bundled Procfile passes it on every line): the earlier files now go to .earlier/."""
    run = tmp_path / "run"
    digits, lsq = config(tmp_path), config(tmp_path, "lsq")
    code, out = peer(digits, run)
    assert code == 0, out
    code, out = peer(lsq, run)
    assert code == 2, out
    assert (f"{run}/solo/checkpoint.pt was made for task swarmnet.tasks.digits:task, this config trains "
            f"swarmnet.tasks.lsq:task; {FIX}") in out and "Traceback" not in out, out
    assert checkpoint.load(run / "solo" / "checkpoint.pt")["step"] == 30
    code, out = peer(lsq, run, "--fresh")
    assert code == 0, out
    earlier = run / ".earlier" / "solo"
    # Its summary too: a start refused before (the other task's checkpoint) left it in place.
    assert f"the earlier run's checkpoint.pt, metrics.jsonl, summary.json moved to {earlier}; to resume" in out, out
    assert checkpoint.load(earlier / "checkpoint.pt")["task"] == "swarmnet.tasks.digits:task"
    assert checkpoint.load(run / "solo" / "checkpoint.pt")["task"] == "swarmnet.tasks.lsq:task"
    for folder in (earlier, run / "solo"):  # each run's metrics alone, not the second appended to the first
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps) and steps[-1] == 30, (folder, steps)
    code, out = peer(lsq, run, "--fresh")
    assert code == 0 and "(replacing the copy kept from the run before it)" in out, out
    assert checkpoint.load(earlier / "checkpoint.pt")["task"] == "swarmnet.tasks.lsq:task"


def test_resume_refuses_a_checkpoint_holding_non_finite_values_and_keeps_it(tmp_path):
    """torch does not verify a file's contents: a NaN in a momentum buffer (bytes damaged on disk)
    would be resumed and then reported as a diverging learning rate, at every restart."""
    run = tmp_path / "run"
    code, out = peer(config(tmp_path), run, "--set", "train.momentum=0.9")
    assert code == 0, out
    path = run / "solo" / "checkpoint.pt"
    state = checkpoint.load(path)
    state["optimizer"]["state"][0]["momentum_buffer"][0] = float("nan")
    torch.save(state, path)
    before = path.read_bytes()
    code, out = peer(config(tmp_path), run, "--set", "train.momentum=0.9")
    assert code == 2, out
    assert f"{path} holds non-finite values in optimizer.state.0.momentum_buffer" in out and FIX in out, out
    assert "Traceback" not in out and path.read_bytes() == before


@pytest.mark.parametrize("content", ["garbage", "another model", "a pickled object"])
def test_resume_refuses_an_unusable_checkpoint_and_keeps_it(tmp_path, content):
    path = tmp_path / "run" / "solo" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    if content == "garbage":
        path.write_bytes(b"garbage\n")
        expected = "cannot be read as a checkpoint (not a torch checkpoint file)"
    elif content == "a pickled object":  # unpickling anything but tensors and plain data could run code
        torch.save({"model": {"weight": torch.zeros(3)}, "step": 5, "when": datetime.date(2026, 1, 1)}, path)
        expected = "cannot be read as a checkpoint (it holds a datetime.date object, and loading objects"
    else:  # an older checkpoint, without the task it was made for
        torch.save({"model": {"weight": torch.zeros(3)}, "step": 5}, path)
        expected = "does not fit this peer's model: 0.weight is missing from the checkpoint"
    before = path.read_bytes()
    code, out = peer(config(tmp_path), tmp_path / "run")
    assert code == 2, out
    assert f"{path} {expected}" in out and FIX in out and "Traceback" not in out, out
    assert path.read_bytes() == before


def test_a_restarted_peer_drops_its_earlier_runs_card_and_summary(tmp_path):
    """Read while the peer runs, or after it is killed, the earlier run's summary would pass for
    this run's result (a script, a Kubernetes check), and its card for this run's address."""
    run, cfg = tmp_path / "run", config(tmp_path)
    code, out = peer(cfg, run)
    assert code == 0 and (run / "solo" / "summary.json").exists(), out
    earlier = json.loads((run / "solo" / "card.json").read_text())
    again = PeerProcessHandle(run, "solo", cfg, "--set", "train.steps=1000000000")
    try:
        wait_until(lambda: not (run / "solo" / "summary.json").exists(), 60, what="the earlier summary removed")
        assert again.card()["pid"] == again.proc.pid != earlier["pid"]
        again.kill_tree()
        assert not (run / "solo" / "summary.json").exists()
    finally:
        again.kill_tree()


def test_a_second_peer_with_the_same_name_and_run_dir_is_refused(tmp_path):
    """A pasted command or a requeued job must not interleave metrics with a running peer or
    replace its checkpoint; once that peer has stopped, the name and directory are free again,
    and the temporary files of a write it was killed in are cleaned up."""
    run, cfg = tmp_path / "run", config(tmp_path)
    first = PeerProcessHandle(run, "solo", cfg, "--set", "train.steps=1000000000")
    try:
        first.card()
        code, out = peer(cfg, run)
        assert code == 2, out
        assert (f"{run}/solo belongs to a peer that is still running (pid {first.proc.pid} on {socket.gethostname()})" in out
                and "another run directory (--run-dir, SwarmOptimizer's run_dir=) or name" in out and "Traceback" not in out), out
        assert first.proc.poll() is None
        first.kill_tree()  # SIGKILL: the kernel drops its claim, and a write it was in stays behind
        first.wait(30)
        leftover = run / "solo" / ".checkpoint.pt.a1b2c3.tmp"
        leftover.write_bytes(b"half a checkpoint")
        code, out = peer(cfg, run, "--fresh")
        assert code == 0, out
        assert not leftover.exists() and "removed 1 temporary file(s)" in out, out
    finally:
        first.kill_tree()


def test_up_into_the_run_dir_of_a_running_swarm_is_refused_before_it_removes_anything(tmp_path):
    run, cfg = tmp_path / "run", config(tmp_path)
    running = PeerProcessHandle(run, "peer0", cfg, "--set", "train.steps=1000000000",
                                "--set", "train.checkpoint_every=0.2")
    try:
        running.card()
        checkpoint_file = run / "peer0" / "checkpoint.pt"
        wait_until(checkpoint_file.exists, 60, what="a first checkpoint")
        code, out = swarmnet("up", "--config", str(cfg), "--run-dir", str(run))
        assert code == 2, out
        assert f"{run}/peer0 belongs to a peer that is still running (pid {running.proc.pid} on {socket.gethostname()})" in out, out
        assert checkpoint_file.exists() and (run / "peer0" / "card.json").exists()
        assert (run / "peer0" / "metrics.jsonl").stat().st_size > 0
        assert running.proc.poll() is None
    finally:
        running.kill_tree()
