"""The RL task's environments: gymnax environments with a discrete action space, an observation
mask, and the per-episode bookkeeping of a rollout.

:class:`EnvConfig` names a gymnax environment and the observation entries the agent sees
(``observe``: indices into the flattened observation; None keeps them all). The default is
CartPole-v1 seeing the cart position and the pole angle only (indices 0 and 2): without the two
velocities, a policy must infer them from the past, so the task needs memory.

Shapes: E environments, O observed features, A actions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxgru._extras import require

gymnax = require("gymnax")

DEFAULT_ENV = "CartPole-v1"
DEFAULT_OBSERVE = (0, 2)  # cart position and pole angle; the velocities (1, 3) are hidden


@functools.lru_cache(maxsize=None)
def _make(name: str):
  if name not in gymnax.registered_envs:
    raise ValueError(f"env must be a gymnax environment, one of {sorted(gymnax.registered_envs)};"
                     f" got {name!r}")
  try:
    return gymnax.make(name)
  except Exception as e:  # noqa: BLE001 (an environment that needs a package gymnax lacks)
    raise ValueError(f"env {name!r} cannot be made here: {' '.join(str(e).split())[:200]}") \
        from None


@dataclasses.dataclass(frozen=True)
class EnvConfig:
  """A gymnax environment and what the agent observes of it.

  Attributes:
    name: a gymnax environment id (``gymnax.registered_envs``) with a discrete action space.
    observe: indices kept from the flattened observation, in this order; None keeps all.
    params: ``(field, value)`` pairs replacing the environment's default parameters (e.g.
      ``(("memory_length", 20),)`` for MemoryChain-bsuite).
  """

  name: str = DEFAULT_ENV
  observe: Optional[tuple[int, ...]] = DEFAULT_OBSERVE
  params: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if isinstance(self.observe, list):
      object.__setattr__(self, "observe", tuple(self.observe))
    if isinstance(self.params, (list, dict)):
      items = self.params.items() if isinstance(self.params, dict) else self.params
      object.__setattr__(self, "params", tuple((k, v) for k, v in items))
    env, env_params = self.make()
    space = env.action_space(env_params)
    if not hasattr(space, "n"):
      raise ValueError(f"env {self.name!r} has a {type(space).__name__} action space; the RL "
                       "task needs a discrete one")
    full = self.full_observation_size
    if self.observe is not None:
      bad = [i for i in self.observe if isinstance(i, bool) or not isinstance(i, int)
             or not 0 <= i < full]
      if bad or not self.observe or len(set(self.observe)) != len(self.observe):
        raise ValueError(f"observe must be distinct indices in [0, {full}) of {self.name}'s "
                         f"{full} observation entries (at least one), got {list(self.observe)}")

  def make(self):
    """``(env, env_params)``: the gymnax environment and its parameters."""
    env, env_params = _make(self.name)
    if self.params:
      fields = {f.name for f in dataclasses.fields(env_params)}
      unknown = [k for k, _ in self.params if k not in fields]
      if unknown:
        raise ValueError(f"env {self.name!r} has no parameter {unknown[0]!r}; it has "
                         f"{sorted(fields)}")
      env_params = env_params.replace(**dict(self.params))
    return env, env_params

  @property
  def full_observation_size(self) -> int:
    env, env_params = self.make()
    with _permissive():
      shape = jax.eval_shape(lambda k: env.reset(k, env_params)[0], jax.random.PRNGKey(0)).shape
    size = 1
    for s in shape:
      size *= s
    return size

  @property
  def observation_size(self) -> int:
    """O, the features the agent sees."""
    return self.full_observation_size if self.observe is None else len(self.observe)

  @property
  def num_actions(self) -> int:
    """A."""
    env, env_params = self.make()
    return int(env.action_space(env_params).n)

  @property
  def max_episode_steps(self) -> int:
    """The longest episode (the environment's ``max_steps_in_episode``)."""
    return int(self.make()[1].max_steps_in_episode)

  def observe_fn(self, obs: jax.Array) -> jax.Array:
    """ONE raw observation -> the (O,) float32 features the agent sees."""
    flat = jnp.reshape(obs, (-1,)).astype(jnp.float32)
    return flat if self.observe is None else flat[jnp.asarray(self.observe)]


class EnvState(NamedTuple):
  """The environments of one agent between two steps (E environments).

  ``starts_E`` marks the environments whose observation ``obs_EO`` begins a new episode (the
  previous step ended one, or it is the first step): the agent's state is reset there.
  """
  env: Any                  # the gymnax states, each leaf (E, ...)
  obs_EO: jax.Array         # (E, O) float32, what the agent sees now
  starts_E: jax.Array       # (E,) bool
  return_E: jax.Array       # (E,) float32, the running episode's return so far


@contextlib.contextmanager
def _permissive():
  """gymnax's environments rely on NumPy's implicit promotions (int * float, rank broadcasts):
  they run under JAX's standard rules whatever the caller set."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def reset(cfg: EnvConfig, key: jax.Array, num_envs: int) -> EnvState:
  """``num_envs`` fresh environments, each at the start of an episode."""
  env, env_params = cfg.make()
  with _permissive():
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs),
                                                      env_params)
  return EnvState(env=state, obs_EO=jax.vmap(cfg.observe_fn)(obs),
                  starts_E=jnp.ones((num_envs,), bool),
                  return_E=jnp.zeros((num_envs,), jnp.float32))


def step(cfg: EnvConfig, key: jax.Array, state: EnvState, actions_E: jax.Array
         ) -> tuple[EnvState, jax.Array, jax.Array, jax.Array, jax.Array]:
  """One step of every environment; an episode that ends is reset at once (gymnax's auto-reset).

  Returns ``(state, rewards_E, dones_E, finished_E, cut_E)``: the rewards of the step, whether it
  ended an episode (terminated or truncated; the next observation is then a new episode's
  first), the return of each episode it ended (0 elsewhere), and whether the episode was cut by
  the time limit without terminating (its future was not zero: PPO bootstraps there).
  """
  env, env_params = cfg.make()
  keys = jax.random.split(key, actions_E.shape[0])
  with _permissive():
    obs, env_state, reward, terminated, truncated, _ = jax.vmap(
        env.step, in_axes=(0, 0, 0, None))(keys, state.env, actions_E, env_params)
  done = jnp.logical_or(terminated, truncated)
  reward = reward.astype(jnp.float32)
  total = state.return_E + reward
  finished = jnp.where(done, total, 0.0)
  new = EnvState(env=env_state, obs_EO=jax.vmap(cfg.observe_fn)(obs), starts_E=done,
                 return_E=jnp.where(done, 0.0, total))
  return new, reward, done, finished, jnp.logical_and(truncated, jnp.logical_not(terminated))
