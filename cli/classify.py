"""``--task=classify|imdb``: sequence classification's flags, its config, and ``run(mode,
workdir)`` (train, eval, predict)."""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags, logging

from cli import common
from cli.common import FLAGS, UsageError
from jaxgru.tasks.classify import POOLINGS
from jaxgru.tasks.classify.imdb import TRUNCATIONS

flags.DEFINE_string("data_path", None,
                    "imdb: the aclImdb folder (or its parent), or the aclImdb_v1.tar.gz archive.")
flags.DEFINE_string("text", None, "--mode=predict: the review to classify.")
flags.DEFINE_integer("vocab_size", None, "imdb: ids in the vocabulary, including padding and "
                     "out-of-vocabulary (the most frequent training words fill the rest).")
flags.DEFINE_integer("max_length", None, "imdb: words kept per review (longer ones are cut).")
flags.DEFINE_enum("truncate", None, TRUNCATIONS,
                  "imdb: which --max_length words of a longer review to keep: the first, the "
                  "last, or the first quarter and the last three quarters.")
flags.DEFINE_integer("embed_size", None, "imdb: embedding size.")
flags.DEFINE_integer("bigram_buckets", None, "imdb: rows of the hashed word-pair embedding (a "
                     "power of two; 0 = words only).")
flags.DEFINE_boolean("ensemble", None, "Classifier: score the --num_models models by their "
                     "averaged probabilities (task default if unset).")
flags.DEFINE_enum("pooling", None, POOLINGS,
                  "Classifier: how the GRU outputs become one vector per sequence.")
flags.DEFINE_float("dropout", None, "Classifier: dropout before the dense head.")
flags.DEFINE_float("embed_dropout", None, "imdb: dropout on the embedded words.")
flags.DEFINE_integer("epochs", None, "Classifier: passes over the training data.")
flags.DEFINE_integer("subset", None, "imdb: use this many reviews per split (class-balanced); "
                     "0 = all of them.")
flags.DEFINE_integer("train_size", None, "classify: synthetic training sequences.")
flags.DEFINE_boolean("random_labels", None, "classify: coin-flip labels, as the tutorial's dummy "
                     "data (held-out accuracy must stay near 0.5).")


def config():
  """Maps the flags onto a ``ClassifyConfig``; unset flags keep the task's measured defaults.

  The task picks the data source; the classifier and its training are the same for both.
  """
  from jaxgru.tasks import classify
  if FLAGS.steps is not None:
    raise UsageError(f"--task={FLAGS.task} trains for --epochs, not --steps")
  if FLAGS.task == "imdb" and not FLAGS.data_path:
    raise UsageError("--task=imdb needs --data_path=PATH: the aclImdb folder or the "
                     "aclImdb_v1.tar.gz archive")
  base = {"imdb": classify.ClassifyConfig, "classify": classify.synthetic_defaults}[FLAGS.task]()
  own = {f.name for f in dataclasses.fields(base.data)}
  for task, source in classify.SOURCES.items():
    for name in sorted({f.name for f in dataclasses.fields(source)} - own):
      if getattr(FLAGS, name, None) is not None:
        raise UsageError(f"--task={FLAGS.task} makes its own data; --{name} is for --task={task}"
                         if name == "data_path" else f"--{name} is for --task={task}")
  if FLAGS.embed_size is not None and base.data.vocab_size is None:
    raise UsageError(f"--embed_size is for word inputs; --task={FLAGS.task} reads features")
  data = common.given(*own)
  fields = common.given(*(set(common.TRAINING_FLAGS) - {"steps"}), "pooling", "dropout",
                        "embed_dropout", "bigram_buckets", "epochs", "ensemble")
  if (rates := common.numbers("learning_rate", float)) is not None:
    fields["learning_rates"] = rates
  return common.configured(lambda: dataclasses.replace(
      base, data=dataclasses.replace(base.data, **data),
      rnn=common.rnn(base.rnn, FLAGS.embed_size), **fields))


def run(mode: str, workdir: str) -> int:
  """``--mode=train``, ``eval`` or ``predict`` (``--text``); returns the exit status."""
  from jaxgru import training
  from jaxgru.tasks import classify
  from jaxgru.tasks.classify import imdb
  if mode == "add":
    raise UsageError(f"--mode=add is for --task=addition, not --task={FLAGS.task}")
  if mode == "predict":
    if FLAGS.text is None or not FLAGS.text.strip():
      raise UsageError("--mode=predict needs a non-empty --text=\"...\" to classify")
    if not training.has_checkpoint(workdir):
      raise UsageError(f"--mode=predict needs a trained IMDB model in --workdir={workdir}; train "
                       f"one with `python run.py --task=imdb --data_path=PATH "
                       f"--workdir={workdir}` first")
    common.stored_run(workdir, tuple(classify.SOURCES), "IMDB")
    probability = float(common.loaded(classify.predict, workdir, [FLAGS.text])[0])
    logging.info("probability that the review is positive: %.4f", probability)
    print(f"{probability:.6f}")
    return 0
  if FLAGS.text is not None:
    raise UsageError("--text is for --mode=predict")
  cfg = config()
  if mode == "eval":
    common.stored_run(workdir, tuple(classify.SOURCES), "classification")
    result = common.loaded(classify.evaluate_trained, workdir,
                           getattr(cfg.data, "data_path", None))
    print(f"test accuracy {result['accuracy']:.4f} on {result['size']} examples")
    return 0
  try:
    s = classify.train_and_evaluate(cfg, workdir, log=logging.info, progress=common.progress(),
                                    flags=common.run_flags(sys.modules[__name__]))
  except (imdb.DataError, training.CheckpointError) as e:
    raise UsageError(str(e)) from None
  print(f"test accuracy {s['test_accuracy']:.4f} on {s['test_size']} examples "
        f"(train {s['train_seconds']:.0f}s, wall {s['wall_seconds']:.0f}s); "
        f"summary in {os.path.join(workdir, 'summary.json')}")
  return 0
