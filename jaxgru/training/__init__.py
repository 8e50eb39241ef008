"""The training library: what every task shares, split by concern.

* :mod:`~jaxgru.training.state`: :class:`OptimizerConfig`, :func:`make_optimizer`,
  :class:`TrainState`, :func:`init_state`, :func:`init_states`, :func:`make_train_step`.
* :mod:`~jaxgru.training.checkpoints`: :class:`Checkpointer`, :class:`CheckpointError`,
  :func:`has_checkpoint`, :func:`intact_steps`, :func:`read_config`, :func:`check_resume`,
  :class:`ConfigMismatch`, :func:`write_json_atomic`.
* :mod:`~jaxgru.training.malloc`: :func:`~jaxgru.training.malloc.tune_malloc`, for entry points
  only (a process-wide setting; nothing here calls it).
* :mod:`~jaxgru.training.metrics`: :class:`MetricsWriter`, :class:`Progress`,
  :class:`StopSignals`, :class:`Interrupted`, :class:`Diverged`, :func:`first_nan_step`.
* :mod:`~jaxgru.training.loop`: :func:`fit`, the loop that ties them together.
* :mod:`~jaxgru.training.parallel`: the device mesh, batch and model sharding, and
  :func:`~jaxgru.training.parallel.fetch` (host values from a multi-process job).
* :mod:`~jaxgru.training.distributed`: joining a multi-process job, for entry points.

Nothing here reads flags or knows a task; ``run.py`` builds a task's config and the task calls
this library. Needs the ``train`` extra (optax, orbax).
"""

from __future__ import annotations

from jaxgru.training.checkpoints import (CheckpointError, Checkpointer, ConfigMismatch,
                                         check_resume, has_checkpoint, intact_steps, is_writer,
                                         read_config, write_json_atomic)
from jaxgru.training.loop import LoopResult, fit
from jaxgru.training.metrics import (Diverged, Interrupted, MetricsWriter, Progress, StopSignals,
                                     first_nan_step)
from jaxgru.training.state import (OPTIMIZERS, SCHEDULES, OptimizerConfig, TrainState,
                                   check_learning_rates, check_seeds, init_state, init_states,
                                   is_integer, is_number, lr_shape, make_optimizer,
                                   make_train_step)

__all__ = (
    "OPTIMIZERS", "SCHEDULES", "CheckpointError", "Checkpointer", "ConfigMismatch", "Diverged",
    "Interrupted", "LoopResult", "MetricsWriter", "OptimizerConfig", "Progress", "StopSignals",
    "TrainState", "check_learning_rates", "check_resume", "check_seeds", "first_nan_step", "fit",
    "has_checkpoint", "init_state", "init_states", "intact_steps", "is_integer", "is_number",
    "is_writer", "lr_shape", "make_optimizer", "make_train_step", "read_config",
    "write_json_atomic",
)
