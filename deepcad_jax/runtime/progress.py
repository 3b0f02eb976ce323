"""A dependency-free progress line: count, rate, ETA and custom fields, on stderr.

The rate and ETA leave compilation out: callers restart the clock once the first step
has compiled (`restart`) or say how long compiling took (`exclude`), and `status` shows
"compiling..." in the meantime.

On a terminal it redraws one line; otherwise (logs, CI) it prints a line at most every
`every_s` seconds, and always the last one.
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """`update(done, **fields)` reports progress towards `total` units."""

  def __init__(self, total: int, label: str, unit: str = "", enabled: bool = True,
               every_s: float = 5.0, stream=None, start: int = 0):
    self.total, self.label, self.unit = total, label, unit
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.every_s = 0.2 if self.tty else every_s
    self.start_done = start
    self.t0 = time.perf_counter()
    self.excluded_s = 0.0
    self.last = -1e9

  def restart(self, done: int) -> None:
    """Measure the rate (and so the ETA) from now and `done` on: call it once the
    first step has compiled, so that compilation never inflates the ETA."""
    self.start_done, self.t0, self.excluded_s = done, time.perf_counter(), 0.0

  def exclude(self, seconds: float) -> None:
    """Seconds since the start (compilation) that the rate must not count."""
    self.excluded_s = seconds

  def status(self, done: int, text: str) -> None:
    """A line saying what is happening before there is a rate, e.g. 'compiling...'."""
    if self.enabled:
      self.stream.write(("\r" if self.tty else "") +
                        f"{self.label} {done}/{self.total}{self.unit}  {text}\n")
      self.stream.flush()

  def update(self, done: int, force: bool = False, **fields) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if not force and done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = now - self.t0 - self.excluded_s
    rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    parts = [f"{self.label} {done}/{self.total}{self.unit}"]
    parts += [f"{k} {v}" for k, v in fields.items()]
    parts.append(f"{rate:.2f}{self.unit}/s" if rate < 100 else f"{rate:.3g}{self.unit}/s")
    parts.append(f"ETA {format_duration(eta)}" if eta == eta else "ETA ?")
    self._write("  ".join(parts), done)

  def _write(self, line: str, done: int) -> None:
    if self.tty:
      self.stream.write("\r" + line + "\033[K")
      if done >= self.total:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
