"""The RL task's agent: an actor-critic with a jaxgru stack (or a feed-forward core, to show what
the memory does).

``obs_O`` -> dense + relu (D) -> core (H) -> two heads, each dense + relu then linear: the
policy's logits over A actions and the value. The core is

* ``"gru"``: a :class:`jaxgru.RNNConfig` stack. The rollout runs it one step at a time with the
  per-example cell, :meth:`jaxgru.GRUConfig.step`, carrying the state ``h_LEH`` and setting it
  to zero where an episode starts; the update runs a whole rollout segment through
  :meth:`jaxgru.RNNConfig.apply` with ``resets=`` and ``reset_state=`` zeros, from the state
  stored at the segment's start.
* ``"mlp"``: ``num_layers`` dense + tanh layers of H units: no state.

Shapes: T steps, E environments, O observed features, D embedding, L layers, H hidden, A actions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxgru.cell import add_bias
from jaxgru.rnn import RNNConfig
from jaxgru.scan import ScanOptions

MODELS = ("gru", "mlp")


def _dense_init(key, fan_in: int, fan_out: int, scale: float, dtype) -> dict[str, jax.Array]:
  """Orthogonal weights of gain ``scale`` and zero bias (as PPO implementations use)."""
  return {"w": jax.nn.initializers.orthogonal(scale)(key, (fan_in, fan_out), dtype),
          "b": jnp.zeros((fan_out,), dtype)}


def _dense(p: dict[str, jax.Array], x: jax.Array, precision=None) -> jax.Array:
  return add_bias(jnp.matmul(x, p["w"], precision=precision), p["b"])


@dataclasses.dataclass(frozen=True)
class ActorCritic:
  """The agent's architecture (static, hashable).

  Attributes:
    rnn: the core's stack; ``rnn.cell.input_size`` is the embedding size D and
      ``rnn.hidden_size`` H. The ``"mlp"`` core uses its sizes and ``num_layers`` only.
    num_actions: A.
    observation_size: O.
    head_size: units of each head's hidden layer.
    core: one of :data:`MODELS`.
    options: how the stack's time loop runs in the update (None: its defaults); the training
      of N agents passes ``ScanOptions(models=N)``, as the loop's defaults differ under a vmap.
  """

  rnn: RNNConfig
  num_actions: int
  observation_size: int
  head_size: int = 64
  core: str = "gru"
  options: Optional[ScanOptions] = None

  def __post_init__(self):
    if self.core not in MODELS:
      raise ValueError(f"model must be one of {MODELS}, got {self.core!r}")
    if self.rnn.bidirectional:
      raise ValueError("an agent's GRU reads its past only: it cannot be bidirectional")
    for name in ("num_actions", "observation_size", "head_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

  @property
  def dtype(self):
    return self.rnn.cell.state_dtype

  def init(self, key: jax.Array) -> dict[str, Any]:
    k_embed, k_core, k_pi, k_pi_out, k_v, k_v_out = jax.random.split(key, 6)
    dt, d, h, f = self.dtype, self.rnn.input_size, self.rnn.hidden_size, self.head_size
    root2 = 2.0 ** 0.5
    return {"embed": _dense_init(k_embed, self.observation_size, d, root2, dt),
            "core": self.init_core(k_core),
            "pi": [_dense_init(k_pi, h, f, root2, dt),
                   _dense_init(k_pi_out, f, self.num_actions, 0.01, dt)],
            "v": [_dense_init(k_v, h, f, root2, dt), _dense_init(k_v_out, f, 1, 1.0, dt)]}

  def init_core(self, key: jax.Array) -> Any:
    """The core's parameters (the GRU's: ``RNNConfig.init``, Keras's initializers)."""
    if self.core == "gru":
      return self.rnn.init(key)
    d, h = self.rnn.input_size, self.rnn.hidden_size
    keys = jax.random.split(key, self.rnn.num_layers)
    return [_dense_init(k, d if l == 0 else h, h, 2.0 ** 0.5, self.dtype)
            for l, k in enumerate(keys)]

  def initial_state(self, num_envs: int) -> jax.Array:
    """The state at an episode's start, zeros (L, E, H) (unused by the ``"mlp"`` core)."""
    return jnp.zeros((self.rnn.num_layers, num_envs, self.rnn.hidden_size), self.dtype)

  def _embed(self, params, obs):
    return jax.nn.relu(_dense(params["embed"], obs, self.rnn.cell.precision))

  def _heads(self, params, y) -> tuple[jax.Array, jax.Array]:
    prec = self.rnn.cell.precision
    a = jax.nn.relu(_dense(params["pi"][0], y, prec))
    v = jax.nn.relu(_dense(params["v"][0], y, prec))
    return _dense(params["pi"][1], a, prec), _dense(params["v"][1], v, prec)[..., 0]

  def _mlp(self, core, x):
    for layer in core:
      x = jnp.tanh(_dense(layer, x, self.rnn.cell.precision))
    return x

  def step(self, params, h_LEH: jax.Array, obs_EO: jax.Array, starts_E: jax.Array
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of E environments, as the rollout runs it: ``(h_LEH, logits_EA, value_E)``.

    Where ``starts_E`` is set (the observation begins an episode) the state is zero first.
    """
    h_LEH, y_EH = self.core_step(params["core"], h_LEH, self._embed(params, obs_EO), starts_E)
    return h_LEH, *self._heads(params, y_EH)

  def core_step(self, core, h_LEH, x_ED, starts_E) -> tuple[jax.Array, jax.Array]:
    """The core's step: ``(h_LEH, y_EH)``, the state zeroed first where ``starts_E``."""
    if self.core == "mlp":
      return h_LEH, self._mlp(core, x_ED)
    h_LEH = jnp.where(starts_E[None, :, None], jnp.zeros_like(h_LEH), h_LEH)
    new = []
    for l, layer in enumerate(core):
      cell = self.rnn.layer_cell(l)
      x_ED = jax.vmap(cell.step, in_axes=(None, 0, 0))(layer["fwd"], h_LEH[l], x_ED)
      new.append(x_ED)
    return jnp.stack(new), x_ED

  def sequence(self, params, h0_LEH: jax.Array, obs_TEO: jax.Array, starts_TE: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """A rollout segment at once, as the update runs it: ``(logits_TEA, values_TE)``; equal to
    :meth:`step` over the T steps from ``h0_LEH`` (the state stored at the segment's start).
    """
    y_TEH = self.core_sequence(params["core"], h0_LEH, self._embed(params, obs_TEO), starts_TE)
    return self._heads(params, y_TEH)

  def core_sequence(self, core, h0_LEH, x_TED, starts_TE) -> jax.Array:
    """The core over a segment: its outputs ``y_TEH``.

    One call of :meth:`jaxgru.RNNConfig.apply`: the episode running when the segment began
    continues from ``h0_LEH``, and each episode that starts inside it (``resets=starts_TE``, at
    t=0 too) starts from zeros (``reset_state``), as the rollout's steps did.
    """
    if self.core == "mlp":
      return self._mlp(core, x_TED)
    ys_TEH, _ = self.rnn.apply(core, x_TED, h0=h0_LEH, resets=starts_TE,
                               reset_state=jnp.zeros_like(h0_LEH), time_major=True,
                               options=self.options)
    return ys_TEH
