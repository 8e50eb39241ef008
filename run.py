"""jaxgru's main job: train, evaluate and use GRU models from the command line.

  python run.py                                   # learn binary addition, then add two big numbers
  python run.py --mode=add --a=123 --b=456        # add with the trained model (exit 0 iff exact)
  python run.py --num_models=64                   # 64 independent models in one compiled program
  python run.py --task=imdb --data_path=aclImdb_labeled.tar.gz
  python run.py --mode=predict --workdir=runs/imdb --text="A wonderful film."

Only this file reads flags; it turns them into a task config and calls the library. Every mistake
a user can make (a bad value, a work directory that cannot be used or holds another run or only
damaged checkpoints, settings that cannot fit in this machine's memory, a platform that is not
there) prints one line and exits with status 2 before anything is written; Ctrl-C or SIGTERM
prints one line and exits with status 130 (a checkpoint is saved first while training).

First thing, ``main`` raises glibc's malloc thresholds for this process (``--nomallopt`` or
JAXGRU_NO_MALLOPT=1 leaves them as they are; see ``jaxgru/training/malloc.py``): XLA:CPU's
temporaries then stay in the heap instead of being mapped and unmapped at every step.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import sys

from absl import app, flags, logging

from jaxgru import ACTIVATIONS, GRUConfig
from jaxgru.cell import PRECISIONS, VARIANTS, field_default
from jaxgru.tasks.classify import SOURCES as CLASSIFY_SOURCES
from jaxgru.tasks.classify import POOLINGS
from jaxgru.tasks.classify.imdb import TRUNCATIONS
from jaxgru.training import OPTIMIZERS, SCHEDULES
from jaxgru.training import malloc

import cli.rl  # --task=rl: its flags, config and modes

TASKS = ("addition",) + tuple(CLASSIFY_SOURCES) + ("rl",)
MODES = ("train", "add", "eval", "predict")

# Choices and cell defaults come from the library; every setting left unset (None) takes the
# task config's default, and the configs validate the values (their ValueErrors become usage
# errors). Only the parsing of list flags is checked here.
FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "addition", TASKS, "What to learn.")
flags.DEFINE_enum("mode", "train", MODES,
                  "train (resumes from --workdir), add (addition: --a + --b), eval, "
                  "predict (imdb: --text).")
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default runs/<task>).")
flags.DEFINE_integer("hidden_size", None, "GRU state size (task default if unset).")
flags.DEFINE_integer("num_layers", None, "Stacked GRU layers (task default if unset).")
flags.DEFINE_enum("variant", field_default(GRUConfig, "variant"), VARIANTS, "GRU variant.")
flags.DEFINE_enum("activation", field_default(GRUConfig, "activation"), sorted(ACTIVATIONS),
                  "Candidate activation.")
flags.DEFINE_enum("recurrent_activation", field_default(GRUConfig, "recurrent_activation"),
                  sorted(ACTIVATIONS), "Gate activation.")
flags.DEFINE_integer("bits", None, "Addition: bits per operand during training.")
flags.DEFINE_integer("consolidate_steps", None,
                     "Addition: steps on longer problems after solving (0 skips).")
flags.DEFINE_integer("consolidate_bits", None, "Addition: bits of those problems.")
flags.DEFINE_integer("consolidate_batch_size", None,
                     "Addition: problems per consolidation step.")
flags.DEFINE_float("consolidate_mixed", None,
                   "Addition: fraction of those problems made with long carry chains.")
flags.DEFINE_list("eval_bits", None,
                  "Addition: operand lengths for the length-generalization evaluation.")
flags.DEFINE_integer("batch_size", None, "Examples per step (task default if unset).")
flags.DEFINE_integer("steps", None, "Maximum training steps (task default if unset).")
flags.DEFINE_enum("optimizer", None, OPTIMIZERS, "Optimizer (task default if unset).")
flags.DEFINE_list("learning_rate", None,
                  "Peak learning rate; a comma list cycles over --num_models models.")
flags.DEFINE_enum("schedule", None, SCHEDULES, "Learning-rate schedule (task default if unset).")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps (task default if unset).")
flags.DEFINE_float("clip_norm", None, "Global-norm gradient clipping (0 disables).")
flags.DEFINE_integer("seed", 0, "Random seed; model i of --num_models uses seed + i.")
flags.DEFINE_integer("num_models", None, "Independent models trained at once (vmap).")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", None, "Steps between metric fetches, logs and evaluations.")
flags.DEFINE_enum("platform", None, ("cpu", "gpu", "tpu"), "JAX platform (default: what JAX finds).")
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16", "float64"),
                  "Compute dtype of the matrix products (float64 turns on JAX's x64 mode).")
flags.DEFINE_enum("matmul_precision", field_default(GRUConfig, "precision"), PRECISIONS,
                  "How exactly GPUs and TPUs compute the products (jaxgru.GRUConfig.precision): "
                  "highest keeps --dtype's precision; high or default allow TensorFloat-32 or "
                  "bfloat16 passes, faster there. No effect on the CPU.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (default: env JAX_COORDINATOR_ADDRESS); "
                    "set, run.py calls jax.distributed.initialize().")
flags.DEFINE_integer("num_processes", None, "Multi-host: processes in all (env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process, 0..N-1 (env JAX_PROCESS_ID).")
flags.DEFINE_boolean("distributed", False, "Multi-host: call jax.distributed.initialize() and let "
                     "JAX detect the cluster (Cloud TPU, SLURM, Open MPI).")
flags.DEFINE_boolean("mallopt", True, "Raise glibc's malloc thresholds first thing (XLA:CPU's "
                     "temporaries stay in the heap rather than being mmapped at every step; "
                     "measured 1.74 -> 0.71 of the single-model cost for 64 models); "
                     "--nomallopt (or env JAXGRU_NO_MALLOPT=1) leaves malloc as it is.")
flags.DEFINE_string("a", None, "--mode=add: first non-negative integer (any number of digits).")
flags.DEFINE_string("b", None, "--mode=add: second non-negative integer.")

# == Sequence classification flags (--task=classify|imdb) ==========================================
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
flags.DEFINE_boolean("bidirectional", None, "Classifier: bidirectional GRU (task default if unset).")
flags.DEFINE_enum("pooling", None, POOLINGS,
                  "Classifier: how the GRU outputs become one vector per sequence.")
flags.DEFINE_float("dropout", None, "Classifier: dropout before the dense head.")
flags.DEFINE_float("embed_dropout", None, "imdb: dropout on the embedded words.")
flags.DEFINE_float("weight_decay", None, "adamw: decoupled weight decay.")
flags.DEFINE_integer("epochs", None, "Classifier: passes over the training data.")
flags.DEFINE_integer("subset", None, "imdb: use this many reviews per split (class-balanced); "
                     "0 = all of them.")
flags.DEFINE_integer("train_size", None, "classify: synthetic training sequences.")
flags.DEFINE_boolean("random_labels", None, "classify: coin-flip labels, as the tutorial's dummy "
                     "data (held-out accuracy must stay near 0.5).")
# == end of sequence classification flags ==========================================================


class UsageError(Exception):
  """A user mistake: reported in one line with exit status 2."""


def _non_negative_int(name: str, value: str | None) -> int:
  if value is None:
    raise UsageError(f"--mode=add needs --{name}=INT")
  if not re.fullmatch(r"[ \t]*\+?[0-9]+[ \t]*", value):  # ASCII digits only, any number
    raise UsageError(f"--{name} must be a non-negative integer in ASCII digits, got "
                     f"{value[:40]!r}{'...' if len(value) > 40 else ''}")
  sys.set_int_max_str_digits(0)
  return int(value)


def _numbers(name: str, kind: type) -> tuple | None:
  """A comma-list flag parsed as numbers (None if unset); whether they fit is the config's call."""
  values = getattr(FLAGS, name)
  if values is None:
    return None
  try:
    if not all(v.isascii() for v in values):
      raise ValueError("not ASCII")
    return tuple(kind(v) for v in values)
  except ValueError:
    raise UsageError(f"--{name} must be a comma list of {kind.__name__}s, got "
                     f"{','.join(values)!r}") from None


