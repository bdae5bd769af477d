"""``swarmnet bench link``: a merge between two hosts whose link, not memory, sets the pace.

On loopback moving bytes costs about what reading them does, so a merge (the pull, then the gap
and the add, each a pass over the model) takes longer than raw pyzmq's transfer alone
(``swarmnet bench exchange``). Between hosts the link is the bottleneck and the snapshot codec is what the design
counts on. Here two real peer daemons run in two network namespaces joined by a veth pair limited
to RATE in each direction (tc's token bucket, as a switch port of that speed), training the
digits MLP of width 3,000 (36.9 MB in fp32) and pulling from each other back to back, once per
codec. What a merge takes is a pull's wall time (requests, decode, gap and norm) plus the compute
thread's add, from the peers' own metrics (``pull_wall_s``, ``apply_wall_s``). Raw pyzmq moves
the model's fp32 bytes over the same link in the same pattern and under the same load: a process
on each host serves the bytes and pulls the other's back to back while it trains the same model
on a thread. The ratio is raw pyzmq's mean time over the merge's (the peers' metrics give means):
above 1, swarmnet's whole merge is faster than raw pyzmq only moving the model.

Needs permission to create network namespaces (root or CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from swarmnet.bench import write_json
from swarmnet.bench.exchange import raw_payload, train_while
from swarmnet.errors import BenchFailed
from swarmnet.launch import GLIBC_TUNABLES
from swarmnet.peer.budget import LOCAL_PEERS_VARIABLE
from swarmnet.testing.netns import HOSTS, HostPair, HostsRefused
from swarmnet.testing.processes import PeerProcessHandle, write_config

PORT = 7000
"""Each peer's port on its host (the namespaces are the bench's own: nothing else listens there)."""
BATCH = 32
"""The training batch of the peers and of the raw pyzmq sides alike."""
RAW_TIMEOUT_MS = 120_000
"""How long a raw pyzmq side waits for one transfer (36.9 MB take 3 s at 100 Mbit/s)."""


def _windowed(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One peer's pulls after the first fifth of its run (start-up and a newcomer's first full
    pull excluded): how many, their mean wall time, bytes and requests, and the mean add."""
    if len(rows) < 3:
        return {"pulls": 0}
    a, b = rows[len(rows) // 5], rows[-1]
    pulls, merges = b["pulls_ok"] - a["pulls_ok"], b["interactions"] - a["interactions"]
    if pulls < 1 or merges < 1:
        return {"pulls": pulls}
    return {"pulls": pulls, "pull_ms": 1e3 * (b["pull_wall_s"] - a["pull_wall_s"]) / pulls,
            "apply_ms": 1e3 * (b["apply_wall_s"] - a["apply_wall_s"]) / merges,
            "bytes_per_pull": (b["bytes_in"] - a["bytes_in"]) / pulls,
            "requests_per_pull": (b["pull_rounds"] - a["pull_rounds"]) / pulls}


def swarm_merge(hosts: HostPair, workdir: Path, codec: str, *, hidden: int, steps: int) -> dict[str, Any]:
    """Two peer daemons, one per host, training and pulling from each other back to back with
    ``codec``: their mean pull, add and bytes per pull."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / f"{codec}.toml", {
        "run": {"peers": 2, "seed": 0},
        "task": {"spec": "swarmnet.tasks.digits:task", "options": {"hidden": hidden}},
        "train": {"batch_size": BATCH, "lr": 0.02, "steps": steps, "metrics_every": 10, "checkpoint_every": 0.0},
        "algorithm": {"name": "swarmsgd", "local_steps": 2},
        "codec": {"name": codec},
        "network": {"exchange_cpu": 0.0, "min_peers": 1},  # pulls back to back: each one's time is the figure
    })
    env = {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES), LOCAL_PEERS_VARIABLE: "2"}
    seed = f"tcp://{HOSTS[0]}:{PORT}"
    run_dir = workdir / codec
    peers = [PeerProcessHandle(run_dir, f"host{i}", config, "--listen", f"tcp://{HOSTS[i]}:{PORT}",
                               *(("--seed", seed) if i else ()), prefix=hosts.prefix(i), env=env,
                               die_with_parent=True)
             for i in range(2)]
    try:
        for peer in peers:
            if peer.wait(900) != 0:
                raise BenchFailed(f"{codec} peer {peer.name} failed:\n{peer.log()}")
    finally:
        for peer in peers:
            peer.kill_tree()
    windows = [_windowed(peer.metrics()) for peer in peers]
    if any("pull_ms" not in w for w in windows):
        raise BenchFailed(f"the {codec} peers merged too rarely to measure ({windows}); give more --steps")
    figures = {key: statistics.mean(w[key] for w in windows)
               for key in ("pull_ms", "apply_ms", "bytes_per_pull", "requests_per_pull")}
    return figures | {"merge_ms": figures["pull_ms"] + figures["apply_ms"], "pulls": sum(w["pulls"] for w in windows)}


def raw_exchange(hosts: HostPair, nbytes: int, *, hidden: int, repeats: int, log: Path) -> list[float]:
    """Raw pyzmq in the swarm's pattern: a process on each host serves ``nbytes`` (a ROUTER) and
    pulls the other's back to back (a DEALER), training the digits MLP of width ``hidden`` on a
    thread meanwhile; the milliseconds of both sides' ``repeats`` timed transfers."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    with log.open("a") as errors:
        sides = [subprocess.Popen([*hosts.prefix(i), sys.executable, "-m", "swarmnet.bench.link", "raw-peer", HOSTS[i],
                                   str(nbytes), str(repeats), str(hidden)], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
                 for i in range(2)]
    try:
        addresses = [side.stdout.readline().strip() for side in sides]  # type: ignore[union-attr]
        for side, other in zip(sides, reversed(addresses)):
            side.stdin.write(other + "\n")  # type: ignore[union-attr]
            side.stdin.flush()  # type: ignore[union-attr]
        times = []
        for side in sides:
            line = side.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise BenchFailed(f"a raw pyzmq process failed (exit {side.wait()}):\n{log.read_text()[-3000:]}")
            times += json.loads(line)
        return times
    finally:
        for side in sides:
            side.kill()
            side.wait()


def _raw_peer(host: str, nbytes: int, repeats: int, hidden: int) -> None:
    """Child process: print the address it serves on, read the other side's, then serve and
    pull back to back while training; print the timed pulls, and serve on until stdin closes."""
    import zmq

    from swarmnet.transport.zmq import size_kernel_buffers

    payload = raw_payload(nbytes)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    size_kernel_buffers(router)
    router.sndhwm = 0  # a ROUTER drops what is over its limit
    router.bind(f"tcp://{host}:*")
    print(router.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    other = sys.stdin.readline().strip()
    threading.Thread(target=_serve, args=(router, payload), daemon=True).start()
    training = threading.Event()
    training.set()
    threading.Thread(target=train_while, args=(training, hidden, BATCH), daemon=True).start()
    dealer = ctx.socket(zmq.DEALER)
    size_kernel_buffers(dealer)
    dealer.rcvtimeo = RAW_TIMEOUT_MS  # a side that never answers ends this one, and the bench says so
    dealer.connect(other)
    times = []
    for i in range(repeats + 1):
        began = time.perf_counter()
        dealer.send(b"pull")
        frames = dealer.recv_multipart(copy=False)
        took = time.perf_counter() - began
        if frames[0].buffer.nbytes != nbytes:
            raise RuntimeError(f"the other side sent {frames[0].buffer.nbytes} bytes, not {nbytes}")
        del frames
        if i:  # the first one pays the connection
            times.append(took * 1e3)
    print(json.dumps(times), flush=True)
    sys.stdin.read()
    os._exit(0)  # at once: the training thread may be inside a torch op, which a normal exit aborts


def _serve(router: Any, payload: memoryview) -> None:
    while True:
        route, _ = router.recv_multipart()
        router.send_multipart([route, payload], copy=False)


def run(*, rates: tuple[str, ...] = ("1gbit", "10gbit"), codecs: tuple[str, ...] = ("fp32", "lattice"),
        hidden: int = 3000, steps: int = 1000, repeats: int = 30, json_path: Path | None = None) -> dict[str, Any]:
    """For each rate ("unlimited": the veth's own pace), raw pyzmq's transfer of the model's fp32
    bytes, then each codec's merge; raises :class:`BenchFailed` where the machine cannot make
    the hosts."""
    from swarmnet.tasks.digits import task

    nbytes = 4 * sum(p.numel() for p in task(hidden=hidden).build_model().parameters())
    result: dict[str, Any] = {"model": f"digits MLP, hidden {hidden}", "bytes": nbytes, "batch_size": BATCH,
                              "steps": steps, "machine": _machine(), "rates": {}}
    try:
        hosts = HostPair()
    except HostsRefused as exc:
        raise BenchFailed(f"{exc}; run it as root (or with CAP_NET_ADMIN) on a machine that allows "
                          "network namespaces") from None
    with hosts, tempfile.TemporaryDirectory(prefix="swarmnet-bench-link-") as tmp:
        for rate in rates:
            try:
                hosts.limit(None if rate == "unlimited" else rate)
            except HostsRefused as exc:
                raise BenchFailed(str(exc)) from None
            raw_ms = raw_exchange(hosts, nbytes, hidden=hidden, repeats=repeats, log=Path(tmp) / "raw.log")
            row: dict[str, Any] = {"raw_ms": statistics.mean(raw_ms), "raw_ms_median": statistics.median(raw_ms),
                                   "raw_ms_range": [min(raw_ms), max(raw_ms)], "raw_transfers": len(raw_ms)}
            for codec in codecs:
                merge = swarm_merge(hosts, Path(tmp) / rate, codec, hidden=hidden, steps=steps)
                merge["ratio"] = row["raw_ms"] / merge["merge_ms"]
                merge["bytes_share"] = merge["bytes_per_pull"] / nbytes
                row[codec] = merge
            result["rates"][rate] = row
            if json_path is not None:  # after every rate: a run stopped later keeps what it measured
                write_json(json_path, result)
    return result


def _machine() -> dict[str, Any]:
    import torch
    import zmq

    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "kernel": os.uname().release}


if __name__ == "__main__":
    if sys.argv[1] == "raw-peer":
        _raw_peer(sys.argv[2], *map(int, sys.argv[3:6]))
