"""Metrics, progress and signals: what a training loop reports, and how it is stopped.

Owns :class:`MetricsWriter` (metrics.jsonl), :class:`Progress` (the progress bar or log lines),
:class:`StopSignals` and :class:`Interrupted` (SIGTERM/SIGINT turned into a checkpoint and a
clean stop), :func:`raise_where_it_propagates` (a signal handler's exception never dropped),
:class:`Diverged` and :func:`first_nan_step` (a non-finite loss).
"""

from __future__ import annotations

import _thread
import gc
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

import numpy as np

from jaxgru.training.checkpoints import is_writer, json_default, saving


class MetricsWriter:
  """Appends one JSON line per log interval to ``metrics.jsonl`` (on the writing process)."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict[str, Any]) -> None:
    if not is_writer():
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=json_default, sort_keys=True) + "\n")

  def cut_after(self, step: int) -> int:
    """Drops the records of steps after ``step`` (a resume from checkpoint ``step`` writes them
    again), and a last line cut short by a kill; returns how many lines were dropped."""
    if not is_writer() or not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step and line.endswith("\n"):
        kept.append(line)
    if len(kept) != len(lines):
      tmp = f"{self.path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    return len(lines) - len(kept)


class Progress:
  """How a training run shows its log intervals: one line redrawn in place, or a log line each.

  In a multi-process job only the writing process (process 0) shows anything.

  :func:`fit` calls :meth:`start` when it begins (the step it starts from, the step it trains
  to) and :meth:`update` once per log interval. With a bar (``bar=None``: when ``stream`` is a
  terminal), every interval redraws ONE line on ``stream`` after a carriage return::

    step 240/2480  145 steps/s  16s left  train_loss=0.002488 train_bit_accuracy=1

  (cut to the terminal's width; the rate and the time left count from the last :meth:`start`,
  so a second phase of a task, with its own step cost, continues the same line);
  :meth:`message` prints a line above it and :meth:`close` ends it with the steps taken, the
  time spent in :func:`fit` and the last metrics. Without one (a pipe, a log file, or
  ``bar=False``), each interval is a line through ``log``:
  ``"step 240/2480: train_loss=0.002488 train_bit_accuracy=1"``, and messages go through
  ``log`` too. A context manager: the line is ended however the block ends, so that an
  error printed next starts on a line of its own.
  """

  def __init__(self, log: Callable[[str], None], stream=None, bar: Optional[bool] = None):
    self.log = log
    self.stream = stream or sys.stderr
    self.bar = (hasattr(self.stream, "isatty") and self.stream.isatty()) if bar is None else bar
    self._shown = ""              # the line on screen (without its carriage return)
    self._step = self._total = 0  # the step of the last update, and the one trained to
    self._text = ""               # the metrics of the last update
    self._phase = None            # (time, step) of the last start
    self._last = None             # time of the last update
    self._done = (0, 0.0)         # steps taken and seconds spent in the phases before

  def start(self, step: int, total: int) -> None:
    """Training (or a next phase of it) begins at ``step`` and goes to at most ``total``."""
    self._done = self._taken()
    self._phase, self._step, self._total = (time.time(), step), step, total

  def update(self, step: int, text: str) -> None:
    """A log interval ended at ``step``; ``text``: the metrics to show."""
    self._step, self._text, self._last = step, text, time.time()
    if not is_writer():
      return
    if not self.bar:
      self.log(f"step {step}/{self._total}: {text}")
      return
    t0, s0 = self._phase
    rate = (step - s0) / (self._last - t0) if self._last > t0 else 0.0
    left = f"  {_duration((self._total - step) / rate)} left" if rate and step < self._total else ""
    self._draw(f"step {step}/{self._total}  {rate:.0f} steps/s{left}  {text}")

  def message(self, text: str) -> None:
    """A line for the reader while training runs: above the progress line, or through ``log``."""
    if not is_writer():
      return
    if not (self.bar and self._shown):
      self.log(text)
      return
    shown = self._shown
    self._draw("")
    self.log(text)
    self._draw(shown)

  def close(self) -> None:
    """Ends the progress line with what was done: steps, time, rate and the last metrics."""
    if self.bar and self._shown:
      steps, seconds = self._taken()
      rate = f" ({steps / seconds:.0f} steps/s)" if seconds > 0 else ""
      self._draw(f"step {self._step}/{self._total}: {steps} steps in {_duration(seconds)}{rate}"
                 f"  {self._text}")
      self.stream.write("\n")
      self.stream.flush()
      self._shown = ""

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False

  def _taken(self) -> tuple[int, float]:
    """Steps taken and seconds spent training, up to the last update (phases added up)."""
    steps, seconds = self._done
    if self._phase is not None and self._last is not None and self._last >= self._phase[0]:
      steps += self._step - self._phase[1]
      seconds += self._last - self._phase[0]
    return steps, seconds

  def _draw(self, line: str) -> None:
    try:
      width = os.get_terminal_size(self.stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
      width = 0
    width = width or shutil.get_terminal_size().columns  # a terminal of unknown size: 80
    line = line[:max(width - 1, 1)]
    # Spaces over what is left of a longer line before (no terminal escape codes needed), and
    # the cursor back to the line's end.
    padded = line.ljust(len(self._shown))
    self.stream.write("\r" + padded + ("\r" + line if len(padded) > len(line) else ""))
    self.stream.flush()
    self._shown = line


def _duration(seconds: float) -> str:
  """``seconds`` as "42s", "3m05s" or "2h07m"."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _drops_exceptions(frame) -> bool:
  """Whether an exception raised at ``frame`` is printed and dropped by Python instead of
  propagated: ``frame`` or one of its callers is a garbage-collector callback (JAX registers
  one) or a ``__del__`` finalizer."""
  callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def raise_where_it_propagates(signum: int, frame, exc: BaseException) -> None:
  """For a signal handler that stops the program by raising ``exc``: raises it, unless the
  handler runs inside a garbage-collector callback or a finalizer (``frame``), where Python
  would print the exception and drop it, and the signal would be lost. There the signal is sent
  to the main thread again from another thread, so that Python runs the handler again at the
  main thread's next check, until that is outside. (Raised from the handler itself, the signal
  would run the handler again at once, inside it.)"""
  if _drops_exceptions(frame):
    # _thread, not threading: Thread.start() waits for the thread in the main thread, where the
    # signal would run this handler again inside this one.
    _thread.start_new_thread(signal.pthread_kill, (threading.main_thread().ident, signum))
    return
  raise exc


class Interrupted(Exception):
  """Raised by :class:`StopSignals` after SIGTERM or SIGINT, at a safe point."""


class StopSignals:
  """Turns SIGTERM/SIGINT into a flag checked between steps, so a checkpoint can be written."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not in the main thread
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum is not None and not saving():  # a second signal: give up at once
      raise_where_it_propagates(signum, frame, KeyboardInterrupt())
      return
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False


def first_nan_step(losses: np.ndarray, first_step: int) -> Optional[int]:
  """The step number of the first non-finite entry of ``losses`` (steps from ``first_step``)."""
  bad = ~np.isfinite(losses)
  if not bad.any():
    return None
  return first_step + int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))


class Diverged(FloatingPointError):
  """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""
