"""Binary addition: a GRU adds two integers of any length, read as reversed bitstrings.

* :mod:`.input_pipeline`: bits, problems and held-out batches.
* :mod:`.models`: :class:`AdditionModel` and its loss.
* :mod:`.train`: :class:`AdditionConfig`, the step, the evaluation, :func:`train_and_evaluate`.
* :mod:`.predict`: :func:`load_trained`, :func:`best_model`, :func:`predict_sum`.

The names below are the task's public API, gathered here for ``from jaxgru.tasks import addition``.
"""

from __future__ import annotations

from jaxgru.tasks.addition.input_pipeline import (EVAL_SALT, encode, eval_batch, from_bits,
                                                  random_batch, random_problem, to_bits)
from jaxgru.tasks.addition.models import AdditionModel, loss_and_metrics
from jaxgru.tasks.addition.predict import best_model, load_trained, predict_sum
from jaxgru.tasks.addition.train import (RESUMABLE_CHANGES, SHOWN_METRICS, TASK, AdditionConfig,
                                         consolidate_optimizer_config, init_states,
                                         make_evaluate, make_train_step, steps_summary,
                                         train_and_evaluate)
