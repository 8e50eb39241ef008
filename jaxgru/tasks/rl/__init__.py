"""Recurrent reinforcement learning: PPO agents with a jaxgru stack on gymnax environments.

* :mod:`.envs`: :class:`EnvConfig` (a gymnax environment and the observation mask), reset, step.
* :mod:`.models`: :class:`ActorCritic`, per-step for the rollout, per-segment for the update.
* :mod:`.train`: :class:`RLConfig`, the PPO iteration, the evaluation, :func:`train_and_evaluate`.
* :mod:`.predict`: :func:`load_trained`, :func:`evaluate_trained`.

Needs the ``rl`` extra (gymnax) besides ``train``.
"""

from __future__ import annotations

from jaxgru.tasks.rl.envs import DEFAULT_ENV, DEFAULT_OBSERVE, EnvConfig
from jaxgru.tasks.rl.models import MODELS, ActorCritic
from jaxgru.tasks.rl.predict import evaluate_trained, load_trained
from jaxgru.tasks.rl.train import (RESUMABLE_CHANGES, SHOWN_METRICS, TASK, RLConfig, RLState,
                                   Rollout, gae, init_states, iteration, make_evaluate,
                                   make_iteration, ppo_loss, rollout, train_and_evaluate)
