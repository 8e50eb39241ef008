"""The training library: what every task shares, split by concern.

* :mod:`~jaxgru.training.state`: :class:`OptimizerConfig`, :func:`make_optimizer`,
  :class:`TrainState`, :func:`init_state`, :func:`init_states`, :func:`make_train_step`.
* :mod:`~jaxgru.training.checkpoints`: :class:`Checkpointer`, :func:`has_checkpoint`,
  :func:`check_resume`, :class:`ConfigMismatch`, :func:`write_json_atomic`.
* :mod:`~jaxgru.training.metrics`: :class:`MetricsWriter`, :class:`Progress`,
  :class:`StopSignals`, :class:`Interrupted`, :class:`Diverged`, :func:`first_nan_step`.
* :mod:`~jaxgru.training.loop`: :func:`fit`, the loop that ties them together.
* :mod:`~jaxgru.training.parallel`: the device mesh, batch and model sharding.

Nothing here reads flags or knows a task; ``run.py`` builds a task's config and the task calls
this library. Needs the ``train`` extra (optax, orbax).
"""

from __future__ import annotations

from jaxgru.training.checkpoints import (Checkpointer, ConfigMismatch, check_resume,
                                         has_checkpoint, is_writer, write_json_atomic)
from jaxgru.training.loop import LoopResult, fit
from jaxgru.training.metrics import (Diverged, Interrupted, MetricsWriter, Progress, StopSignals,
                                     first_nan_step)
from jaxgru.training.state import (OPTIMIZERS, SCHEDULES, OptimizerConfig, TrainState,
                                   init_state, init_states, lr_shape, make_optimizer,
                                   make_train_step)

__all__ = (
    "OPTIMIZERS", "SCHEDULES", "Checkpointer", "ConfigMismatch", "Diverged", "Interrupted",
    "LoopResult", "MetricsWriter", "OptimizerConfig", "Progress", "StopSignals", "TrainState",
    "check_resume", "first_nan_step", "fit", "has_checkpoint", "init_state", "init_states",
    "is_writer", "lr_shape", "make_optimizer", "make_train_step", "write_json_atomic",
)
