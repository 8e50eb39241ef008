"""A Flax NNX module over the same functions, for Flax NNX users (needs ``jaxgru[flax]``).

:class:`GRU` holds its parameters as ``nnx.Param`` leaves in the layout of
:meth:`RNNConfig.init` (a list of layers, each ``{"fwd": cell_params, "bwd": ...}``, each cell
``{"w_x" (I, 3H), "w_h" (H, 3H), "b_x" (3H,), "b_h" (3H,)}``, gates ``z | r | n``), under the
attribute ``gru``, and calls :meth:`RNNConfig.apply`; it has no math of its own. So its
parameters move as they are to and from :class:`jaxgru.RNNConfig`, the linen module
(``variables["params"]["gru"]``) and every converter of :mod:`jaxgru.convert`:

* :meth:`GRU.stack_params` returns them as plain arrays (``StackParams``);
* :meth:`GRU.load_params` and :meth:`GRU.from_params` set them from ``StackParams``.

Dropout between layers follows NNX: it draws its keys from the ``"dropout"`` stream of the
``nnx.Rngs`` given at construction, and the ``deterministic`` attribute switches it off;
``model.eval()`` sets it, ``model.train()`` clears it (``nnx.view(model, deterministic=True)``
works as well). It exists only when dropout can apply: more than one layer and a rate above 0.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxgru.nnx import GRU
>>> model = GRU(8, 16, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
>>> ys_BTF, h_last = model(jnp.ones((4, 10, 8)), jnp.array([10, 3, 7, 1]))
>>> ys_BTF.shape, h_last.shape
((4, 10, 32), (4, 4, 16))
>>> model.config.output_size, len(model.stack_params())
(32, 2)
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from jaxgru import _extras
from jaxgru import activations as _act
from jaxgru._deprecation import renamed
from jaxgru.cell import INITIALIZERS, GRUConfig, check_flag, field_default
from jaxgru.rnn import RNNConfig, StackParams

nnx = _extras.require("flax.nnx", "flax")

__all__ = ("GRU",)

_cell = lambda name: field_default(GRUConfig, name)
_stack = lambda name: field_default(RNNConfig, name)

_is_variable = lambda x: isinstance(x, nnx.Variable)


def _dropout_applies(cfg: RNNConfig) -> bool:
  return cfg.dropout > 0 and cfg.num_layers > 1


class GRU(nnx.Module):
  """A (stacked, bidirectional) GRU layer; arguments as :class:`jaxgru.GRUConfig` and
  :class:`jaxgru.RNNConfig`, with their defaults.

  Args:
    in_features: I, features per time step.
    hidden_size: H, the state size of every cell.
    num_layers, bidirectional, merge, dropout: as :class:`jaxgru.RNNConfig`.
    variant, activation, recurrent_activation, use_bias, param_dtype, dtype, precision:
      as :class:`jaxgru.GRUConfig`.
    initializer: ``"keras"`` or ``"pytorch"``, as :meth:`GRUConfig.init`.
    unroll: the ``lax.scan`` unroll factor; None picks the backend's default.
    deterministic: turn dropout off (NNX's convention: False, training, until ``model.eval()``).
    rngs: the parameters are drawn from its ``"params"`` stream; dropout keys from its
      ``"dropout"`` stream (each falls back to ``"default"`` as NNX does).

  Attributes:
    config: the :class:`jaxgru.RNNConfig` the module runs (static).
    gru: the parameters, ``nnx.Param`` leaves in the layout of :meth:`RNNConfig.init`.
    deterministic: whether dropout is off.
    rngs: the dropout stream, or None when dropout cannot apply.
  """

  def __init__(self, in_features: int, hidden_size: int, *,
               num_layers: int = _stack("num_layers"),
               bidirectional: bool = _stack("bidirectional"),
               merge: str = _stack("merge"),
               dropout: float = _stack("dropout"),
               variant: str = _cell("variant"),
               activation: _act.Activation = _cell("activation"),
               recurrent_activation: _act.Activation = _cell("recurrent_activation"),
               use_bias: bool = _cell("use_bias"),
               param_dtype: Any = _cell("param_dtype"),
               dtype: Any = _cell("dtype"),
               precision: Optional[str] = _cell("precision"),
               initializer: str = INITIALIZERS[0],
               unroll: Optional[int] = None,
               deterministic: bool = False,
               rngs: Any):
    cell = GRUConfig(input_size=in_features, hidden_size=hidden_size, variant=variant,
                     activation=activation, recurrent_activation=recurrent_activation,
                     use_bias=use_bias, param_dtype=param_dtype, dtype=dtype,
                     precision=precision)
    self.config = RNNConfig(cell, num_layers=num_layers, bidirectional=bidirectional,
                            merge=merge, dropout=dropout)
    self.unroll = unroll
    self.deterministic = deterministic
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"jaxgru.nnx.GRU: rngs must be an nnx.Rngs, such as nnx.Rngs(0), got "
                      f"{type(rngs).__name__}")
    self.gru = nnx.data(jax.tree.map(nnx.Param, self.config.init(rngs.params(), initializer)))
    if _dropout_applies(self.config):
      try:
        stream = rngs["dropout"]
      except KeyError:
        raise ValueError(f"jaxgru.nnx.GRU with dropout={dropout} draws its masks from rngs' "
                         "'dropout' stream, which this nnx.Rngs lacks: pass nnx.Rngs(0), or "
                         "nnx.Rngs(params=0, dropout=1)") from None
      self.rngs = stream.fork()
    else:
      self.rngs = nnx.data(None)

  @classmethod
  def from_params(cls, cfg: RNNConfig, params: StackParams, *, rngs: Any = None,
                  unroll: Optional[int] = None, deterministic: bool = False) -> "GRU":
    """A module that runs ``cfg`` with ``params`` (from :meth:`RNNConfig.init`, the linen module,
    a converter ``from_*`` or another module's :meth:`stack_params`).

    ``rngs`` gives the dropout stream; it may be None when ``cfg``'s dropout cannot apply (the
    module then draws its placeholder parameters from ``nnx.Rngs(0)`` before loading).
    """
    if not isinstance(cfg, RNNConfig):
      raise ValueError(f"from_params takes a jaxgru.RNNConfig, got {type(cfg).__name__}")
    if rngs is None:
      if _dropout_applies(cfg):
        raise ValueError(f"dropout={cfg.dropout} over {cfg.num_layers} layers needs rngs (an "
                         "nnx.Rngs with a 'dropout' stream)")
      rngs = nnx.Rngs(0)
    c = cfg.cell
    model = cls(c.input_size, c.hidden_size, num_layers=cfg.num_layers,
                bidirectional=cfg.bidirectional, merge=cfg.merge, dropout=cfg.dropout,
                variant=c.variant, activation=c.activation,
                recurrent_activation=c.recurrent_activation, use_bias=c.use_bias,
                param_dtype=c.param_dtype, dtype=c.dtype, precision=c.precision, unroll=unroll,
                deterministic=deterministic, rngs=rngs)
    model.load_params(params)
    return model

  def stack_params(self) -> StackParams:
    """The parameters as plain arrays, in the layout of :meth:`RNNConfig.init`."""
    return jax.tree.map(lambda v: v.get_value(), self.gru, is_leaf=_is_variable)

  def load_params(self, params: StackParams) -> None:
    """Sets the parameters from ``params`` (the layout of :meth:`RNNConfig.init`), cast to each
    parameter's dtype; raises ValueError unless they match :attr:`config`."""
    self.config.check_params(params)
    for layer, new_layer in zip(self.gru, params):
      for d, cell in layer.items():
        for name, var in cell.items():
          var.set_value(jnp.asarray(new_layer[d][name], dtype=var.get_value().dtype))

  def set_view(self, deterministic: Optional[bool] = None):
    """Used by ``nnx.view``: ``deterministic=True`` turns dropout off."""
    if deterministic is not None:
      self.deterministic = deterministic

  @renamed("jaxgru.nnx.GRU", xs_BTI="xs", lengths_B="lengths", resets_BT="resets")
  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None,
               h0: Optional[jax.Array] = None, *, resets: Optional[jax.Array] = None,
               reset_state: Optional[jax.Array] = None, deterministic: Optional[bool] = None,
               rngs: Union[None, Any, jax.Array] = None) -> tuple[jax.Array, jax.Array]:
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
      deterministic: overrides the ``deterministic`` attribute for this call.
      rngs: overrides the dropout stream for this call: an ``nnx.Rngs`` (its ``"dropout"``
        stream), an ``nnx.RngStream`` or a PRNG key.

    Returns:
      ``(ys, h_last)``: outputs ``ys_BTF`` (B, T, output_size) and final states ``h_last_NBH``
      (L * D, B, H).

    The former keywords ``xs_BTI=``, ``lengths_B=`` and ``resets_BT=`` still work for one release,
    with a DeprecationWarning.
    """
    cfg = self.config
    deterministic = self.deterministic if deterministic is None else deterministic
    check_flag("jaxgru.nnx.GRU deterministic", deterministic)
    key = None
    if not deterministic and _dropout_applies(cfg):
      source = self.rngs if rngs is None else rngs
      if isinstance(source, nnx.Rngs):
        key = source["dropout"]()
      elif isinstance(source, nnx.RngStream):
        key = source()
      else:
        key = source
    return cfg.apply(self.stack_params(), xs, lengths, h0, resets=resets,
                     reset_state=reset_state, dropout_key=key, unroll=self.unroll)