def _given(*names: str) -> dict:
  """The flags among ``names`` that were set (unset ones, and config fields with no flag, take
  the config's default)."""
  return {k: getattr(FLAGS, k) for k in names if getattr(FLAGS, k, None) is not None}


def _configured(build):
  """``build()``, with the configs' ValueErrors turned into usage errors; then the memory the
  run would need is compared with the machine's (before anything is allocated or written)."""
  try:
    cfg = build()
  except ValueError as e:
    raise UsageError(f"invalid settings: {e}") from None
  _fits(cfg)
  return cfg


def _fits(cfg) -> None:
  """Refuses, as a usage error naming the flag, a config that cannot fit in memory."""
  from jaxgru.tasks import common
  try:
    common.check_fits(cfg.memory_needs())
  except common.TooBig as e:
    raise UsageError(f"--{e}") from None


def _precision(rnn_json: dict) -> str:
  """The --dtype a run was made with, from its stored stack settings."""
  cell = rnn_json.get("cell", {})
  if cell.get("dtype") == "bfloat16":
    return "bfloat16"
  return "float64" if cell.get("param_dtype") == "float64" else "float32"


def _stored_run(workdir: str, tasks: tuple, what: str) -> dict:
  """The run in ``workdir`` for ``--mode=add|eval|predict``: it must hold finished checkpoints,
  a readable config.json of one of ``tasks``, and have been made with this --dtype."""
  from jaxgru import training
  from jaxgru.tasks import common
  if not training.has_checkpoint(workdir):
    raise UsageError(f"--mode={FLAGS.mode} needs a trained {what} model in --workdir={workdir}")
  try:
    meta = common.read_run(workdir, tasks)
  except (OSError, ValueError) as e:
    raise UsageError(f"--mode={FLAGS.mode}: {e}") from None
  made = _precision(meta["config"].get("rnn", {}))
  if made != FLAGS.dtype:
    raise UsageError(f"{workdir} holds a run made with --dtype={made}, not --dtype={FLAGS.dtype}; "
                     f"use --dtype={made}")
  return meta


