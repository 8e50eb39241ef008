"""Sequence classification with jaxgru: synthetic sequences and IMDB sentiment.

The model reads a batch of sequences, each with its true length, and gives one logit each::

  ids (B, T) int32 -> embed[w_t] (+ bigram[hash(w_t-1, w_t)]) -> x (B, T, E)
  or features x (B, T, I)
     -> jaxgru stack run with the lengths -> ys (B, T, F), h_last
     -> pooled (B, P): masked mean and/or max of ys over the valid steps, or h_last
     -> dropout -> dense -> logit (B,)

The GRU stops at each sequence's length (the backward direction starts there) and the pooling
ignores the steps past it, so padding never changes a prediction. ``num_models`` models (seeds)
train at once in one compiled step (``jax.vmap``, each with its own init and dropout masks, all
on the same batches); with ``ensemble`` their averaged probabilities are the prediction.

Two tasks share the model and the training loop:

* ``"classify"``: synthetic sequences shaped like the tutorial's dummy data (10 steps x 8
  features, standard normal) whose label is a function of the sequence (:func:`synthetic_data`),
  so the task is learnable; ``random_labels=True`` gives the tutorial's coin-flip labels, which
  no model can beat on held-out data.
* ``"imdb"``: the Large Movie Review Dataset through :mod:`jaxgru.tasks.imdb`, with an embedding
  of the ``vocab_size`` most frequent training words.

Shapes carry their names: N models, B examples, T steps, E embedding, F GRU outputs, P pooled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgru import train as _train
from jaxgru.cell import GRUConfig
from jaxgru.rnn import RNNConfig
from jaxgru.tasks import imdb as _imdb

POOLINGS = ("last", "mean", "max", "mean_max")
TASKS = ("classify", "imdb")

# -- model -----------------------------------------------------------------------------------------


def _dropout(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Static description of the classifier; hashable, so ``jax.jit`` can take it as static.

  Attributes:
    rnn: the GRU stack; its ``input_size`` is the embedding size (or the feature count).
    vocab_size: V, rows of the embedding table; None means the inputs are float features
      (B, T, I) fed to the GRU as they are.
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
    """P, the size of the vector the head reads."""
    if self.pooling == "last":
      return self.rnn.num_directions * self.rnn.hidden_size
    return self.rnn.output_size * (2 if self.pooling == "mean_max" else 1)

  @property
  def dtype(self) -> np.dtype:
    return self.rnn.layer_cell(0).state_dtype

  def init(self, key: jax.Array, initializer: str = "keras") -> dict[str, Any]:
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

  def bigram_ids(self, ids_BxT: jax.Array) -> jax.Array:
    """Row of each (previous word, word) pair in the bigram table, (B, T) int32.

    Multiplicative (Fibonacci) hashing in wrapping uint32 arithmetic; the first word pairs with
    the padding id.
    """
    ids = ids_BxT.astype(jnp.uint32)
    prev = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids[:, :-1]], axis=1)
    mixed = (prev * jnp.uint32(0x9E3779B1) + ids) * jnp.uint32(0x85EBCA77)
    shift = jnp.uint32(32 - self.bigram_buckets.bit_length() + 1)
    return (mixed >> shift).astype(jnp.int32)

  def pooled(self, params: dict[str, Any], inputs: jax.Array, lengths_B: jax.Array, *,
             dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """One vector per sequence, (B, P).

    Args:
      params: from :meth:`init`.
      inputs: word ids (B, T) int32 when the model has an embedding, else features (B, T, I).
      lengths_B: valid steps per sequence, (B,) integers in [0, T].
      dropout_key: PRNG key for training-time dropout; None for evaluation.
    """
    keys = (jax.random.split(dropout_key, 3) if dropout_key is not None else (None,) * 3)
    if self.vocab_size is not None:
      x_BxTxE = jnp.take(params["embed"], inputs, axis=0)
      if self.bigram_buckets:
        x_BxTxE = x_BxTxE + jnp.take(params["bigram"], self.bigram_ids(inputs), axis=0)
    else:
      x_BxTxE = inputs.astype(self.dtype)
    if keys[0] is not None and self.embed_dropout > 0:
      x_BxTxE = _dropout(keys[0], self.embed_dropout, x_BxTxE)
    ys_BxTxF, h_last = self.rnn.apply(params["gru"], x_BxTxE, lengths_B, dropout_key=keys[1])
    steps = ys_BxTxF.shape[1]
    valid_BxTx1 = (jnp.arange(steps, dtype=lengths_B.dtype)[None, :]
                   < lengths_B[:, None])[:, :, None]
    parts = []
    if self.pooling == "last":
      d = self.rnn.num_directions
      parts.append(jnp.concatenate(list(h_last[-d:]), axis=-1))
    if self.pooling in ("mean", "mean_max"):
      total_BxF = jnp.where(valid_BxTx1, ys_BxTxF, jnp.zeros_like(ys_BxTxF)).sum(axis=1)
      count_Bx1 = jnp.maximum(lengths_B, 1).astype(self.dtype)[:, None]
      parts.append(total_BxF / count_Bx1)
    if self.pooling in ("max", "mean_max"):
      lowest = jnp.full_like(ys_BxTxF, jnp.finfo(self.dtype).min)
      top_BxF = jnp.where(valid_BxTx1, ys_BxTxF, lowest).max(axis=1)
      parts.append(jnp.where((lengths_B > 0)[:, None], top_BxF, jnp.zeros_like(top_BxF)))
    pooled_BxP = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    if keys[2] is not None and self.dropout > 0:
      pooled_BxP = _dropout(keys[2], self.dropout, pooled_BxP)
    return pooled_BxP

  def logits(self, params: dict[str, Any], inputs: jax.Array, lengths_B: jax.Array, *,
             dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Logits (B,) of the positive class; arguments as :meth:`pooled`."""
    pooled_BxP = self.pooled(params, inputs, lengths_B, dropout_key=dropout_key)
    head = params["head"]
    return jnp.matmul(pooled_BxP, head["w"])[:, 0] + head["b"][0]


