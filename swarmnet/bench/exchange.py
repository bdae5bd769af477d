"""``swarmnet bench exchange``: what the exchange costs the compute loop, and how fast a pull is.

1. Compute ratio: the same swarm (2 peers unless told, real processes, digits MLP; on the device a
   peer would pick unless told: several peers share a GPU) with the exchange on (its
   default CPU budget) versus off, and with no budget at all; steps per second per peer over the
   middle of each run, and how many steps each merge took; the median over rounds of the three
   runs back to back. Target >= 0.95. The ratio is split into the share of a core the training
   thread kept and its CPU time per step (Linux thread clocks, from the peers' metrics).
2. Pull ratio: one real peer daemon serves an fp32 snapshot of a ~37 MB model; a client pulls it
   through the swarmnet protocol (PULL, validation) and, on the same socket types, a raw pyzmq
   ROUTER/DEALER pair moves the same bytes (copy=False). Both run in one client process,
   alternating, with the glibc hugetlb tunable set. Each server trains the same model on a
   thread while it serves, as a peer does, and only the one being timed runs: the other is
   stopped (the daemon by SIGSTOP, the raw server's thread by a message), so neither side has a
   busier machine or a busier GIL than the other. Target >= 0.8. Then what the exchange does
   with the reply, each timed: reading the vector (``codec.view``, in place), the exchange
   worker's gap and norm written over it (against ``decode``'s copy into a preallocated vector
   and the gap written over that copy), and the compute thread's add of half the gap to the
   live model. And the floor of that whole merge on this machine: the CPU raw pyzmq's transfer
   takes at both ends, how many cores are busy meanwhile (the raw server's training included),
   and so how short the transfer plus the two passes can be at best.
3. Streamed merge: whether a snapshot sent in pieces, each merged while the next is in flight,
   would pay. Raw pyzmq both ways, so only the overlap differs: the whole vector, then the gap
   and the add, against the same bytes in ``STREAM_PIECES`` messages whose gaps run in a worker
   thread as they arrive, then the add; once with the serving process otherwise idle, once with
   it training on a thread, as a peer daemon does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmnet.bench import write_json
from swarmnet.errors import BenchFailed
from swarmnet.launch import GLIBC_TUNABLES
from swarmnet.testing.processes import LocalSwarm, PeerProcessHandle, write_config

if TYPE_CHECKING:
    import zmq.asyncio
    from torch import Tensor

STREAM_PIECES = 8
"""Messages the streamed-merge comparison splits a snapshot into (4.6 MB each for 36.9 MB)."""


def _window(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Over the middle 60% of a peer's run (start-up and tail excluded): steps per second, the
    share of a core its training thread got, that thread's CPU milliseconds per step, and the
    share of a core the exchange used (every figure per peer)."""
    rows = [r for r in metrics if "compute_cpu_s" in r]
    if len(rows) < 5:
        nan = float("nan")
        return {"steps_per_s": nan, "compute_share": nan, "cpu_ms_per_step": nan, "exchange_share": nan}
    a, b = rows[len(rows) // 5], rows[(4 * len(rows)) // 5]
    seconds, steps = max(1e-9, b["time"] - a["time"]), max(1, b["step"] - a["step"])
    compute = b["compute_cpu_s"] - a["compute_cpu_s"]
    return {"steps_per_s": steps / seconds, "compute_share": compute / seconds,
            "cpu_ms_per_step": 1e3 * compute / steps,
            "exchange_share": (b["exchange_cpu_s"] - a["exchange_cpu_s"]) / seconds}


EXCHANGE_MODES = {"off": {"exchange": False}, "on": {}, "unlimited": {"exchange_cpu": 0.0}}
"""off: no exchange; on: the default CPU budget for the exchange (network.exchange_cpu auto);
unlimited: pull for every merge as soon as it is due, whatever it costs."""


def _compute_run(workdir: Path, mode: str, *, hidden: int, steps: int, local_steps: int,
                 batch_size: int, peers: int, device: str) -> dict[str, float]:
    """One swarm of ``peers`` in ``mode``: the figures of :func:`_window` averaged over the
    peers, plus steps per merge."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / f"compute-{mode}-{batch_size}.toml", {
        "run": {"peers": peers},
        "device": {"device": device},
        "task": {"spec": "swarmnet.tasks.digits:task", "options": {"hidden": hidden}},
        "train": {"batch_size": batch_size, "lr": 0.02, "steps": steps, "metrics_every": 20,
                  "checkpoint_every": 0.0},
        "algorithm": {"name": "swarmsgd", "local_steps": local_steps},
        "network": EXCHANGE_MODES[mode],
    })
    swarm = LocalSwarm(workdir / f"compute-{mode}-{batch_size}", config, die_with_parent=True)
    try:
        if swarm.wait(600) != 0:
            raise BenchFailed(f"bench swarm failed:\n{swarm.log()}")
    finally:
        swarm.kill_tree()
    windows = [_window(swarm.metrics(f"peer{i}")) for i in range(peers)]
    figures = {key: statistics.mean(w[key] for w in windows) for key in windows[0]}
    summaries = swarm.summary()["peers"]
    merges = sum(p["interactions"] for p in summaries)
    figures["steps_per_merge"] = sum(p["steps"] for p in summaries) / merges if merges else float("inf")
    return figures


def compute_ratio(workdir: Path, *, hidden: int = 512, steps: int = 3000, local_steps: int = 2,
                  batch_size: int = 32, rounds: int = 3, peers: int = 2, device: str = "auto") -> dict[str, Any]:
    """Rounds of the three modes back to back (the order rotating each round); each round's
    ratio compares runs minutes apart at most, and the median over rounds is reported, since
    the machine's pace alone drifts by about 10% between runs.

    Each round's step ratio splits exactly into two factors, each reported: how much of a core the
    training thread still got (``share_ratio``: on a full machine every peer's exchange takes
    from some training thread, not only its own) and
    how much longer each step took on that core (``cpu_per_step_ratio``: the merges' work is
    not counted there, so this is caches, memory bandwidth and the machine's drift)."""
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in EXCHANGE_MODES}
    modes = list(EXCHANGE_MODES)
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
            runs[mode].append(_compute_run(workdir / f"round{r}", mode, hidden=hidden, steps=steps,
                                           local_steps=local_steps, batch_size=batch_size, peers=peers,
                                           device=device))

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    def ratios(mode: str, key: str) -> list[float]:
        return [x[key] / off[key] for x, off in zip(runs[mode], runs["off"])]

    rates = {mode: [run["steps_per_s"] for run in values] for mode, values in runs.items()}
    return {"steps_per_s": {mode: statistics.median(v) for mode, v in rates.items()},
            "steps_per_s_rounds": rates,
            "ratio": statistics.median(ratios("on", "steps_per_s")), "ratio_rounds": ratios("on", "steps_per_s"),
            "ratio_unlimited": statistics.median(ratios("unlimited", "steps_per_s")),
            "ratio_unlimited_rounds": ratios("unlimited", "steps_per_s"),
            "share_ratio": statistics.median(ratios("on", "compute_share")),
            "cpu_per_step_ratio": statistics.median(ratios("on", "cpu_ms_per_step")),
            "compute_share": {mode: median(mode, "compute_share") for mode in modes},
            "cpu_ms_per_step": {mode: median(mode, "cpu_ms_per_step") for mode in modes},
            "exchange_share": {mode: median(mode, "exchange_share") for mode in modes},
            "steps_per_merge": {mode: median(mode, "steps_per_merge") for mode in ("on", "unlimited")},
            "runs": runs,
            "rounds": rounds, "peers": peers, "device": device, "hidden": hidden, "batch_size": batch_size, "local_steps": local_steps}


SERVING_BATCH = 8
"""Batch size of the training both pull-stage servers do while they serve (learning rate 0)."""


def pull_ratio(workdir: Path, *, hidden: int = 3000, repeats: int = 30) -> dict[str, Any]:
    config = write_config(workdir / "serve.toml", {
        "task": {"spec": "swarmnet.tasks.digits:task", "options": {"hidden": hidden}},
        "train": {"batch_size": SERVING_BATCH, "lr": 0.0, "steps": 10**9, "metrics_every": 1000,
                  "checkpoint_every": 0.0},
        "network": {"exchange": False},
    })
    tunables = os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES)  # as `swarmnet up` and _client_process set it
    server = PeerProcessHandle(workdir, "server", config, die_with_parent=True, env={"GLIBC_TUNABLES": tunables})
    try:
        address = server.card(timeout=120)["addr"]
        return _client_process("pull-client", address, str(repeats), str(server.proc.pid), str(hidden))
    finally:
        server.kill_tree()


