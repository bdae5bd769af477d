"""The lattice step size per chunk: eps = 2^e following the learning rate (SPEC 3.4).

Legend: R = chunks (rows) of one snapshot.

Theory wants the quantization error comparable to one interaction's update, (R^2+7) eps =
eta H M (SPEC 2.5). The adaptive policy measures that scale directly: the RMS, per chunk, of
what the peer's own training steps moved since the previous snapshot (``hints["progress"]``,
over ``hints["progress_steps"]`` steps: the H this interaction actually had, which a CPU budget
may stretch), smoothed by an EMA, and sets eps = scale * that. When the runtime passes ``lr``
(and, without ``progress``, ``local_steps``, default 1) the EMA runs on that RMS per unit of
lr*steps and eps is multiplied back by the current lr*steps, so eps follows a decaying learning
rate at once instead of lagging the EMA; consensus distances shrink with the learning rate too
(SPEC 3.4), so bits per coordinate stay roughly constant.

Averaging moves must stay out of that measure. A snapshot follows a merge, so the plain
difference between successive snapshots holds the merge's move as well, which is half the
distance to the neighbour: eps would then grow with the distance, and with it the rounding noise
every merge adds, until the noise keeps the peers as far apart as they are (seen: peers stuck
0.5 apart at a learning rate of zero). Without ``progress`` (a caller that does not track it)
the policy falls back to that plain difference.

Fallbacks: the first snapshot (nothing to difference against), or a chunk that has never
changed, uses ``init`` times the chunk's RMS (or the vector's, or ``init`` itself if all is
zero). ``fixed`` replaces all of this by one constant.

eps is rounded down to a power of two, which makes x/eps exact in float32 and keeps the header
to one small integer per chunk. Adaptive steps are also raised where needed so that
|x|/eps < 2^29 in every chunk: coordinates stay int32 (SPEC 4 item 10; such a step is below
float32 resolution of the chunk's largest value anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

E_MIN, E_MAX = -100, 100
"""Exponent range of eps on the wire (2^-100 .. 2^100)."""
HEADROOM_BITS = 29


class StepPolicy:
    """Per-chunk exponents e (eps = 2^e) for successive snapshots of one vector.

    Called by the lattice codec's ``encode`` (compute thread), once per snapshot, with the
    chunk statistics it computes anyway.
    """

    def __init__(
        self,
        *,
        fixed: float | None = None,
        scale: float = 0.5,
        ema: float = 0.9,
        init: float = 2.0**-10,
    ) -> None:
        self.fixed = fixed
        self.scale = scale
        self.ema = ema
        self.init = init
        self._ema_R: np.ndarray | None = None
        self._normalized: bool | None = None

    def reset(self) -> None:
        self._ema_R = None
        self._normalized = None

    def exponents(
        self,
        rms_x: Callable[[], np.ndarray],
        rms_diff_R: np.ndarray | None,
        max_abs_R: np.ndarray,
        hints: Mapping[str, Any] | None,
    ) -> np.ndarray:
        """Exponents (int64 [R]) from the per-chunk RMS of the training progress since the
        previous snapshot (or of x minus the previous snapshot; None on the first snapshot) and
        max |x| (float64 [R]); ``rms_x()`` gives the per-chunk RMS of x itself and is called
        only when a fallback needs it. NumPy: a few dozen values, where each torch call would
        cost more than the arithmetic."""
        if self.fixed is not None:
            return np.full(max_abs_R.shape, math.floor(math.log2(self.fixed)), dtype=np.int64)
        lr = float(hints.get("lr", 0.0)) if hints else 0.0
        steps = float(hints.get("local_steps", 1.0)) if hints else 1.0
        if hints and "progress" in hints:  # the steps this snapshot actually follows
            steps = float(hints.get("progress_steps", steps))
        normalized = math.isfinite(lr) and lr > 0 and math.isfinite(steps) and steps > 0
        per_update = lr * steps if normalized else 1.0
        if normalized != self._normalized or (
            self._ema_R is not None and self._ema_R.shape != max_abs_R.shape
        ):
            self._ema_R = None
        self._normalized = normalized
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if rms_diff_R is not None:
                observed = rms_diff_R / per_update
                valid = np.isfinite(observed) & (observed > 0)
                if self._ema_R is None:
                    self._ema_R = np.where(valid, observed, np.nan)
                else:
                    blended = np.where(
                        np.isnan(self._ema_R),
                        observed,
                        self.ema * self._ema_R + (1 - self.ema) * observed,
                    )
                    self._ema_R = np.where(valid, blended, self._ema_R)
            ema = self._ema_R if self._ema_R is not None else np.full(max_abs_R.shape, np.nan)
            eps = self.scale * per_update * ema
            missing = ~(np.isfinite(eps) & (eps > 0))
            if missing.any():
                rms_x_R = rms_x()
                overall = float(np.sqrt(np.mean(np.square(rms_x_R)))) if rms_x_R.size else 0.0
                fallback = self.init * np.where(rms_x_R > 0, rms_x_R, overall if overall > 0 else 1.0)
                eps = np.where(missing, fallback, eps)
            e = np.clip(np.floor(np.log2(eps)), E_MIN, E_MAX)
            # |x| / 2^e < 2^29: e >= log2(max|x|) - 29 (no constraint for all-zero chunks).
            floor_e = np.ceil(np.log2(max_abs_R)) - HEADROOM_BITS
        e = np.maximum(e, np.nan_to_num(floor_e, neginf=E_MIN))
        return np.clip(e, E_MIN, E_MAX).astype(np.int64)