def loss_and_metrics(model: Classifier, params, inputs, lengths_B, labels_B, *,
                     dropout_key: Optional[jax.Array] = None):
  """Mean sigmoid cross-entropy and accuracy of one batch."""
  logits_B = model.logits(params, inputs, lengths_B, dropout_key=dropout_key)
  loss = optax.sigmoid_binary_cross_entropy(logits_B, labels_B.astype(logits_B.dtype)).mean()
  correct_B = (logits_B > 0) == (labels_B > 0)
  return loss, {"accuracy": correct_B.mean(dtype=jnp.float32)}


# -- synthetic data --------------------------------------------------------------------------------


def synthetic_data(seed: int, size: int, steps: int = 10, features: int = 8,
                   random_labels: bool = False, margin: float = 1.0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Sequences like the tutorial's dummy data, with a label that depends on them.

  ``x`` is standard normal, (size, steps, features) float32. The label is 1 when the running
  total of feature 0 ends above that of feature 1, ``s = sum_t (x[t, 0] - x[t, 1]) > 0``, so a
  GRU has to integrate over every step to get it right. Sequences with ``|s| < margin`` are
  drawn again (``s`` has standard deviation ``sqrt(2 * steps)``, about 4.5), which leaves a gap
  between the classes: without one, the last per cent of accuracy only measures how precisely
  a model can add up noise near the boundary.

  With ``random_labels`` the labels are fair coin flips independent of ``x`` (the tutorial's
  setting, no gap), so no model can beat 0.5 on held-out data.

  Returns:
    ``x`` (size, steps, features) float32 and ``y`` (size,) int32.
  """
  if features < 2:
    raise ValueError(f"the synthetic task needs at least 2 features, got {features}")
  rng = np.random.default_rng(seed)
  if random_labels:
    x = rng.standard_normal((size, steps, features)).astype(np.float32)
    return x, rng.integers(0, 2, size).astype(np.int32)
  kept, have = [], 0
  while have < size:
    x = rng.standard_normal((2 * size, steps, features)).astype(np.float32)
    s = x[:, :, 0].sum(axis=1, dtype=np.float64) - x[:, :, 1].sum(axis=1, dtype=np.float64)
    x = x[np.abs(s) >= margin]
    kept.append(x)
    have += x.shape[0]
  x = np.concatenate(kept)[:size]
  y = x[:, :, 0].sum(axis=1, dtype=np.float64) > x[:, :, 1].sum(axis=1, dtype=np.float64)
  return x, y.astype(np.int32)


# -- batches ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
  """One split on the host: ``inputs`` (N, T) int32 ids or (N, T, I) float, ``lengths`` (N,)
  int32, ``labels`` (N,) int32."""
  inputs: np.ndarray
  lengths: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def padded_length(longest: int, bucket: int, max_length: int) -> int:
  """The time steps a batch is padded to: ``longest`` rounded up to a multiple of ``bucket``.

  Few distinct lengths mean few compilations; short batches skip the padding's compute.
  """
  return int(min(max_length, max(bucket, -(-int(longest) // bucket) * bucket)))


class TrainBatches:
  """Length-bucketed, shuffled training batches; batch ``s`` depends only on (seed, s).

  Each epoch shuffles the examples, sorts them by length within windows of ``window`` batches
  (so a batch holds reviews of similar lengths and little padding), and shuffles the batch order.
  A remainder smaller than a batch is left out of that epoch (a different one each epoch).
  """

  def __init__(self, split: Split, batch_size: int, bucket: int, seed: int, window: int = 50):
    if len(split) < batch_size:
      raise ValueError(f"{len(split)} training examples are fewer than one batch of {batch_size}")
    self.split, self.batch_size, self.bucket, self.seed = split, batch_size, bucket, seed
    self.window = window
    self.steps_per_epoch = len(split) // batch_size
    self._epoch, self._plan = -1, None

  def _make_plan(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.split))[: self.steps_per_epoch * self.batch_size]
    span = self.window * self.batch_size
    for i in range(0, order.size, span):
      chunk = order[i:i + span]
      order[i:i + span] = chunk[np.argsort(self.split.lengths[chunk], kind="stable")]
    batches = order.reshape(self.steps_per_epoch, self.batch_size)
    return batches[rng.permutation(self.steps_per_epoch)]

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    epoch, i = divmod(int(step), self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._plan = epoch, self._make_plan(epoch)
    index = self._plan[i]
    steps = padded_length(self.split.lengths[index].max(), self.bucket,
                          self.split.inputs.shape[1])
    return (self.split.inputs[index, :steps], self.split.lengths[index],
            self.split.labels[index])


def eval_batches(split: Split, batch_size: int, bucket: int):
  """Yields ``(index, inputs, lengths)`` covering every example once, sorted by length.

  Every batch has ``batch_size`` rows (the last one padded with empty rows, not in ``index``).
  """
  order = np.argsort(split.lengths, kind="stable")
  for i in range(0, order.size, batch_size):
    index = order[i:i + batch_size]
    rows = np.concatenate([index, np.full(batch_size - index.size, index[0])])
    steps = padded_length(split.lengths[index].max(), bucket, split.inputs.shape[1])
    lengths = split.lengths[rows].copy()
    lengths[index.size:] = 0
    yield index, split.inputs[rows, :steps], lengths


# -- configuration ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  """Everything a classification run needs; ``run.py`` fills it from flags.

  The defaults are the IMDB settings chosen by measurement (see the README): an ensemble of
  three bidirectional GRUs over words and hashed word pairs, two epochs, which reached a test
  accuracy of 0.902 on the full 24,998-review test split in under 6 minutes of wall time on a
  2-core CPU. :func:`synthetic_defaults` gives the ``"classify"`` task's.
  """

  task: str = "imdb"
  data_path: Optional[str] = None
  # Text pipeline (imdb).
  vocab_size: int = 20000
  max_length: int = 512
  truncate: str = "head_tail"
  subset: int = 0                 # reviews per split (class-balanced); 0 = all of them
  bucket: int = 64                # batches are padded to a multiple of this many steps
  # Synthetic data (classify).
  seq_length: int = 10
  num_features: int = 8
  train_size: int = 8000
  test_size: int = 2000
  random_labels: bool = False
  margin: float = 1.0             # gap between the synthetic classes (see synthetic_data)
  # Model.
  embed_size: int = 64
  bigram_buckets: int = 32768
  hidden_size: int = 64
  num_layers: int = 1
  bidirectional: bool = True
  pooling: str = "mean_max"
  variant: str = "reset_after"
  activation: str = "tanh"
  recurrent_activation: str = "sigmoid"
  initializer: str = "keras"
  embed_dropout: float = 0.2
  dropout: float = 0.3
  rnn_dropout: float = 0.0
  dtype: Optional[str] = None
  # Optimization.
  batch_size: int = 64
  epochs: int = 2
  optimizer: str = "adamw"
  learning_rates: tuple[float, ...] = (3e-3,)
  schedule: str = "cosine"
  warmup_steps: int = 100
  clip_norm: float = 1.0
  weight_decay: float = 1e-4
  seed: int = 0
  num_models: int = 3             # trained at once (vmap), seeds seed, seed + 1, ...
  ensemble: bool = True           # predict with the models' averaged probabilities
  # Bookkeeping.
  eval_batch_size: int = 256
  eval_every: int = 0             # steps between held-out evaluations during training; 0 = none
  eval_subset: int = 1000         # held-out examples for those evaluations
  log_every: int = 50
  checkpoint_every: int = 500

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.truncate not in _imdb.TRUNCATIONS:
      raise ValueError(f"truncate must be one of {_imdb.TRUNCATIONS}, got {self.truncate!r}")
    for name in ("vocab_size", "max_length", "bucket", "seq_length", "num_features",
                 "train_size", "test_size", "embed_size", "hidden_size", "num_layers",
                 "batch_size", "epochs", "num_models", "eval_batch_size", "log_every",
                 "checkpoint_every", "eval_subset"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.vocab_size < len(_imdb.RESERVED) + 1:
      raise ValueError(f"vocab_size must be at least {len(_imdb.RESERVED) + 1}")
    if self.task == "classify" and self.num_features < 2:
      raise ValueError("the synthetic task needs num_features >= 2")
    self.model()  # validates the model settings
    self.optimizer_config()

  def model(self) -> Classifier:
    text = self.task == "imdb"
    return Classifier(
        rnn=RNNConfig(GRUConfig(
            input_size=self.embed_size if text else self.num_features,
            hidden_size=self.hidden_size, variant=self.variant,
            activation=self.activation, recurrent_activation=self.recurrent_activation,
            dtype=self.dtype), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.rnn_dropout),
        vocab_size=self.vocab_size if text else None, pooling=self.pooling,
        embed_dropout=self.embed_dropout if text else 0.0, dropout=self.dropout,
        bigram_buckets=self.bigram_buckets if text else 0)

  def optimizer_config(self, total_steps: int = 1000) -> _train.OptimizerConfig:
    return _train.OptimizerConfig(
        name=self.optimizer, schedule=self.schedule, warmup_steps=self.warmup_steps,
        total_steps=total_steps, clip_norm=self.clip_norm, weight_decay=self.weight_decay)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ClassifyConfig":
    d = dict(d)
    d["learning_rates"] = tuple(d["learning_rates"])
    return cls(**d)


# Settings a resumed run may change: where the same data lies (its vocabulary is checked), how
# often to log, save and evaluate, and whether to predict with the ensemble.
RESUMABLE_CHANGES = ("data_path", "log_every", "checkpoint_every", "eval_every", "eval_subset",
                     "eval_batch_size", "ensemble")


def synthetic_defaults(**overrides) -> ClassifyConfig:
  """The ``"classify"`` task's defaults, chosen by measurement (>= 99% in a few seconds)."""
  settings = dict(task="classify", hidden_size=32, bidirectional=False, pooling="last",
                  embed_dropout=0.0, dropout=0.0, bigram_buckets=0, num_models=1,
                  ensemble=False, batch_size=64, epochs=4, optimizer="adam",
                  learning_rates=(1e-2,), schedule="cosine", warmup_steps=0, log_every=25,
                  checkpoint_every=1000, eval_batch_size=1000)
  settings.update(overrides)
  return ClassifyConfig(**settings)


# -- data ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  train: Split
  test: Split
  vocab: Optional[tuple[str, ...]]
  info: dict[str, Any]


def load_data(cfg: ClassifyConfig, log: Callable[[str], None] = logging.info) -> Data:
  """The train and test splits of ``cfg.task`` (for IMDB: read, tokenized, vocab, encoded)."""
  if cfg.task == "classify":
    x, y = synthetic_data(cfg.seed, cfg.train_size, cfg.seq_length, cfg.num_features,
                          cfg.random_labels, cfg.margin)
    xt, yt = synthetic_data(cfg.seed + 1_000_003, cfg.test_size, cfg.seq_length,
                            cfg.num_features, cfg.random_labels, cfg.margin)
    full = lambda n: np.full((n,), cfg.seq_length, np.int32)
    return Data(Split(x, full(x.shape[0]), y), Split(xt, full(xt.shape[0]), yt), None,
                {"train_size": int(x.shape[0]), "test_size": int(xt.shape[0]),
                 "positive_fraction": float(y.mean())})
  t0 = time.time()
  reviews = _imdb.load_reviews(cfg.data_path)
  if cfg.subset:
    reviews = {k: _imdb.subsample(v, cfg.subset, cfg.seed) for k, v in reviews.items()}
  read_seconds = time.time() - t0
  tokens = {k: [_imdb.tokenize(t) for t in v.texts] for k, v in reviews.items()}
  vocab = _imdb.build_vocab(tokens["train"], cfg.vocab_size)
  splits = {}
  for k, v in reviews.items():
    ids, lengths = _imdb.encode(tokens[k], vocab, cfg.max_length, cfg.truncate)
    splits[k] = Split(ids, lengths, v.labels)
  info = {"train_size": len(splits["train"]), "test_size": len(splits["test"]),
          "vocab_words": len(vocab), "read_seconds": read_seconds,
          "train_lengths": _imdb.length_stats(tokens["train"], cfg.max_length),
          "test_lengths": _imdb.length_stats(tokens["test"], cfg.max_length),
          "test_oov_fraction": float(np.sum(splits["test"].inputs == _imdb.OOV_ID)
                                     / max(int(splits["test"].lengths.sum()), 1))}
  log(f"read {info['train_size']} training and {info['test_size']} test reviews in "
      f"{read_seconds:.1f}s; vocabulary of {len(vocab)} ids; "
      f"{info['train_lengths']['truncated_fraction']:.1%} of training reviews cut to "
      f"{cfg.max_length} words")
  return Data(splits["train"], splits["test"], vocab, info)


# -- training --------------------------------------------------------------------------------------


def init_states(cfg: ClassifyConfig, total_steps: int) -> _train.TrainState:
  """N fresh model states stacked on a leading axis: model i has seed ``seed + i``."""
  model = cfg.model()
  return _train.init_states(lambda key: model.init(key, cfg.initializer),
                            _train.make_optimizer(cfg.optimizer_config(total_steps)),
                            cfg.num_models, cfg.seed, cfg.learning_rates)


def make_train_step(cfg: ClassifyConfig, total_steps: int):
  """Jitted ``(state (N, ...), inputs, lengths (B,), labels (B,)) -> (state, metrics (N,))``.

  Every model sees the same batch; each draws its own dropout masks from its own key. One
  compilation per padded batch length.
  """
  model = cfg.model()
  opt = _train.make_optimizer(cfg.optimizer_config(total_steps))

  def one_model(state, inputs, lengths_B, labels_B):
    def loss_fn(params, key, step):
      del step
      return loss_and_metrics(model, params, inputs, lengths_B, labels_B, dropout_key=key)
    return _train.make_train_step(loss_fn, opt)(state)

  return jax.jit(jax.vmap(one_model, in_axes=(0, None, None, None)), donate_argnums=0)


def make_predict(model: Classifier):
  """Jitted ``(params (N, ...), inputs, lengths (B,)) -> probabilities (N, B)``."""
  @jax.jit
  def predict(params, inputs, lengths_B):
    logits = jax.vmap(model.logits, in_axes=(0, None, None))(params, inputs, lengths_B)
    return jax.nn.sigmoid(logits)
  return predict


def _scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Accuracy and mean cross-entropy along the last axis of ``probs`` (..., N_examples)."""
  positive = labels > 0
  p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
  loss = -np.where(positive, np.log(p), np.log1p(-p)).mean(axis=-1)
  return ((probs > 0.5) == positive).mean(axis=-1), loss


def evaluate(predict_fn, params, split: Split, batch_size: int, bucket: int
             ) -> dict[str, np.ndarray]:
  """Scores of the N models on every example of ``split``.

  Returns:
    ``accuracy`` and ``loss`` (N,) of every model, and ``ensemble_accuracy`` and
    ``ensemble_loss`` () of their averaged probabilities.
  """
  num = jax.tree.leaves(params)[0].shape[0]
  probs = np.zeros((num, len(split)), np.float32)
  for index, inputs, lengths in eval_batches(split, batch_size, bucket):
    probs[:, index] = np.asarray(predict_fn(params, inputs, lengths))[:, : index.size]
  accuracy, loss = _scores(probs, split.labels[None, :])
  ens_accuracy, ens_loss = _scores(probs.mean(axis=0), split.labels)
  return {"accuracy": accuracy, "loss": loss, "ensemble_accuracy": ens_accuracy,
          "ensemble_loss": ens_loss}


def _cpu_seconds() -> float:
  """CPU time of this process so far, all threads: on a shared machine, a load-independent
  measure of the work done (wall time depends on what else runs)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _eval_sample(split: Split, size: int, seed: int) -> Split:
  if size >= len(split):
    return split
  index = np.sort(np.random.default_rng(seed).choice(len(split), size, replace=False))
  return Split(split.inputs[index], split.lengths[index], split.labels[index])


def train_and_evaluate(cfg: ClassifyConfig, workdir: str, log=logging.info,
                       progress_stream=None, flags: Optional[dict[str, Any]] = None,
                       data: Optional[Data] = None) -> dict[str, Any]:
  """Trains ``cfg.num_models`` classifiers (resuming from ``workdir``), evaluates on the whole
  test split, and writes ``workdir/summary.json``.

  Also writes ``config.json``, ``metrics.jsonl`` and orbax checkpoints whose extra data holds
  the vocabulary, so that :func:`predict` encodes text with the ids the model was trained on.

  Args:
    cfg: the run's configuration.
    workdir: output folder.
    log: where progress lines go.
    progress_stream: stream for the progress bar (stderr by default).
    flags: recorded as they are in the summary (``run.py`` passes its flags).
    data: preloaded data (benchmarks share one load across runs); loaded from ``cfg`` if None.

  Returns:
    The summary dict.

  Raises:
    imdb.DataError: unusable input data.
    train.ConfigMismatch: ``workdir`` holds checkpoints of a run with other settings (beyond
      :data:`RESUMABLE_CHANGES`).
    train.Diverged: the loss became NaN or infinite.
  """
  record = {"task": cfg.task, "config": cfg.to_json()}
  _train.check_resume(workdir, record, RESUMABLE_CHANGES)  # before the data: fail fast
  wall_start = time.time()
  load_start = os.getloadavg()[0]
  t0 = time.time()
  if data is None:
    data = load_data(cfg, log)
  data_seconds = time.time() - t0
  if len(data.train) < cfg.batch_size:
    raise _imdb.DataError(f"{len(data.train)} training examples are fewer than one batch "
                          f"(batch_size={cfg.batch_size})")
  os.makedirs(workdir, exist_ok=True)  # only now: bad data leaves no half-made run behind
  batches = TrainBatches(data.train, cfg.batch_size, cfg.bucket, cfg.seed)
  total_steps = cfg.epochs * batches.steps_per_epoch

  ckpt = _train.Checkpointer(workdir)
  state = init_states(cfg, total_steps)
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state, extra = ckpt.restore(state)
    if data.vocab is not None and extra and tuple(extra.get("vocab", ())) != data.vocab:
      raise _imdb.DataError(f"the checkpoint in {ckpt.directory} was trained with another "
                            "vocabulary (different data or --vocab_size); use a new --workdir")
    log(f"resumed from the checkpoint at step {resumed_from} in {ckpt.directory}")
  # After the checks above (a refused resume leaves the stored run as it was), and before the
  # first checkpoint of a new run (a checkpoint always has its config beside it).
  _train.write_json_atomic(os.path.join(workdir, "config.json"), record)

  model = cfg.model()
  train_step = make_train_step(cfg, total_steps)
  predict_fn = make_predict(model)
  held_out = _eval_sample(data.test, cfg.eval_subset, cfg.seed)

  def evaluate_during(state, step):
    if not cfg.eval_every or (step % cfg.eval_every and step != total_steps):
      return {}, False
    m = evaluate(predict_fn, state.params, held_out, cfg.eval_batch_size, cfg.bucket)
    return {"eval_accuracy": float(m["accuracy"].mean()), "eval_loss": float(m["loss"].mean()),
            "eval_accuracy_per_model": m["accuracy"].tolist(),
            "eval_accuracy_ensemble": float(m["ensemble_accuracy"])}, False

  extra = {"vocab": list(data.vocab)} if data.vocab is not None else {}
  result = _train.fit(
      state, train_step, total_steps=total_steps, log_every=cfg.log_every,
      checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt,
      writer=_train.MetricsWriter(os.path.join(workdir, "metrics.jsonl")),
      progress=_train.Progress(total_steps, log, progress_stream), evaluate=evaluate_during,
      batch_fn=batches, checkpoint_extra=lambda: extra)
  ckpt.close()

  t0 = time.time()
  test = evaluate(predict_fn, result.state.params, data.test, cfg.eval_batch_size, cfg.bucket)
  eval_seconds = time.time() - t0
  # One model, or an ensemble (the models' averaged probabilities), or the models' mean score.
  key = "ensemble_" if cfg.ensemble or cfg.num_models == 1 else ""
  summary = {
      "task": cfg.task,
      "test_accuracy": float(np.mean(test[key + "accuracy"])),
      "test_loss": float(np.mean(test[key + "loss"])),
      "test_accuracy_per_model": test["accuracy"].tolist(),
      "test_accuracy_ensemble": float(test["ensemble_accuracy"]),
      "test_size": len(data.test),
      "train_size": len(data.train),
      "steps": result.steps,
      "epochs": cfg.epochs,
      "steps_per_epoch": batches.steps_per_epoch,
      "train_seconds": result.train_seconds,
      "data_seconds": data_seconds,
      "eval_seconds": eval_seconds,
      "wall_seconds": time.time() - wall_start,
      "cpu_seconds": _cpu_seconds(),
      "resumed_from_step": resumed_from,
      "load_average": {"start": load_start, "end": os.getloadavg()[0],
                       "cpu_count": os.cpu_count()},
      "data": data.info,
      "devices": [str(d) for d in jax.devices()],
      "config": cfg.to_json(),
      "flags": flags,
  }
  _train.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"test accuracy {summary['test_accuracy']:.4f} on {len(data.test)} examples; "
      f"train {result.train_seconds:.1f}s, wall {summary['wall_seconds']:.1f}s")
  return summary


