"""Optimizer, training state and the training step: what one update of one model computes.

Owns :class:`OptimizerConfig` (with the choices :data:`OPTIMIZERS` and :data:`SCHEDULES`, which
``run.py`` offers as they are), :func:`make_optimizer`, :class:`TrainState`, :func:`init_state`,
:func:`init_states` and :func:`make_train_step`. A task supplies a loss function
``loss_fn(params, key, step) -> (loss, metrics)`` and gets back one pure step, which works on one
model or, vmapped, on many models at once (every field of the state then gains a leading model
axis N).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxgru._extras import require

optax = require("optax")

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine")
SEED_LIMIT = 2**32  # jax.random.PRNGKey(seed) keeps seed mod 2**32 (without x64, seed < 2**31)


def check_seeds(seed: int, num_models: int) -> None:
  """Raises ValueError unless the seeds ``seed .. seed + num_models - 1`` are distinct keys.

  ``jax.random.PRNGKey`` reduces a seed modulo 2**32, so seed 2**32 would train the models of
  seed 0, and a larger one overflows; every model's seed must lie in [0, 2**32).
  """
  if seed < 0 or seed + num_models - 1 >= SEED_LIMIT:
    raise ValueError(f"seed + num_models - 1 must lie in [0, 2**32) (the PRNG keeps 32 bits of a "
                     f"seed), got seed={seed} with num_models={num_models}")


def is_number(value: Any) -> bool:
  """Whether ``value`` is a real number (a Python or NumPy int or float, not a bool or str)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
  """Whether ``value`` is an integer (a Python or NumPy int, not a bool, a float or a str)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_learning_rates(rates) -> None:
  """Raises ValueError unless ``rates`` holds at least one finite positive number."""
  if (not isinstance(rates, (tuple, list)) or not rates
      or not all(is_number(r) and 0 < r < math.inf for r in rates)):
    raise ValueError(f"learning_rates must be positive finite numbers (at least one), got "
                     f"{rates!r}")


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays, saved whole in checkpoints.

  With many models every field gains a leading model axis (N,).
  """
  step: jax.Array           # () int32, steps taken
  params: Any               # the model's parameter pytree
  opt_state: Any            # optax state
  learning_rate: jax.Array  # () float32, the peak learning rate (per model when vmapped)
  rng: jax.Array            # (2,) uint32, raw PRNG key of this model's data and dropout


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Static optimizer settings; the peak learning rate lives in :class:`TrainState`.

  Attributes:
    name: one of ``OPTIMIZERS``.
    schedule: ``"constant"`` or ``"cosine"`` (decay to ``final_fraction`` of the peak by
      ``total_steps``), either after ``warmup_steps`` of linear warm-up.
    clip_norm: global-norm clipping threshold; 0 disables it.
    weight_decay: decoupled weight decay (adamw only).
  """
  name: str = "adam"
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 1000
  final_fraction: float = 0.0
  clip_norm: float = 0.0
  weight_decay: float = 1e-4
  momentum: float = 0.9

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    for name in ("warmup_steps", "clip_norm", "weight_decay", "momentum", "final_fraction"):
      value = getattr(self, name)
      if not (is_number(value) and value >= 0 and math.isfinite(value)):  # NaN fails both
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (is_integer(self.total_steps) and self.total_steps >= 1):
      raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")

  def warmup_warning(self) -> Optional[str]:
    """A line to log where the warm-up is not shorter than the run, else None.

    Then the learning rate never reaches its peak (and a cosine decay never starts): legal, as
    in a short trial run, but rarely what was meant.
    """
    if self.warmup_steps and self.warmup_steps >= self.total_steps:
      return (f"warning: the warm-up ({self.warmup_steps} steps) is not shorter than the run "
              f"({self.total_steps} steps): the learning rate never reaches its peak")
    return None


def lr_shape(cfg: OptimizerConfig) -> "optax.Schedule":
  """The learning-rate schedule with a peak of 1, to be multiplied by the state's rate."""
  warmup = max(int(cfg.warmup_steps), 0)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else 1.0, 1.0, warmup, max(int(cfg.total_steps), warmup + 1),
        cfg.final_fraction)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup])
  return optax.constant_schedule(1.0)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """The optax transformation for a peak learning rate of 1 (scaled per model in the step)."""
  shape = lr_shape(cfg)
  base = {
      "adam": lambda: optax.adam(shape),
      "adamw": lambda: optax.adamw(shape, weight_decay=cfg.weight_decay),
      "sgd": lambda: optax.sgd(shape, momentum=cfg.momentum or None),
      "rmsprop": lambda: optax.rmsprop(shape),
  }[cfg.name]()
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
  return base


def init_state(params: Any, optimizer: optax.GradientTransformation, learning_rate: float,
               seed: int) -> TrainState:
  """A fresh :class:`TrainState` for one model."""
  check_seeds(seed, 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    learning_rate=jnp.asarray(learning_rate, jnp.float32),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32))


def init_states(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                num_models: int, seed: int, learning_rates: Sequence[float]) -> TrainState:
  """N fresh states stacked on a leading axis: model i has seed ``seed + i`` and learning rate
  ``learning_rates[i % len(learning_rates)]``; its params are ``init_params(PRNGKey(seed + i))``.
  """
  check_seeds(seed, num_models)
  states = []
  for i in range(num_models):
    params = init_params(jax.random.PRNGKey(seed + i))
    lr = learning_rates[i % len(learning_rates)]
    states.append(init_state(params, optimizer, lr, seed + i))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


LossFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure step ``state -> (state, metrics)`` for ONE model.

  The step's key is ``fold_in(key(state.rng), state.step)``, so the data of step s depends only
  on (seed, s): a resumed run sees exactly the batches an uninterrupted one would. ``metrics``
  holds the loss and whatever ``loss_fn`` returns, plus ``grad_norm``.
  """
  def step(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, key, state.step)
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int counts and floats
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (u * state.learning_rate).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return step
