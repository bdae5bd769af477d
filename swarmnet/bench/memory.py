"""``swarmnet bench memory``: a peer's host memory, in copies of its model.

Per codec, in one run: 2-peer swarms (real processes, the digits MLP, SGD with momentum,
merging as often as the algorithm asks) at two widths, ``hidden`` and half of it. Each peer's
resident set is read from /proc every 0.1 s. The figure is the memory that grows with the model:
(peak at ``hidden`` - peak at half) / (the difference of their fp32 parameter bytes), free of
what a peer takes whatever its model (the interpreter, torch, numba's compiled loops, which a
model under 2M coordinates does not load for fp32: a tiny baseline model counted them as model
copies). The peaks themselves are reported too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from swarmnet.bench import write_json
from swarmnet.errors import BenchFailed
from swarmnet.tasks import load_task
from swarmnet.testing.processes import LocalSwarm, write_config

TASK = "swarmnet.tasks.digits:task"


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident set in MiB (0 once it is gone); ``field="VmHWM"``: its peak so far,
    which the kernel keeps exactly (sampling VmRSS misses a merge's buffers of a few ms)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def model_bytes(hidden: int) -> int:
    model = load_task(TASK, {"hidden": hidden}).build_model()
    return 4 * sum(p.numel() for p in model.parameters() if p.is_floating_point())


def peak_rss(workdir: Path, *, codec: str, hidden: int, steps: int) -> list[float]:
    """Each peer's peak resident set (MiB) over a 2-peer run."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "memory.toml", {
        "run": {"peers": 2},
        "task": {"spec": TASK, "options": {"hidden": hidden}},
        "train": {"batch_size": 32, "lr": 0.01, "momentum": 0.9, "steps": steps, "metrics_every": 20,
                  "checkpoint_every": 0.0},
        "codec": {"name": codec},
        "network": {"exchange_cpu": 0.0},
    })
    swarm = LocalSwarm(workdir / "run", config, die_with_parent=True)
    peaks = [0.0, 0.0]
    done = threading.Event()

    def sample() -> None:
        pids: list[int | None] = [None, None]
        while not done.wait(0.1):
            for i in range(2):
                if pids[i] is None:
                    card = swarm.run_dir / f"peer{i}" / "card.json"
                    if card.exists():
                        pids[i] = json.loads(card.read_text())["pid"]
                if pids[i] is not None:
                    peaks[i] = max(peaks[i], resident_mb(pids[i], "VmHWM"))  # the last read before it exits

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if swarm.wait(1800) != 0:
            raise BenchFailed(f"bench swarm failed:\n{swarm.log()}")
    finally:
        done.set()
        sampler.join()
        swarm.kill_tree()
    if not all(peaks):
        raise RuntimeError(f"no resident set read for a peer: {peaks}")
    return peaks


def run(*, codecs: tuple[str, ...] = ("fp32", "lattice"), hidden: int = 3000, steps: int = 300,
        json_path: Path | None = None) -> dict[str, Any]:
    widths = (hidden // 2, hidden)
    nbytes = [model_bytes(w) for w in widths]
    result: dict[str, Any] = {"hidden": list(widths), "model_bytes": nbytes, "steps": steps, "peers": 2, "codecs": {}}
    with tempfile.TemporaryDirectory(prefix="swarmnet-bench-memory-") as tmp:
        for codec in codecs:
            peaks = [peak_rss(Path(tmp) / f"{codec}-{w}", codec=codec, hidden=w, steps=steps) for w in widths]
            grown_mb = max(peaks[1]) - max(peaks[0])
            result["codecs"][codec] = {"peak_rss_mb": peaks,
                                       "model_copies": grown_mb * 1024 * 1024 / (nbytes[1] - nbytes[0])}
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "time": time.time()}
    if json_path is not None:
        write_json(json_path, result)
    return result
