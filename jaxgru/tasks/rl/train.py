"""The RL task's configuration, recurrent PPO and its training loop, on :mod:`jaxgru.training`.

Owns :class:`RLConfig`, :class:`RLState`, the PPO iteration (:func:`make_iteration`: a rollout of
T steps in E environments, GAE, then epochs of clipped-objective updates over minibatches of
environments), the greedy evaluation (:func:`make_evaluate`) and :func:`train_and_evaluate`.
N agents train at once, vmapped: own seeds, own environments, own optimizer states.

PPO (Schulman et al. 2017), per iteration and agent, with ``pi_old`` the policy of the rollout::

    delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t)
    A_t     = delta_t + gamma lambda (1 - done_t) A_{t+1}          (GAE), targets R_t = A_t + V(s_t)
    ratio_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))
    loss    = -mean(min(ratio A', clip(ratio, 1-eps, 1+eps) A'))               (A' normalized)
              + c_v 0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))
              - c_e mean(entropy(pi))

Shapes: N agents, T rollout steps, E environments, O observed features, L layers, H hidden,
A actions, M minibatches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import training
from jaxgru._extras import require
from jaxgru.cell import GRUConfig
from jaxgru.rnn import RNNConfig
from jaxgru.scan import ScanOptions
from jaxgru.tasks import common
from jaxgru.tasks.rl import envs
from jaxgru.tasks.rl.models import MODELS, ActorCritic
from jaxgru.training import parallel

optax = require("optax")

TASK = "rl"
EVAL_SALT = 0xE7A1  # evaluation episodes come from a key stream training never uses


def _check(name: str, value: Any, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Everything a training run needs; ``cli/rl.py`` fills it from flags.

  Attributes:
    env: the environment and what the agent observes of it.
    model: the core, ``"gru"`` or ``"mlp"`` (:data:`jaxgru.tasks.rl.models.MODELS`).
    rnn: the core's stack; its cell's ``input_size`` is the embedding size.
    head_size: units of the policy's and the value's hidden layer.
    num_envs, rollout_steps: E environments per agent, T steps per rollout.
    env_steps: environment steps per agent in all; iterations = env_steps // (E T).
    epochs, minibatches: passes over each rollout, and the minibatches (of E/M environments,
      whole segments) per pass.
    gamma, gae_lambda, clip_eps, vf_coef, ent_coef: PPO's settings (see the module docstring).
    learning_rates: peak Adam rates, cycled over the agents; ``schedule`` "cosine" anneals
      them to 0 over the run.
    clip_norm: global-norm gradient clipping.
    eval_episodes: episodes each agent plays after training (greedy actions).
    normalize_observations: the agent sees each observed feature shifted and scaled by the
      running mean and standard deviation of all its observations so far (updated after each
      rollout, frozen for evaluation): CartPole's pole angle moves by hundredths of a radian
      per step, which is what a memory of it has to tell apart.
  """

  env: envs.EnvConfig = envs.EnvConfig()
  model: str = "gru"
  rnn: RNNConfig = RNNConfig(GRUConfig(input_size=64, hidden_size=64))
  head_size: int = 64
  num_envs: int = 128
  rollout_steps: int = 32
  env_steps: int = 2_000_000
  epochs: int = 4
  minibatches: int = 4
  gamma: float = 0.99
  gae_lambda: float = 0.95
  clip_eps: float = 0.2
  vf_coef: float = 0.5
  ent_coef: float = 0.01
  learning_rates: tuple[float, ...] = (1e-3,)
  schedule: str = "cosine"
  clip_norm: float = 0.5
  seed: int = 0
  num_models: int = 8
  eval_episodes: int = 128
  normalize_observations: bool = True
  log_every: int = 10
  checkpoint_every: int = 100

  def __post_init__(self):
    if isinstance(self.learning_rates, list):
      object.__setattr__(self, "learning_rates", tuple(self.learning_rates))
    for name in ("head_size", "num_envs", "rollout_steps", "env_steps", "epochs", "minibatches",
                 "num_models", "eval_episodes", "log_every", "checkpoint_every"):
      value = getattr(self, name)
      _check(name, value, training.is_integer(value) and value >= 1, "a positive integer")
    _check("seed", self.seed, training.is_integer(self.seed) and self.seed >= 0, "an integer >= 0")
    for name in ("gamma", "gae_lambda"):
      value = getattr(self, name)
      _check(name, value, training.is_number(value) and 0 <= value <= 1, "a number in [0, 1]")
    for name in ("clip_eps", "vf_coef", "ent_coef", "clip_norm"):
      value = getattr(self, name)
      _check(name, value, training.is_number(value) and 0 <= value < math.inf,
             "a finite number >= 0")
    _check("model", self.model, self.model in MODELS, f"one of {MODELS}")
    _check("normalize_observations", self.normalize_observations,
           isinstance(self.normalize_observations, bool), "a bool")
    _check("minibatches", self.minibatches, self.num_envs % self.minibatches == 0,
           f"a divisor of num_envs={self.num_envs}")
    _check("env_steps", self.env_steps, self.env_steps >= self.num_envs * self.rollout_steps,
           f"at least num_envs * rollout_steps = {self.num_envs * self.rollout_steps}")
    training.check_learning_rates(self.learning_rates)
    training.check_seeds(self.seed, self.num_models)
    self.agent()  # validates the sizes against the environment

  @property
  def iterations(self) -> int:
    """PPO iterations: each a rollout of E x T steps and its update."""
    return self.env_steps // (self.num_envs * self.rollout_steps)

  @property
  def steps_per_iteration(self) -> int:
    return self.num_envs * self.rollout_steps

  def agent(self) -> ActorCritic:
    return ActorCritic(rnn=self.rnn, num_actions=self.env.num_actions,
                       observation_size=self.env.observation_size, head_size=self.head_size,
                       core=self.model, options=ScanOptions(models=self.num_models))

  def optimizer_config(self) -> training.OptimizerConfig:
    return training.OptimizerConfig(
        name="adam", schedule=self.schedule, clip_norm=self.clip_norm,
        total_steps=max(self.iterations * self.epochs * self.minibatches, 1))

  def memory_needs(self) -> list[tuple[str, float, str]]:
    """Rough bytes of the rollout and its update per agent (see ``common.check_fits``)."""
    h = self.rnn.hidden_size * self.rnn.num_layers
    per = 4 * self.num_models * self.rollout_steps * self.num_envs
    return [("num_envs", per * (2 * 8 * h + 4 * self.rnn.input_size + 64),
             f"{self.num_models} agents' rollouts of {self.num_envs} x {self.rollout_steps}")]

  def to_json(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {**d, "rnn": common.rnn_to_json(self.rnn), "learning_rates": list(self.learning_rates),
            "env": {"name": self.env.name,
                    "observe": None if self.env.observe is None else list(self.env.observe),
                    "params": [list(p) for p in self.env.params]}}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "RLConfig":
    d = dict(d)
    e = d["env"]
    env = envs.EnvConfig(e["name"], None if e["observe"] is None else tuple(e["observe"]),
                         tuple(tuple(p) for p in e["params"]))
    return cls(**{**d, "env": env, "rnn": common.rnn_from_json(d["rnn"]),
                  "learning_rates": tuple(d["learning_rates"])})


# Settings a resumed run may change: how often to log and save, how many evaluation episodes.
RESUMABLE_CHANGES = ("log_every", "checkpoint_every", "eval_episodes")

# The entries of the metrics records the progress line shows.
SHOWN_METRICS = ("episode_return", "train_loss", "train_entropy")


class ObsStats(NamedTuple):
  """Running statistics of one agent's observations (Chan et al.'s parallel update)."""
  mean: jax.Array   # (O,) float32
  var: jax.Array    # (O,) float32
  count: jax.Array  # () float32


def init_obs_stats(size: int) -> ObsStats:
  return ObsStats(jnp.zeros((size,), jnp.float32), jnp.ones((size,), jnp.float32),
                  jnp.asarray(1e-4, jnp.float32))


def normalize(cfg: RLConfig, stats: ObsStats, obs: jax.Array) -> jax.Array:
  """``obs`` (..., O) as the agent sees it: standardized by ``stats`` and clipped to [-10, 10]
  when ``cfg.normalize_observations``, else as it is."""
  if not cfg.normalize_observations:
    return obs
  lead = (1,) * (obs.ndim - 1)
  mean, scale = stats.mean.reshape(lead + (-1,)), jnp.sqrt(stats.var + 1e-8).reshape(lead + (-1,))
  return jnp.clip((obs - mean) / scale, -10.0, 10.0)


def update_obs_stats(stats: ObsStats, obs_NO: jax.Array) -> ObsStats:
  """``stats`` with the N observations ``obs_NO`` added."""
  n = jnp.asarray(obs_NO.shape[0], jnp.float32)
  mean, var = obs_NO.mean(axis=0), obs_NO.var(axis=0)
  total = stats.count + n
  delta = mean - stats.mean
  m2 = stats.var * stats.count + var * n + delta ** 2 * stats.count * n / total
  return ObsStats(stats.mean + delta * n / total, m2 / total, total)


class RLState(NamedTuple):
  """One agent's training state (every field gains a leading axis N with many agents)."""
  train: training.TrainState   # step (iterations done), params, optimizer, learning rate, rng
  env: envs.EnvState           # the E environments now
  h_LEH: jax.Array             # (L, E, H) the agent's state now, carried across rollouts
  obs_stats: ObsStats          # the running statistics the agent's observations are scaled by
  episodes: jax.Array          # () int32, episodes finished so far
  return_sum: jax.Array        # () float32, their returns summed

  @property
  def step(self) -> jax.Array:
    return self.train.step


class Rollout(NamedTuple):
  """T steps of E environments (each field (T, E, ...))."""
  obs: jax.Array        # (T, E, O) what the agent saw (normalized)
  raw_obs: jax.Array    # (T, E, O) the observations as the environments gave them
  starts: jax.Array     # (T, E) bool, the observation began an episode (state reset before it)
  actions: jax.Array    # (T, E) int32
  log_probs: jax.Array  # (T, E) log pi_old(a_t | history)
  values: jax.Array     # (T, E) V_old
  rewards: jax.Array    # (T, E)
  dones: jax.Array      # (T, E) bool, the step ended an episode
  finished: jax.Array   # (T, E) the return of the episode the step ended (0 elsewhere)
  cut: jax.Array        # (T, E) bool, the step ended an episode by the time limit alone


def init_state(cfg: RLConfig, seed: int, learning_rate: float, agent: Optional[ActorCritic] = None
               ) -> RLState:
  """A fresh state for one agent with ``seed`` (``agent``: the architecture, ``cfg.agent()`` by
  default; benchmarks/rl.py passes others)."""
  agent = agent or cfg.agent()
  key = jax.random.PRNGKey(seed)
  k_params, k_env = jax.random.split(key)
  opt = training.make_optimizer(cfg.optimizer_config())
  train = training.init_state(agent.init(k_params), opt, learning_rate, seed)
  return RLState(train=train, env=envs.reset(cfg.env, k_env, cfg.num_envs),
                 h_LEH=agent.initial_state(cfg.num_envs),
                 obs_stats=init_obs_stats(cfg.env.observation_size),
                 episodes=jnp.zeros((), jnp.int32),
                 return_sum=jnp.zeros((), jnp.float32))


def init_states(cfg: RLConfig, agent: Optional[ActorCritic] = None) -> RLState:
  """N fresh agents stacked on a leading axis: agent i has seed ``seed + i`` and learning rate
  ``learning_rates[i % len(learning_rates)]``."""
  states = [init_state(cfg, cfg.seed + i, cfg.learning_rates[i % len(cfg.learning_rates)], agent)
            for i in range(cfg.num_models)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def rollout(cfg: RLConfig, params, env: envs.EnvState, h_LEH: jax.Array, key: jax.Array,
            obs_stats: ObsStats, agent: Optional[ActorCritic] = None
            ) -> tuple[envs.EnvState, jax.Array, Rollout]:
  """T steps of E environments with actions sampled from the policy, the state carried from
  step to step and zeroed where an episode starts: ``(env, h_LEH, rollout)`` after them. The
  observations are normalized by ``obs_stats`` (fixed during the rollout)."""
  agent = agent or cfg.agent()

  def one(carry, k):
    env, h = carry
    k_act, k_env = jax.random.split(k)
    obs = normalize(cfg, obs_stats, env.obs_EO)
    h, logits, value = agent.step(params, h, obs, env.starts_E)
    action = jax.random.categorical(k_act, logits)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=1)[:, 0]
    new, reward, done, finished, cut = envs.step(cfg.env, k_env, env, action)
    return (new, h), Rollout(obs, env.obs_EO, env.starts_E, action, log_prob, value, reward, done,
                             finished, cut)

  (env, h_LEH), traj = jax.lax.scan(one, (env, h_LEH), jax.random.split(key, cfg.rollout_steps))
  return env, h_LEH, traj


def gae(cfg: RLConfig, traj: Rollout, last_value_E: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimates and value targets, each (T, E).

  Where the time limit cut an episode that had not terminated (``traj.cut``), its future is not
  zero: the step bootstraps from its own value, ``V(s_t)``, standing for that of the state the
  cut hid (gymnax resets at once; Pardo et al. 2018, "Time limits in reinforcement learning").
  Without it the return drops from about 1 / (1 - gamma) to 0 at the limit, which no
  observation foretells, and the values and advantages of agents that reach the limit are noise.
  """
  def back(carry, t):
    adv_next, value_next = carry
    reward, value, done, cut = t
    live = 1.0 - done.astype(jnp.float32)
    future = jnp.where(cut, value, value_next * live)
    delta = reward + cfg.gamma * future - value
    adv = delta + cfg.gamma * cfg.gae_lambda * live * adv_next
    return (adv, value), adv

  _, adv_TE = jax.lax.scan(back, (jnp.zeros_like(last_value_E), last_value_E),
                           (traj.rewards, traj.values, traj.dones, traj.cut), reverse=True)
  return adv_TE, adv_TE + traj.values


def ppo_loss(cfg: RLConfig, params, h0_LEH, traj: Rollout, adv_TE, targets_TE,
             agent: Optional[ActorCritic] = None):
  """The clipped PPO loss of a minibatch of whole segments, and its metrics."""
  logits, values = (agent or cfg.agent()).sequence(params, h0_LEH, traj.obs, traj.starts)
  log_p = jax.nn.log_softmax(logits)
  log_prob = jnp.take_along_axis(log_p, traj.actions[..., None], axis=-1)[..., 0]
  ratio = jnp.exp(log_prob - traj.log_probs)
  adv = (adv_TE - adv_TE.mean()) / (adv_TE.std() + 1e-8)
  pg_loss = -jnp.minimum(ratio * adv,
                         jnp.clip(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv).mean()
  v_clipped = traj.values + jnp.clip(values - traj.values, -cfg.clip_eps, cfg.clip_eps)
  v_loss = 0.5 * jnp.maximum((values - targets_TE) ** 2, (v_clipped - targets_TE) ** 2).mean()
  entropy = -(jnp.exp(log_p) * log_p).sum(-1).mean()
  loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
  return loss, {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy,
                "approx_kl": ((ratio - 1) - (log_prob - traj.log_probs)).mean(),
                "clip_fraction": (jnp.abs(ratio - 1) > cfg.clip_eps).mean()}


def update(cfg: RLConfig, train: training.TrainState, h0_LEH, traj: Rollout, adv_TE,
           targets_TE, key: jax.Array, agent: Optional[ActorCritic] = None
           ) -> tuple[training.TrainState, dict]:
  """``epochs`` passes over the rollout, each in ``minibatches`` random groups of environments:
  one Adam step per minibatch. Returns the state and the last pass's mean metrics."""
  opt = training.make_optimizer(cfg.optimizer_config())
  per = cfg.num_envs // cfg.minibatches
  grad_fn = jax.value_and_grad(lambda p, *a: ppo_loss(cfg, p, *a, agent=agent), has_aux=True)

  def minibatch(carry, idx):
    params, opt_state = carry
    take = lambda x: jnp.take(x, idx, axis=1)  # environments are axis 1 of (T, E) and (L, E, H)
    (loss, metrics), grads = grad_fn(params, take(h0_LEH), jax.tree.map(take, traj),
                                     take(adv_TE), take(targets_TE))
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int counts and floats
      updates, opt_state = opt.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (u * train.learning_rate).astype(u.dtype), updates)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

  def epoch(carry, k):
    order = jax.random.permutation(k, cfg.num_envs).reshape((cfg.minibatches, per))
    return jax.lax.scan(minibatch, carry, order)

  (params, opt_state), metrics = jax.lax.scan(
      epoch, (train.params, train.opt_state), jax.random.split(key, cfg.epochs))
  metrics = jax.tree.map(lambda m: m[-1].mean(), metrics)
  return train._replace(params=params, opt_state=opt_state), metrics


def iteration(cfg: RLConfig, state: RLState, agent: Optional[ActorCritic] = None
              ) -> tuple[RLState, dict]:
  """One PPO iteration of ONE agent: rollout, GAE, update. Its keys are
  ``fold_in(key(rng), step)``, so a resumed run repeats an uninterrupted one exactly."""
  train = state.train
  key = jax.random.fold_in(jax.random.wrap_key_data(train.rng), train.step)
  k_roll, k_update = jax.random.split(key)
  agent = agent or cfg.agent()
  env, h_LEH, traj = rollout(cfg, train.params, state.env, state.h_LEH, k_roll, state.obs_stats,
                             agent)
  _, _, last_value = agent.step(train.params, h_LEH,
                                normalize(cfg, state.obs_stats, env.obs_EO), env.starts_E)
  adv_TE, targets_TE = gae(cfg, traj, last_value)
  train, metrics = update(cfg, train, state.h_LEH, traj, adv_TE, targets_TE, k_update, agent)
  done = traj.dones.sum(dtype=jnp.int32)
  metrics.update(episodes=done, return_sum=traj.finished.sum())
  obs_stats = update_obs_stats(state.obs_stats,
                               traj.raw_obs.reshape((-1, traj.raw_obs.shape[-1])))
  state = RLState(train=train._replace(step=train.step + 1), env=env, h_LEH=h_LEH,
                  obs_stats=obs_stats,
                  episodes=state.episodes + done,
                  return_sum=state.return_sum + traj.finished.sum())
  return state, metrics


@functools.lru_cache(maxsize=8)  # one compiled program per config in a process (a resume, tests)
def make_iteration(cfg: RLConfig, agent: Optional[ActorCritic] = None):
  """The jitted iteration of N agents: ``state (N, ...) -> (state, metrics (N,))``."""
  return jax.jit(jax.vmap(lambda s: iteration(cfg, s, agent)), donate_argnums=0)


def evaluate_agent(cfg: RLConfig, params, obs_stats: ObsStats, key: jax.Array, episodes: int,
                   agent: Optional[ActorCritic] = None) -> jax.Array:
  """ONE agent plays ``episodes`` episodes at once, greedy (the most probable action), each
  from a fresh state: their returns, (episodes,)."""
  agent = agent or cfg.agent()
  env = envs.reset(cfg.env, key, episodes)
  h = agent.initial_state(episodes)
  limit = cfg.env.max_episode_steps + 1

  def cond(c):
    t, _, _, alive, _, _ = c
    return jnp.logical_and(t < limit, alive.any())

  def body(c):
    t, env, h, alive, returns, k = c
    k, k_env = jax.random.split(k)
    h, logits, _ = agent.step(params, h, normalize(cfg, obs_stats, env.obs_EO), env.starts_E)
    env, reward, done, _, _ = envs.step(cfg.env, k_env, env, jnp.argmax(logits, axis=-1))
    return t + 1, env, h, alive & ~done, returns + jnp.where(alive, reward, 0.0), k

  init = (jnp.zeros((), jnp.int32), env, h, jnp.ones((episodes,), bool),
          jnp.zeros((episodes,), jnp.float32), jax.random.fold_in(key, 1))
  return jax.lax.while_loop(cond, body, init)[4]


def make_evaluate(cfg: RLConfig, episodes: Optional[int] = None,
                  agent: Optional[ActorCritic] = None):
  """``state (N, ...) -> returns (N, episodes)``: every agent of an :class:`RLState` plays the
  same episodes' seeds."""
  fn = _evaluate_fn(cfg, cfg.eval_episodes if episodes is None else episodes, agent)
  return lambda state: parallel.fetch(fn(state.train.params, state.obs_stats))


@functools.lru_cache(maxsize=8)
def _evaluate_fn(cfg: RLConfig, episodes: int, agent: Optional[ActorCritic]):
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), EVAL_SALT)
  return jax.jit(jax.vmap(lambda p, s: evaluate_agent(cfg, p, s, key, episodes, agent)))


