"""Weight interchange with PyTorch ``nn.GRU``, Keras 3 ``GRU``, Flax ``GRUCell`` and Equinox
``eqx.nn.GRUCell``; every converter is also ``jaxgru.<name>``.

jaxgru stores fused gates in the order ``z | r | n`` with kernels as (in, out) matrices.

=====================  ============================================  ==============================
framework              layout                                        gate order
=====================  ============================================  ==============================
PyTorch ``nn.GRU``     ``weight_ih_l{k}[_reverse]`` (3H, I), ...      r | z | n
Keras ``GRU``          ``[kernel (I,3H), recurrent (H,3H), bias]``   z | r | h
Flax linen GRUCell     ``ir iz in hr hz hn`` Dense (in, H) kernels   separate
Flax nnx GRUCell       ``dense_i`` (I,3H)+bias, ``dense_h`` (H,3H)   r | z | n
Equinox GRUCell        ``weight_ih`` (3H, I), ``weight_hh``, ``bias``  r | z | n
=====================  ============================================  ==============================

None of the torch, Keras and Flax converters needs its framework installed: they read and write
NumPy arrays (a ``torch.Tensor`` on the CPU is accepted anywhere an array is). The Equinox ones
make and read an ``eqx.nn.GRUCell``, so they import Equinox when called (``import jaxgru``
does not), and name the extra to install where it is missing (``jaxgru[equinox]``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru._extras import require
from jaxgru.cell import GRUConfig, Params, field_default, narrowed_dtype
from jaxgru.rnn import RNNConfig, StackParams


def _np(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch.Tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def _param_dtype(what: str, found: np.dtype, dtype: Any) -> Any:
  """The converted params' dtype: ``dtype`` if given, else the weights' own, which must then be
  one JAX can hold (float64 needs x64 mode: JAX would silently make it float32)."""
  if not jnp.issubdtype(found, jnp.floating):  # NumPy's test would refuse bfloat16
    raise ValueError(f"{what}: expected floating-point weights, got {found}")
  if dtype is not None:
    return dtype
  if narrowed_dtype(found) is not None:
    raise ValueError(f"{what}: the weights are {found} and JAX's x64 mode is off; pass "
                     f"dtype='float32' to convert them, or call "
                     f"jax.config.update('jax_enable_x64', True) first")
  return found


def _expect(what: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if x.shape != shape:
    raise ValueError(f"{what}: expected shape {shape}, got {x.shape}")
  return x


def _rzn_to_zrn(w: np.ndarray, axis: int) -> np.ndarray:
  r, z, n = np.split(w, 3, axis=axis)
  return np.concatenate([z, r, n], axis=axis)


_zrn_to_rzn = _rzn_to_zrn  # swapping the first two blocks is its own inverse


def _standard_activations(cfg: Any, target: str) -> None:
  if cfg.activation != "tanh" or cfg.recurrent_activation != "sigmoid":
    raise ValueError(f"{target} supports activation='tanh' and recurrent_activation='sigmoid' "
                     f"only, got {cfg.activation!r} and {cfg.recurrent_activation!r}")


def _check_stack(cfg: Any, what: str) -> None:
  if not isinstance(cfg, RNNConfig):
    raise ValueError(f"{what} takes a jaxgru.RNNConfig (as every from_* returns), got "
                     f"{type(cfg).__name__}; wrap a cell as jaxgru.RNNConfig(cell)")


def _single_cell(cfg: Any, params: Any, target: str, caller: str) -> tuple[GRUConfig, Params]:
  """The one cell of a one-layer, one-direction stack, for frameworks whose layer is one cell
  (``caller``: the converter's name, for errors)."""
  _check_stack(cfg, caller)
  if cfg.num_layers != 1 or cfg.bidirectional:
    raise ValueError(f"{target} holds one layer in one direction; got num_layers="
                     f"{cfg.num_layers}, bidirectional={cfg.bidirectional}")
  cfg.check_params(params)
  return cfg.cell, params[0]["fwd"]


def _entry(what: str, tree: Mapping[str, Any], key: str) -> Any:
  if not isinstance(tree, Mapping) or key not in tree:
    got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f"{what}: missing entry {key!r} (got {got})")
  return tree[key]


