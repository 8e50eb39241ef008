"""The addition task's model: a unidirectional jaxgru stack and a per-step linear readout.

``x_BTI`` (B, T, 2) -> stack -> ``ys_BTH`` -> readout -> one logit per bit ``logits_BT``; the loss
is a sigmoid cross-entropy per bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxgru._extras import require
from jaxgru.cell import INITIALIZERS
from jaxgru.rnn import RNNConfig
from jaxgru.scan import ScanOptions

optax = require("optax")


@dataclasses.dataclass(frozen=True)
class AdditionModel:
  """A unidirectional jaxgru stack and a per-step linear readout to one logit."""

  rnn: RNNConfig
  # How the stack's time loops run; None: their defaults. The training step of many models
  # passes ScanOptions(models=N) here (the loop's defaults differ under a vmap over models).
  options: Optional[ScanOptions] = None

  def __post_init__(self):
    if self.rnn.input_size != 2 or self.rnn.bidirectional:
      raise ValueError("the addition model reads 2 bits per step with a unidirectional GRU")

  def init(self, key: jax.Array, initializer: str = INITIALIZERS[0]) -> dict[str, Any]:
    k_rnn, k_out = jax.random.split(key)
    size = self.rnn.output_size
    dtype = self.rnn.layer_cell(0).state_dtype
    return {"gru": self.rnn.init(k_rnn, initializer),
            "readout": {"w": jax.nn.initializers.lecun_normal()(k_out, (size, 1), dtype),
                        "b": jnp.zeros((1,), dtype)}}

  def logits(self, params: dict[str, Any], x_BTI: jax.Array, h0_LBH: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array]:
    """Per-bit logits ``logits_BT`` and the final states ``h_LBH`` (L, B, H) (pass them as
    ``h0_LBH`` to continue the sequences)."""
    ys_BTH, h_LBH = self.rnn.apply(params["gru"], x_BTI, h0=h0_LBH, options=self.options)
    out = params["readout"]
    logits_BT = jnp.matmul(ys_BTH, out["w"], precision=self.rnn.cell.precision)[..., 0] \
        + out["b"][0]
    return logits_BT, h_LBH


def loss_and_metrics(model: AdditionModel, params, x_BTI, y_BT):
  """Mean per-bit sigmoid cross-entropy; bit accuracy and exact match (all bits right)."""
  logits_BT, _ = model.logits(params, x_BTI)
  labels_BT = y_BT.astype(logits_BT.dtype)
  loss = optax.sigmoid_binary_cross_entropy(logits_BT, labels_BT).mean()
  correct_BT = (logits_BT > 0) == (y_BT > 0)
  return loss, {"bit_accuracy": correct_BT.mean(dtype=jnp.float32),
                "exact_match": correct_BT.all(axis=1).mean(dtype=jnp.float32)}
