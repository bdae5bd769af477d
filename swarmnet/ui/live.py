"""The live status loop: poll the swarm, render a frame, repeat, all on the event loop thread.

``rich.live.Live`` runs with ``auto_refresh=False`` and is updated with ``refresh=True`` after each
poll, so rich's refresh thread never touches the snapshot and a slow peer never freezes the screen
for longer than one request deadline.
"""

from __future__ import annotations

import asyncio
import json
import time

from rich.console import Console
from rich.live import Live

from swarmnet.ui.collect import StatusCollector
from swarmnet.ui.model import SwarmSnapshot
from swarmnet.ui.view import render


async def snapshot_once(collector: StatusCollector, settle: float = 0.5) -> SwarmSnapshot:
    """Two polls ``settle`` seconds apart, so the frame has rates; the first discovers peers."""
    await collector.poll()
    await asyncio.sleep(settle)
    return await collector.poll()


async def run_status(collector: StatusCollector, *, console: Console, interval: float = 1.0,
                     once: bool = False, as_json: bool = False, frames: int | None = None) -> SwarmSnapshot:
    """Drive ``swarmnet status``: one frame (``once``), one JSON document (``as_json``), or a live
    view refreshed every ``interval`` seconds until cancelled (or ``frames`` frames, for tests).
    Returns the last snapshot."""
    try:
        if once or as_json:
            snap = await snapshot_once(collector, min(interval, 0.5))
            if as_json:
                console.out(json.dumps(snap.to_json(), indent=2), highlight=False)
            else:
                console.print(render(snap))
            return snap
        snap = await collector.poll()
        with Live(render(snap), console=console, auto_refresh=False, screen=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            shown = 1
            while frames is None or shown < frames:
                next_at = time.monotonic() + interval
                snap = await collector.poll()
                live.update(render(snap), refresh=True)
                shown += 1
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        return snap
    finally:
        await collector.aclose()
