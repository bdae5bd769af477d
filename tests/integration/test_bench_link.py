"""``swarmnet bench link``: two hosts in network namespaces whose link is rate-limited, a real
two-peer swarm across it, and raw pyzmq over the same link."""

import pytest

from swarmnet.bench.link import raw_exchange, swarm_merge
from swarmnet.testing.netns import HostPair, HostsRefused

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(300)]

NBYTES = 2_500_000


def limit(hosts: HostPair, rate: str | None) -> None:
    try:
        hosts.limit(rate)
    except HostsRefused as exc:  # a kernel without the token bucket filter
        pytest.skip(str(exc))


def test_a_limited_link_moves_bytes_at_its_rate_and_no_faster(tmp_path, two_hosts):
    log = tmp_path / "raw.log"
    limit(two_hosts, "100mbit")
    times = raw_exchange(two_hosts, NBYTES, hidden=64, repeats=2, log=log)
    assert len(times) == 4  # both sides' timed pulls
    limited = min(times)
    assert limited >= 0.9 * 1e3 * NBYTES * 8 / 100e6, limited  # 200 ms at 100 Mbit/s
    assert limited < 4 * 1e3 * NBYTES * 8 / 100e6, limited  # the bucket keeps the link busy
    limit(two_hosts, None)
    unlimited = min(raw_exchange(two_hosts, NBYTES, hidden=64, repeats=2, log=log))
    assert unlimited < limited / 3, (unlimited, limited)


def test_over_a_slow_link_a_lattice_merge_moves_fewer_bytes_and_ends_sooner_than_an_fp32_one(tmp_path, two_hosts):
    limit(two_hosts, "100mbit")
    fp32 = swarm_merge(two_hosts, tmp_path, "fp32", hidden=256, steps=800)
    lattice = swarm_merge(two_hosts, tmp_path, "lattice", hidden=256, steps=800)
    model_bytes = 4 * (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    # A pull is the whole model in fp32 (the reply's header on top), well under half of it in lattice.
    # Within a tenth: the window's edges can cut a pull in flight, whose bytes count when they
    # arrive and the pull once it completes (0.97 of the model once, on a slow VM, over about 30 pulls).
    assert 0.9 * model_bytes <= fp32["bytes_per_pull"] < 1.1 * model_bytes, fp32
    assert lattice["bytes_per_pull"] < 0.5 * model_bytes, lattice
    # The link sets an fp32 pull's pace: no faster than its bytes at 100 Mbit/s.
    assert fp32["pull_ms"] >= 0.9 * 1e3 * model_bytes * 8 / 100e6, fp32
    assert lattice["merge_ms"] < fp32["merge_ms"], (lattice, fp32)
    assert fp32["apply_ms"] > 0 and lattice["apply_ms"] > 0 and fp32["pulls"] >= 4 and lattice["pulls"] >= 4