def _loaded(load, *args):
  """``load(*args)`` (a task's load_trained and the like), its errors as usage errors."""
  from jaxgru import training
  try:
    return load(*args)
  except (OSError, ValueError, TypeError, KeyError, training.CheckpointError) as e:
    raise UsageError(str(e)) from None


def _rnn(base, input_size: int | None = None):
  """``base`` (an RNNConfig) with the cell and stack flags applied."""
  # The precision is recorded as given: float64 parameters (JAX's x64 mode is on), float32 ones,
  # or float32 ones with bfloat16 matrix products.
  cell = dict(variant=FLAGS.variant, activation=FLAGS.activation,
              recurrent_activation=FLAGS.recurrent_activation,
              param_dtype="float64" if FLAGS.dtype == "float64" else "float32",
              dtype="bfloat16" if FLAGS.dtype == "bfloat16" else None,
              precision=FLAGS.matmul_precision, **_given("hidden_size"))
  if input_size is not None:
    cell["input_size"] = input_size
  return dataclasses.replace(base, cell=dataclasses.replace(base.cell, **cell),
                             **_given("num_layers", "bidirectional"))


# Flags that map one to one onto a field of a task's config, when given.
_TRAINING_FLAGS = ("batch_size", "steps", "optimizer", "schedule", "warmup_steps", "clip_norm",
                   "weight_decay", "seed", "num_models", "checkpoint_every", "log_every")


def _addition_config():
  from jaxgru.tasks import addition
  base = addition.AdditionConfig()
  fields = _given(*_TRAINING_FLAGS, "bits", "consolidate_steps", "consolidate_bits",
                  "consolidate_mixed", "consolidate_batch_size")
  for name, key, kind in (("learning_rate", "learning_rates", float), ("eval_bits", "eval_bits", int)):
    if (values := _numbers(name, kind)) is not None:
      fields[key] = values
  return _configured(lambda: dataclasses.replace(base, rnn=_rnn(base.rnn), **fields))


def _show_addition(workdir: str, a: int, b: int) -> bool:
  import jax
  from jaxgru.tasks import addition
  cfg, state, steps_to_solve = _loaded(addition.load_trained, workdir)
  params = jax.device_get(addition.best_model(state, steps_to_solve))
  got = addition.predict_sum(cfg.model(), params, a, b)
  ok = got == a + b
  print(f"a       = {a}")
  print(f"b       = {b}")
  print(f"model   = {got}")
  print(f"a + b   = {a + b}")
  print(f"{'correct' if ok else 'WRONG'}: the model's sum {'equals' if ok else 'differs from'} the "
        f"exact sum ({max(a.bit_length(), b.bit_length()) + 1} bits, {len(str(a + b))} digits)")
  return ok


