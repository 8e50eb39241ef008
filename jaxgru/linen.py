"""A Flax linen module over the same functions, for Flax users (needs ``jaxgru[flax]``).

The module only creates the parameters (as one pytree, the same as :meth:`RNNConfig.init`) and
calls :meth:`RNNConfig.apply`; it has no math of its own. Its attributes are the fields of
:class:`jaxgru.GRUConfig` and :class:`jaxgru.RNNConfig` (less the input size, which it reads from
its input), with their defaults read from those configs.

>>> import jax, jax.numpy as jnp
>>> from jaxgru.linen import GRU
>>> layer = GRU(hidden_size=16, bidirectional=True)
>>> xs_BTI = jnp.ones((4, 10, 8))
>>> variables = layer.init(jax.random.key(0), xs_BTI)
>>> ys_BTF, h_last = layer.apply(variables, xs_BTI, jnp.array([10, 3, 7, 1]))
>>> ys_BTF.shape, h_last.shape
((4, 10, 32), (2, 4, 16))
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from jaxgru import _extras
from jaxgru import activations as _act
from jaxgru.cell import INITIALIZERS, GRUConfig, check_flag, check_shape, field_default
from jaxgru.rnn import RNNConfig

nn = _extras.require("flax.linen", "flax")

_cell = lambda name: field_default(GRUConfig, name)
_stack = lambda name: field_default(RNNConfig, name)


class GRU(nn.Module):
  """A (stacked, bidirectional) GRU layer; attributes as :class:`jaxgru.GRUConfig` and
  :class:`jaxgru.RNNConfig`.

  Call it with ``xs`` (B, T, I), optional ``lengths`` (B,), ``h0`` (L*D, B, H) and ``resets``
  (B, T) booleans (episode boundaries: the state restarts from ``h0`` there); dropout
  between layers takes the ``"dropout"`` PRNG stream when ``deterministic=False`` (and only when
  it can apply: more than one layer and a rate above 0). Returns ``(ys, h_last)`` as
  :meth:`RNNConfig.apply`. The parameters live under ``"gru"``.
  """

  hidden_size: int
  num_layers: int = _stack("num_layers")
  bidirectional: bool = _stack("bidirectional")
  merge: str = _stack("merge")
  dropout: float = _stack("dropout")
  variant: str = _cell("variant")
  activation: _act.Activation = _cell("activation")
  recurrent_activation: _act.Activation = _cell("recurrent_activation")
  use_bias: bool = _cell("use_bias")
  param_dtype: Any = _cell("param_dtype")
  dtype: Any = _cell("dtype")
  precision: Optional[str] = _cell("precision")
  initializer: str = INITIALIZERS[0]
  unroll: Optional[int] = None  # None: the backend's default (jaxgru.ScanOptions)

  def config(self, input_size: int) -> RNNConfig:
    """The :class:`RNNConfig` this module runs for inputs of ``input_size`` features."""
    cell = GRUConfig(
        input_size=input_size, hidden_size=self.hidden_size, variant=self.variant,
        activation=self.activation, recurrent_activation=self.recurrent_activation,
        use_bias=self.use_bias, param_dtype=self.param_dtype, dtype=self.dtype,
        precision=self.precision)
    return RNNConfig(cell, num_layers=self.num_layers, bidirectional=self.bidirectional,
                     merge=self.merge, dropout=self.dropout)

  @nn.compact
  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None,
               h0: Optional[jax.Array] = None, *, resets: Optional[jax.Array] = None,
               reset_state: Optional[jax.Array] = None,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Runs the stack: :meth:`RNNConfig.apply` with the module's parameters.

    Args:
      xs: inputs ``xs_BTI``, (B, T, I).
      lengths: optional valid lengths ``lengths_B``, (B,) integers in [0, T].
      h0: optional initial states ``h0_NBH``, (L * D, B, H) (layer-major, forward before
        backward); zeros when None.
      resets: optional episode boundaries ``resets_BT``, (B, T) booleans: the state restarts
        from ``h0`` before each flagged step (:meth:`RNNConfig.apply`'s ``resets``).
      reset_state: optional states a reset restores in the place of ``h0``, shaped as ``h0``
        (:meth:`RNNConfig.apply`'s ``reset_state``).
      deterministic: no dropout (the default); False draws masks from the ``"dropout"`` stream.

    Returns:
      ``(ys, h_last)``: outputs ``ys_BTF`` (B, T, output_size) and final states ``h_last_NBH``
      (L * D, B, H).
    """
    check_flag("linen GRU deterministic", deterministic)
    xs = check_shape("linen GRU xs", xs, (None, None, None), "(B, T, input features)")
    width = xs.shape[-1]
    if self.has_variable("params", "gru"):
      # The parameters fix the input width; Flax's own check would name the parameter's shape.
      try:
        width = int(self.get_variable("params", "gru")[0]["fwd"]["w_x"].shape[0])
      except (KeyError, IndexError, TypeError, AttributeError):
        pass  # malformed parameters: RNNConfig.apply's check names what is wrong with them
    cfg = self.config(width)
    params = self.param("gru", lambda key: cfg.init(key, self.initializer))
    applies = cfg.dropout > 0 and cfg.num_layers > 1
    key = None if deterministic or not applies else self.make_rng("dropout")
    return cfg.apply(params, xs, lengths, h0, resets=resets, reset_state=reset_state,
                     dropout_key=key,
                     unroll=self.unroll)