def _client_process(*args: str) -> dict[str, Any]:
    """Run ``python -m swarmnet.bench.exchange ARGS`` (a client of stages 2 and 3) with the glibc
    tunable ``swarmnet up`` sets for its peers, unless told otherwise; its JSON result."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    out = subprocess.run([sys.executable, "-m", "swarmnet.bench.exchange", *args],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchFailed(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _pull_client(address: str, repeats: int, daemon_pid: int, hidden: int) -> dict[str, Any]:
    """Runs in a child process: alternates swarmnet pulls and raw pyzmq transfers of the same
    bytes, the serving side of each training and the other one stopped."""
    import signal

    import torch

    from swarmnet.algorithms import apply_pull
    from swarmnet.codecs import make_codec
    from swarmnet.peer.budget import linux_process_clock
    from swarmnet.peer.client import PeerClient
    from swarmnet.peer.exchange import gap_over
    from swarmnet.peer.stats import PeerStats
    from swarmnet.transport import TransportSet
    from swarmnet.wire import Limits, MsgType, request

    transports = TransportSet()
    client = PeerClient(sender="bench", transports=transports, limits=Limits(), timeout=30, stats=PeerStats(),
                        max_frame_bytes=2**31 - 1)
    codec = make_codec("fp32")
    first = await client.call(address, request(MsgType.PULL, "bench", clock=0, want=None, version=None))
    n = first.body["meta"]["n"]
    out, own, live = torch.empty(n), torch.randn(n), torch.zeros(n)
    nbytes = 4 * n

    raw, dealer = await _raw_pair(nbytes, hidden, SERVING_BATCH)

    async def serve_from(server: str) -> None:
        """Let only ``server`` ("daemon" or "raw") train and serve, and its training run a while."""
        if server == "raw":
            os.kill(daemon_pid, signal.SIGSTOP)
        await _tell(dealer, b"busy" if server == "raw" else b"idle")
        if server == "daemon":
            os.kill(daemon_pid, signal.SIGCONT)
        await asyncio.sleep(SWITCH_SETTLE_S)

    times: dict[str, list[float]] = {"pull": [], "view": [], "copy": [], "delta": [], "delta_after_copy": [],
                                     "apply": [], "raw": []}
    raw_clock = linux_process_clock(raw.pid)
    raw_client_cpu = raw_machine_cpu = 0.0
    try:
        await serve_from("raw")
        await asyncio.sleep(1.0)  # the raw server's first "busy" builds its model
        raw_server_cpu = await _serving_cpu(dealer)
        for _ in range(repeats):
            await serve_from("daemon")
            t0 = time.perf_counter()
            reply = await client.call(address, request(MsgType.PULL, "bench", clock=0, want=None, version=None))
            t1 = time.perf_counter()
            remote = codec.view(reply.body["meta"], reply.frames, own)
            t2 = time.perf_counter()
            codec.decode(reply.body["meta"], reply.frames, own, out, {})
            t3 = time.perf_counter()
            assert remote is not None  # a writable frame and a CPU model: read in place
            gap_over(remote, own, own)  # the exchange worker's pass, over the frames
            t4 = time.perf_counter()
            gap_over(out, own, own)  # the same over the copy, as a decoding peer does
            t5 = time.perf_counter()
            apply_pull(live, remote)  # the compute thread's pass
            t6 = time.perf_counter()
            del reply, remote  # freeing swarmnet's reply is in neither window, as the raw one's is not
            await serve_from("raw")
            t_raw, client_cpu, server_cpu = time.perf_counter(), time.process_time(), time.clock_gettime(raw_clock)
            await dealer.send(b"pull")
            frames = await dealer.recv_multipart(copy=False)
            t7 = time.perf_counter()
            client_cpu, server_cpu = time.process_time() - client_cpu, time.clock_gettime(raw_clock) - server_cpu
            raw_client_cpu += client_cpu
            raw_machine_cpu += client_cpu + server_cpu  # the raw server's training included
            assert frames[1].buffer.nbytes == nbytes
            del frames
            for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t_raw)):
                times[key].append(seconds)
        raw_server_cpu = await _serving_cpu(dealer) - raw_server_cpu
    finally:  # left stopped, the daemon would not act on the SIGTERM that ends it with the bench
        os.kill(daemon_pid, signal.SIGCONT)
    raw.kill()
    raw.wait()
    dealer.close(0)
    await client.aclose()
    await transports.aclose()
    swarm_s, view_s, copy_s, delta_s, delta_copy_s, apply_s, raw_s = (statistics.median(x) for x in times.values())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # The least a whole merge can take here: the raw transfer's CPU (both ends), then the merge's
    # two passes, which first fill the cores the transfer and the raw server's training left idle
    # and then take CPU at the pace the transfer got it.
    transfer_cpu_s = (raw_client_cpu + raw_server_cpu) / repeats
    busy_cores = raw_machine_cpu / sum(times["raw"])
    spare = max(0.0, cores - busy_cores)
    floor_s = raw_s + max(0.0, delta_s + apply_s - spare * raw_s) / (transfer_cpu_s / raw_s + spare)
    return {"bytes": nbytes, "swarmnet_pull_ms": swarm_s * 1e3, "view_ms": view_s * 1e3,
            "copying_decode_ms": copy_s * 1e3, "delta_ms": delta_s * 1e3, "delta_after_copy_ms": delta_copy_s * 1e3,
            "apply_ms": apply_s * 1e3,
            "raw_pyzmq_ms": raw_s * 1e3, "ratio": raw_s / swarm_s, "ratio_with_view": raw_s / (swarm_s + view_s),
            "ratio_with_copying_decode": raw_s / (swarm_s + copy_s),
            "ratio_with_view_and_delta": raw_s / (swarm_s + view_s + delta_s),
            "ratio_with_copying_decode_and_delta": raw_s / (swarm_s + copy_s + delta_copy_s),
            "ratio_with_merge": raw_s / (swarm_s + view_s + delta_s + apply_s),
            "raw_cpu_ms": {"client": raw_client_cpu / repeats * 1e3, "server": raw_server_cpu / repeats * 1e3},
            "cores": cores, "raw_busy_cores": busy_cores, "merge_floor_ms": floor_s * 1e3,
            "merge_floor_ratio": raw_s / floor_s,
            "swarmnet_GBps": nbytes / swarm_s / 1e9, "raw_GBps": nbytes / raw_s / 1e9, "repeats": repeats,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "servers": f"each training (digits MLP hidden {hidden}, batch {SERVING_BATCH}) while it serves, "
                       "the other one stopped"}


SWITCH_SETTLE_S = 0.05
"""How long the pull stage lets a server that was just made to run train before it is timed."""


async def _tell(dealer: zmq.asyncio.Socket, word: bytes) -> None:
    """Tell the raw server to train (``busy``) or not (``idle``), and wait for its answer."""
    await dealer.send(word)
    await asyncio.wait_for(dealer.recv_multipart(), 60)


async def _serving_cpu(dealer: zmq.asyncio.Socket) -> float:
    """CPU seconds the raw server has spent so far on everything but its training thread."""
    await dealer.send(b"cpu")
    return float((await asyncio.wait_for(dealer.recv_multipart(), 60))[0])


async def _raw_pair(nbytes: int, hidden: int = 512, batch: int = 32) -> tuple[subprocess.Popen[str], zmq.asyncio.Socket]:
    """A raw pyzmq server of ``nbytes`` and a DEALER connected to it, one transfer made. The
    server runs in its own process and session, as a peer does: neither side shares a GIL or,
    with the scheduler's autogroups, a share of the CPU with this client. Told ``busy``, it
    trains the digits MLP of width ``hidden`` with batches of ``batch`` on a thread."""
    import zmq
    import zmq.asyncio

    from swarmnet.transport.zmq import size_kernel_buffers

    # stdin: the server exits when this process ends, however it ends (it has its own session).
    raw = subprocess.Popen([sys.executable, "-m", "swarmnet.bench.exchange", "raw-server", str(nbytes),
                            str(hidden), str(batch)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert raw.stdout is not None
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    size_kernel_buffers(dealer)
    dealer.connect(raw.stdout.readline().strip())
    await dealer.send(b"pull")  # connected and warm, as the swarmnet side is after its first pull
    await asyncio.wait_for(dealer.recv_multipart(copy=False), 60)
    return raw, dealer


def streamed_gain(*, hidden: int = 3000, repeats: int = 30) -> dict[str, Any]:
    """Stage 3 in a client process of its own, with no peer daemon running beside it."""
    from swarmnet.tasks.digits import task

    numel = sum(p.numel() for p in task(hidden).build_model().parameters())  # the pull stage's model
    return _client_process("streamed-client", str(numel), str(repeats))


async def _streamed_client(numel: int, repeats: int) -> dict[str, Any]:
    import torch

    raw, dealer = await _raw_pair(4 * numel)
    own, live = torch.randn(numel), torch.zeros(numel)
    try:
        result: dict[str, Any] = {mode: await _streamed_merge(dealer, mode, own, live, repeats)
                                  for mode in ("idle", "busy")}
    finally:
        raw.kill()
        raw.wait()
        dealer.close(0)
    return result | {"bytes": 4 * numel, "pieces": STREAM_PIECES, "repeats": repeats}


async def _streamed_merge(dealer: zmq.asyncio.Socket, mode: str, own: Tensor, live: Tensor,
                          repeats: int) -> dict[str, float]:
    """The serving process ``mode`` ("idle" or "busy": training on a thread): the whole vector,
    gap and add one after the other, against the vector in STREAM_PIECES messages whose gaps
    overlap the transfer of the next pieces. Medians in ms, and their ratio."""
    import torch

    from swarmnet.algorithms import apply_pull
    from swarmnet.peer.exchange import gap_over

    await _tell(dealer, mode.encode())
    loop = asyncio.get_running_loop()

    async def merge(pieces: int) -> tuple[float, list[Tensor]]:
        """Seconds, and the gap in pieces (each over the memory of the frame it came in)."""
        t0 = time.perf_counter()
        await dealer.send(f"pull {pieces}".encode())
        offset, gaps, parts = 0, [], []
        for _ in range(pieces):
            frames = await asyncio.wait_for(dealer.recv_multipart(copy=False), 60)
            remote = torch.frombuffer(frames[1].buffer, dtype=torch.float32)
            mine = own[offset:offset + remote.numel()]  # one object: the lossless gap reads it once
            gaps.append(loop.run_in_executor(worker, gap_over, remote, mine, mine))
            parts.append(remote)
            offset += remote.numel()
        await asyncio.gather(*gaps)
        for start, gap in zip(itertools.accumulate((p.numel() for p in parts), initial=0), parts):
            apply_pull(live[start:start + gap.numel()], gap)
        seconds = time.perf_counter() - t0
        assert offset == own.numel()
        return seconds, parts

    with ThreadPoolExecutor(1) as worker:
        whole, streamed = (await merge(1))[1], (await merge(STREAM_PIECES))[1]  # each warm once
        if not torch.equal(whole[0].view(torch.int32), torch.cat(streamed).view(torch.int32)):  # the same
            # work both ways, to the bit (the raw server's random bytes hold NaNs, which equal nothing)
            raise RuntimeError("the gap computed in pieces differs from the gap of the whole vector")
        del whole, streamed
        times: dict[int, list[float]] = {1: [], STREAM_PIECES: []}
        for _ in range(repeats):
            for pieces in times:
                times[pieces].append((await merge(pieces))[0])
    whole, streamed = (statistics.median(t) * 1e3 for t in times.values())
    return {"whole_ms": whole, "streamed_ms": streamed, "gain": whole / streamed}


def run(*, json_path: Path | None = None, quick: bool = False, rounds: int = 3, peers: int = 2,
        device: str = "auto", progress: bool = True) -> dict[str, Any]:
    from rich.progress import Progress

    # A small step (batch 32, about 2 ms) shows the exchange's own CPU cost; a larger one
    # (batch 512) is closer to real training, where the step dominates.
    stages = {
        "compute": lambda work: compute_ratio(work, steps=1500 if quick else 3000, rounds=rounds, peers=peers,
                                              device=device),
        "compute_large_batch": lambda work: compute_ratio(work, steps=600 if quick else 1200, batch_size=512,
                                                          rounds=rounds, peers=peers, device=device),
        "pull": lambda work: pull_ratio(work, repeats=10 if quick else 30),
        "streamed_merge": lambda work: streamed_gain(repeats=10 if quick else 30),
    }
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="swarmnet-bench-") as tmp, Progress(disable=not progress) as bar:
        task = bar.add_task("bench exchange", total=len(stages))
        for name, stage in stages.items():
            bar.update(task, description=f"bench exchange: {name}")
            result[name] = stage(Path(tmp))
            if json_path is not None:  # after every stage: a run stopped later keeps what it measured
                left = [s for s in stages if s not in result]
                write_json(json_path, result | ({"stages_left": left} if left else {}))
            bar.advance(task)
    return result


def _raw_server(nbytes: int, hidden: int, batch: int) -> None:
    """Child process: a plain pyzmq ROUTER answering ``pull`` with the payload, ``pull P`` with it
    in P messages, and ``busy`` / ``idle`` by training (the digits MLP of width ``hidden``,
    batches of ``batch``) on a thread or not, as a peer daemon serves while it trains."""
    import zmq

    from swarmnet.transport.zmq import size_kernel_buffers

    threading.Thread(target=_exit_with_the_client, daemon=True).start()
    payload = raw_payload(nbytes)
    busy = threading.Event()
    trainer: threading.Thread | None = None  # started at the first ``busy``: idle, the process only serves
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    size_kernel_buffers(router)
    router.sndhwm = 0  # no limit: a ROUTER drops what is over it, and it counts loosely (a few pieces already are)
    router.bind("tcp://127.0.0.1:*")
    print(router.getsockopt(zmq.LAST_ENDPOINT).decode(), flush=True)
    while True:
        route, body = router.recv_multipart()
        if body == b"busy" and trainer is None:
            trainer = threading.Thread(target=train_while, args=(busy, hidden, batch), daemon=True)
            trainer.start()
        if body == b"busy":
            busy.set()
        elif body == b"idle":
            busy.clear()
        if body in (b"busy", b"idle"):
            router.send_multipart([route, b"ok"])
            continue
        if body == b"cpu":
            router.send_multipart([route, str(_cpu_but(trainer)).encode()])
            continue
        pieces = int(body.split()[1]) if b" " in body else 1
        cuts = [len(payload) // 4 * i // pieces * 4 for i in range(pieces + 1)]
        for lo, hi in zip(cuts, cuts[1:]):
            router.send_multipart([route, b"h", payload[lo:hi]], copy=False)


def _cpu_but(thread: threading.Thread | None) -> float:
    """CPU seconds used so far by this process, libzmq's threads included, less ``thread``'s."""
    from swarmnet.peer.budget import thread_cpu_clock

    return time.process_time() - (thread_cpu_clock(thread.ident)() if thread is not None and thread.ident else 0.0)


def raw_payload(nbytes: int) -> memoryview:
    """What the raw pyzmq servers send: ``nbytes`` (rounded down to whole floats) of noise."""
    return memoryview(bytearray(os.urandom(1024)) * (nbytes // 1024 + 1))[:nbytes // 4 * 4]


def _exit_with_the_client() -> None:
    """Child process thread: end the process once the client's end of stdin closes."""
    sys.stdin.read()
    os._exit(0)


def train_while(busy: threading.Event, hidden: int, batch_size: int) -> None:
    """SGD steps of the digits MLP of width ``hidden`` on batches of ``batch_size``, on one
    thread, while ``busy`` is set (the compute stage's task by default: hidden 512, batch 32)."""
    import torch

    from swarmnet.tasks.digits import task

    torch.set_num_threads(1)
    digits = task(hidden=hidden)
    model = digits.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = digits.train
    batch = (x[:batch_size], y[:batch_size])
    while True:
        busy.wait()
        optimizer.zero_grad()
        digits.loss(model, batch).backward()
        optimizer.step()


if __name__ == "__main__":
    if sys.argv[1] == "pull-client":
        print(json.dumps(asyncio.run(_pull_client(sys.argv[2], *map(int, sys.argv[3:6])))))
    elif sys.argv[1] == "streamed-client":
        print(json.dumps(asyncio.run(_streamed_client(int(sys.argv[2]), int(sys.argv[3])))))
    elif sys.argv[1] == "raw-server":
        _raw_server(*map(int, sys.argv[2:5]))
