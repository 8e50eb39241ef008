"""Using a trained RL run: load its agents and let them play."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np

from jaxgru import training
from jaxgru.tasks import common
from jaxgru.tasks.rl.train import TASK, RLConfig, RLState, init_states, make_evaluate


def load_trained(workdir: str, log: Callable[[str], None] = logging.warning
                 ) -> tuple[RLConfig, RLState]:
  """The config and the states of all N agents (stacked) of the run in ``workdir``.

  Raises:
    FileNotFoundError: no run or no checkpoint there.
    ValueError: the run there is not an RL run (or its config.json is damaged).
    training.CheckpointError: no checkpoint there restores.
  """
  if not training.has_checkpoint(workdir):
    raise FileNotFoundError(f"no finished checkpoint in {workdir}")
  cfg = RLConfig.from_json(common.read_run(workdir, (TASK,))["config"])
  ckpt = training.Checkpointer(workdir, read_only=True)
  try:
    state, _, _ = ckpt.restore_intact(init_states(cfg), log)
  finally:
    ckpt.close()
  return cfg, state


def evaluate_trained(workdir: str, episodes: Optional[int] = None) -> np.ndarray:
  """Every agent of the run plays ``episodes`` greedy episodes (the run's ``eval_episodes`` by
  default): their returns, (N, episodes)."""
  cfg, state = load_trained(workdir)
  return make_evaluate(cfg, episodes)(state)
