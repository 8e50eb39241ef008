"""Weight interchange with PyTorch ``nn.GRU``, Keras 3 ``GRU`` and Flax ``GRUCell``.

jaxgru stores fused gates in the order ``z | r | n`` with kernels as (in, out) matrices.

=====================  ============================================  ==============================
framework              layout                                        gate order
=====================  ============================================  ==============================
PyTorch ``nn.GRU``     ``weight_ih_l{k}[_reverse]`` (3H, I), ...      r | z | n
Keras ``GRU``          ``[kernel (I,3H), recurrent (H,3H), bias]``   z | r | h
Flax linen GRUCell     ``ir iz in hr hz hn`` Dense (in, H) kernels   separate
Flax nnx GRUCell       ``dense_i`` (I,3H)+bias, ``dense_h`` (H,3H)   r | z | n
=====================  ============================================  ==============================

None of these functions needs torch, keras or flax installed: they read and write NumPy arrays
(a ``torch.Tensor`` on the CPU is accepted anywhere an array is).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxgru.cell import GRUConfig, Params
from jaxgru.rnn import RNNConfig, StackParams


def _np(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch.Tensor
    x = x.detach().cpu().numpy()
  return np.asarray(x)


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


# -- PyTorch ---------------------------------------------------------------------------------------

_TORCH_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def from_torch(state_dict: Mapping[str, Any], dtype: Any = None) -> tuple[RNNConfig, StackParams]:
  """Converts a ``torch.nn.GRU`` state dict (any layers, either direction count).

  Args:
    state_dict: ``gru.state_dict()`` (tensors or arrays). Only ``batch_first`` differs between
      PyTorch GRUs of the same weights; :meth:`RNNConfig.apply` takes batch-first inputs.
    dtype: param dtype of the result; None keeps the arrays' dtype.

  Returns:
    ``(config, params)`` for :meth:`RNNConfig.apply`, which then reproduces ``gru(x)``.
  """
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
  cfg = RNNConfig(input_size=first["weight_ih"].shape[-1], hidden_size=hidden,
                  num_layers=num_layers, bidirectional=bidirectional, use_bias=use_bias,
                  param_dtype=dtype if dtype is not None else first["weight_ih"].dtype)
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
      i = cfg.cell(l).input_size
      p = {"w_x": _rzn_to_zrn(_expect(f"weight_ih_{name}", e["weight_ih"], (3 * hidden, i)).T, 1),
           "w_h": _rzn_to_zrn(_expect(f"weight_hh_{name}", e["weight_hh"], (3 * hidden, hidden)).T,
                              1)}
      if use_bias:
        p["b_x"] = _rzn_to_zrn(_expect(f"bias_ih_{name}", e["bias_ih"], (3 * hidden,)), 0)
        p["b_h"] = _rzn_to_zrn(_expect(f"bias_hh_{name}", e["bias_hh"], (3 * hidden,)), 0)
      layer[d] = {k: v.astype(cfg.cell(l).state_dtype) for k, v in p.items()}
    params.append(layer)
  return cfg, params


def to_torch(cfg: RNNConfig, params: StackParams) -> dict[str, np.ndarray]:
  """The ``torch.nn.GRU`` state dict for ``params``; load it with ``load_state_dict``.

  The matching module is ``nn.GRU(cfg.input_size, cfg.hidden_size, cfg.num_layers,
  bias=cfg.use_bias, batch_first=True, bidirectional=cfg.bidirectional)``; PyTorch concatenates
  directions, so ``merge`` must be ``"concat"``.
  """
  if cfg.variant != "reset_after":
    raise ValueError("torch.nn.GRU computes the reset_after variant; got variant='reset_before'")
  if cfg.bidirectional and cfg.merge != "concat":
    raise ValueError("torch.nn.GRU concatenates directions; got merge='sum'")
  _standard_activations(cfg, "torch.nn.GRU")
  cfg.check_params(params)
  out = {}
  for l, layer in enumerate(params):
    for d in cfg.directions:
      suffix = f"l{l}{'_reverse' if d == 'bwd' else ''}"
      p = {k: _np(v) for k, v in layer[d].items()}
      out[f"weight_ih_{suffix}"] = _zrn_to_rzn(p["w_x"], 1).T.copy()
      out[f"weight_hh_{suffix}"] = _zrn_to_rzn(p["w_h"], 1).T.copy()
      if cfg.use_bias:
        out[f"bias_ih_{suffix}"] = _zrn_to_rzn(p["b_x"], 0)
        out[f"bias_hh_{suffix}"] = _zrn_to_rzn(p["b_h"], 0)
  return out


# -- Keras -----------------------------------------------------------------------------------------

def from_keras(weights: Sequence[Any], activation: Any = "tanh",
               recurrent_activation: Any = "sigmoid") -> tuple[GRUConfig, Params]:
  """Converts the weights of a Keras 3 ``GRU`` layer (``layer.get_weights()``).

  ``[kernel (I, 3H), recurrent_kernel (H, 3H)]`` plus a bias of shape (2, 3H) for
  ``reset_after=True`` (input and recurrent rows) or (3H,) for ``reset_after=False``. Pass the
  layer's activations by name (Keras's ``hard_sigmoid`` is ``jaxgru``'s).
  """
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
                  use_bias=len(weights) == 3, param_dtype=kernel.dtype)
  return cfg, {k: v.astype(cfg.state_dtype) for k, v in params.items()}


def to_keras(cfg: GRUConfig, params: Params) -> list[np.ndarray]:
  """Weights for ``keras.layers.GRU(H, reset_after=(cfg.variant == "reset_after"),
  use_bias=cfg.use_bias, ...)``; load them with ``layer.set_weights``."""
  cfg.check_params(params)
  p = {k: _np(v) for k, v in params.items()}
  out = [p["w_x"], p["w_h"]]
  if cfg.use_bias:
    out.append(np.stack([p["b_x"], p["b_h"]]) if cfg.variant == "reset_after" else p["b_x"])
  return out


# -- Flax ------------------------------------------------------------------------------------------

_LINEN_KEYS = {"ir", "iz", "in", "hr", "hz", "hn"}


def from_flax(variables: Mapping[str, Any]) -> tuple[GRUConfig, Params]:
  """Converts Flax ``GRUCell`` parameters (linen or nnx).

  Accepts linen variables (``{"params": {"ir": ..., "hn": ...}}`` or the inner dict) or the
  nested-dict state of an ``nnx.GRUCell`` (``nnx.state(cell, nnx.Param).to_pure_dict()``, with
  ``dense_i`` and ``dense_h``). Both use tanh and sigmoid unless told otherwise in the cell; pass
  other activations to the returned config with ``dataclasses.replace``.
  """
  p = dict(variables.get("params", variables))
  if set(p) == _LINEN_KEYS:
    ks = {k: _np(p[k]["kernel"]) for k in _LINEN_KEYS}
    inputs, hidden = ks["ir"].shape
    for k in ("iz", "in"):
      _expect(f"Flax GRUCell {k}.kernel", ks[k], (inputs, hidden))
    for k in ("hr", "hz", "hn"):
      _expect(f"Flax GRUCell {k}.kernel", ks[k], (hidden, hidden))
    bias = lambda k: _expect(f"Flax GRUCell {k}.bias", _np(p[k]["bias"]), (hidden,))
    zeros = np.zeros((hidden,), ks["ir"].dtype)
    params = {
        "w_x": np.concatenate([ks["iz"], ks["ir"], ks["in"]], axis=1),
        "w_h": np.concatenate([ks["hz"], ks["hr"], ks["hn"]], axis=1),
        "b_x": np.concatenate([bias("iz"), bias("ir"), bias("in")]),
        "b_h": np.concatenate([zeros, zeros, bias("hn")]),
    }
  elif set(p) == {"dense_i", "dense_h"}:
    w_i, w_h = _np(p["dense_i"]["kernel"]), _np(p["dense_h"]["kernel"])
    inputs, hidden = w_i.shape[0], w_i.shape[1] // 3
    _expect("Flax nnx GRUCell dense_i.kernel", w_i, (inputs, 3 * hidden))
    _expect("Flax nnx GRUCell dense_h.kernel", w_h, (hidden, 3 * hidden))
    params = {
        "w_x": _rzn_to_zrn(w_i, 1), "w_h": _rzn_to_zrn(w_h, 1),
        "b_x": _rzn_to_zrn(_expect("Flax nnx GRUCell dense_i.bias", _np(p["dense_i"]["bias"]),
                                   (3 * hidden,)), 0),
        "b_h": np.zeros((3 * hidden,), w_i.dtype),
    }
  else:
    raise ValueError(f"Flax GRUCell params: expected keys {sorted(_LINEN_KEYS)} (linen) or "
                     f"['dense_h', 'dense_i'] (nnx), got {sorted(p)}")
  cfg = GRUConfig(input_size=params["w_x"].shape[0], hidden_size=params["w_h"].shape[0],
                  param_dtype=params["w_x"].dtype)
  return cfg, {k: v.astype(cfg.state_dtype) for k, v in params.items()}


def to_flax(cfg: GRUConfig, params: Params) -> dict[str, dict[str, np.ndarray]]:
  """Parameters for ``flax.linen.GRUCell(features=H)``: ``cell.apply({"params": out}, h, x)``.

  Flax's cell has no recurrent bias on the z and r gates; they are folded into the input biases,
  which gives the same sums.
  """
  if cfg.variant != "reset_after" or not cfg.use_bias:
    raise ValueError("Flax GRUCell is reset_after with biases; got "
                     f"variant={cfg.variant!r}, use_bias={cfg.use_bias}")
  cfg.check_params(params)
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