# -- using a trained model -------------------------------------------------------------------------


def load_trained(workdir: str) -> tuple[ClassifyConfig, Classifier, Any, Optional[tuple[str, ...]]]:
  """The config, model, params (every model's, stacked: leading axis N) and vocabulary of the
  run in ``workdir``.

  Raises:
    FileNotFoundError: no finished or interrupted run there.
    ValueError: the run there is not a classification run.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no run in {workdir} (no config.json)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("task") not in TASKS:
    raise ValueError(f"{workdir} holds a {meta.get('task')!r} run, not a classification run")
  cfg = ClassifyConfig.from_json(meta["config"])
  ckpt = _train.Checkpointer(workdir)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state, extra = ckpt.restore(init_states(cfg, 1))
  finally:
    ckpt.close()
  vocab = tuple(extra["vocab"]) if extra and "vocab" in extra else None
  return cfg, cfg.model(), state.params, vocab


def predict_texts(model: Classifier, params, vocab: Sequence[str], texts: Sequence[str],
                  max_length: int, truncate: str = "head") -> np.ndarray:
  """Probabilities (len(texts),) that each review is positive, averaged over the models.

  Args:
    model: the classifier.
    params: N models' params, stacked on a leading axis.
    vocab: the vocabulary the models were trained with.
    texts: raw reviews.
    max_length, truncate: as in training.

  Raises:
    imdb.DataError: a text has no words.
  """
  for t in texts:
    if not _imdb.tokenize(t):
      raise _imdb.DataError(f"no words to classify in {t!r}")
  ids, lengths = _imdb.encode_texts(texts, vocab, max_length, truncate)
  steps = max(int(lengths.max()), 1)  # no need to run the GRU over the padding
  return np.asarray(make_predict(model)(params, ids[:, :steps], lengths)).mean(axis=0)


def evaluate_trained(workdir: str, data_path: Optional[str] = None) -> dict[str, Any]:
  """Accuracy and loss of the run in ``workdir`` on a whole test split, scored as in training
  (its models' averaged probabilities when it has several).

  For IMDB the test reviews of ``data_path`` (default: the path it was trained on) are encoded
  with the vocabulary saved in the checkpoint, never a rebuilt one.
  """
  cfg, model, params, vocab = load_trained(workdir)
  if cfg.task == "imdb":
    reviews = _imdb.load_reviews(data_path or cfg.data_path, splits=("test",))["test"]
    ids, lengths = _imdb.encode_texts(reviews.texts, vocab, cfg.max_length, cfg.truncate)
    test = Split(ids, lengths, reviews.labels)
  else:
    test = load_data(cfg).test
  m = evaluate(make_predict(model), params, test, cfg.eval_batch_size, cfg.bucket)
  key = "ensemble_" if cfg.ensemble or cfg.num_models == 1 else ""
  return {"accuracy": float(np.mean(m[key + "accuracy"])),
          "loss": float(np.mean(m[key + "loss"])), "size": len(test)}


def predict(workdir: str, texts: Sequence[str]) -> np.ndarray:
  """Probabilities that ``texts`` are positive reviews, with the IMDB run in ``workdir``."""
  cfg, model, params, vocab = load_trained(workdir)
  if cfg.task != "imdb" or vocab is None:
    raise ValueError(f"{workdir} holds a {cfg.task!r} run; prediction needs an IMDB run")
  return predict_texts(model, params, vocab, texts, cfg.max_length, cfg.truncate)