def _run_addition(workdir: str) -> int:
  from jaxgru import training
  from jaxgru.tasks import addition
  if FLAGS.mode == "add":
    a, b = _non_negative_int("a", FLAGS.a), _non_negative_int("b", FLAGS.b)
    if not training.has_checkpoint(workdir):
      raise UsageError(f"--mode=add needs a trained model in --workdir={workdir}; train one with "
                       f"`python run.py --workdir={workdir}` first")
    _stored_run(workdir, (addition.TASK,), "addition")
    return 0 if _show_addition(workdir, a, b) else 1
  if FLAGS.mode == "eval":
    import numpy as np
    meta = _stored_run(workdir, (addition.TASK,), "addition")
    stored = _loaded(addition.AdditionConfig.from_json, meta["config"])
    eval_bits = _numbers("eval_bits", int)
    if eval_bits is not None:
      stored = _configured(lambda: dataclasses.replace(stored, eval_bits=eval_bits))
    _fits(stored)
    cfg, state, _ = _loaded(addition.load_trained, workdir)
    for bits in (cfg.bits,) + stored.eval_bits:
      size = cfg.long_eval_size if bits > 256 else cfg.eval_size
      exact = addition.make_evaluate(cfg, bits, size, log=logging.info)(state.params)
      print(f"{bits} bits: exact-match {np.mean(exact):.4f} over {size} problems "
            f"x {cfg.num_models} model(s)")
    return 0
  if FLAGS.mode == "predict":
    raise UsageError("--mode=predict is for --task=imdb; use --mode=add for addition")
  cfg = _addition_config()
  # Before showing a finished run too: one made with other settings is not what was asked for.
  training.check_resume(workdir, {"task": "addition", "config": cfg.to_json()},
                     addition.RESUMABLE_CHANGES)
  if _finished(workdir, cfg.to_json()):
    logging.info("a finished run with these settings is in %s; showing it (delete the folder, or "
                 "ask for more --steps, to train again)", workdir)
  else:
    summary = addition.train_and_evaluate(cfg, workdir, log=logging.info, flags=_run_flags())
    s = summary
    logging.info("steps_to_solve=%s solved_fraction=%.3f compile=%.2fs train=%.2fs wall=%.2fs",
                 s["steps_to_solve"], s["solved_fraction"], s["compile_seconds"],
                 s["train_seconds"], s["wall_seconds"])
    logging.info("length generalization (bits -> exact-match): %s", s["length_generalization"])
    if s["solved_fraction"] == 0:
      print(f"not solved in {s['steps']} steps (see {workdir}/metrics.jsonl); more --steps or "
            f"another --learning_rate may help")
      return 0
  rng = random.Random(FLAGS.seed)
  sys.set_int_max_str_digits(0)
  _show_addition(workdir, rng.getrandbits(1000), rng.getrandbits(1000))
  return 0


def _finished(workdir: str, config: dict) -> bool:
  """Whether ``workdir`` holds a finished run of exactly ``config`` (its summary records the same
  settings, steps included): then there is nothing to train, only the run to show."""
  import json
  from jaxgru import training
  from jaxgru.training.checkpoints import json_default
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return False
  want = json.loads(json.dumps(config, default=json_default))
  if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
    return False
  # A run saved before GRUConfig.precision existed does not record it; it may differ on resume.
  drop = lambda c: {**c, "rnn": {**c.get("rnn", {}), "cell": {
      k: v for k, v in c.get("rnn", {}).get("cell", {}).items() if k != "precision"}}}
  return drop(summary["config"]) == drop(want) and training.has_checkpoint(workdir)


# == Sequence classification (--task=classify|imdb, --mode=predict) ===============================


def _run_flags() -> dict:
  """This file's flags and their values, recorded in the run's summary."""
  return {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}


def _classify_config():
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
  data = _given(*own)
  fields = _given(*(set(_TRAINING_FLAGS) - {"steps"}), "pooling", "dropout", "embed_dropout",
                  "bigram_buckets", "epochs", "ensemble")
  if (rates := _numbers("learning_rate", float)) is not None:
    fields["learning_rates"] = rates
  return _configured(lambda: dataclasses.replace(
      base, data=dataclasses.replace(base.data, **data), rnn=_rnn(base.rnn, FLAGS.embed_size),
      **fields))