def _step_of(state: RLState) -> int:
  return int(parallel.fetch(state.step).reshape(-1)[0])


def read_curve(workdir: str) -> list[dict[str, Any]]:
  """The learning curve recorded in ``workdir/metrics.jsonl``: records with ``env_steps`` and
  ``episode_return_per_agent``."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except ValueError:
          continue
        if isinstance(r, dict) and "episode_return_per_agent" in r:
          out.append(r)
  return out


def plot_curve(workdir: str, path: str, title: str) -> Optional[str]:
  """Return against environment steps, one line per agent, as a PNG at ``path``; None (and no
  file) when matplotlib is not installed or nothing was recorded."""
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_curve(workdir)
  if not records:
    return None
  steps = np.array([r["env_steps"] for r in records], float)
  per = np.array([[np.nan if v is None else v for v in r["episode_return_per_agent"]]
                  for r in records], float)
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i in range(per.shape[1]):
    ax.plot(steps, per[:, i], lw=1.2, label=f"agent {i}")
  ax.set_xlabel("environment steps per agent")
  ax.set_ylabel("mean episode return (training episodes)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if per.shape[1] <= 10:
    ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def train_and_evaluate(cfg: RLConfig, workdir: str, log=print,
                       progress: Optional[training.Progress] = None,
                       flags: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Trains ``cfg.num_models`` agents (resuming from ``workdir``), evaluates them, writes
  ``summary.json`` (``eval_returns``: each agent's mean over ``eval_episodes`` greedy episodes;
  ``train_seconds``, ``env_steps`` per agent, ``env_steps_per_second`` of all agents together)
  and ``learning_curve.png`` (when matplotlib is installed). Returns the summary.

  Raises:
    training.ConfigMismatch, training.Diverged, training.CheckpointError: as the other tasks.
  """
  record = {"task": TASK, "config": cfg.to_json()}
  training.check_resume(workdir, record, RESUMABLE_CHANGES)
  progress = progress or training.Progress(log)
  os.makedirs(workdir, exist_ok=True)
  wall_start = time.time()
  mesh = parallel.make_mesh()
  ckpt = training.Checkpointer(workdir)
  state = parallel.shard_models(init_states(cfg), mesh)
  resumed_from = None
  writer = training.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  if ckpt.latest_step() is not None:
    state, _, resumed_from = ckpt.restore_intact(state, log)
    log(f"resumed from the checkpoint at iteration {resumed_from} in {ckpt.directory}")
  writer.cut_after(resumed_from or 0)
  training.write_json_atomic(os.path.join(workdir, "config.json"), record)

  t0 = time.time()
  step_fn = make_iteration(cfg).lower(state).compile()
  compile_seconds = time.time() - t0
  first = parallel.fetch((state.episodes, state.return_sum))
  seen = {"episodes": first[0], "sum": first[1]}

  def evaluate(state, step):
    episodes, total = parallel.fetch((state.episodes, state.return_sum))
    new = episodes - seen["episodes"]
    per = [float(s / n) if n else None for s, n in zip(total - seen["sum"], new)]
    seen.update(episodes=episodes, sum=total)
    known = [p for p in per if p is not None]
    out = {"env_steps": step * cfg.steps_per_iteration, "episode_return_per_agent": per}
    if known:
      out["episode_return"] = float(np.mean(known))
    return out, False

  with progress:
    result = training.fit(state, step_fn, total_steps=cfg.iterations, log_every=cfg.log_every,
                          checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt, writer=writer,
                          progress=progress,
                          evaluate=evaluate, shown=SHOWN_METRICS)
  ckpt.close()
  state = result.state
  done_steps = _step_of(state)
  trained_steps = (done_steps - (resumed_from or 0)) * cfg.steps_per_iteration
  t0 = time.time()
  returns = make_evaluate(cfg)(state)
  eval_seconds = time.time() - t0
  curve = plot_curve(workdir, os.path.join(workdir, "learning_curve.png"),
                     f"{cfg.model} agents on {cfg.env.name}, observing "
                     f"{'all' if cfg.env.observe is None else list(cfg.env.observe)}")
  summary = {
      "task": TASK,
      "iterations": done_steps,
      "num_models": cfg.num_models,
      "eval_returns": [float(r) for r in returns.mean(axis=1)],
      "eval_episodes": cfg.eval_episodes,
      "eval_policy": "greedy",
      "env_steps": done_steps * cfg.steps_per_iteration,
      "train_seconds": result.train_seconds,
      # all agents together, over this process's training (after a resume: since it)
      "env_steps_per_second": trained_steps * cfg.num_models / max(result.train_seconds, 1e-9),
      "compile_seconds": compile_seconds,
      "eval_seconds": eval_seconds,
      "wall_seconds": time.time() - wall_start,
      "resumed_from_step": resumed_from,
      "learning_curve": None if curve is None else os.path.basename(curve),
      "devices": [str(d) for d in jax.devices()],
      "config": cfg.to_json(),
      "flags": flags,
  }
  training.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary
