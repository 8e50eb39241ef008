"""Using a trained addition run: load its models, pick one, add two integers of any size."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import training
from jaxgru.tasks import common
from jaxgru.tasks.addition.input_pipeline import encode, from_bits
from jaxgru.tasks.addition.models import AdditionModel
from jaxgru.tasks.addition.train import TASK, AdditionConfig, init_states
from jaxgru.training import parallel


def load_trained(workdir: str, log: Callable[[str], None] = logging.warning
                 ) -> tuple[AdditionConfig, training.TrainState, list]:
  """The config, the states of all N models (stacked) and their steps-to-solve, from a run.

  The newest checkpoint that restores is used; each damaged one is reported through ``log``.
  The states are placed on all devices as training places them (:func:`parallel.shard_models`),
  whatever number of processes and devices saved them; in a multi-process job every process
  must call this.

  Raises:
    FileNotFoundError: no run or no checkpoint there.
    ValueError: the run there is not an addition run (or of an older layout, or its config.json
      is damaged).
    training.CheckpointError: no checkpoint there restores.
  """
  if not training.has_checkpoint(workdir):
    raise FileNotFoundError(f"no finished checkpoint in {workdir}")
  cfg = AdditionConfig.from_json(common.read_run(workdir, (TASK,))["config"])
  ckpt = training.Checkpointer(workdir, read_only=True)
  try:
    target = parallel.shard_models(init_states(cfg), parallel.make_mesh())
    state, extra, _ = ckpt.restore_intact(target, log)
  finally:
    ckpt.close()
  steps_to_solve = (extra or {}).get("steps_to_solve", [None] * cfg.num_models)
  return cfg, state, steps_to_solve


def best_model(state: training.TrainState, steps_to_solve: Sequence[Optional[int]]) -> Any:
  """The params of the first solved model (the first model if none solved), as NumPy arrays on
  the host (gathered from the processes that hold them: every process must call this)."""
  solved = [i for i, s in enumerate(steps_to_solve) if s is not None]
  i = solved[0] if solved else 0
  return jax.tree.map(lambda x: x[i], parallel.fetch(state.params))


def predict_sum(model: AdditionModel, params, a: int, b: int) -> int:
  """The model's sum of two non-negative integers of any size."""
  x_TI, _ = encode(a, b)
  logits_BT, _ = model.logits(params, jnp.asarray(x_TI)[None])
  return from_bits(np.asarray(logits_BT[0] > 0))
