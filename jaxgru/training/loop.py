"""The training loop, :func:`fit`: steps, metric fetches, evaluation, checkpoints, signals.

Owns :func:`fit` and its :class:`LoopResult`. It knows no task: the task passes the step, the
evaluation, the extra checkpoint data and the names of the metrics the progress line shows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru.training import parallel
from jaxgru.training.checkpoints import Checkpointer
from jaxgru.training.metrics import (Diverged, Interrupted, MetricsWriter, Progress, StopSignals,
                                     first_nan_step)
from jaxgru.training.state import TrainState


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  steps: int                      # steps taken in total (including before a resume)
  stopped_early: bool             # ``evaluate`` asked to stop
  train_seconds: float            # wall time of this process's training loop


def fit(state: TrainState, train_step: Callable[..., tuple[TrainState, dict]], *,
        total_steps: int, log_every: int, checkpoint_every: int,
        checkpointer: Optional[Checkpointer], writer: Optional[MetricsWriter],
        progress: Optional[Progress],
        evaluate: Optional[Callable[[TrainState, int], tuple[dict, bool]]] = None,
        batch_fn: Optional[Callable[[int], tuple]] = None,
        checkpoint_extra: Optional[Callable[[], dict]] = None,
        shown: Sequence[str] = ("train_loss",)) -> LoopResult:
  """Runs ``train_step`` until ``total_steps`` or until ``evaluate`` says stop.

  Metrics stay on the device between log intervals and are fetched once per interval. At each
  interval the loss is checked (a non-finite loss raises :class:`Diverged` naming the step,
  before anything is saved), ``evaluate(state, step) -> (record, stop)`` runs, one line goes to
  ``writer`` and a checkpoint is written at the end of each interval that reaches or passes a
  multiple of ``checkpoint_every`` (whatever ``log_every`` is), at a stop, at the end, and on
  SIGTERM/SIGINT (which then raise :class:`Interrupted`).

  Args:
    state: the state to start from (its ``step`` may be > 0 after a resume; with many models,
      every model is at the same step).
    train_step: jitted ``(state, *batch) -> (state, metrics)``.
    progress: told where training starts and goes (:meth:`Progress.start`), then each
      interval's shown metrics; its owner closes it (one line can span several calls of ``fit``).
    batch_fn: ``step -> batch tuple`` for tasks whose data come from the host.
    shown: the record entries the progress line shows, in this order (the task's names, such as
      ``"train_loss"`` or ``"eval_accuracy"``); entries missing from a record are skipped.
  """
  step = int(parallel.fetch(state.step).reshape(-1)[0])
  start = time.time()
  if progress is not None:
    progress.start(step, total_steps)
  stopped = False
  # Alone, a signal ends the interval at once; in a multi-process job every process must take
  # the same steps, so the processes agree at the end of each interval (any_process).
  alone = not parallel.is_multiprocess()
  with StopSignals() as signals:
    while step < total_steps:
      interval_start = step
      n = min(log_every - step % log_every, total_steps - step)
      pending = []
      for _ in range(n):
        state, metrics = train_step(state, *(batch_fn(step) if batch_fn else ()))
        pending.append(metrics)
        step += 1
        if alone and signals.signum is not None:
          break
      # One gather per metric (stacked on the device first), whichever processes hold them.
      fetched = parallel.fetch(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
      signalled = parallel.any_process(signals.signum is not None)
      losses = np.asarray(fetched["loss"])
      bad = first_nan_step(losses, step - len(pending) + 1)
      if bad is not None:
        raise Diverged(f"loss became non-finite at step {bad}; training stopped, the last good "
                       f"checkpoint is kept")
      record = {"step": step}
      for k, values in fetched.items():
        record[f"train_{k}"] = float(np.mean(np.mean(values.reshape(len(pending), -1), axis=1)))
      stop = False
      if evaluate is not None and (step % log_every == 0 or step == total_steps):
        extra, stop = evaluate(state, step)
        record.update(extra)
      record["elapsed_seconds"] = time.time() - start
      if writer is not None:
        writer.write(record)
      if progress is not None:
        progress.update(step, " ".join(f"{k}={record[k]:.4g}" for k in shown if k in record))
      done = stop or step >= total_steps or signalled
      # Each time a multiple of checkpoint_every is reached or passed, whatever log_every is.
      passed = step // checkpoint_every > interval_start // checkpoint_every
      if checkpointer is not None and (done or passed):
        checkpointer.save(step, state, checkpoint_extra() if checkpoint_extra else None)
      if signalled:
        what = ("another process's signal" if signals.signum is None
                else f"signal {signals.signum}")
        raise Interrupted(f"stopped by {what} at step {step}; checkpoint saved, "
                          "run the same command again to resume")
      if stop:
        stopped = True
        break
  return LoopResult(state=state, steps=step, stopped_early=stopped,
                    train_seconds=time.time() - start)
