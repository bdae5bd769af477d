"""Strict JSON for the files and outputs others read (summaries, metrics, ``--json``).

Python's json writes NaN and Infinity, which JSON has not: other readers (jq, JavaScript,
``json.loads`` with ``parse_constant``) refuse the whole document. Unknown values become null.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` of :func:`finite_or_none` of ``value``, refusing any NaN left (none is)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)
