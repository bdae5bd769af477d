import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarmnet.codecs import kernels
from swarmnet.errors import ConfigError
from swarmnet.peer.budget import (
    CpuBudget,
    auto_cores,
    linux_process_clock,
    local_peers,
    named_threads_cpu,
    peer_share,
    thread_cpu_clock,
)

pytestmark = pytest.mark.timeout(60)


def burn(seconds: float) -> float:
    """Spend about ``seconds`` of this thread's CPU time; returns what was spent."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        sum(range(1000))
    return time.thread_time() - start


def test_work_beyond_the_budget_asks_for_a_proportional_wait():
    budget = CpuBudget(0.1, thread_cpu_clock(threading.get_ident()), window=1.0)
    assert budget.delay() == 0.0
    burn(0.4)  # 0.4 CPU-s of exchange work against a 0.1-core budget with 0.1 s of credit
    wait = budget.delay()
    assert 1.5 < wait < 4.0, wait
    assert budget.waited == pytest.approx(wait)


def test_pressure_tells_whether_the_budget_sets_the_pace():
    clock = thread_cpu_clock(threading.get_ident())
    tight, ample = CpuBudget(0.05, clock, window=0.01), CpuBudget(10.0, clock)
    for _ in range(20):
        burn(0.002)  # 2 ms of work per interaction; the tight budget refills 0.5 ms at most
        tight.delay()
        ample.delay()
    assert tight.pressure > 0.8  # 1 - 0.9^20 if every call asked for a wait
    assert ample.pressure == 0.0


def test_only_the_charged_threads_count():
    clock = thread_cpu_clock(threading.get_ident())
    budget = CpuBudget(0.1, clock)
    other = threading.Thread(target=burn, args=(0.4,))  # e.g. the compute thread's steps
    other.start()
    other.join()
    assert budget.delay() < 0.2


def test_no_limit_never_waits_yet_counts_what_was_used():
    budget = CpuBudget(0.0, thread_cpu_clock(threading.get_ident()))
    spent = burn(0.1)
    assert budget.delay() == 0.0
    assert budget.used == pytest.approx(spent, abs=0.02)


def test_auto_leaves_spare_cores_alone_and_keeps_a_floor_when_there_are_none():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert auto_cores(cpu, 1, 1.0) == pytest.approx(0.05)  # every core is training
    assert auto_cores(cpu, 1, 0.5) == pytest.approx(0.025)
    # 16 peers on 2 cores: 1% of a core each, not 5% of an eighth (their gossip alone costs about that)
    assert auto_cores(cpu, 1, 0.125) == pytest.approx(0.01)
    assert auto_cores(cpu, 2, 8.0) == pytest.approx(6.0)
    assert auto_cores(gpu, 1, 8.0) == pytest.approx(7.0)


def test_a_container_cpu_quota_bounds_the_cores_a_peer_counts():
    """A container's CPU limit is a cgroup quota, which the process's affinity does not show: a
    peer limited to one CPU on this machine counted both cores, and gave its exchange one of
    them. Made as container runtimes make it: the process in a cgroup of its own with a quota,
    shown at the cgroup root in the process's own mount namespace."""
    root = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller
    if os.geteuid() != 0 or not (root / "cpu.cfs_quota_us").is_file() or shutil.which("unshare") is None:
        pytest.skip("needs root, cgroup v1's cpu controller at /sys/fs/cgroup/cpu, and unshare")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores in this process's affinity")
    group = root / f"swarmnet-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_quota_us").write_text((group / "cpu.cfs_period_us").read_text())  # one CPU
    except OSError as exc:
        pytest.skip(f"no cgroup with a CPU quota can be made here: {exc}")
    try:
        count = f"{sys.executable} -c 'from swarmnet.peer.budget import usable_cores; print(usable_cores())'"
        container = f"echo $$ > {group}/cgroup.procs && mount --bind {group} {root} && exec {count}"
        run = subprocess.run(["unshare", "--mount", "sh", "-c", container], capture_output=True, text=True, timeout=60)
        if run.returncode != 0 and "Traceback" not in run.stderr:  # unshare, mount or the cgroup refused
            pytest.skip(f"no container can be made here: {run.stderr.strip()}")
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["1"]
    finally:
        group.rmdir()  # empty again: the process has ended


def test_local_peers_come_from_the_launcher_or_the_scheduler():
    assert local_peers({}) == (1, None)
    assert local_peers({"SWARMNET_LOCAL_PEERS": "4", "LOCAL_WORLD_SIZE": "8"}) == (4, "SWARMNET_LOCAL_PEERS")
    assert local_peers({"SLURM_NTASKS_PER_NODE": "8"}) == (8, "SLURM_NTASKS_PER_NODE")
    assert local_peers({"LOCAL_WORLD_SIZE": "zero"}) == (1, None)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "1e9", "2.5"])
def test_a_bad_count_of_local_peers_is_an_error_naming_the_variable(value):
    """Not ignored as if unset: the peer's exchange budget would take the whole machine."""
    with pytest.raises(ConfigError, match=rf"SWARMNET_LOCAL_PEERS='{re.escape(value)}': give the number of peers"):
        local_peers({"SWARMNET_LOCAL_PEERS": value})


