"""Equinox: a GRU module over the same functions, and weights to and from ``eqx.nn.GRUCell``
(needs ``jaxgru[equinox]``).

:class:`GRU` is an ``eqx.Module`` whose pytree holds the parameters in the layout of
:meth:`RNNConfig.init` (``model.params``: a list of layers, each ``{"fwd": cell_params, "bwd":
...}``, each cell ``{"w_x" (I, 3H), "w_h" (H, 3H), "b_x" (3H,), "b_h" (3H,)}``, gates
``z | r | n``) beside its static :class:`jaxgru.RNNConfig` (``model.config``); it runs
:meth:`RNNConfig.apply` and has no math of its own. As Equinox layers are, it is per-example:
``model(xs_TI)`` runs one sequence and ``jax.vmap(model)`` a batch; :meth:`GRU.batched` runs a
batch (B, T, I) as one time-major loop, which is faster than a vmap of per-example loops.

:func:`from_equinox` and :func:`to_equinox` convert ``eqx.nn.GRUCell`` weights exactly, so
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
from jaxgru.cell import INITIALIZERS, GRUConfig, check_flag, check_shape, field_default
from jaxgru.convert import _np, _rzn_to_zrn, _single_cell, _standard_activations, _zrn_to_rzn
from jaxgru.rnn import RNNConfig, StackParams

eqx = _extras.require("equinox", "equinox")

__all__ = ("GRU", "from_equinox", "to_equinox")

_cell = lambda name: field_default(GRUConfig, name)
_stack = lambda name: field_default(RNNConfig, name)


# -- eqx.nn.GRUCell --------------------------------------------------------------------------------

def from_equinox(cell: Any) -> tuple[RNNConfig, StackParams]:
  """Converts an ``eqx.nn.GRUCell`` into a one-layer :class:`RNNConfig` and its params.

  ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H) become ``w_x`` (I, 3H) and ``w_h`` (H, 3H);
  ``bias`` (3H,) becomes ``b_x`` and ``bias_n`` (H,) the n block of ``b_h`` (its z and r blocks
  are zero). A cell without biases gives ``use_bias=False``. Exact: :func:`to_equinox` gives the
  same arrays back.
  """
  if not isinstance(cell, eqx.nn.GRUCell):
    raise ValueError(f"from_equinox takes an eqx.nn.GRUCell, got {type(cell).__name__}")
  w_ih, w_hh = _np(cell.weight_ih), _np(cell.weight_hh)
  inputs, hidden = cell.input_size, cell.hidden_size
  for what, w, shape in (("weight_ih", w_ih, (3 * hidden, inputs)),
                         ("weight_hh", w_hh, (3 * hidden, hidden))):
    if w.shape != shape:
      raise ValueError(f"eqx.nn.GRUCell {what}: expected shape {shape}, got {w.shape}")
  params = {"w_x": _rzn_to_zrn(w_ih.T, 1), "w_h": _rzn_to_zrn(w_hh.T, 1)}
  if cell.use_bias:
    bias, bias_n = _np(cell.bias), _np(cell.bias_n)
    if bias.shape != (3 * hidden,) or bias_n.shape != (hidden,):
      raise ValueError(f"eqx.nn.GRUCell bias, bias_n: expected shapes ({3 * hidden},) and "
                       f"({hidden},), got {bias.shape} and {bias_n.shape}")
    zeros = np.zeros_like(bias_n)
    params["b_x"] = _rzn_to_zrn(bias, 0)
    params["b_h"] = np.concatenate([zeros, zeros, bias_n])
  cfg = GRUConfig(input_size=inputs, hidden_size=hidden, use_bias=cell.use_bias,
                  param_dtype=w_ih.dtype)
  return RNNConfig(cfg), [{"fwd": {k: v.astype(cfg.state_dtype) for k, v in params.items()}}]


def to_equinox(cfg: RNNConfig, params: StackParams) -> Any:
  """An ``eqx.nn.GRUCell`` computing the cell of a one-layer, one-direction ``cfg``.

  The recurrent z and r biases are folded into ``bias`` (the same sums); the candidate's
  recurrent bias becomes ``bias_n``. The cell holds its parameters in ``cfg.cell.state_dtype``
  and computes in it (``cfg.cell.dtype`` is not carried).

  Raises:
    ValueError: ``cfg`` is not one layer in one direction, is reset_before, or has activations
      other than tanh and sigmoid (what an ``eqx.nn.GRUCell`` computes).
  """
  cell_cfg, p = _single_cell(cfg, params, "eqx.nn.GRUCell", "to_equinox")
  if cell_cfg.variant != "reset_after":
    raise ValueError("eqx.nn.GRUCell computes the reset_after variant "
                     "(n = tanh(W_in x + b_n + r * (W_hn h + bias_n))); got variant='reset_before'")
  _standard_activations(cell_cfg, "eqx.nn.GRUCell")
  p = {k: _np(v) for k, v in p.items()}
  i, h, dtype = cell_cfg.input_size, cell_cfg.hidden_size, cell_cfg.state_dtype
  arrays = {"weight_ih": _zrn_to_rzn(p["w_x"], 1).T, "weight_hh": _zrn_to_rzn(p["w_h"], 1).T}
  if cell_cfg.use_bias:
    bh_z, bh_r, bh_n = np.split(p["b_h"], 3)
    arrays["bias"] = _zrn_to_rzn(p["b_x"] + np.concatenate([bh_z, bh_r, np.zeros_like(bh_n)]), 0)
    arrays["bias_n"] = bh_n
  # The cell's shape without drawing its random initial weights, then ours in their place.
  shell = eqx.filter_eval_shape(eqx.nn.GRUCell, i, h, cell_cfg.use_bias, dtype,
                                key=jax.random.key(0))
  names = tuple(arrays)
  return eqx.tree_at(lambda c: tuple(getattr(c, n) for n in names), shell,
                     tuple(jnp.asarray(arrays[n], dtype) for n in names))


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

  def batched(self, xs_BTI: jax.Array, lengths_B: Optional[jax.Array] = None,
              h0: Optional[jax.Array] = None, *,
              key: Optional[jax.Array] = None,
              resets_BT: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Runs a batch as one time-major loop: :meth:`RNNConfig.apply` with the module's params.

    Args:
      xs_BTI: inputs, (B, T, I).
      lengths_B: optional valid lengths, (B,) integers in [0, T].
      h0: optional initial states, (L * D, B, H) (layer-major, forward before backward).
      key: PRNG key for dropout between layers; needed when dropout applies, unless
        ``inference``.
      resets_BT: optional episode boundaries, (B, T) booleans: the state restarts from ``h0``
        before each flagged step (:meth:`RNNConfig.apply`'s ``resets``).

    Returns:
      ``(ys, h_last)``: outputs (B, T, output_size) and final states (L * D, B, H).
    """
    cfg = self.config
    dropout_key = None
    check_flag("jaxgru.equinox.GRU inference", self.inference)
    if not self.inference and _dropout_applies(cfg):
      if key is None:
        raise ValueError(f"jaxgru.equinox.GRU with dropout={cfg.dropout} needs a key in training "
                         "mode; pass key=..., or eqx.nn.inference_mode(model) to turn dropout off")
      dropout_key = key
    return cfg.apply(self.params, xs_BTI, lengths_B, h0, dropout_key=dropout_key,
                     unroll=self.unroll, resets=resets_BT)

  def __call__(self, xs_TI: jax.Array, length: Optional[jax.Array] = None,
               h0: Optional[jax.Array] = None, *,
               key: Optional[jax.Array] = None,
               resets_T: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Runs ONE sequence: :meth:`batched` with a batch of one.

    Args:
      xs_TI: inputs, (T, I).
      length: optional valid length, a scalar integer in [0, T].
      h0: optional initial states, (L * D, H).
      key: PRNG key for dropout, as :meth:`batched`.
      resets_T: optional episode boundaries, (T,) booleans, as :meth:`batched`'s ``resets_BT``.

    Returns:
      ``(ys, h_last)``: outputs (T, output_size) and final states (L * D, H).
      ``jax.vmap(model)(xs_BTI, lengths_B)`` gives :meth:`batched`'s results, with batch-major
      ``h_last`` (B, L * D, H).
    """
    cfg = self.config
    # Per-example shapes, checked here: past this point the batch of one would name (B, T, I).
    xs_TI = check_shape("equinox GRU xs", xs_TI, (None, cfg.input_size),
                        f"(T, input_size={cfg.input_size}), one sequence (for a batch: "
                        "jax.vmap(model) or model.batched)")
    if length is not None:
      check_shape("equinox GRU length", length, (), "(), one integer")
    if h0 is not None:
      cells = cfg.num_layers * cfg.num_directions
      h0 = check_shape("equinox GRU h0", h0, (cells, cfg.hidden_size),
                       f"(L*D={cells}, H={cfg.hidden_size})")
    if resets_T is not None:
      check_shape("equinox GRU resets_T", resets_T, (np.shape(xs_TI)[0],),
                  f"(T={np.shape(xs_TI)[0]},)")
    lengths = None if length is None else jnp.reshape(jnp.asarray(length), (1,))
    resets = None if resets_T is None else jnp.asarray(resets_T)[None]
    ys, h_last = self.batched(xs_TI[None], lengths, None if h0 is None else h0[:, None], key=key,
                              resets_BT=resets)
    return ys[0], h_last[:, 0]