def _run_classification(workdir: str) -> int:
  from jaxgru import training
  from jaxgru.tasks import classify
  from jaxgru.tasks.classify import imdb
  if FLAGS.mode == "add":
    raise UsageError(f"--mode=add is for --task=addition, not --task={FLAGS.task}")
  if FLAGS.mode == "predict":
    if FLAGS.text is None or not FLAGS.text.strip():
      raise UsageError("--mode=predict needs a non-empty --text=\"...\" to classify")
    if not training.has_checkpoint(workdir):
      raise UsageError(f"--mode=predict needs a trained IMDB model in --workdir={workdir}; train "
                       f"one with `python run.py --task=imdb --data_path=PATH "
                       f"--workdir={workdir}` first")
    _stored_run(workdir, tuple(classify.SOURCES), "IMDB")
    probability = float(_loaded(classify.predict, workdir, [FLAGS.text])[0])
    logging.info("probability that the review is positive: %.4f", probability)
    print(f"{probability:.6f}")
    return 0
  if FLAGS.text is not None:
    raise UsageError("--text is for --mode=predict")
  cfg = _classify_config()
  if FLAGS.mode == "eval":
    _stored_run(workdir, tuple(classify.SOURCES), "classification")
    result = _loaded(classify.evaluate_trained, workdir, getattr(cfg.data, "data_path", None))
    print(f"test accuracy {result['accuracy']:.4f} on {result['size']} examples")
    return 0
  try:
    s = classify.train_and_evaluate(cfg, workdir, log=logging.info, flags=_run_flags())
  except (imdb.DataError, training.CheckpointError) as e:
    raise UsageError(str(e)) from None
  print(f"test accuracy {s['test_accuracy']:.4f} on {s['test_size']} examples "
        f"(train {s['train_seconds']:.0f}s, wall {s['wall_seconds']:.0f}s); "
        f"summary in {os.path.join(workdir, 'summary.json')}")
  return 0


# == end of sequence classification ================================================================


