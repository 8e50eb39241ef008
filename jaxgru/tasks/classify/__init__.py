"""Sequence classification with jaxgru: synthetic sequences and IMDB sentiment, one classifier.

* :mod:`.input_pipeline`: the data sources (:class:`SyntheticData`, :class:`ImdbData`), splits
  and batches; :mod:`.imdb` reads and encodes the IMDB reviews.
* :mod:`.models`: :class:`Classifier` and its loss.
* :mod:`.train`: :class:`ClassifyConfig`, the step, scoring, :func:`train_and_evaluate`.
* :mod:`.predict`: :func:`load_trained`, :func:`evaluate_trained`, :func:`predict`.

The names below are the task's public API, gathered here for ``from jaxgru.tasks import classify``.
"""

from __future__ import annotations

from jaxgru.tasks.classify import imdb
from jaxgru.tasks.classify.input_pipeline import (SOURCES, Data, DataSource, ImdbData, Split,
                                                  SyntheticData, TrainBatches, eval_batches,
                                                  eval_sample, padded_length, synthetic_data)
from jaxgru.tasks.classify.models import POOLINGS, Classifier, loss_and_metrics
from jaxgru.tasks.classify.predict import (evaluate_trained, load_trained, predict,
                                           predict_texts)
from jaxgru.tasks.classify.train import (SHOWN_METRICS, ClassifyConfig, evaluate, init_states,
                                         load_data, make_predict, make_train_step,
                                         synthetic_defaults, train_and_evaluate)
