"""A Flax linen module over the same functions, for Flax users.

The module only creates the parameters (as one pytree, the same as :meth:`RNNConfig.init`) and
calls :meth:`RNNConfig.apply`; it has no math of its own.

>>> import jax, jax.numpy as jnp
>>> from jaxgru.linen import GRU
>>> layer = GRU(hidden_size=16, bidirectional=True)
>>> xs = jnp.ones((4, 10, 8))                                  # (B, T, I)
>>> variables = layer.init(jax.random.key(0), xs)
>>> ys, h_last = layer.apply(variables, xs, jnp.array([10, 3, 7, 1]))
>>> ys.shape, h_last.shape
((4, 10, 32), (2, 4, 16))
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from jaxgru import activations as _act
from jaxgru.rnn import RNNConfig


class GRU(nn.Module):
  """A (stacked, bidirectional) GRU layer; attributes as :class:`jaxgru.RNNConfig`.

  Call it with ``xs`` (B, T, I), optional ``lengths`` (B,) and ``h0`` (L*D, B, H); dropout
  between layers takes the ``"dropout"`` PRNG stream when ``deterministic=False``. Returns
  ``(ys, h_last)`` as :meth:`RNNConfig.apply`. The parameters live under ``"gru"``.
  """

  hidden_size: int
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  dropout: float = 0.0
  variant: str = "reset_after"
  activation: _act.Activation = "tanh"
  recurrent_activation: _act.Activation = "sigmoid"
  use_bias: bool = True
  initializer: str = "keras"
  param_dtype: Any = None
  dtype: Any = None
  unroll: Optional[int] = None  # None: the backend's default (jaxgru.ScanOptions)

  def config(self, input_size: int) -> RNNConfig:
    return RNNConfig(
        input_size=input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
        bidirectional=self.bidirectional, merge=self.merge, dropout=self.dropout,
        variant=self.variant, activation=self.activation,
        recurrent_activation=self.recurrent_activation, use_bias=self.use_bias,
        param_dtype=self.param_dtype, dtype=self.dtype)

  @nn.compact
  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None,
               h0: Optional[jax.Array] = None, deterministic: bool = True):
    cfg = self.config(xs.shape[-1])
    params = self.param("gru", lambda key: cfg.init(key, self.initializer))
    key = None if deterministic or cfg.dropout == 0 else self.make_rng("dropout")
    return cfg.apply(params, xs, lengths, h0, dropout_key=key, unroll=self.unroll)
