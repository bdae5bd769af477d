"""Who may interact with whom (SPEC 2.1): complete graph, ring, random regular graph.

Graphs are built over indices 0..n-1. The daemon maps peer ids to indices by sorting the
membership view, so every peer that sees the same membership derives the same graph.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("complete", "ring", "random-regular")


@dataclass(frozen=True, slots=True)
class Topology:
    kind: str = "complete"
    degree: int = 0
    """Degree of ``random-regular``; unused otherwise."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown topology {self.kind!r}; use complete, ring or random-regular:K")
        if self.kind == "random-regular" and self.degree < 2:
            raise ValueError("random-regular:K needs K >= 2")

    def __str__(self) -> str:
        return f"random-regular:{self.degree}" if self.kind == "random-regular" else self.kind

    def adjacency(self, n: int) -> list[list[int]]:
        """Sorted neighbour lists of nodes 0..n-1."""
        if n <= 1:
            return [[] for _ in range(n)]
        if self.kind == "complete":
            return [[j for j in range(n) if j != i] for i in range(n)]
        if self.kind == "ring":
            return [sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)]
        return _random_regular(n, min(self.degree, n - 1), random.Random(self.seed))

    def neighbours_of(self, me: str, members: Sequence[str]) -> list[str]:
        """Neighbours of peer ``me`` among ``members`` (which must include ``me``)."""
        ordered = sorted(set(members) | {me})
        if self.kind == "complete":
            return [m for m in ordered if m != me]
        adjacency = self.adjacency(len(ordered))
        return [ordered[j] for j in adjacency[ordered.index(me)]]


def parse_topology(text: str, seed: int = 0) -> Topology:
    """Parse ``complete``, ``ring`` or ``random-regular:K``."""
    kind, _, degree = text.partition(":")
    if kind == "random-regular":
        if not degree.isdigit():
            raise ValueError(f"random-regular needs a degree, e.g. random-regular:4 (got {text!r})")
        return Topology(kind, int(degree), seed)
    if degree:
        raise ValueError(f"topology {kind!r} takes no parameter (got {text!r})")
    return Topology(kind, 0, seed)


def _random_regular(n: int, degree: int, rng: random.Random) -> list[list[int]]:
    """Uniform-ish random simple regular graph by the pairing model with restarts.

    Steger and Wormald's variant: pair random free stubs, refusing loops and double edges;
    restart on a dead end. Retries until the graph is connected. Where n * degree is odd no
    regular graph exists: the last node gets degree - 1, every other node keeps the degree.
    """
    if degree == 0:
        return [[] for _ in range(n)]
    for _ in range(1000):
        edges: set[tuple[int, int]] = set()
        stubs = [v for v in range(n) for _ in range(degree)][: n * degree // 2 * 2]
        ok = True
        while stubs:
            rng.shuffle(stubs)
            leftover: list[int] = []
            for a, b in zip(stubs[::2], stubs[1::2]):
                e = (min(a, b), max(a, b))
                if a == b or e in edges:
                    leftover += [a, b]
                else:
                    edges.add(e)
            if len(leftover) == len(stubs):
                ok = False
                break
            stubs = leftover
        if not ok:
            continue
        adjacency: list[list[int]] = [[] for _ in range(n)]
        for a, b in edges:
            adjacency[a].append(b)
            adjacency[b].append(a)
        if _connected(adjacency):
            return [sorted(nb) for nb in adjacency]
    raise RuntimeError(f"could not build a connected {degree}-regular graph on {n} nodes")


def _connected(adjacency: list[list[int]]) -> bool:
    seen = {0}
    frontier = [0]
    while frontier:
        for nb in adjacency[frontier.pop()]:
            if nb not in seen:
                seen.add(nb)
                frontier.append(nb)
    return len(seen) == len(adjacency)