def _maybe_initialize_distributed() -> None:
  """Joins a multi-host job when asked to; JAX's own runtime does the rest."""
  address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (address or FLAGS.distributed):
    given = [f"--{n}" for n in ("num_processes", "process_id") if getattr(FLAGS, n) is not None]
    if given:  # a multi-host job meant, and this process would train alone
      verb = "joins" if len(given) == 1 else "join"
      raise UsageError(f"{' and '.join(given)} {verb} a multi-host job: give "
                       "--coordinator_address (or JAX_COORDINATOR_ADDRESS), or --distributed")
    return
  import jax

  def env_int(flag, name):
    value = flag if flag is not None else os.environ.get(name)
    if value is None:
      return None
    if not re.fullmatch(r"[0-9]+", str(value)):
      raise UsageError(f"--{name.lower()[4:]} (env {name}) must be an integer >= 0, got {value!r}")
    return int(value)
  num_processes = env_int(FLAGS.num_processes, "JAX_NUM_PROCESSES")
  process_id = env_int(FLAGS.process_id, "JAX_PROCESS_ID")
  if address and not FLAGS.distributed and (num_processes is None or process_id is None):
    raise UsageError("--coordinator_address needs --num_processes and --process_id (or "
                     "JAX_NUM_PROCESSES and JAX_PROCESS_ID); --distributed lets JAX detect them")
  if num_processes is not None and (num_processes < 1 or (process_id is not None
                                                          and process_id >= num_processes)):
    raise UsageError(f"--process_id must lie in [0, --num_processes), got {process_id} of "
                     f"{num_processes}")
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  except (RuntimeError, ValueError) as e:
    raise UsageError(f"joining the multi-host job failed: {_first_line(e)}") from None
  logging.info("process %d of %d; %d devices in all", jax.process_index(), jax.process_count(),
               jax.device_count())


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def _check_workdir(workdir: str) -> None:
  """Refuses a --workdir that is not a folder, or (for training) one that cannot be made or
  written to; the probe leaves the file system as it was."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir={workdir} exists and is not a directory")
  if FLAGS.mode != "train":
    return
  if os.path.isdir(workdir):
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise UsageError(f"--workdir={workdir} is not writable")
    return
  made, path = [], os.path.abspath(workdir)
  while not os.path.exists(path):
    made.append(path)
    path = os.path.dirname(path)
  try:
    for p in reversed(made):
      os.mkdir(p)
  except OSError as e:
    raise UsageError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from None
  finally:
    for p in made:
      try:
        os.rmdir(p)
      except OSError:
        pass


# Set once _main has the run's outcome in hand (its one line is being printed, the process is
# exiting): a SIGTERM or SIGINT from then on is ignored, so that a second signal cannot break
# into the report or into the interpreter's exit as a traceback.
_ending = False


def _raise_interrupt(signum, frame):
  """SIGTERM or SIGINT outside the training loop (compiling, evaluating, reading data) stops the
  run; while a checkpoint is written it is put off until the save is done (a signal then never
  goes missing), and once the run is ending it is ignored. Where Python would drop the
  exception (a signal handled inside JAX's garbage-collector callback, which a signal during
  compiling can hit), it is raised at the next instruction outside."""
  from jaxgru.training.checkpoints import defer_signal, saving
  from jaxgru.training.metrics import raise_where_it_propagates
  if _ending:
    return
  if saving():  # raised again once the save is done, so that it is not lost
    defer_signal(signum)
    return
  raise_where_it_propagates(signum, frame, KeyboardInterrupt(f"signal {signum}"))


def main(argv):
  tuned = malloc.tune_malloc(FLAGS.mallopt)  # before JAX allocates anything
  logging.debug("malloc: %s (%s)", "thresholds raised" if tuned["applied"] else "as it is",
               tuned["reason"])
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _raise_interrupt)
  if FLAGS.workdir is not None and not FLAGS.workdir.strip():  # --workdir=$UNSET, most likely
    raise UsageError("--workdir is empty; leave it out for runs/<task>, or name a folder")
  if FLAGS.mode == "predict" and FLAGS.task == "addition":  # predict needs no --task=imdb
    workdir = FLAGS.workdir or os.path.join("runs", "imdb")
  else:
    workdir = FLAGS.workdir or os.path.join("runs", FLAGS.task)
  _check_workdir(workdir)
  import jax
  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  _maybe_initialize_distributed()
  try:
    jax.devices()
  except RuntimeError as e:
    raise UsageError(f"--platform={FLAGS.platform or os.environ.get('JAX_PLATFORMS', '')}: no "
                     f"such device here ({_first_line(e)[:160]})") from None
  if FLAGS.mode == "predict" and FLAGS.task == "addition":
    return _run_classification(workdir)
  if FLAGS.task == "rl":
    try:
      return cli.rl.run(FLAGS.mode, workdir)
    except cli.rl.UsageError as e:
      raise UsageError(str(e)) from None
  if FLAGS.task == "addition":
    return _run_addition(workdir)
  return _run_classification(workdir)


def _parse_flags(argv):
  sys.set_int_max_str_digits(0)  # integer flags of any length parse (and fail) as values
  for arg in argv[1:]:
    # Python's int() and float() read any script's digits ("١٢٣", "１２３"); a flag takes ASCII.
    name, eq, value = arg.lstrip("-").partition("=")
    if eq and name in FLAGS and not value.isascii() and isinstance(
        FLAGS[name].parser, (flags.IntegerParser, flags.FloatParser, flags.ListParser)):
      print(f"run.py: error: --{name} takes ASCII digits, got {value[:40]!r}", file=sys.stderr)
      sys.exit(2)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"run.py: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _main(argv):
  global _ending
  from jaxgru import training
  try:
    status = main(argv)
  except BaseException as e:  # noqa: BLE001  (anything not reported below is re-raised)
    _ending = True  # first, before any call: a signal that is pending now is ignored
    status = _report(e, training)
    if status is None:
      raise
  _ending = True
  if status == 130:
    # Stopped by a signal: leave at once. A signal can stop JAX half-way through compiling, and
    # the interpreter's teardown then crashes (SIGSEGV) in XLA's destructors; the checkpoint and
    # the run's files are written and closed by now, and nothing else needs the teardown.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def _report(e: BaseException, training) -> int | None:
  """Prints the one line for how ``main`` ended with ``e``; returns the exit status (None: not a
  user-facing outcome, re-raised)."""
  if isinstance(e, (UsageError, training.ConfigMismatch, training.CheckpointError)):
    print(f"run.py: error: {_one_line(e)}", file=sys.stderr)
    return 2
  if isinstance(e, training.Diverged):
    print(f"run.py: {e}", file=sys.stderr)
    return 1
  if isinstance(e, training.Interrupted):
    print(f"run.py: {e}", file=sys.stderr)
    return 130
  if isinstance(e, KeyboardInterrupt):
    print("run.py: interrupted; a training run resumes from its last checkpoint when run again",
          file=sys.stderr)
    return 130
  return None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _quiet_libraries(record) -> bool:
  """Keeps libraries' INFO lines (orbax's per-save lines, JAX's backend probing) out of the job's
  log; their warnings and errors still show."""
  return (record.levelno >= logging.converter.STANDARD_WARNING
          or "site-packages" not in record.pathname)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  app.run(_main, flags_parser=_parse_flags)
