"""Equinox: a GRU module over the same functions, and weights to and from ``eqx.nn.GRUCell``
(needs ``jaxgru[equinox]``).

:class:`GRU` is an ``eqx.Module`` whose pytree holds the parameters in the layout of
:meth:`RNNConfig.init` (``model.params``: a list of layers, each ``{"fwd": cell_params, "bwd":
...}``, each cell ``{"w_x" (I, 3H), "w_h" (H, 3H), "b_x" (3H,), "b_h" (3H,)}``, gates
``z | r | n``) beside its static :class:`jaxgru.RNNConfig` (``model.config``); it runs
:meth:`RNNConfig.apply` and has no math of its own. As Equinox layers are, it is per-example:
``model(xs_TI)`` runs one sequence and ``jax.vmap(model)`` a batch; :meth:`GRU.batched` runs a
batch (B, T, I) as one time-major loop, which is faster than a vmap of per-example loops.

:func:`from_equinox` and :func:`to_equinox` (from :mod:`jaxgru.convert`, also
``jaxgru.from_equinox`` and ``jaxgru.to_equinox``) convert ``eqx.nn.GRUCell`` weights exactly, so
PyTorch weights reach Equinox as ``to_equinox(*jaxgru.from_torch(gru.state_dict()))``.
``eqx.nn.GRUCell`` computes, with gates stored ``r | z | n``::

  r = sigmoid(W_ir x + b_r + W_hr h)          (b = bias (3H,))
  z = sigmoid(W_iz x + b_z + W_hz h)
  n = tanh(W_in x + b_n + r * (W_hn h + bias_n))
  h' = n + z * (h - n)                        = (1 - z) * n + z * h

that is jaxgru's reset_after cell with ``b_x + b_h`` folded on the z and r gates and
``bias_n = b_h_n``.

>>> import jax, jax.numpy as jnp
>>> from jaxgru.equinox import GRU
>>> model = GRU(8, 16, num_layers=2, bidirectional=True, key=jax.random.key(0))
>>> ys_TF, h_last_NH = model(jnp.ones((10, 8)), length=7)      # one sequence
>>> ys_TF.shape, h_last_NH.shape
((10, 32), (4, 16))
>>> ys_BTF, h_last = model.batched(jnp.ones((4, 10, 8)), jnp.array([10, 3, 7, 1]))
>>> ys_BTF.shape, h_last.shape
((4, 10, 32), (4, 4, 16))
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import _extras
from jaxgru import activations as _act
from jaxgru._deprecation import renamed
from jaxgru.cell import INITIALIZERS, GRUConfig, check_flag, check_shape, field_default
from jaxgru.convert import from_equinox, to_equinox
from jaxgru.rnn import RNNConfig, StackParams

eqx = _extras.require("equinox", "equinox")

__all__ = ("GRU", "from_equinox", "to_equinox")

_cell = lambda name: field_default(GRUConfig, name)
_stack = lambda name: field_default(RNNConfig, name)


# -- the module ------------------------------------------------------------------------------------

def _dropout_applies(cfg: RNNConfig) -> bool:
  return cfg.dropout > 0 and cfg.num_layers > 1


class GRU(eqx.Module):
  """A (stacked, bidirectional) GRU layer as an Equinox module; arguments as
  :class:`jaxgru.GRUConfig` and :class:`jaxgru.RNNConfig`, with their defaults.

  ``GRU(in_features, hidden_size, *, num_layers, bidirectional, merge, dropout, variant,
  activation, recurrent_activation, use_bias, param_dtype, dtype, precision, initializer="keras",
  unroll=None, inference=False, key)``. ``initializer`` is as :meth:`GRUConfig.init` and
  ``unroll`` the ``lax.scan`` unroll factor (None: the backend's default); the parameters are
  ``config.init(key, initializer)``.

  Dropout between layers (when it can apply: more than one layer and a rate above 0) follows
  ``eqx.nn.Dropout``: it needs a ``key`` unless ``inference`` is True, which
  ``eqx.nn.inference_mode(model)`` sets.

  Attributes:
    params: the parameters, in the layout of :meth:`RNNConfig.init` (the pytree's leaves).
    config: the :class:`jaxgru.RNNConfig` the module runs (static).
    unroll: the ``lax.scan`` unroll factor (static).
    inference: whether dropout is off.
  """

  params: StackParams
  config: RNNConfig = eqx.field(static=True)
  unroll: Optional[int] = eqx.field(static=True)
  inference: bool

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
               inference: bool = False,
               key: jax.Array):
    cell = GRUConfig(input_size=in_features, hidden_size=hidden_size, variant=variant,
                     activation=activation, recurrent_activation=recurrent_activation,
                     use_bias=use_bias, param_dtype=param_dtype, dtype=dtype,
                     precision=precision)
    self.config = RNNConfig(cell, num_layers=num_layers, bidirectional=bidirectional,
                            merge=merge, dropout=dropout)
    self.params = self.config.init(key, initializer)
    self.unroll = unroll
    self.inference = inference

  @classmethod
  def from_params(cls, cfg: RNNConfig, params: StackParams, *, unroll: Optional[int] = None,
                  inference: bool = False) -> "GRU":
    """A module that runs ``cfg`` with ``params`` (from :meth:`RNNConfig.init`, a converter
    ``from_*``, the linen or nnx module), cast to ``cfg``'s parameter dtypes."""
    if not isinstance(cfg, RNNConfig):
      raise ValueError(f"from_params takes a jaxgru.RNNConfig, got {type(cfg).__name__}")
    cfg.check_params(params)
    c = cfg.cell
    shell = eqx.filter_eval_shape(
        cls, c.input_size, c.hidden_size, num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional, merge=cfg.merge, dropout=cfg.dropout,
        variant=c.variant, activation=c.activation, recurrent_activation=c.recurrent_activation,
        use_bias=c.use_bias, param_dtype=c.param_dtype, dtype=c.dtype, precision=c.precision, unroll=unroll,
        inference=inference, key=jax.random.key(0))
    values = [{d: {n: jnp.asarray(v, cfg.layer_cell(l).state_dtype) for n, v in layer[d].items()}
               for d in cfg.directions} for l, layer in enumerate(params)]
    return eqx.tree_at(lambda m: m.params, shell, values)

  @renamed("jaxgru.equinox.GRU.batched", xs_BTI="xs", lengths_B="lengths", resets_BT="resets")
  def batched(self, xs: jax.Array, lengths: Optional[jax.Array] = None,
              h0: Optional[jax.Array] = None, *, resets: Optional[jax.Array] = None,
              reset_state: Optional[jax.Array] = None,
              key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Runs a batch as one time-major loop: :meth:`RNNConfig.apply` with the module's params.

    Args:
      xs: inputs ``xs_BTI``, (B, T, I).
      lengths: optional valid lengths ``lengths_B``, (B,) integers in [0, T].
      h0: optional initial states ``h0_NBH``, (L * D, B, H) (layer-major, forward before
        backward); zeros when None.
      resets: optional episode boundaries ``resets_BT``, (B, T) booleans: the state restarts
        from ``h0`` before each flagged step (:meth:`RNNConfig.apply`'s ``resets``).
      reset_state: optional states a reset restores in the place of ``h0``, shaped as ``h0``
        (:meth:`RNNConfig.apply`'s ``reset_state``).
      key: PRNG key for dropout between layers; needed when dropout applies, unless
        ``inference``.

    Returns:
      ``(ys, h_last)``: outputs ``ys_BTF`` (B, T, output_size) and final states ``h_last_NBH``
      (L * D, B, H).

    The former keywords ``xs_BTI=``, ``lengths_B=`` and ``resets_BT=`` still work for one release,
    with a DeprecationWarning.
    """
    cfg = self.config
    dropout_key = None
    check_flag("jaxgru.equinox.GRU inference", self.inference)
    if not self.inference and _dropout_applies(cfg):
      if key is None:
        raise ValueError(f"jaxgru.equinox.GRU with dropout={cfg.dropout} needs a key in training "
                         "mode; pass key=..., or eqx.nn.inference_mode(model) to turn dropout off")
      dropout_key = key
    return cfg.apply(self.params, xs, lengths, h0, resets=resets, reset_state=reset_state,
                     dropout_key=dropout_key, unroll=self.unroll)

  @renamed("jaxgru.equinox.GRU", xs_TI="xs", resets_T="resets")
  def __call__(self, xs: jax.Array, length: Optional[jax.Array] = None,
               h0: Optional[jax.Array] = None, *, resets: Optional[jax.Array] = None,
               reset_state: Optional[jax.Array] = None,
               key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Runs ONE sequence: :meth:`batched` with a batch of one.

    Args:
      xs: inputs ``xs_TI``, (T, I).
      length: optional valid length, a scalar integer in [0, T].
      h0: optional initial states ``h0_NH``, (L * D, H); zeros when None.
      resets: optional episode boundaries ``resets_T``, (T,) booleans, as :meth:`batched`'s.
      reset_state: optional states a reset restores, ``(L * D, H)`` as ``h0``.
      key: PRNG key for dropout, as :meth:`batched`.

    Returns:
      ``(ys, h_last)``: outputs ``ys_TF`` (T, output_size) and final states ``h_last_NH``
      (L * D, H). ``jax.vmap(model)(xs_BTI, lengths_B)`` gives :meth:`batched`'s results, with
      batch-major ``h_last`` (B, L * D, H).

    The former keywords ``xs_TI=`` and ``resets_T=`` still work for one release, with a
    DeprecationWarning.
    """
    cfg = self.config
    # Per-example shapes, checked here: past this point the batch of one would name (B, T, I).
    xs_TI = check_shape("equinox GRU xs", xs, (None, cfg.input_size),
                        f"(T, input_size={cfg.input_size}), one sequence (for a batch: "
                        "jax.vmap(model) or model.batched)")
    if length is not None:
      check_shape("equinox GRU length", length, (), "(), one integer")
    h0_NH = h0
    cells = cfg.num_layers * cfg.num_directions
    if h0_NH is not None:
      h0_NH = check_shape("equinox GRU h0", h0_NH, (cells, cfg.hidden_size),
                          f"(L*D={cells}, H={cfg.hidden_size})")
    if resets is not None:
      check_shape("equinox GRU resets", resets, (np.shape(xs_TI)[0],),
                  f"(T={np.shape(xs_TI)[0]},)")
    if reset_state is not None:
      reset_state = check_shape("equinox GRU reset_state", reset_state, (cells, cfg.hidden_size),
                                f"(L*D={cells}, H={cfg.hidden_size}), as h0")[:, None]
    lengths_1 = None if length is None else jnp.reshape(jnp.asarray(length), (1,))
    resets_1T = None if resets is None else jnp.asarray(resets)[None]
    ys_1TF, h_last_N1H = self.batched(xs_TI[None], lengths_1,
                                      None if h0_NH is None else h0_NH[:, None], resets=resets_1T,
                                      reset_state=reset_state, key=key)
    return ys_1TF[0], h_last_N1H[:, 0]
