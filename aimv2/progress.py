"""Progress for long commands: a bar with rate and ETA on a terminal, whole lines everywhere else.

Why two modes: tqdm redraws its bar with carriage returns. In a file (CI logs, SLURM's
`slurm-JOB.out`) those become one enormous line or thousands of half lines. When the stream is not a
terminal we print a complete line now and then instead -- at every 10% and at least every
`interval` seconds -- and one at the end:

    features train: 120/300 (40%) 3.9 it/s ETA 0:46
    features train: 300/300 (100%) 4.1 it/s, done in 1:13

`AIMV2_PROGRESS=bar|lines|off` forces a mode; `AIMV2_PROGRESS_INTERVAL=SECONDS` sets the interval.
Every helper writes to stderr by default so that stdout keeps only results.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

DEFAULT_INTERVAL_S = 30.0


def progress_mode(stream: IO[str] | None = None, enable: bool = True) -> str:
    """'bar' (tqdm) when `stream` is a terminal, 'lines' when it is not, 'off' when disabled."""
    if not enable:
        return "off"
    forced = os.environ.get("AIMV2_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or file-less stream
        return "lines"


def format_duration(seconds: float) -> str:
    """0:46, 12:03, 3:02:15 (tqdm's style)."""
    seconds = int(max(0, round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(rate: float, unit: str = "it") -> str:
    """'3.9 it/s', or '12.5 s/it' when slower than one per second (easier to read than 0.08 it/s)."""
    if rate <= 0 or not math.isfinite(rate):
        return f"? {unit}/s"
    return f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"


class LineProgress:
    """tqdm's small API (update, set_postfix, close, iteration, with-blocks) printing whole lines."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        stream: IO[str] | None = None,
        interval: float | None = None,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None and math.isfinite(total) and total > 0 else None
        self.n = self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        if interval is None:
            interval = float(os.environ.get("AIMV2_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.interval = interval
        self.postfix = ""
        self.start = self._last_time = time.perf_counter()
        self._last_n = initial
        self._last_decile = self._decile(initial)
        self.closed = False

    def _decile(self, n: float) -> int:
        return int(10 * n / self.total) if self.total else 0

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={_short(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def due(self, n: float) -> bool:
        """Whether reaching count n now prints a line (callers fetch costly postfix values only then)."""
        return time.perf_counter() - self._last_time >= self.interval or self._decile(n) > self._last_decile

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        decile = self._decile(self.n)
        if now - self._last_time >= self.interval or decile > self._last_decile:
            if not (self.total and self.n >= self.total):  # the last line is close()'s
                self._emit(now)
            self._last_decile = decile

    def line(self, now: float | None = None) -> str:
        """The current state in one line; the rate is over the span since the previous line."""
        now = time.perf_counter() if now is None else now
        span, done = now - self._last_time, self.n - self._last_n
        rate = done / span if span > 0 and done > 0 else (self.n - self.initial) / max(now - self.start, 1e-9)
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            pct = 100 * self.n / self.total
            text = f"{head}{_count(self.n)}/{_count(self.total)} ({pct:.0f}%) {format_rate(rate, self.unit)}"
            if rate > 0 and self.n < self.total:
                text += f" ETA {format_duration((self.total - self.n) / rate)}"
        else:
            text = f"{head}{_count(self.n)} {self.unit} {format_rate(rate, self.unit)}"
        return f"{text} {self.postfix}".rstrip()

    def _emit(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last_time, self._last_n = now, self.n

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n > self.initial:  # printed lines are never erased, so always say how it ended
            now = time.perf_counter()
            rate = (self.n - self.initial) / max(now - self.start, 1e-9)
            head = f"{self.desc}: " if self.desc else ""
            count = f"{_count(self.n)}/{_count(self.total)}" if self.total else f"{_count(self.n)} {self.unit}"
            text = f"{head}{count} {format_rate(rate, self.unit)}, done in {format_duration(now - self.start)}"
            print(f"{text} {self.postfix}".rstrip(), file=self.stream, flush=True)


def _count(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.1f}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enable: bool = True,
    initial: int = 0,
    stream: IO[str] | None = None,
    leave: bool = True,
    interval: float | None = None,
):
    """A progress bar (tqdm on a terminal), a `LineProgress` elsewhere, or a disabled tqdm (no output).

    Use it as tqdm: `for x in progress(items, desc="shards")`, or `bar = progress(total=n)` with
    `bar.update()`, `bar.set_postfix(loss=...)`, `bar.close()`. `leave` applies to the terminal bar;
    in lines mode the closing line ("done in ...") is always printed.
    """
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    mode = progress_mode(stream, enable)
    if mode == "lines":
        return LineProgress(iterable, total, desc, unit, initial, stream, interval)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        file=stream,
        leave=leave,
        disable=mode == "off",
        dynamic_ncols=True,
    )
