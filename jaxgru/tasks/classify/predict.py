"""Using a trained classification run: load its models and vocabulary, score a test split,
classify texts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import numpy as np

from jaxgru import training
from jaxgru.tasks import common
from jaxgru.tasks.classify.input_pipeline import SOURCES, ImdbData
from jaxgru.tasks.classify.models import Classifier
from jaxgru.tasks.classify.train import ClassifyConfig, evaluate, init_states, make_predict
from jaxgru.training import parallel


def load_trained(workdir: str) -> tuple[ClassifyConfig, Classifier, Any, Optional[tuple[str, ...]]]:
  """The config, model, params (every model's, stacked: leading axis N) and vocabulary of the
  run in ``workdir``.

  Raises:
    FileNotFoundError: no finished or interrupted run there.
    ValueError: the run there is not a classification run (or of an older layout).
  """
  if not training.has_checkpoint(workdir):
    raise FileNotFoundError(f"no finished checkpoint in {workdir}")
  cfg = ClassifyConfig.from_json(common.read_run(workdir, tuple(SOURCES))["config"])
  ckpt = training.Checkpointer(workdir, read_only=True)
  try:
    # Placed on all devices as training places them, whatever job saved them.
    target = parallel.shard_models(init_states(cfg, 1), parallel.make_mesh())
    state, extra, _ = ckpt.restore_intact(target, logging.warning)
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
  source = ImdbData(vocab_size=len(vocab), max_length=max_length, truncate=truncate)
  return _predict(model, params, *source.encode_texts(texts, vocab))


def _predict(model: Classifier, params, ids_BT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
  steps = max(int(lengths_B.max()), 1)  # no need to run the GRU over the padding
  return parallel.fetch(make_predict(model)(params, ids_BT[:, :steps], lengths_B)).mean(axis=0)


def evaluate_trained(workdir: str, data_path: Optional[str] = None) -> dict[str, Any]:
  """Accuracy and loss of the run in ``workdir`` on a whole test split, scored as in training
  (its models' averaged probabilities when it has several).

  Text is encoded with the vocabulary saved in the checkpoint, never a rebuilt one; ``data_path``
  (for sources that read files) replaces the path the run was trained on.
  """
  cfg, model, params, vocab = load_trained(workdir)
  data = cfg.data
  if data_path is not None:
    if "data_path" not in {f.name for f in dataclasses.fields(data)}:
      raise ValueError(f"a {cfg.task!r} run makes its own data; it takes no data path")
    data = dataclasses.replace(data, data_path=data_path)
  test = data.test_split(cfg.seed, vocab)
  m = evaluate(make_predict(model), params, test, cfg.eval_batch_size, cfg.bucket)
  key = "ensemble_" if cfg.ensemble or cfg.num_models == 1 else ""
  return {"accuracy": float(np.mean(m[key + "accuracy"])),
          "loss": float(np.mean(m[key + "loss"])), "size": len(test)}


def predict(workdir: str, texts: Sequence[str]) -> np.ndarray:
  """Probabilities that ``texts`` are positive, with the run in ``workdir`` (one whose data are
  text: ValueError otherwise; imdb.DataError for a text without words)."""
  cfg, model, params, vocab = load_trained(workdir)
  return _predict(model, params, *cfg.data.encode_texts(texts, vocab))