# -- PyTorch ---------------------------------------------------------------------------------------

_TORCH_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def from_torch(state_dict: Any, dtype: Any = None) -> tuple[RNNConfig, StackParams]:
  """Converts a ``torch.nn.GRU`` or its state dict (any layers, either direction count).

  Args:
    state_dict: ``gru.state_dict()`` (tensors or arrays), or the module ``gru`` itself. Only
      ``batch_first`` differs between PyTorch GRUs of the same weights; :meth:`RNNConfig.apply`
      takes batch-first inputs.
    dtype: param dtype of the result; None keeps the arrays' dtype (float64 weights then need
      JAX's x64 mode: a ValueError says so rather than letting JAX make them float32).

  Returns:
    ``(config, params)`` for :meth:`RNNConfig.apply`, which then reproduces ``gru(x)``.
  """
  if callable(getattr(state_dict, "state_dict", None)):  # the module itself
    state_dict = state_dict.state_dict()
  if not isinstance(state_dict, Mapping):
    raise TypeError(f"from_torch: expected a torch.nn.GRU or its state_dict(), got "
                    f"{type(state_dict).__name__}")
  entries: dict[tuple[int, str], dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    m = _TORCH_KEY.match(key)
    if not m:
      raise ValueError(f"unexpected key {key!r} in a torch.nn.GRU state dict (expected names like "
                       f"'weight_ih_l0', 'bias_hh_l1_reverse'; proj_size is not supported)")
    kind, src, layer, rev = m.groups()
    entries.setdefault((int(layer), "bwd" if rev else "fwd"), {})[f"{kind}_{src}"] = _np(value)
  if not entries:
    raise ValueError("empty torch.nn.GRU state dict")
  num_layers = max(l for l, _ in entries) + 1
  bidirectional = any(d == "bwd" for _, d in entries)
  first = entries.get((0, "fwd"), {})
  if "weight_ih" not in first or "weight_hh" not in first:
    raise ValueError("torch.nn.GRU state dict lacks weight_ih_l0 / weight_hh_l0")
  hidden = first["weight_hh"].shape[-1]
  use_bias = "bias_ih" in first
  if np.ndim(first["weight_ih"]) != 2 or np.ndim(first["weight_hh"]) != 2:
    raise ValueError(f"torch.nn.GRU weight_ih_l0 / weight_hh_l0: expected 2-D (3H, I) and "
                     f"(3H, H) matrices, got shapes {np.shape(first['weight_ih'])} and "
                     f"{np.shape(first['weight_hh'])}")
  cell = GRUConfig(input_size=first["weight_ih"].shape[-1], hidden_size=hidden, use_bias=use_bias,
                   param_dtype=_param_dtype("from_torch", first["weight_ih"].dtype, dtype))
  cfg = RNNConfig(cell, num_layers=num_layers, bidirectional=bidirectional)
  params = []
  for l in range(num_layers):
    layer = {}
    for d in cfg.directions:
      e = entries.get((l, d))
      name = f"l{l}{'_reverse' if d == 'bwd' else ''}"
      expected = {"weight_ih", "weight_hh"} | ({"bias_ih", "bias_hh"} if use_bias else set())
      if e is None or set(e) != expected:
        raise ValueError(f"torch.nn.GRU state dict: expected {sorted(expected)} for {name}, "
                         f"got {sorted(e or {})}")
      i = cfg.layer_cell(l).input_size
      p = {"w_x": _rzn_to_zrn(_expect(f"weight_ih_{name}", e["weight_ih"], (3 * hidden, i)).T, 1),
           "w_h": _rzn_to_zrn(_expect(f"weight_hh_{name}", e["weight_hh"], (3 * hidden, hidden)).T,
                              1)}
      if use_bias:
        p["b_x"] = _rzn_to_zrn(_expect(f"bias_ih_{name}", e["bias_ih"], (3 * hidden,)), 0)
        p["b_h"] = _rzn_to_zrn(_expect(f"bias_hh_{name}", e["bias_hh"], (3 * hidden,)), 0)
      layer[d] = {k: v.astype(cfg.layer_cell(l).state_dtype) for k, v in p.items()}
    params.append(layer)
  return cfg, params


def to_torch(cfg: RNNConfig, params: StackParams) -> dict[str, np.ndarray]:
  """The ``torch.nn.GRU`` state dict for ``params``; load it with ``load_state_dict``.

  The matching module is ``nn.GRU(cfg.input_size, cfg.hidden_size, cfg.num_layers,
  bias=cfg.cell.use_bias, batch_first=True, bidirectional=cfg.bidirectional)``; PyTorch
  concatenates directions, so ``merge`` must be ``"concat"``.
  """
  _check_stack(cfg, "to_torch")
  if cfg.cell.variant != "reset_after":
    raise ValueError("torch.nn.GRU computes the reset_after variant; got variant='reset_before'")
  if cfg.bidirectional and cfg.merge != "concat":
    raise ValueError("torch.nn.GRU concatenates directions; got merge='sum'")
  _standard_activations(cfg.cell, "torch.nn.GRU")
  cfg.check_params(params)
  out = {}
  for l, layer in enumerate(params):
    for d in cfg.directions:
      suffix = f"l{l}{'_reverse' if d == 'bwd' else ''}"
      p = {k: _np(v) for k, v in layer[d].items()}
      out[f"weight_ih_{suffix}"] = _zrn_to_rzn(p["w_x"], 1).T.copy()
      out[f"weight_hh_{suffix}"] = _zrn_to_rzn(p["w_h"], 1).T.copy()
      if cfg.cell.use_bias:
        out[f"bias_ih_{suffix}"] = _zrn_to_rzn(p["b_x"], 0)
        out[f"bias_hh_{suffix}"] = _zrn_to_rzn(p["b_h"], 0)
  return out


# -- Keras -----------------------------------------------------------------------------------------

def _keras_activation(config: Mapping[str, Any], key: str) -> Any:
  """A Keras layer config's activation by name (None where the config has none)."""
  value = config.get(key)
  if value is not None and not isinstance(value, str):
    raise ValueError(f"from_keras: the layer's {key} is {value!r}, not a name; pass {key}= "
                     f"explicitly")
  return value


def from_keras(weights: Any, activation: Any = None, recurrent_activation: Any = None,
               dtype: Any = None) -> tuple[RNNConfig, StackParams]:
  """Converts a Keras 3 ``GRU`` layer, or its weights (``layer.get_weights()``).

  Returns ``(config, params)``: a one-layer :class:`RNNConfig` and its params, as every
  ``from_*`` does.

  The weights are ``[kernel (I, 3H), recurrent_kernel (H, 3H)]`` plus a bias of shape (2, 3H)
  for ``reset_after=True`` (input and recurrent rows) or (3H,) for ``reset_after=False``.

  Args:
    weights: the built layer itself, or its ``get_weights()`` list.
    activation, recurrent_activation: the cell's activations by name (Keras's ``hard_sigmoid``
      is ``jaxgru``'s) or as callables. None: the layer's own, read from its config when a layer
      is given, else ``"tanh"`` and ``"sigmoid"``.
    dtype: param dtype of the result; None keeps the weights' dtype (float64 then needs JAX's x64
      mode, as in :func:`from_torch`).
  """
  if callable(getattr(weights, "get_weights", None)):  # the layer itself
    config = weights.get_config() if callable(getattr(weights, "get_config", None)) else {}
    if activation is None:
      activation = _keras_activation(config, "activation")
    if recurrent_activation is None:
      recurrent_activation = _keras_activation(config, "recurrent_activation")
    weights = weights.get_weights()
  if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
    raise TypeError(f"from_keras: expected a Keras GRU layer or its get_weights() list, got "
                    f"{type(weights).__name__}")
  if activation is None:
    activation = field_default(GRUConfig, "activation")
  if recurrent_activation is None:
    recurrent_activation = field_default(GRUConfig, "recurrent_activation")
  if len(weights) not in (2, 3):
    raise ValueError(f"Keras GRU weights: expected [kernel, recurrent_kernel(, bias)], "
                     f"got {len(weights)} arrays")
  kernel, recurrent = _np(weights[0]), _np(weights[1])
  if kernel.ndim != 2 or kernel.shape[1] % 3:
    raise ValueError(f"Keras GRU kernel: expected shape (I, 3H), got {kernel.shape}")
  hidden = kernel.shape[1] // 3
  _expect("Keras GRU recurrent_kernel", recurrent, (hidden, 3 * hidden))
  params = {"w_x": kernel, "w_h": recurrent}
  variant = "reset_after"
  if len(weights) == 3:
    bias = _np(weights[2])
    if bias.shape == (2, 3 * hidden):
      params["b_x"], params["b_h"] = bias[0], bias[1]
    elif bias.shape == (3 * hidden,):
      variant = "reset_before"
      params["b_x"] = bias
    else:
      raise ValueError(f"Keras GRU bias: expected shape (2, {3 * hidden}) for reset_after=True or "
                       f"({3 * hidden},) for reset_after=False, got {bias.shape}")
  cfg = GRUConfig(input_size=kernel.shape[0], hidden_size=hidden, variant=variant,
                  activation=activation, recurrent_activation=recurrent_activation,
                  use_bias=len(weights) == 3,
                  param_dtype=_param_dtype("from_keras", kernel.dtype, dtype))
  return RNNConfig(cfg), [{"fwd": {k: v.astype(cfg.state_dtype) for k, v in params.items()}}]


def to_keras(cfg: RNNConfig, params: StackParams) -> list[np.ndarray]:
  """Weights for ``keras.layers.GRU(H, reset_after=(cfg.cell.variant == "reset_after"),
  use_bias=cfg.cell.use_bias, ...)``; load them with ``layer.set_weights``. ``cfg`` must be one
  layer in one direction (a Keras ``GRU``); wrap the layer in ``Bidirectional`` or stack layers
  for more."""
  cfg, params = _single_cell(cfg, params, "Keras GRU", "to_keras")
  p = {k: _np(v) for k, v in params.items()}
  out = [p["w_x"], p["w_h"]]
  if cfg.use_bias:
    out.append(np.stack([p["b_x"], p["b_h"]]) if cfg.variant == "reset_after" else p["b_x"])
  return out


# -- Flax ------------------------------------------------------------------------------------------

_LINEN_KEYS = {"ir", "iz", "in", "hr", "hz", "hn"}


def from_flax(variables: Mapping[str, Any], dtype: Any = None) -> tuple[RNNConfig, StackParams]:
  """Converts Flax ``GRUCell`` parameters (linen or nnx) into a one-layer :class:`RNNConfig`.

  Accepts linen variables (``{"params": {"ir": ..., "hn": ...}}`` or the inner dict) or the
  nested-dict state of an ``nnx.GRUCell`` (``nnx.state(cell, nnx.Param).to_pure_dict()``, with
  ``dense_i`` and ``dense_h``). Both use tanh and sigmoid unless told otherwise in the cell; pass
  other activations to the returned config with ``dataclasses.replace``. ``dtype``: param dtype
  of the result; None keeps the kernels' (float64 then needs JAX's x64 mode).
  """
  if not isinstance(variables, Mapping):
    raise ValueError(f"Flax GRUCell params: expected a dict, got {type(variables).__name__}")
  p = variables.get("params", variables)
  if not isinstance(p, Mapping):
    raise ValueError(f"Flax GRUCell params: expected a dict under 'params', got "
                     f"{type(p).__name__}")
  p = dict(p)
  if set(p) == _LINEN_KEYS:
    ks = {k: _np(_entry(f"Flax GRUCell {k}", p[k], "kernel")) for k in _LINEN_KEYS}
    if ks["ir"].ndim != 2:
      raise ValueError(f"Flax GRUCell ir.kernel: expected shape (I, H), got {ks['ir'].shape}")
    inputs, hidden = ks["ir"].shape
    for k in ("iz", "in"):
      _expect(f"Flax GRUCell {k}.kernel", ks[k], (inputs, hidden))
    for k in ("hr", "hz", "hn"):
      _expect(f"Flax GRUCell {k}.kernel", ks[k], (hidden, hidden))
    bias = lambda k: _expect(f"Flax GRUCell {k}.bias",
                             _np(_entry(f"Flax GRUCell {k}", p[k], "bias")), (hidden,))
    zeros = np.zeros((hidden,), ks["ir"].dtype)
    params = {
        "w_x": np.concatenate([ks["iz"], ks["ir"], ks["in"]], axis=1),
        "w_h": np.concatenate([ks["hz"], ks["hr"], ks["hn"]], axis=1),
        "b_x": np.concatenate([bias("iz"), bias("ir"), bias("in")]),
        "b_h": np.concatenate([zeros, zeros, bias("hn")]),
    }
  elif set(p) == {"dense_i", "dense_h"}:
    w_i = _np(_entry("Flax nnx GRUCell dense_i", p["dense_i"], "kernel"))
    w_h = _np(_entry("Flax nnx GRUCell dense_h", p["dense_h"], "kernel"))
    if w_i.ndim != 2 or w_i.shape[1] % 3:
      raise ValueError(f"Flax nnx GRUCell dense_i.kernel: expected shape (I, 3H), got {w_i.shape}")
    inputs, hidden = w_i.shape[0], w_i.shape[1] // 3
    _expect("Flax nnx GRUCell dense_i.kernel", w_i, (inputs, 3 * hidden))
    _expect("Flax nnx GRUCell dense_h.kernel", w_h, (hidden, 3 * hidden))
    params = {
        "w_x": _rzn_to_zrn(w_i, 1), "w_h": _rzn_to_zrn(w_h, 1),
        "b_x": _rzn_to_zrn(_expect("Flax nnx GRUCell dense_i.bias",
                                   _np(_entry("Flax nnx GRUCell dense_i", p["dense_i"], "bias")),
                                   (3 * hidden,)), 0),
        "b_h": np.zeros((3 * hidden,), w_i.dtype),
    }
  else:
    raise ValueError(f"Flax GRUCell params: expected keys {sorted(_LINEN_KEYS)} (linen) or "
                     f"['dense_h', 'dense_i'] (nnx), got {sorted(p)}")
  cfg = GRUConfig(input_size=params["w_x"].shape[0], hidden_size=params["w_h"].shape[0],
                  param_dtype=_param_dtype("from_flax", params["w_x"].dtype, dtype))
  return RNNConfig(cfg), [{"fwd": {k: v.astype(cfg.state_dtype) for k, v in params.items()}}]


def to_flax(cfg: RNNConfig, params: StackParams) -> dict[str, dict[str, np.ndarray]]:
  """Parameters for ``flax.linen.GRUCell(features=H)``: ``cell.apply({"params": out}, h, x)``.

  ``cfg`` must be one layer in one direction, reset_after with biases and Flax's activations
  (tanh, sigmoid), which is all a Flax ``GRUCell`` can hold. Flax's cell has no recurrent bias
  on the z and r gates; they are folded into the input biases, which gives the same sums.
  """
  cfg, params = _single_cell(cfg, params, "Flax GRUCell", "to_flax")
  if cfg.variant != "reset_after" or not cfg.use_bias:
    raise ValueError("Flax GRUCell is reset_after with biases; got "
                     f"variant={cfg.variant!r}, use_bias={cfg.use_bias}")
  _standard_activations(cfg, "Flax GRUCell")
  p = {k: _np(v) for k, v in params.items()}
  wx, wh = np.split(p["w_x"], 3, axis=1), np.split(p["w_h"], 3, axis=1)
  bx, bh = np.split(p["b_x"], 3), np.split(p["b_h"], 3)
  return {
      "iz": {"kernel": wx[0], "bias": bx[0] + bh[0]},
      "ir": {"kernel": wx[1], "bias": bx[1] + bh[1]},
      "in": {"kernel": wx[2], "bias": bx[2]},
      "hz": {"kernel": wh[0]},
      "hr": {"kernel": wh[1]},
      "hn": {"kernel": wh[2], "bias": bh[2]},
  }


# -- Flax nnx GRUCell ------------------------------------------------------------------------------

def to_flax_nnx(cfg: RNNConfig, params: StackParams) -> dict[str, dict[str, np.ndarray]]:
  """Parameters for ``flax.nnx.GRUCell(I, H, rngs=...)``, as the nested dict of its state.

  The result has the layout of ``nnx.to_pure_dict(nnx.state(cell, nnx.Param))``::

    {"dense_i": {"kernel": (I, 3H), "bias": (3H,)}, "dense_h": {"kernel": (H, 3H)}}

  with gates in nnx's order ``r | z | n``. Load it into a cell with
  ``state = nnx.state(cell, nnx.Param); nnx.replace_by_pure_dict(state, out);
  nnx.update(cell, state)``. :func:`from_flax` reads it back. (``to_flax`` writes the linen
  ``GRUCell``'s layout; this is the nnx one, and ``from_flax`` tells the two apart by their keys.)

  An ``nnx.GRUCell`` computes ``n = tanh(x @ W_in + b_in + r * (h @ W_hn))``: it has an input
  bias only. The recurrent z and r biases of ``cfg`` are folded into the input bias (the same
  sums); the candidate's recurrent bias ``b_h_n`` sits inside ``r * (...)`` and cannot be folded,
  so it must be zero (as it is after :func:`from_flax` of an nnx cell).

  Raises:
    ValueError: ``cfg`` is not one layer in one direction, not reset_after with biases, not
      tanh/sigmoid, or ``b_h_n`` is not zero.
  """
  cfg, params = _single_cell(cfg, params, "Flax nnx GRUCell", "to_flax_nnx")
  if cfg.variant != "reset_after" or not cfg.use_bias:
    raise ValueError("Flax nnx GRUCell is reset_after with biases; got "
                     f"variant={cfg.variant!r}, use_bias={cfg.use_bias}")
  _standard_activations(cfg, "Flax nnx GRUCell")
  p = {k: _np(v) for k, v in params.items()}
  bh_z, bh_r, bh_n = np.split(p["b_h"], 3)
  if np.any(bh_n != 0):
    raise ValueError(
        "Flax nnx GRUCell has no recurrent candidate bias: b_h's n block (inside r * (h @ W_hn + "
        f"b_hn)) cannot be folded into the input bias, and it is non-zero (max |b_hn| = "
        f"{float(np.max(np.abs(bh_n)))}). Export to torch, Equinox or the linen GRUCell instead, "
        "which hold it")
  zeros = np.zeros_like(bh_n)
  b_x = p["b_x"] + np.concatenate([bh_z, bh_r, zeros])
  return {
      "dense_i": {"kernel": _zrn_to_rzn(p["w_x"], 1), "bias": _zrn_to_rzn(b_x, 0)},
      "dense_h": {"kernel": _zrn_to_rzn(p["w_h"], 1)},
  }


# -- Equinox eqx.nn.GRUCell -----------------------------------------------------------------------------------

def from_equinox(cell: Any) -> tuple[RNNConfig, StackParams]:
  """Converts an ``eqx.nn.GRUCell`` into a one-layer :class:`RNNConfig` and its params.

  ``weight_ih`` (3H, I) and ``weight_hh`` (3H, H) become ``w_x`` (I, 3H) and ``w_h`` (H, 3H);
  ``bias`` (3H,) becomes ``b_x`` and ``bias_n`` (H,) the n block of ``b_h`` (its z and r blocks
  are zero). A cell without biases gives ``use_bias=False``. Exact: :func:`to_equinox` gives the
  same arrays back.
  """
  eqx = require("equinox", user="jaxgru.from_equinox")
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
  eqx = require("equinox", user="jaxgru.to_equinox")
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
