"""Two hosts on one machine: network namespaces joined by a veth pair, optionally rate-limited.

Used by the tests that need two hosts and by ``swarmnet bench link``. Making namespaces needs
root (or CAP_NET_ADMIN) and iproute2; where the machine refuses, :class:`HostsRefused` says why.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from types import TracebackType

HOSTS = ("10.200.1.1", "10.200.1.2")
"""The two hosts' addresses on the veth pair (private to the namespaces, so any pair may use them)."""

RATE = re.compile(r"\d+(\.\d+)?[kmg]?bit", re.IGNORECASE)
"""A link rate as tc writes it: 100mbit, 1gbit, 2.5gbit."""

TBF_LATENCY = "100ms"
"""How long a packet may queue in the rate limiter before it is dropped: enough for TCP to fill
the link without loss at the rates the bench uses."""


class HostsRefused(RuntimeError):
    """This machine cannot make the two hosts (no iproute2, no permission, no veth or tbf)."""


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        raise HostsRefused(f"{command[0]} is not installed (iproute2): cannot create network namespaces") from None


def rate_bits(rate: str) -> float:
    """``rate`` (as tc writes it) in bits per second; ValueError when it is not one."""
    if not RATE.fullmatch(rate):
        raise ValueError(f"{rate!r} is not a link rate; write it as tc does, e.g. 100mbit, 1gbit, 2.5gbit")
    number, unit = rate[:-3].lower(), ""
    if number[-1] in "kmg":
        number, unit = number[:-1], number[-1]
    return float(number) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit]


class HostPair:
    """Namespaces ``names[0]`` and ``names[1]``, hosts :data:`HOSTS`, one veth between them.
    A context manager: the namespaces (and with them the link) are deleted on exit."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.names = (f"swn-a-{tag}", f"swn-b-{tag}")
        self.links = (f"va{tag}", f"vb{tag}")
        made = _run("ip", "netns", "add", self.names[0])
        if made.returncode != 0:
            raise HostsRefused(f"this machine does not allow network namespaces: {made.stderr.strip()}")
        try:
            a, b = self.names
            va, vb = self.links
            for step in (("netns", "add", b), ("link", "add", va, "type", "veth", "peer", "name", vb),
                         ("link", "set", va, "netns", a), ("link", "set", vb, "netns", b),
                         ("-n", a, "addr", "add", f"{HOSTS[0]}/24", "dev", va),
                         ("-n", b, "addr", "add", f"{HOSTS[1]}/24", "dev", vb),
                         ("-n", a, "link", "set", va, "up"), ("-n", b, "link", "set", vb, "up"),
                         ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")):
                done = _run("ip", *step)
                if done.returncode != 0:
                    raise HostsRefused(f"could not set up namespaces (ip {' '.join(step)}): {done.stderr.strip()}")
        except BaseException:
            self.close()
            raise

    def prefix(self, host: int) -> list[str]:
        """The command prefix that runs a process on ``host`` (0 or 1)."""
        return ["ip", "netns", "exec", self.names[host]]

    def set_link(self, up: bool) -> None:
        """Cut (both ends down: packets vanish, no reset) or heal the link between the hosts."""
        for ns, link in zip(self.names, self.links):
            done = _run("ip", "-n", ns, "link", "set", link, "up" if up else "down")
            if done.returncode != 0:
                raise RuntimeError(f"ip link set {link} failed: {done.stderr.strip()}")

    def go_dark(self, host: int) -> None:
        """``host`` stops answering without a word, as a host that lost power: its end of the
        link goes down while the other end keeps its route and a fixed neighbour entry for it, so
        what is sent to it vanishes, with no reset and no unreachable error."""
        other = 1 - host
        shown = _run("ip", "-n", self.names[host], "-o", "link", "show", self.links[host]).stdout
        mac = shown.split("link/ether ")[1].split()[0]
        for step in (("-n", self.names[other], "neigh", "replace", HOSTS[host], "lladdr", mac, "dev",
                      self.links[other], "nud", "permanent"),
                     ("-n", self.names[host], "link", "set", self.links[host], "down")):
            done = _run("ip", *step)
            if done.returncode != 0:
                raise RuntimeError(f"ip {' '.join(step)} failed: {done.stderr.strip()}")

    def limit(self, rate: str | None) -> None:
        """Limit each direction of the link to ``rate`` (a token bucket on both ends' egress, as a
        switch port of that speed would); None lifts the limit (the veth's own pace: memory)."""
        for ns, link in zip(self.names, self.links):
            if rate is None:
                _run("tc", "-n", ns, "qdisc", "del", "dev", link, "root")  # fails harmlessly when there is none
                continue
            # The bucket holds 10 ms of the rate (at least 64 KB): timer ticks as coarse as
            # 100 Hz still refill it in time to keep the link busy.
            burst = max(65536, int(rate_bits(rate) / 8 / 100))
            done = _run("tc", "-n", ns, "qdisc", "replace", "dev", link, "root", "tbf", "rate", rate,
                        "burst", str(burst), "latency", TBF_LATENCY)
            if done.returncode != 0:
                raise HostsRefused(f"could not limit the link to {rate} (tc tbf): {done.stderr.strip()}")

    def close(self) -> None:
        for name in self.names:
            _run("ip", "netns", "del", name)

    def __enter__(self) -> HostPair:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