def test_a_peer_shares_the_machine_with_the_local_peers_but_a_slurm_task_owns_its_cpus():
    alone = "2 cores shared by 1 local peer (no count given: set SWARMNET_LOCAL_PEERS=N for N peers on this machine)"
    assert peer_share({}, cores=2) == (2, alone)
    assert peer_share({"SWARMNET_LOCAL_PEERS": "4"}, cores=2) == (0.5, "2 cores shared by 4 local peers "
                                                                       "(SWARMNET_LOCAL_PEERS)")
    # 4 GPU peers of a node, 4 CPUs each, every task bound to its own: a share of 4, not 4 / 4.
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "4"}
    assert peer_share(slurm, cores=4) == (4, "this Slurm task's 4 cores (SLURM_CPUS_PER_TASK)")
    assert auto_cores(torch.device("cuda", 0), 1, peer_share(slurm, cores=4)[0]) == 3
    assert peer_share(slurm, cores=16)[0] == 4  # the tasks not bound: each still owns 4 of the 16
    # srun -n 4 -c 4 without --ntasks-per-node: no count, the task's own CPUs all the same.
    assert peer_share({"SLURM_PROCID": "1", "SLURM_CPUS_PER_TASK": "4"}, cores=4)[0] == 4
    # --ntasks-per-node=4 without -c, bound: the node's allocation over its tasks.
    bound = {"SLURM_PROCID": "1", "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "8"}
    assert peer_share(bound, cores=2) == (2, "the 8 cores Slurm gave this node's 4 tasks (SLURM_CPUS_ON_NODE)")
    # `swarmnet up` inside a Slurm allocation: its own count of local peers, dividing the task's CPUs.
    assert peer_share(slurm | {"SWARMNET_LOCAL_PEERS": "8"}, cores=16)[0] == 2
    # Not a Slurm task (a shell inside an allocation): the local count as given.
    assert peer_share({"SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "4"}, cores=16)[0] == 4


@contextlib.contextmanager
def libzmq_context_that_moved_bytes() -> Iterator[None]:
    """A fresh context whose I/O threads (they start, and name themselves, only once it exists)
    moved 320 MB from a PUSH to a PULL socket; they end when the block does."""
    import zmq

    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        payload = bytes(8 << 20)
        for _ in range(40):
            push.send(payload, copy=False)
            pull.recv(copy=False)
        yield
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_libzmq_io_threads_are_charged_for_the_bytes_they_move():
    io_cpu = named_threads_cpu("ZMQbg/IO", rescan_s=0.0)  # made before the context exists
    before = io_cpu()
    with libzmq_context_that_moved_bytes():
        assert io_cpu() - before > 0.01
        threads = [tid for tid in os.listdir("/proc/self/task")
                   if open(f"/proc/self/task/{tid}/comm").read().startswith("ZMQbg/IO")]
        ticks = sum(proc_ticks(tid) for tid in threads) / os.sysconf("SC_CLK_TCK")
        # The kernel's own count of every such thread agrees, to its 10 ms ticks.
        assert abs(io_cpu() - ticks) < 0.05 + 0.01 * len(threads)
    assert named_threads_cpu("no-such-thread")() == 0.0


@pytest.mark.skipif(not kernels.usable(torch.empty(0)), reason="numba is not installed")
def test_the_helper_threads_of_the_fused_loops_are_charged():
    charged = named_threads_cpu(("no-such-thread", kernels.HELPER_THREADS), rescan_s=0.0)
    before, threads = charged(), torch.get_num_threads()
    x = torch.randn(1 << 22).view(-1, 1024)
    torch.set_num_threads(2)  # the loops add one helper thread
    try:
        for _ in range(40):
            kernels.max_abs(x)
    finally:
        torch.set_num_threads(threads)
    assert charged() - before > 0.005  # the helper's half of 40 passes over 16 MB (a few ms each)


def proc_ticks(tid: str) -> int:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_io_thread_time_is_not_lost_when_the_thread_ends():
    io_cpu = named_threads_cpu("ZMQbg/IO", rescan_s=0.0)
    with libzmq_context_that_moved_bytes():
        used = io_cpu()
        assert used > 0.01
    assert io_cpu() >= used  # the context's I/O threads have ended


def test_work_before_the_start_is_not_charged():
    """A peer's start (joining, adopting a model) runs on the charged threads before its exchange
    does; counted, it held back the first pulls for seconds."""
    budget = CpuBudget(0.1, thread_cpu_clock(threading.get_ident()), window=1.0)
    burn(0.4)
    budget.start()
    assert budget.delay() == 0.0
    assert budget.used < 0.05


def test_a_process_clock_reads_another_process_cpu():
    """What `bench exchange` reads of its raw pyzmq server: the CPU of another process, all its
    threads, not the wall time it has been alive."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                               "while time.process_time() - t < 5: pass"])
    try:
        time.sleep(1.0)
        idle, busy = (time.clock_gettime(linux_process_clock(p.pid)) for p in (child, burner))
        assert idle < 0.3 < busy, (idle, busy)  # start-up alone costs the idle one a few tens of ms
    finally:
        for p in (child, burner):
            p.kill()
            p.wait()
