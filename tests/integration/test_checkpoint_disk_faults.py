"""A peer whose run directory turns read-only or fills up keeps training, says so, and never
leaves a torn checkpoint; once space is back, checkpoints resume. The peers mirror their metrics
to TensorBoard, as they do by default wherever it is installed (the test extra installs it)."""

import importlib.util
import json
import os
import signal
import subprocess

import pytest

from swarmnet.peer import checkpoint
from swarmnet.testing import PeerProcessHandle, query_status, wait_until

from .conftest import write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _mount(*args):
    try:
        return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def start_peer(run_dir, tmp_path):
    config = write_config(tmp_path / "disk.toml", {
        "run": {"peers": 1},
        "task": {"spec": "swarmnet.tasks.digits:task"},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps": 10**9, "metrics_every": 5,
                  "checkpoint_every": 0.3},
    })
    peer = PeerProcessHandle(run_dir, "disk", config, log=tmp_path / "disk.log")  # the log off the faulty disk
    card = peer.card()
    ckpt = run_dir / "disk" / "checkpoint.pt"
    wait_until(ckpt.exists, 60, what="a first checkpoint")
    return peer, card, ckpt


def assert_survives(peer, card, ckpt, expected_error):
    """The fault is in place: errors are logged and counted, training goes on, the file stays whole."""
    # Once a save has failed, none that began before the fault can still land.
    first = query_status(card["addr"])["checkpoint_errors"]
    wait_until(lambda: query_status(card["addr"])["checkpoint_errors"] > first, 30, what="a failed save")
    before = checkpoint.load(ckpt)["step"]
    status = query_status(card["addr"])
    wait_until(lambda: query_status(card["addr"])["checkpoint_errors"] >= status["checkpoint_errors"] + 3, 30,
               what="checkpoint errors counted")
    after = query_status(card["addr"])
    assert after["state"] == "training" and after["step"] > status["step"]
    assert peer.proc.poll() is None
    assert expected_error in peer.log(400) and "training goes on" in peer.log(400)
    assert checkpoint.load(ckpt)["step"] == before  # the last good checkpoint, intact
    if TENSORBOARD and expected_error != "Permission denied":  # its writer fails too (on its own thread,
        # within seconds): only the mirror stops. Under mode 0555 it appends to its open file on.
        wait_until(lambda: "the TensorBoard mirror" in peer.log(400), 30, what="the TensorBoard mirror to stop")
        wait_until(lambda: query_status(card["addr"])["step"] > after["step"], 30,
                   what="training going on after the mirror stopped")  # the mirror may stop a moment after `after`
        assert peer.proc.poll() is None
    # A save in flight has its temporary file for a moment; a leaked one is still there later.
    in_flight = set(ckpt.parent.glob(".checkpoint.pt.*"))
    wait_until(lambda: not in_flight & set(ckpt.parent.glob(".checkpoint.pt.*")), 10,
               what="the temporary files of saves in flight removed (a leaked one stays)")
    return after


@pytest.fixture
def mounts():
    made = []
    yield made
    for path in reversed(made):
        _umount(path)


def test_read_only_run_directory(tmp_path, mounts):
    run = tmp_path / "run"
    peer, card, ckpt = start_peer(run, tmp_path)
    try:
        peer_dir = ckpt.parent
        if os.geteuid() == 0:  # root ignores permission bits: make the directory a read-only mount
            if _mount("--bind", str(peer_dir), str(peer_dir)).returncode != 0:
                pytest.skip("bind mounts are not permitted here")
            mounts.append(peer_dir)
            result = _mount("-o", "remount,bind,ro", str(peer_dir))
            if result.returncode != 0:
                pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
            expected = "Read-only file system"
        else:
            peer_dir.chmod(0o555)
            expected = "Permission denied"
        assert_survives(peer, card, ckpt, expected)
    finally:
        peer.kill_tree()
        if os.geteuid() != 0:
            ckpt.parent.chmod(0o755)


def small_disk(tmp_path, mounts):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    result = _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    mounts.append(disk)
    return disk


def fill(filler, leave=0):
    """Take the disk's free space but ``leave`` bytes. The peer keeps writing meanwhile, so the
    disk may fill before the filler does: unbuffered, so no write is left to fail again on close."""
    vfs = os.statvfs(filler.parent)
    left = vfs.f_bavail * vfs.f_frsize - leave
    with open(filler, "wb", buffering=0) as fh:
        try:
            while left > 0:
                left -= fh.write(b"\0" * min(65536, left))
        except OSError:
            pass


