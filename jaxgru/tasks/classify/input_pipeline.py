"""The classifier's data: sources that provide splits, and the batches cut from them.

A data source (:class:`DataSource`) says what the classifier reads and provides it:

* :class:`SyntheticData` (task ``"classify"``): sequences shaped like the tutorial's dummy data
  (10 steps x 8 features, standard normal) whose label is a function of the sequence
  (:func:`synthetic_data`); ``random_labels=True`` gives the tutorial's coin-flip labels.
* :class:`ImdbData` (task ``"imdb"``): the Large Movie Review Dataset through
  :mod:`jaxgru.tasks.classify.imdb`, as word ids of the ``vocab_size`` most frequent training
  words.

The classifier never asks which one it has: a source with ``vocab_size`` None gives feature
vectors ``x_BTI`` (``num_features`` of them per step), one with a vocabulary gives word ids
``ids_BT``. :class:`TrainBatches` and :func:`eval_batches` cut length-bucketed batches from a
:class:`Split`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import numpy as np

from jaxgru.tasks.classify import imdb as _imdb


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
    ``x_BTI`` (size, steps, features) float32 and ``y_B`` (size,) int32.
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


@dataclasses.dataclass(frozen=True)
class Split:
  """One split on the host, B examples: ``inputs`` ``ids_BT`` int32 or ``x_BTI`` float,
  ``lengths`` ``lengths_B`` int32, ``labels`` ``labels_B`` int32."""
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


@dataclasses.dataclass
class Data:
  """What a source provides: the splits, the vocabulary (None for features) and facts to log."""
  train: Split
  test: Split
  vocab: Optional[tuple[str, ...]]
  info: dict[str, Any]


def eval_sample(split: Split, size: int, seed: int) -> Split:
  """``size`` examples of ``split`` drawn without replacement (all of it if it is smaller)."""
  if size >= len(split):
    return split
  index = np.sort(np.random.default_rng(seed).choice(len(split), size, replace=False))
  return Split(split.inputs[index], split.lengths[index], split.labels[index])


class DataSource(Protocol):
  """What the classifier's training needs from its data.

  Attributes:
    task: the task's name, recorded with the run (``"classify"``, ``"imdb"``).
    vocab_size: V, rows of the embedding table for word-id inputs; None for feature inputs.
    num_features: I, features per step for feature inputs; None for word ids.
    resumable: settings of the source a resumed run may change.
  """
  task: ClassVar[str]
  vocab_size: Optional[int]
  num_features: Optional[int]
  resumable: ClassVar[tuple[str, ...]]

  def load(self, seed: int, log: Callable[[str], None]) -> Data:
    """The train and test splits."""

  def test_split(self, seed: int, vocab: Optional[Sequence[str]]) -> Split:
    """The test split alone, encoded with ``vocab`` (a trained run's) where there is one."""

  def encode_texts(self, texts: Sequence[str], vocab: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Raw texts as ``ids_BT`` and ``lengths_B``; ValueError for sources that read no text."""


def _positive(source: Any, *names: str) -> None:
  for name in names:
    value = getattr(source, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """The synthetic task's data (:func:`synthetic_data`): feature vectors, no vocabulary.

  The test split is drawn with ``seed + 1_000_003``, so it never repeats a training sequence.
  """
  task: ClassVar[str] = "classify"
  vocab_size: ClassVar[None] = None
  resumable: ClassVar[tuple[str, ...]] = ()
  seq_length: int = 10
  num_features: int = 8
  train_size: int = 8000
  test_size: int = 2000
  random_labels: bool = False
  margin: float = 1.0             # gap between the classes (see synthetic_data)

  def __post_init__(self):
    _positive(self, "seq_length", "num_features", "train_size", "test_size")
    if self.num_features < 2:
      raise ValueError(f"the synthetic task needs num_features >= 2, got {self.num_features}")
    if not self.margin >= 0:
      raise ValueError(f"margin must be >= 0, got {self.margin!r}")

  def _split(self, seed: int, size: int) -> Split:
    x_BTI, y_B = synthetic_data(seed, size, self.seq_length, self.num_features,
                                self.random_labels, self.margin)
    return Split(x_BTI, np.full((x_BTI.shape[0],), self.seq_length, np.int32), y_B)

  def load(self, seed: int, log: Callable[[str], None] = logging.info) -> Data:
    del log
    train = self._split(seed, self.train_size)
    test = self.test_split(seed, None)
    return Data(train, test, None, {"train_size": len(train), "test_size": len(test),
                                    "positive_fraction": float(train.labels.mean())})

  def test_split(self, seed: int, vocab: Optional[Sequence[str]]) -> Split:
    del vocab
    return self._split(seed + 1_000_003, self.test_size)

  def encode_texts(self, texts, vocab):
    raise ValueError(f"a {self.task!r} run reads feature vectors; prediction from text needs an "
                     "IMDB run")


@dataclasses.dataclass(frozen=True)
class ImdbData:
  """IMDB reviews as word ids: read, tokenized, a vocabulary of the training split, encoded.

  Attributes:
    data_path: the aclImdb folder (or its parent), or the ``.tar.gz`` archive.
    vocab_size: ids in the vocabulary, including padding and out-of-vocabulary.
    max_length: words kept per review; ``truncate`` (one of ``imdb.TRUNCATIONS``) says which.
    subset: reviews per split (class-balanced); 0 = all of them.
  """
  task: ClassVar[str] = "imdb"
  num_features: ClassVar[None] = None
  resumable: ClassVar[tuple[str, ...]] = ("data_path",)  # the vocabulary is checked instead
  data_path: Optional[str] = None
  vocab_size: int = 20000
  max_length: int = 512
  truncate: str = "head_tail"
  subset: int = 0

  def __post_init__(self):
    _positive(self, "vocab_size", "max_length")
    if self.vocab_size < len(_imdb.RESERVED) + 1:
      raise ValueError(f"vocab_size must be at least {len(_imdb.RESERVED) + 1} (padding, "
                       f"unknown, one word), got {self.vocab_size}")
    if self.truncate not in _imdb.TRUNCATIONS:
      raise ValueError(f"truncate must be one of {_imdb.TRUNCATIONS}, got {self.truncate!r}")
    if isinstance(self.subset, bool) or not isinstance(self.subset, (int, np.integer)) \
        or self.subset < 0:
      raise ValueError(f"subset must be >= 0, got {self.subset!r}")

  def load(self, seed: int, log: Callable[[str], None] = logging.info) -> Data:
    t0 = time.time()
    reviews = _imdb.load_reviews(self.data_path)
    if self.subset:
      reviews = {k: _imdb.subsample(v, self.subset, seed) for k, v in reviews.items()}
    read_seconds = time.time() - t0
    tokens = {k: [_imdb.tokenize(t) for t in v.texts] for k, v in reviews.items()}
    vocab = _imdb.build_vocab(tokens["train"], self.vocab_size)
    splits = {}
    for k, v in reviews.items():
      ids_BT, lengths_B = _imdb.encode(tokens[k], vocab, self.max_length, self.truncate)
      splits[k] = Split(ids_BT, lengths_B, v.labels)
    info = {"train_size": len(splits["train"]), "test_size": len(splits["test"]),
            "vocab_words": len(vocab), "read_seconds": read_seconds,
            "train_lengths": _imdb.length_stats(tokens["train"], self.max_length),
            "test_lengths": _imdb.length_stats(tokens["test"], self.max_length),
            "test_oov_fraction": float(np.sum(splits["test"].inputs == _imdb.OOV_ID)
                                       / max(int(splits["test"].lengths.sum()), 1))}
    log(f"read {info['train_size']} training and {info['test_size']} test reviews in "
        f"{read_seconds:.1f}s; vocabulary of {len(vocab)} ids; "
        f"{info['train_lengths']['truncated_fraction']:.1%} of training reviews cut to "
        f"{self.max_length} words")
    return Data(splits["train"], splits["test"], vocab, info)

  def test_split(self, seed: int, vocab: Optional[Sequence[str]]) -> Split:
    del seed
    reviews = _imdb.load_reviews(self.data_path, splits=("test",))["test"]
    ids_BT, lengths_B = _imdb.encode_texts(reviews.texts, vocab, self.max_length, self.truncate)
    return Split(ids_BT, lengths_B, reviews.labels)

  def encode_texts(self, texts: Sequence[str], vocab: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Raises imdb.DataError for a text without words."""
    for t in texts:
      if not _imdb.tokenize(t):
        raise _imdb.DataError(f"no words to classify in {t!r}")
    return _imdb.encode_texts(texts, vocab, self.max_length, self.truncate)


SOURCES: dict[str, type] = {s.task: s for s in (SyntheticData, ImdbData)}
