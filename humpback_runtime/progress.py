"""Live progress of a stage: `<stage>/_PROGRESS.json` in the store every few seconds, a bar on a
terminal, plain log lines elsewhere (pods, CI), and the stage's Prometheus metrics.

    with stage_progress(store, "ns/run/curate-1", "curate-1"):      # run_stage does this
        with track("curate-1", total=len(pairs), unit="records") as p:  # any loop inside the stage
            for pair in pairs:
                ...
                p.update(1, tokens=usage)

The file (one JSON object, rewritten whole) holds what `humpback status` and the operator show::

    {"stage": "curate-1", "state": "running" | "finished" | "failed", "phase": "curate-1",
     "unit": "records", "done": 120, "total": 400, "rate": 4.1, "eta_seconds": 68.3,
     "tokens": 51234, "tokens_per_second": 850.2, "errors": 0, "retries": 2,
     "last_error": "HTTP 503: ...", "checkpoint_age_seconds": 12.0,
     "started": "2026-...Z", "updated": "2026-...Z", "elapsed_seconds": 29.4}

`rate` is over the last minute (so a resumed stage's ETA is not skewed by skipped work); `total`
is null when unknown (a streamed source). Outside a stage (`stage_progress` not entered, or a
torchrun rank other than 0) a tracker only shows the bar. Writes never fail the stage: a store
error is logged once and the stage goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

__all__ = ["PROGRESS", "Progress", "format_line", "read_progress", "stage_progress", "track"]

log = logging.getLogger(__name__)

PROGRESS = "_PROGRESS.json"
INTERVAL_ENV = "HUMPBACK_PROGRESS_INTERVAL"  # seconds between writes of _PROGRESS.json (default 5)
LOG_INTERVAL_ENV = "HUMPBACK_PROGRESS_LOG_INTERVAL"  # seconds between plain log lines (default 30)
_RATE_WINDOW_S = 60.0


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.05, float(os.environ.get(name, default)))
    except ValueError:
        return default


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Stage:
    store: Any
    prefix: str
    name: str
    started: float
    current: Progress | None = None
    warned: bool = False

    def write(self, snapshot: dict) -> None:
        try:
            self.store.write_json(f"{self.prefix}/{PROGRESS}", snapshot)
        except Exception as e:  # noqa: BLE001 - progress is best effort, the stage's work is not
            if not self.warned:
                self.warned = True
                log.warning("Could not write %s under %s (%s); the stage goes on without live progress",
                            PROGRESS, self.store.url(self.prefix), e)


_active: _Stage | None = None


@contextmanager
def stage_progress(store: Any, prefix: str, name: str) -> Iterator[None]:
    """Make `prefix/_PROGRESS.json` the target of every tracker the stage opens; mark the end."""
    global _active
    previous, _active = _active, _Stage(store, prefix, name, time.time())
    _active.write(Progress(name, stage=_active).snapshot("running"))
    try:
        yield
    except BaseException as e:
        stage, last = _active, _active.current
        snap = (last or Progress(name, stage=stage)).snapshot("failed")
        snap["last_error"] = _error_text(e) or snap.get("last_error")
        stage.write(snap)
        raise
    else:
        last = _active.current or Progress(name, stage=_active)
        _active.write(last.snapshot("finished"))
    finally:
        _active = previous


def _error_text(e: BaseException) -> str | None:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text[:500]


def track(phase: str, *, total: int | None = None, unit: str = "records", done: int = 0) -> Progress:
    """A tracker for one loop of the current stage (use as a context manager, or call close())."""
    return Progress(phase, total=total, unit=unit, done=done, stage=_active).start()


def iterate(items: Iterable[Any], phase: str, *, total: int | None = None, unit: str = "records") -> Iterator[Any]:
    """`items`, counted by a tracker."""
    with track(phase, total=total, unit=unit) as p:
        for item in items:
            yield item
            p.update(1)


class Progress:
    """Counts one loop: done/total, tokens, errors, retries; writes and shows them on a timer."""

    def __init__(self, phase: str, *, total: int | None = None, unit: str = "records", done: int = 0,
                 stage: _Stage | None = None, interval: float | None = None, log_interval: float | None = None):
        self.phase, self.total, self.unit, self.stage = phase, total, unit, stage
        self.done = done
        self.start_done = done  # work finished by an earlier attempt: not part of this one's rate
        self.tokens = 0
        self.errors = 0
        self.retries = 0
        self.last_error: str | None = None
        self.extra: dict[str, Any] = {}
        self.started = time.time()
        self.last_checkpoint: float | None = None
        self.interval = interval if interval is not None else _env_seconds(INTERVAL_ENV, 5.0)
        self.log_interval = log_interval if log_interval is not None else _env_seconds(LOG_INTERVAL_ENV, 30.0)
        self._samples: deque[tuple[float, int, int]] = deque()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log = time.monotonic()
        self._metrics = None

    # --- lifecycle ---

    def start(self) -> Progress:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=self.phase, unit=f" {self.unit}",
                             mininterval=1.0, dynamic_ncols=True)
        if self.stage is not None:
            self.stage.current = self
            from humpback_runtime import metrics

            self._metrics = metrics.stage_metrics(self.stage.name, self.done)
        self._thread = threading.Thread(target=self._tick_loop, name="humpback-progress", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._tick(final=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- counting (cheap: called once per record) ---

    def update(self, n: int = 1, *, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(n)

    def set_done(self, done: int) -> None:
        """For loops that know an absolute position (training steps)."""
        delta = done - self.done
        if delta:
            self.update(delta)

    def set_total(self, total: int | None) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def error(self, message: str, *, count: bool = True) -> None:
        """Remember the last error (shown in status); `count` adds it to the error count."""
        self.last_error = message[:500]
        if count:
            self.errors += 1

    def checkpoint(self) -> None:
        self.last_checkpoint = time.time()

    # --- what is shown and written ---

    def _rate(self, now: float) -> tuple[float | None, float | None]:
        self._samples.append((now, self.done, self.tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _RATE_WINDOW_S:
            self._samples.popleft()
        t0, d0, k0 = self._samples[0]
        if now - t0 < 1e-3:
            t0, d0, k0 = self.started, self.start_done, 0
        span = now - t0
        if span <= 0:
            return None, None
        return (self.done - d0) / span, (self.tokens - k0) / span

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        now = time.time()
        rate, token_rate = self._rate(now)
        eta = None
        if rate and self.total is not None and state == "running":
            eta = round(max(0, self.total - self.done) / rate, 1)
        snap: dict[str, Any] = {
            "stage": self.stage.name if self.stage else self.phase,
            "state": state,
            "phase": self.phase,
            "unit": self.unit,
            "done": self.done,
            "total": self.total,
            "rate": round(rate, 3) if rate is not None else None,
            "eta_seconds": eta,
            "tokens": self.tokens,
            "tokens_per_second": round(token_rate, 1) if token_rate else None,
            "errors": self.errors,
            "retries": self.retries,
            "last_error": self.last_error,
            "checkpoint_age_seconds": round(now - self.last_checkpoint, 1) if self.last_checkpoint else None,
            "started": _iso(self.stage.started if self.stage else self.started),
            "updated": _iso(now),
            "elapsed_seconds": round(now - (self.stage.started if self.stage else self.started), 1),
            **self.extra,
        }
        return snap

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def _tick(self, final: bool = False) -> None:
        snap = self.snapshot()
        if self._metrics is not None:
            self._metrics.observe(snap)
        if self.stage is not None:
            self.stage.write(snap)
        if self._bar is None and not final and time.monotonic() - self._last_log >= self.log_interval:
            self._last_log = time.monotonic()
            log.info("%s", format_line(snap))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_line(snap: dict[str, Any]) -> str:
    """One human line: `curate-1: 120/400 records (30%), 4.1 records/s, ETA 1m08s, 850 tokens/s`."""
    unit = snap.get("unit") or "records"
    done, total = snap.get("done") or 0, snap.get("total")
    parts = [f"{done:,}/{total:,} {unit} ({done / total:.0%})" if total else f"{done:,} {unit}"]
    if snap.get("rate") is not None:
        parts.append(f"{snap['rate']:.3g} {unit}/s")
    if snap.get("eta_seconds") is not None:
        parts.append(f"ETA {format_duration(snap['eta_seconds'])}")
    if snap.get("tokens_per_second"):
        parts.append(f"{snap['tokens_per_second']:,.0f} tokens/s")
    if snap.get("errors"):
        parts.append(f"{snap['errors']} errors")
    if snap.get("retries"):
        parts.append(f"{snap['retries']} retries")
    phase = snap.get("phase") or snap.get("stage")
    return f"{phase}: " + ", ".join(parts)


def read_progress(store: Any, prefix: str) -> dict | None:
    """A stage's `_PROGRESS.json`, or None when absent or unreadable."""
    try:
        data = store.read_json(f"{prefix}/{PROGRESS}")
    except Exception:  # noqa: BLE001 - absent, unreadable or half-written: no progress to show
        return None
    return data if isinstance(data, dict) else None