def test_full_disk_then_space_freed(tmp_path, mounts):
    disk = small_disk(tmp_path, mounts)
    peer, card, ckpt = start_peer(disk / "run", tmp_path)
    try:
        filler = disk / "filler"
        fill(filler)
        status = assert_survives(peer, card, ckpt, "No space left on device")
        filler.unlink()
        stuck = checkpoint.load(ckpt)["step"]
        wait_until(lambda: checkpoint.load(ckpt)["step"] > stuck, 30, what="checkpoints again after space is freed")
        errors = query_status(card["addr"])["checkpoint_errors"]
        assert errors >= status["checkpoint_errors"]
        peer.signal(signal.SIGTERM)
        assert peer.wait(30) == 0, peer.log()
        final = checkpoint.load(ckpt)
        summary = peer.summary()
        assert final["step"] == summary["steps"]
        # The rows the full disk cost are counted, and the stream around them is whole lines.
        assert summary["metrics_errors"] >= 1 and status["metrics_errors"] >= 1
        rows = [json.loads(line) for line in (ckpt.parent / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == summary["steps"]
    finally:
        peer.kill_tree()


def test_disk_filling_up_part_way_through_a_checkpoint(tmp_path, mounts):
    """Room for half a checkpoint: the write fails part-way (torch's own file writer would turn
    that into a RuntimeError and kill the peer); the peer reports the full disk and goes on."""
    disk = small_disk(tmp_path, mounts)
    peer, card, ckpt = start_peer(disk / "run", tmp_path)
    try:
        filler = disk / "filler"
        fill(filler, leave=ckpt.stat().st_size // 2)
        assert_survives(peer, card, ckpt, "No space left on device")
        filler.unlink()
        peer.signal(signal.SIGTERM)
        assert peer.wait(30) == 0, peer.log()
        assert peer.summary()["checkpoint_errors"] >= 3
    finally:
        peer.kill_tree()


def test_a_summary_that_cannot_be_written_leaves_no_torn_file(tmp_path, mounts):
    """Stopped on a full disk: the peer says it could not write its summary, and leaves none
    (never an empty or half-written one that `swarmnet up` would read)."""
    disk = small_disk(tmp_path, mounts)
    peer, card, ckpt = start_peer(disk / "run", tmp_path)
    try:
        fill(disk / "filler")
        assert_survives(peer, card, ckpt, "No space left on device")
        peer.signal(signal.SIGTERM)
        assert peer.wait(30) == 1, peer.log()  # not 0: neither the model nor the results were saved
        assert "the final checkpoint to" in peer.log(400) and "free space" in peer.log(400)
        assert "could not write" in peer.log(400) and "summary.json" in peer.log(400)
        assert not (ckpt.parent / "summary.json").exists()
        assert not list(ckpt.parent.glob(".summary.json.*")), "a temporary file was left behind"
    finally:
        peer.kill_tree()


def test_a_peer_that_cannot_write_its_card_at_start_says_so(tmp_path, mounts):
    disk = small_disk(tmp_path, mounts)
    fill(disk / "filler")
    config = write_config(tmp_path / "start.toml", {"task": {"spec": "swarmnet.tasks.digits:task"}})
    peer = PeerProcessHandle(disk / "run", "late", config, log=tmp_path / "late.log")
    try:
        assert peer.wait(60) == 2, peer.log()
        log = peer.log()
        assert "card.json" in log and "No space left on device" in log and "Traceback" not in log, log
        assert not list((disk / "run" / "late").glob("*.tmp")) and not list((disk / "run" / "late").glob(".*.tmp"))
    finally:
        peer.kill_tree()


def test_a_simulation_on_a_full_disk_says_so_and_leaves_no_truncated_curve(tmp_path, mounts):
    """`swarmnet simulate` writing its curves where the disk fills part-way: exit status 1 with
    the reason, and no file of the sweep at all (before 2026-12-06 a truncated .jsonl stayed, and
    until 2026-12-07 the curves written before the disk filled)."""
    from typer.testing import CliRunner

    from swarmnet.cli import app

    disk = small_disk(tmp_path, mounts)
    fill(disk / "filler", leave=24 * 1024)  # room for a file or two of the 10 this sweep writes
    out = disk / "sim"
    result = CliRunner().invoke(app, ["simulate", "--nodes", "2,4", "--baseline", "--interactions-per-node", "50",
                                      "--records", "400", "--no-progress", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "free space or pass another --out" in result.output
    # All or nothing: the sweep's files are staged inside --out and none is moved in.
    assert not [p for p in out.rglob("*") if p.is_file()], sorted(out.rglob("*"))


def test_a_plot_on_a_full_disk_says_so_and_leaves_no_empty_file(tmp_path, mounts):
    from typer.testing import CliRunner

    from swarmnet.cli import app
    from tests.ui.test_plots import write_run

    write_run(tmp_path / "run")
    disk = small_disk(tmp_path, mounts)
    fill(disk / "filler")
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "-o", str(disk / "swarm.png")])
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no empty swarm.png, no temporary file
