"""Checkpoints stream to disk, keep the real error of a failed write and never tear a file.

Each case runs in a child process: one sets a file size limit (a write past it fails with
EFBIG, like a disk filling up part-way through), the other measures its own peak memory."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

PREAMBLE = """
import os, resource, signal, sys, torch
from pathlib import Path
from swarmnet.peer import checkpoint
path = Path(sys.argv[1])
"""


def run_child(code, *args):
    done = subprocess.run([sys.executable, "-c", PREAMBLE + code, *map(str, args)], capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_write_failing_part_way_raises_its_oserror_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    out = run_child("""
checkpoint.save_atomic({"step": 1, "w": torch.ones(1000)}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    checkpoint.save_atomic({"step": 2, "w": torch.ones(1 << 20)}, path)  # 4 MiB: fails at 1 MiB
except OSError as exc:
    print("OSError", exc.errno)
print(checkpoint.load(path)["step"], len(os.listdir(path.parent)))
""", path)
    assert out == ["OSError", "27", "1", "1"]  # EFBIG, not torch's RuntimeError; step 1 intact, no temp file


def test_the_state_is_not_copied_in_memory_on_its_way_to_disk(tmp_path):
    """Serialized in memory first, a 200 MB state raised the peak by 191 MB; streamed, by 0.4 MB."""
    out = run_child("""
state = {"model": torch.randn(25_000_000), "momentum": torch.randn(25_000_000)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
checkpoint.save_atomic(state, path)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
print(torch.equal(checkpoint.load(path)["momentum"], state["momentum"]))
""", tmp_path / "checkpoint.pt")
    assert int(out[0]) < 50 and out[1] == "True", out
