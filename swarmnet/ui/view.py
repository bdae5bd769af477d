"""The swarm status view: pure functions from a :class:`SwarmSnapshot` to rich renderables.

Nothing here does I/O or reads mutable state, so a frame can be rendered (and tested) anywhere:
``render(snapshot)`` is the whole screen, a header panel, one table row per peer and the recent
events.
"""

from __future__ import annotations

import math
import time

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from swarmnet.ui.model import PeerStatus, SwarmSnapshot

STATE_STYLES = {"training": "green", "starting": "yellow", "settling": "cyan", "draining": "cyan", "done": "blue"}


def fmt_float(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def fmt_bytes(rate: float | None) -> str:
    """A byte rate with a binary prefix, e.g. ``1.5MiB`` (per second)."""
    if rate is None or not math.isfinite(rate):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(rate) < 1024 or unit == "GiB":
            return f"{rate:.0f}{unit}" if unit == "B" else f"{rate:.1f}{unit}"
        rate /= 1024
    raise AssertionError("unreachable")


def fmt_age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_header(snap: SwarmSnapshot) -> Panel:
    through = snap.throughput
    parts = [
        f"peers alive [bold]{len(snap.alive)}[/]/{len(snap.peers)}",
        f"throughput [bold]{fmt_float(through.interactions, 3) if through else '-'}[/] interactions/s",
        f"in {fmt_bytes(through.bytes_in if through else None)}/s",
        f"out {fmt_bytes(through.bytes_out if through else None)}/s",
        f"consensus distance [bold]{fmt_float(snap.consensus)}[/]",
        f"mean-model loss [bold]{fmt_float(snap.mean_model_loss)}[/]",
    ]
    budgets = {p.total_steps for p in snap.peers if p.total_steps}
    if budgets:
        parts.append(f"budget {'/'.join(str(b) for b in sorted(budgets))} steps")
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    return Panel("  ".join(parts), title=f"swarmnet status  {stamp}",
                 subtitle=f"query {snap.query_s * 1000:.0f} ms", title_align="left", subtitle_align="right")


PEER_COLUMNS = (("peer", "left", 4), ("host", "left", 4), ("device", "left", 6), ("state", "left", 9),
                ("step", "right", 5), ("clock", "right", 0), ("loss", "right", 6), ("lr", "right", 0),
                ("inter/s", "right", 0), ("in/s", "right", 0), ("out/s", "right", 0), ("stale", "right", 0),
                ("budget", "right", 0), ("failed", "right", 0), ("refused", "right", 0), ("seen", "right", 5))
"""Name, justification and least width of each column of the peers table (budget: the
exchange's CPU budget in cores; failed: pulls that failed; refused: what the peer refused, requests (malformed,
unauthenticated, ...) and neighbours' snapshots its screening turned down)."""
DROP_FIRST = ("budget", "host", "device", "seen", "refused", "failed", "stale", "clock", "lr")
"""Columns left out, in this order, while the table is wider than the terminal."""


class PeerTable:
    """The peers table, laid out when the terminal's width is known: on a narrow one the least
    telling columns are left out rather than every number cut short with an ellipsis."""

    def __init__(self, snap: SwarmSnapshot) -> None:
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render_peers(self.snap, options.max_width)


def render_peers(snap: SwarmSnapshot, width: int | None = None) -> Table:
    rows = [_cells(row, snap.taken_at) for row in snap.peers]
    widths = [max([len(name), least, *(_width(cells[i]) for cells in rows)])
              for i, (name, _, least) in enumerate(PEER_COLUMNS)]
    shown = list(range(len(PEER_COLUMNS)))
    names = [name for name, _, _ in PEER_COLUMNS]
    for name in DROP_FIRST:
        if width is None or sum(widths[i] for i in shown) + 2 * (len(shown) - 1) <= width:
            break
        shown.remove(names.index(name))
    table = Table(expand=True, pad_edge=False, box=None, header_style="bold")
    for i in shown:  # a peer's name keeps its whole width; numbers give way first
        name, justify, least = PEER_COLUMNS[i]
        table.add_column(name, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         min_width=widths[i] if name == "peer" else least or None)
    for row, cells in zip(snap.peers, rows, strict=True):
        table.add_row(*(cells[i] for i in shown), style="dim" if row.stale else None)
    return table


def _width(cell: RenderableType) -> int:
    return cell.cell_len if isinstance(cell, Text) else cell_len(str(cell))


def _cells(row: PeerStatus, now: float) -> list[RenderableType]:
    rates = row.rates
    if row.stale:
        state = Text("stale" if row.sampled_at else "no answer", style="red")
    else:
        state = Text(row.state, style=STATE_STYLES.get(row.state, ""))
    age = row.last_seen_age(now)
    seen = "never" if age is None else fmt_age(age)
    return [
        # Text: what a peer says about itself is shown as it is, never read as rich markup
        Text(row.name), Text(row.host or "-"), Text(row.device or "-"), state, str(row.step), str(row.clock), fmt_float(row.loss),
        fmt_float(row.lr, 3), fmt_float(rates.interactions, 3) if rates else "-",
        fmt_bytes(rates.bytes_in if rates else None), fmt_bytes(rates.bytes_out if rates else None),
        f"{fmt_float(row.staleness_s, 2)}s" if math.isfinite(row.staleness_s) else "-",
        _budget(row.exchange_cpu), Text(str(row.pulls_failed), style="yellow" if row.pulls_failed else ""),
        Text(str(row.refused), style="yellow" if row.refused else ""), seen,
    ]


def _budget(cores: float) -> str:
    if not math.isfinite(cores):
        return "-"
    return "none" if cores == 0 else fmt_float(cores, 2)


def render_events(snap: SwarmSnapshot) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, title="recent events", title_justify="left",
                  title_style="bold")
    table.add_column(no_wrap=True)
    table.add_column()
    for event in reversed(snap.events):
        when = time.strftime("%H:%M:%S", time.localtime(event.time))
        style = "red" if event.what in ("not answering", "suspected", "left") else ""
        by = f" (seen by {event.source})" if event.source and event.source != "status" else ""
        table.add_row(when, Text(f"{event.peer} {event.what}{by}", style=style))
    if not snap.events:
        table.add_row("", "none yet")
    return table


def render(snap: SwarmSnapshot) -> RenderableType:
    """The whole status screen for one snapshot."""
    return Group(render_header(snap), PeerTable(snap), Text(""), render_events(snap))
