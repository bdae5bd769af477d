"""One JSON-lines metrics stream per peer (run_dir/<peer>/metrics.jsonl), mirrored to TensorBoard
(run_dir/<peer>/tensorboard/) when the tensorboard package is installed (`swarmnet[tensorboard]`)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from swarmnet import jsonsafe
from swarmnet.errors import unwritable_run_dir
from swarmnet.log import Throttle, get_logger
from swarmnet.peer.stats import PeerStats

NOT_SCALARS = ("time", "elapsed", "step")


def progress_record(stats: PeerStats, *, elapsed: float, loss: float | None) -> dict[str, Any]:
    """One row of the metrics stream: where training and the exchange stand now."""
    s = stats  # short, for the long literal below
    return {
        "time": time.time(), "elapsed": elapsed, "step": s.step, "epoch": s.epoch, "loss": loss,
        "lr": s.lr, "clock": s.clock, "interactions": s.interactions, "nudges": s.nudges_applied,
        "pulls_ok": s.pulls_ok, "pull_rounds": s.pull_rounds, "pulls_failed": s.pulls_failed,
        "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "pull_wall_s": s.pull_wall_s, "apply_wall_s": s.apply_wall_s,
        "staleness_s": s.staleness_s, "consensus": s.consensus, "bits_per_coord": s.bits_per_coord,
        "peers": s.peers_alive, "compute_cpu_s": s.compute_cpu_s, "exchange_cpu_s": s.exchange_cpu_s,
    }


def _tensorboard(logdir: Path) -> Any:
    """A SummaryWriter when tensorboard is installed, else None (it is an optional extra, and a
    run directory it cannot write to leaves the JSON stream alone)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    _quiet_writer_threads()
    try:
        return SummaryWriter(str(logdir))
    except OSError as exc:
        get_logger("metrics").error("no TensorBoard mirror at %s (%s); metrics.jsonl goes on", logdir,
                                    exc.strerror or exc)
        return None


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread dies on a failed write (a full disk) and Python prints its
    traceback; the writer hands the same error to our next call, which reports it in one line
    (:meth:`MetricsWriter._drop_tensorboard`). Other threads' errors print as before. The hook
    is the process's: in a user's own loop (swarmnet.api) it quiets their writers' threads too,
    whose errors their next call raises just the same."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another layout: its tracebacks print
        return
    previous = threading.excepthook
    if getattr(previous, "swarmnet_quiet", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and issubclass(args.exc_type, OSError)):
            previous(args)
    hook.swarmnet_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Numeric entries of a record, nested maps flattened as ``eval/accuracy``."""
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCALARS:
            if math.isfinite(value):
                out.append((prefix + key, float(value)))
    return out


ERRORS_EVERY_S = 30.0
"""A failing metrics file is reported at its first failure, then at most this often."""

TENSORBOARD_EVERY_S = 1.0
"""Progress rows reach TensorBoard at most this often (evaluations always, the last row at close):
mirroring a row costs the training thread about 0.5 ms (a protobuf event per scalar), where the
JSON line costs 17 us, and small models write a row every few milliseconds."""


class MetricsWriter:
    """Appends whole lines only: a row the disk has no room for is cut back off the file, so
    the stream stays valid JSON lines through a full disk, and a resumed peer's rows never run
    on from a torn one. Failures are counted in ``errors`` (and ``stats.metrics_errors``)."""

    def __init__(self, path: Path, *, tensorboard: bool = True, tensorboard_every: float = TENSORBOARD_EVERY_S,
                 stats: PeerStats | None = None) -> None:
        self.path = path
        self.stats = stats
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(path)
            self._fh: BinaryIO | None = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
            self._size = os.fstat(self._fh.fileno()).st_size
        except OSError as exc:
            raise unwritable_run_dir(path, exc) from None
        self._tb = _tensorboard(path.parent / "tensorboard") if tensorboard else None
        self._tb_every = tensorboard_every
        self._tb_at = -float("inf")
        self._tb_held: dict[str, Any] | None = None
        """The latest progress row not mirrored yet (mirrored at close)."""
        self.errors = 0
        self._failures = Throttle(ERRORS_EVERY_S)

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            line = (jsonsafe.dumps(record) + "\n").encode()
            try:
                written = 0
                while written < len(line):  # a short write on a nearly full disk: the rest raises ENOSPC
                    wrote = self._fh.write(memoryview(line)[written:])
                    if not wrote:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += wrote
                self._size += written
            except OSError as exc:  # a full or read-only disk must not stop training
                with contextlib.suppress(OSError):
                    os.truncate(self._fh.fileno(), self._size)  # the part of the row that landed, if any
                self._count_error()
                if self._failures.due() is not None:
                    get_logger("metrics").error("writing %s failed (%s, %d times so far); training goes on, "
                                                "free space or fix permissions", self.path,
                                                exc.strerror or exc, self.errors)
        if self._tb is not None and "step" in record:
            now = time.monotonic()
            if "eval" in record:
                self._mirror(record)
            elif now - self._tb_at >= self._tb_every:
                self._mirror(record)
                self._tb_at, self._tb_held = now, None
            else:
                self._tb_held = record

    def _mirror(self, record: dict[str, Any]) -> None:
        assert self._tb is not None
        try:
            for key, value in _scalars(record):
                self._tb.add_scalar(key, value, record["step"])
        except Exception as exc:  # its writer thread re-raises here what failed it (a full disk)
            self._drop_tensorboard(exc)

    def _drop_tensorboard(self, exc: Exception) -> None:
        """Stop mirroring for good: TensorBoard's writer cannot resume after a failed write, and
        the JSON stream holds every row anyway."""
        tb, self._tb, self._tb_held = self._tb, None, None
        self._count_error()
        get_logger("metrics").error("the TensorBoard mirror in %s stopped: %s; training and metrics.jsonl "
                                    "go on (free space or fix permissions, then restart the peer to mirror again)",
                                    self.path.parent / "tensorboard", getattr(exc, "strerror", None) or exc)
        with contextlib.suppress(Exception):
            tb.close()

    def _count_error(self) -> None:
        self.errors += 1
        if self.stats is not None:
            self.stats.metrics_errors = self.errors

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:
                get_logger("metrics").error("closing %s failed: %s", self.path, exc.strerror or exc)
            self._fh = None
        if self._tb is not None and self._tb_held is not None:
            self._mirror(self._tb_held)
        if self._tb is not None:
            try:
                self._tb.close()
            except Exception as exc:
                self._drop_tensorboard(exc)
            self._tb, self._tb_held = None, None


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a row whose write was cut short: the process killed mid-write, or
    an older swarmnet on a full disk) off an existing stream."""
    try:
        fh = open(path, "rb+")  # noqa: SIM115
    except FileNotFoundError:
        return
    with fh:
        size = end = os.fstat(fh.fileno()).st_size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            newline = fh.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            fh.truncate(end)
            get_logger("metrics").warning("%s ended in a partial line (a write cut short): removed its %d bytes",
                                          path, size - end)


def read_metrics(path: Path, start: int = 0) -> list[dict[str, Any]]:
    """All complete records of a metrics file from byte ``start`` on (a torn last line is skipped,
    and so is any line that is not a JSON object)."""
    records = []
    with open(path, "rb") as fh:
        fh.seek(start)
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
