"""The classifier: embedded word ids or feature vectors -> jaxgru stack -> pooling -> one logit.

::

  ids_BT int32 -> embed[w_t] (+ bigram[hash(w_t-1, w_t)]) -> x_BTI   (I = the embedding size)
  or features x_BTI
     -> jaxgru stack run with lengths_B -> ys_BTF, h_last
     -> pooled_BF: masked mean and/or max of ys over the valid steps, or h_last
     -> dropout -> dense -> logits_B

The GRU stops at each sequence's length (the backward direction starts there) and the pooling
ignores the steps past it, so padding never changes a prediction. Whether the inputs are token
ids or features is the data's business: ``vocab_size`` None means features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru._extras import require
from jaxgru.cell import INITIALIZERS
from jaxgru.rnn import RNNConfig

optax = require("optax")

POOLINGS = ("last", "mean", "max", "mean_max")


def _dropout(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Static description of the classifier; hashable, so ``jax.jit`` can take it as static.

  Attributes:
    rnn: the GRU stack; its ``input_size`` is the embedding size (or the feature count).
    vocab_size: V, rows of the embedding table; None means the inputs are float features
      ``x_BTI`` fed to the GRU as they are.
    pooling: how the GRU's outputs become one vector per sequence: ``"last"`` (the final state
      of every direction of the last layer), ``"mean"`` or ``"max"`` over the valid steps, or
      ``"mean_max"`` (both, concatenated).
    embed_dropout: dropout rate on the embedded words (training only).
    dropout: dropout rate on the pooled vector before the dense head (training only).
    bigram_buckets: 0, or the rows K (a power of two) of a second embedding table for word
      pairs: step t then reads ``embed[w_t] + bigram[hash(w_{t-1}, w_t) mod K]``, so the GRU
      sees local word order ("not good") from its first layer on.
  """

  rnn: RNNConfig
  vocab_size: Optional[int] = None
  pooling: str = "mean_max"
  embed_dropout: float = 0.0
  dropout: float = 0.0
  bigram_buckets: int = 0

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    for name in ("embed_dropout", "dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"vocab_size must be positive or None, got {self.vocab_size!r}")
    k = self.bigram_buckets
    if k and (k < 2 or k & (k - 1) or k > 2**31 or self.vocab_size is None):
      raise ValueError(f"bigram_buckets must be 0 or a power of two >= 2 (with a vocabulary), "
                       f"got {k!r}")

  @property
  def pooled_size(self) -> int:
    """F of the pooled vector, the size of the vector the head reads."""
    if self.pooling == "last":
      return self.rnn.num_directions * self.rnn.hidden_size
    return self.rnn.output_size * (2 if self.pooling == "mean_max" else 1)

  @property
  def dtype(self) -> np.dtype:
    return self.rnn.layer_cell(0).state_dtype

  def init(self, key: jax.Array, initializer: str = INITIALIZERS[0]) -> dict[str, Any]:
    """Fresh parameters: ``"embed"`` (V, E) and ``"bigram"`` (K, E) (token inputs only),
    ``"gru"``, ``"head"``."""
    k_embed, k_rnn, k_head = jax.random.split(key, 3)
    params = {
        "gru": self.rnn.init(k_rnn, initializer),
        "head": {"w": jax.nn.initializers.glorot_uniform()(k_head, (self.pooled_size, 1),
                                                           self.dtype),
                 "b": jnp.zeros((1,), self.dtype)},
    }
    if self.vocab_size is not None:
      # Keras's Embedding initializer; small vectors keep the GRU's gates unsaturated at first.
      params["embed"] = jax.random.uniform(k_embed, (self.vocab_size, self.rnn.input_size),
                                           self.dtype, -0.05, 0.05)
    if self.bigram_buckets:
      # Zeros: the model starts as a word-only model and learns the pairs it needs.
      params["bigram"] = jnp.zeros((self.bigram_buckets, self.rnn.input_size), self.dtype)
    return params

  def bigram_ids(self, ids_BT: jax.Array) -> jax.Array:
    """Row of each (previous word, word) pair in the bigram table, ``ids_BT`` int32.

    Multiplicative (Fibonacci) hashing in wrapping uint32 arithmetic; the first word pairs with
    the padding id.
    """
    ids = ids_BT.astype(jnp.uint32)
    prev = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
    mixed = (prev * jnp.uint32(0x9E3779B1) + ids) * jnp.uint32(0x85EBCA77)
    shift = jnp.uint32(32 - self.bigram_buckets.bit_length() + 1)
    return (mixed >> shift).astype(jnp.int32)

  def pooled(self, params: dict[str, Any], inputs: jax.Array, lengths_B: jax.Array, *,
             dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """One vector per sequence, (B, F) with F = :attr:`pooled_size`.

    Args:
      params: from :meth:`init`.
      inputs: word ids ``ids_BT`` int32 when the model has an embedding, else features
        ``x_BTI``.
      lengths_B: valid steps per sequence, (B,) integers in [0, T].
      dropout_key: PRNG key for training-time dropout; None for evaluation.
    """
    keys = (jax.random.split(dropout_key, 3) if dropout_key is not None else (None,) * 3)
    if self.vocab_size is not None:
      x_BTI = jnp.take(params["embed"], inputs, axis=0)
      if self.bigram_buckets:
        x_BTI = x_BTI + jnp.take(params["bigram"], self.bigram_ids(inputs), axis=0)
    else:
      x_BTI = inputs.astype(self.dtype)
    if keys[0] is not None and self.embed_dropout > 0:
      x_BTI = _dropout(keys[0], self.embed_dropout, x_BTI)
    ys_BTF, h_LBH = self.rnn.apply(params["gru"], x_BTI, lengths_B, dropout_key=keys[1])
    steps = ys_BTF.shape[1]
    valid_BT = jnp.arange(steps, dtype=lengths_B.dtype)[None, :] < lengths_B[:, None]
    parts = []
    if self.pooling == "last":
      d = self.rnn.num_directions
      parts.append(jnp.concatenate(list(h_LBH[-d:]), axis=-1))
    if self.pooling in ("mean", "mean_max"):
      total_BF = jnp.where(valid_BT[:, :, None], ys_BTF, jnp.zeros_like(ys_BTF)).sum(axis=1)
      count_B = jnp.maximum(lengths_B, 1).astype(self.dtype)
      parts.append(total_BF / count_B[:, None])
    if self.pooling in ("max", "mean_max"):
      lowest = jnp.full_like(ys_BTF, jnp.finfo(self.dtype).min)
      top_BF = jnp.where(valid_BT[:, :, None], ys_BTF, lowest).max(axis=1)
      parts.append(jnp.where((lengths_B > 0)[:, None], top_BF, jnp.zeros_like(top_BF)))
    pooled_BF = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    if keys[2] is not None and self.dropout > 0:
      pooled_BF = _dropout(keys[2], self.dropout, pooled_BF)
    return pooled_BF

  def logits(self, params: dict[str, Any], inputs: jax.Array, lengths_B: jax.Array, *,
             dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Logits (B,) of the positive class; arguments as :meth:`pooled`."""
    pooled_BF = self.pooled(params, inputs, lengths_B, dropout_key=dropout_key)
    head = params["head"]
    return jnp.matmul(pooled_BF, head["w"], precision=self.rnn.cell.precision)[:, 0] \
        + head["b"][0]


def loss_and_metrics(model: Classifier, params, inputs, lengths_B, labels_B, *,
                     dropout_key: Optional[jax.Array] = None):
  """Mean sigmoid cross-entropy and accuracy of one batch."""
  logits_B = model.logits(params, inputs, lengths_B, dropout_key=dropout_key)
  loss = optax.sigmoid_binary_cross_entropy(logits_B, labels_B.astype(logits_B.dtype)).mean()
  correct_B = (logits_B > 0) == (labels_B > 0)
  return loss, {"accuracy": correct_B.mean(dtype=jnp.float32)}
