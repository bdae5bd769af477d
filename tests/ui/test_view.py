"""The status model and the pure render functions, on fake-but-real status maps."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
from rich.console import Console

from swarmnet.ui.model import PeerStatus, SwarmSnapshot
from swarmnet.ui.view import render
from tests.ui.conftest import fake_status

pytestmark = pytest.mark.timeout(30)


def screen(renderable: object, width: int = 200) -> str:
    console = Console(width=width, height=200, record=True, force_terminal=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def swarm_rows(n: int, t0: float, dt: float) -> list[PeerStatus]:
    rows = []
    for i in range(n):
        addr = f"tcp://127.0.0.1:{7100 + i}"
        first = PeerStatus.from_reply(fake_status(i, addr, t=10.0), addr=addr, now=t0)
        rows.append(PeerStatus.from_reply(fake_status(i, addr, t=10.0 + dt), addr=addr, now=t0 + dt, previous=first))
    return rows


def test_rates_come_from_two_successive_replies() -> None:
    (row,) = swarm_rows(1, 1000.0, 2.0)
    assert row.rates is not None
    assert row.rates.interactions == pytest.approx(4.0)
    assert row.rates.bytes_in == pytest.approx(1000.0)
    assert row.rates.bytes_out == pytest.approx(2000.0)


def test_no_rates_across_a_restart_or_from_a_single_reply() -> None:
    addr = "tcp://127.0.0.1:7100"
    first = PeerStatus.from_reply(fake_status(0, addr, t=10.0), addr=addr, now=100.0)
    assert first.rates is None
    restarted = PeerStatus.from_reply(fake_status(0, addr, t=11.0, peer_id="peer0-123456"), addr=addr,
                                      now=101.0, previous=first)
    assert restarted.rates is None


def test_header_totals_and_consensus_skip_stale_peers() -> None:
    rows = swarm_rows(4, 1000.0, 1.0)
    rows[3] = rows[3].gone_stale("RequestTimeout")
    snap = SwarmSnapshot(taken_at=1003.0, peers=tuple(rows))
    assert len(snap.alive) == 3
    assert snap.throughput is not None and snap.throughput.interactions == pytest.approx(12.0)
    assert snap.consensus == pytest.approx((0.0 + 0.1 + 0.2) / 3)  # peer3's 0.3 is not counted
    doc = json.loads(json.dumps(snap.to_json(), allow_nan=False))
    assert doc["swarm"]["alive"] == 3
    assert doc["peers"][3]["stale"] is True and doc["peers"][3]["last_seen_s"] == pytest.approx(2.0)
    never = PeerStatus(name="peer9", addr="tcp://127.0.0.1:7109", sampled_at=0.0).gone_stale("RequestTimeout")
    doc = SwarmSnapshot(taken_at=1003.0, peers=(*rows, never)).to_json()
    assert doc["peers"][4]["last_seen_s"] is None  # not the seconds since 1970


def test_render_shows_every_peer_and_marks_stale_ones() -> None:
    rows = swarm_rows(5, 1000.0, 1.0)
    rows[2] = rows[2].gone_stale("RequestTimeout")
    text = screen(render(SwarmSnapshot(taken_at=1004.0, peers=tuple(rows))))
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("peer")}
    assert set(lines) >= {f"peer{i}" for i in range(5)}
    assert "stale" in lines["peer2"] and "3.0s" in lines["peer2"]
    assert "training" in lines["peer1"] and "stale" not in lines["peer1"]
    assert "peers alive 4/5" in text
    assert "NaN" not in text and "nan" not in text


def test_render_of_a_never_answering_address() -> None:
    row = PeerStatus(name="tcp://127.0.0.1:9", addr="tcp://127.0.0.1:9").gone_stale("RequestTimeout")
    assert math.isnan(row.loss)
    text = screen(render(SwarmSnapshot(taken_at=1.0, peers=(row,))))
    assert "no answer" in text and "never" in text


def test_render_64_peers_lists_them_all_in_order() -> None:
    rows = swarm_rows(64, 1000.0, 1.0)
    snap = SwarmSnapshot(taken_at=1001.5, peers=tuple(rows))
    text = screen(render(snap))
    names = [line.split()[0] for line in text.splitlines() if re.match(r"peer\d+ ", line)]
    assert names == [f"peer{i}" for i in range(64)]


def test_a_narrow_terminal_leaves_columns_out_instead_of_cutting_numbers() -> None:
    rows = swarm_rows(3, 1000.0, 1.0)
    snap = SwarmSnapshot(taken_at=1001.5, peers=tuple(rows))

    def header(text: str) -> list[str]:
        return next(line for line in text.splitlines() if line.startswith("peer ")).split()

    wide, narrow = screen(render(snap), width=200), screen(render(snap), width=80)
    assert header(wide) == ["peer", "host", "device", "state", "step", "clock", "loss", "lr", "inter/s", "in/s",
                            "out/s", "stale", "budget", "failed", "refused", "seen"]
    assert "…" not in narrow
    assert {"peer", "state", "step", "loss", "inter/s", "in/s", "out/s"} <= set(header(narrow)) < set(header(wide))
    for row in rows:  # every peer's name and step in full
        assert any(line.split()[0] == row.name and str(row.step) in line.split() for line in narrow.splitlines())


def test_the_exchange_budget_failed_pulls_and_refusals_are_shown_and_in_the_json() -> None:
    """docs/operations.md and docs/reliability.md send users to status for the exchange's CPU
    budget, its waits, its failed pulls and the requests a peer refused."""
    reply = {"id": "a1", "name": "peer0", "exchange_cpu": 0.05, "budget_wait_s": 12.5, "pulls_failed": 7,
             "rejected": {"malformed": 2, "unauthenticated": 1, "bogus": "x"}}
    row = PeerStatus.from_reply(reply, addr="tcp://127.0.0.1:9", now=1000.0)
    assert row.rejected == {"malformed": 2, "unauthenticated": 1, "bogus": 0} and row.refused == 3
    snap = SwarmSnapshot(taken_at=1000.5, peers=(row,))
    line = next(line for line in screen(render(snap), width=200).splitlines() if line.startswith("peer0 "))
    assert line.split()[-4:] == ["0.05", "7", "3", "0.5s"]  # budget, failed, refused, seen
    peer = snap.to_json()["peers"][0]
    assert (peer["exchange_cpu"], peer["budget_wait_s"], peer["pulls_failed"], peer["rejected"]["malformed"]) == (
        0.05, 12.5, 7, 2)
    unlimited = PeerStatus.from_reply({"id": "b", "name": "peer1", "exchange_cpu": 0.0}, addr="x", now=1000.0)
    assert "none" in screen(render(SwarmSnapshot(taken_at=1000.5, peers=(unlimited,))), width=200)


def test_what_a_peer_says_about_itself_is_shown_as_it_is_not_as_markup() -> None:
    """Without [security] anyone can gossip a card; its name must not restyle or break the screen."""
    addr = "tcp://127.0.0.1:7100"
    status = fake_status(0, addr) | {"name": "evil[/bold]", "host": "[red]node", "device": "[link=x]cpu"}
    text = screen(render(SwarmSnapshot(taken_at=1.0, peers=(PeerStatus.from_reply(status, addr=addr, now=1.0),))))
    assert "evil[/bold]" in text and "[red]node" in text and "[link=x]cpu" in text
