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
  """A one-line progress bar in a terminal; plain log lines through ``log`` otherwise. In a
  multi-process job only the writing process (process 0) shows it."""

  def __init__(self, total: int, log: Callable[[str], None], stream=None):
    self.total, self.log = total, log
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.time()

  def update(self, step: int, text: str) -> None:
    if not is_writer():
      return
    if self.tty:
      frac = min(step / max(self.total, 1), 1.0)
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      rate = step / max(time.time() - self.start, 1e-9)
      self.stream.write(f"\r[{bar}] {step}/{self.total} {text} ({rate:.0f} steps/s) ")
      self.stream.flush()
    else:
      self.log(f"step {step}/{self.total}: {text}")

  def close(self) -> None:
    if self.tty and is_writer():
      self.stream.write("\n")
      self.stream.flush()


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
