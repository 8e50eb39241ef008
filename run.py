"""jaxgru's main job: train, evaluate and use GRU models from the command line.

  python run.py                                   # learn binary addition, then add two big numbers
  python run.py --mode=add --a=123 --b=456        # add with the trained model (exit 0 iff exact)
  python run.py --num_models=64                   # 64 independent models in one compiled program
  python run.py --task=imdb --data_path=aclImdb_labeled.tar.gz
  python run.py --mode=predict --workdir=runs/imdb --text="A wonderful film."

Only this file reads flags; it turns them into a task config and calls the library. Usage errors
print one line and exit with status 2.
"""

from __future__ import annotations

import os
import random
import re
import sys

from absl import app, flags, logging

TASKS = ("addition", "classify", "imdb")
MODES = ("train", "add", "eval", "predict")

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "addition", TASKS, "What to learn.")
flags.DEFINE_enum("mode", "train", MODES,
                  "train (resumes from --workdir), add (addition: --a + --b), eval, "
                  "predict (imdb: --text).")
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default runs/<task>).")
flags.DEFINE_integer("hidden_size", None, "GRU state size (task default if unset).")
flags.DEFINE_integer("num_layers", None, "Stacked GRU layers (task default if unset).")
flags.DEFINE_enum("variant", "reset_after", ("reset_after", "reset_before"), "GRU variant.")
flags.DEFINE_string("activation", "tanh", "Candidate activation (tanh, relu, gelu, ...).")
flags.DEFINE_string("recurrent_activation", "sigmoid", "Gate activation (sigmoid, hard_sigmoid).")
flags.DEFINE_integer("bits", 8, "Addition: bits per operand during training.")
flags.DEFINE_integer("consolidate_steps", None,
                     "Addition: steps on longer problems after solving (0 skips; default 2400).")
flags.DEFINE_integer("consolidate_bits", None, "Addition: bits of those problems (default 64).")
flags.DEFINE_integer("consolidate_batch_size", None,
                     "Addition: problems per consolidation step (default 128).")
flags.DEFINE_float("consolidate_mixed", None,
                   "Addition: fraction of those problems made with long carry chains "
                   "(default 0.5).")
flags.DEFINE_list("eval_bits", ["16", "64", "256", "1024", "10000"],
                  "Addition: operand lengths for the length-generalization evaluation.")
flags.DEFINE_integer("batch_size", None, "Examples per step (task default if unset).")
flags.DEFINE_integer("steps", None, "Maximum training steps (task default if unset).")
flags.DEFINE_enum("optimizer", "adam", ("adam", "adamw", "sgd", "rmsprop"), "Optimizer.")
flags.DEFINE_list("learning_rate", None,
                  "Peak learning rate; a comma list cycles over --num_models models.")
flags.DEFINE_enum("schedule", "constant", ("constant", "cosine"), "Learning-rate schedule.")
flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.")
flags.DEFINE_float("clip_norm", None, "Global-norm gradient clipping (0 disables).")
flags.DEFINE_integer("seed", 0, "Random seed; model i of --num_models uses seed + i.")
flags.DEFINE_integer("num_models", 1, "Independent models trained at once (vmap).")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", None, "Steps between metric fetches, logs and evaluations.")
flags.DEFINE_enum("platform", None, ("cpu", "gpu", "tpu"), "JAX platform (default: what JAX finds).")
flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16", "float64"),
                  "Compute dtype of the matrix products (float64 turns on JAX's x64 mode).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (default: env JAX_COORDINATOR_ADDRESS); "
                    "set, run.py calls jax.distributed.initialize().")
flags.DEFINE_integer("num_processes", None, "Multi-host: processes in all (env JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process, 0..N-1 (env JAX_PROCESS_ID).")
flags.DEFINE_boolean("distributed", False, "Multi-host: call jax.distributed.initialize() and let "
                     "JAX detect the cluster (Cloud TPU, SLURM, Open MPI).")
flags.DEFINE_string("a", None, "--mode=add: first non-negative integer (any number of digits).")
flags.DEFINE_string("b", None, "--mode=add: second non-negative integer.")

_POSITIVE = ("hidden_size", "num_layers", "bits", "batch_size", "consolidate_batch_size",
             "steps", "num_models",
             "checkpoint_every", "log_every")
for _name in _POSITIVE:
  flags.register_validator(_name, lambda v: v is None or v >= 1,
                           message=f"--{_name} must be a positive integer")
flags.register_validator("consolidate_steps", lambda v: v is None or v >= 0,
                         message="--consolidate_steps must be >= 0")
flags.register_validator("consolidate_bits", lambda v: v is None or v >= 1,
                         message="--consolidate_bits must be a positive integer")
flags.register_validator("consolidate_mixed", lambda v: v is None or 0.0 <= v <= 1.0,
                         message="--consolidate_mixed must be a fraction in [0, 1]")
flags.register_validator("eval_bits", lambda v: all(re.fullmatch(r"[1-9]\d*", s) for s in v),
                         message="--eval_bits must be a comma list of positive integers")
flags.register_validator(
    "learning_rate",
    lambda v: v is None or all(re.fullmatch(r"\d*\.?\d+(e-?\d+)?", s) and float(s) > 0 for s in v),
    message="--learning_rate must be a positive number or a comma list of them")
flags.register_validator("clip_norm", lambda v: v is None or v >= 0,
                         message="--clip_norm must be >= 0")
flags.register_validator("warmup_steps", lambda v: v >= 0, message="--warmup_steps must be >= 0")
flags.register_validator("seed", lambda v: v >= 0, message="--seed must be >= 0")

# == Sequence classification flags (--task=classify|imdb) ==========================================
flags.DEFINE_string("data_path", None,
                    "imdb: the aclImdb folder (or its parent), or the aclImdb_v1.tar.gz archive.")
flags.DEFINE_string("text", None, "--mode=predict: the review to classify.")
flags.DEFINE_integer("vocab_size", None, "imdb: ids in the vocabulary, including padding and "
                     "out-of-vocabulary (the most frequent training words fill the rest).")
flags.DEFINE_integer("max_length", None, "imdb: words kept per review (longer ones are cut).")
flags.DEFINE_enum("truncate", None, ("head", "tail", "head_tail"),
                  "imdb: which --max_length words of a longer review to keep: the first, the "
                  "last, or the first quarter and the last three quarters.")
flags.DEFINE_integer("embed_size", None, "imdb: embedding size.")
flags.DEFINE_integer("bigram_buckets", None, "imdb: rows of the hashed word-pair embedding (a "
                     "power of two; 0 = words only).")
flags.DEFINE_boolean("ensemble", None, "Classifier: score the --num_models models by their "
                     "averaged probabilities (task default if unset).")
flags.DEFINE_boolean("bidirectional", None, "Classifier: bidirectional GRU (task default if unset).")
flags.DEFINE_enum("pooling", None, ("last", "mean", "max", "mean_max"),
                  "Classifier: how the GRU outputs become one vector per sequence.")
flags.DEFINE_float("dropout", None, "Classifier: dropout before the dense head.")
flags.DEFINE_float("embed_dropout", None, "imdb: dropout on the embedded words.")
flags.DEFINE_float("weight_decay", None, "adamw: decoupled weight decay.")
flags.DEFINE_integer("epochs", None, "Classifier: passes over the training data.")
flags.DEFINE_integer("subset", None, "imdb: use this many reviews per split (class-balanced); "
                     "0 = all of them.")
flags.DEFINE_integer("train_size", None, "classify: synthetic training sequences.")
flags.DEFINE_boolean("random_labels", False, "classify: coin-flip labels, as the tutorial's dummy "
                     "data (held-out accuracy must stay near 0.5).")

for _name in ("vocab_size", "max_length", "embed_size", "epochs", "train_size"):
  flags.register_validator(_name, lambda v: v is None or v >= 1,
                           message=f"--{_name} must be a positive integer")
flags.register_validator("vocab_size", lambda v: v is None or v >= 3,
                         message="--vocab_size must be at least 3 (padding, unknown, one word)")
for _name in ("dropout", "embed_dropout"):
  flags.register_validator(_name, lambda v: v is None or 0 <= v < 1,
                           message=f"--{_name} must lie in [0, 1)")
flags.register_validator("weight_decay", lambda v: v is None or v >= 0,
                         message="--weight_decay must be >= 0")
flags.register_validator("subset", lambda v: v is None or v >= 0,
                         message="--subset must be >= 0")
flags.register_validator("bigram_buckets", lambda v: v is None or v == 0 or (
    2 <= v <= 2**31 and v & (v - 1) == 0), message="--bigram_buckets must be 0 or a power of two")
# == end of sequence classification flags ==========================================================


class UsageError(Exception):
  """A user mistake: reported in one line with exit status 2."""


def _check_activation(name: str, value: str) -> None:
  from jaxgru import ACTIVATIONS
  if value not in ACTIVATIONS:
    raise UsageError(f"--{name}={value!r} is not one of {', '.join(sorted(ACTIVATIONS))}")


def _non_negative_int(name: str, value: str | None) -> int:
  if value is None:
    raise UsageError(f"--mode=add needs --{name}=INT")
  if not re.fullmatch(r"\s*\+?\d+\s*", value):
    raise UsageError(f"--{name} must be a non-negative integer, got {value!r}")
  sys.set_int_max_str_digits(0)
  return int(value)


def _addition_config():
  from jaxgru.tasks import addition
  fields = dict(
      variant=FLAGS.variant, activation=FLAGS.activation,
      recurrent_activation=FLAGS.recurrent_activation, bits=FLAGS.bits,
      eval_bits=tuple(int(s) for s in FLAGS.eval_bits), optimizer=FLAGS.optimizer,
      schedule=FLAGS.schedule, warmup_steps=FLAGS.warmup_steps, seed=FLAGS.seed,
      num_models=FLAGS.num_models,
      dtype=None if FLAGS.dtype in ("float32", "float64") else FLAGS.dtype)
  for k in ("hidden_size", "num_layers", "batch_size", "steps", "checkpoint_every", "log_every",
            "clip_norm", "consolidate_steps", "consolidate_bits", "consolidate_mixed",
            "consolidate_batch_size"):
    if getattr(FLAGS, k) is not None:
      fields[k] = getattr(FLAGS, k)
  if FLAGS.learning_rate:
    fields["learning_rates"] = tuple(float(s) for s in FLAGS.learning_rate)
  return addition.AdditionConfig(**fields)


def _show_addition(workdir: str, a: int, b: int) -> bool:
  import jax
  from jaxgru.tasks import addition
  cfg, state, steps_to_solve = addition.load_trained(workdir)
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
  from jaxgru import train
  from jaxgru.tasks import addition
  if FLAGS.mode == "add":
    a, b = _non_negative_int("a", FLAGS.a), _non_negative_int("b", FLAGS.b)
    if not train.has_checkpoint(workdir):
      raise UsageError(f"--mode=add needs a trained model in --workdir={workdir}; train one with "
                       f"`python run.py --workdir={workdir}` first")
    return 0 if _show_addition(workdir, a, b) else 1
  if FLAGS.mode == "eval":
    if not train.has_checkpoint(workdir):
      raise UsageError(f"--mode=eval needs a trained model in --workdir={workdir}")
    import numpy as np
    cfg, state, _ = addition.load_trained(workdir)
    for bits in (cfg.bits,) + tuple(int(s) for s in FLAGS.eval_bits):
      size = cfg.long_eval_size if bits > 256 else cfg.eval_size
      exact = addition.make_evaluate(cfg, bits, size)(state.params)
      print(f"{bits} bits: exact-match {np.mean(exact):.4f} over {size} problems "
            f"x {cfg.num_models} model(s)")
    return 0
  if FLAGS.mode == "predict":
    raise UsageError("--mode=predict is for --task=imdb; use --mode=add for addition")
  cfg = _addition_config()
  # Before showing a finished run too: one made with other settings is not what was asked for.
  train.check_resume(workdir, {"task": "addition", "config": cfg.to_json()},
                     addition.RESUMABLE_CHANGES)
  summary_path = os.path.join(workdir, "summary.json")
  default_run = all(FLAGS[k].using_default_value for k in ("task", "mode"))
  if default_run and os.path.exists(summary_path) and train.has_checkpoint(workdir):
    logging.info("a finished run is in %s; showing it (delete the folder to train again)", workdir)
  else:
    summary = addition.train_and_evaluate(cfg, workdir, log=logging.info)
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


# == Sequence classification (--task=classify|imdb, --mode=predict) ===============================


def _classify_config(workdir: str):
  """Maps the flags onto a ``ClassifyConfig``; unset flags keep the task's measured defaults."""
  from jaxgru.tasks import classify
  del workdir
  if FLAGS.steps is not None:
    raise UsageError(f"--task={FLAGS.task} trains for --epochs, not --steps")
  if FLAGS.task == "imdb" and not FLAGS.data_path:
    raise UsageError("--task=imdb needs --data_path=PATH: the aclImdb folder or the "
                     "aclImdb_v1.tar.gz archive")
  if FLAGS.task == "classify" and FLAGS.data_path:
    raise UsageError("--task=classify makes its own data; --data_path is for --task=imdb")
  base = classify.ClassifyConfig() if FLAGS.task == "imdb" else classify.synthetic_defaults()
  overrides = {k: getattr(FLAGS, k) for k in (
      "data_path", "vocab_size", "max_length", "truncate", "embed_size", "bigram_buckets",
      "hidden_size", "num_layers", "bidirectional", "pooling", "dropout", "embed_dropout",
      "weight_decay", "batch_size", "epochs", "subset", "train_size", "checkpoint_every",
      "log_every", "clip_norm", "ensemble") if getattr(FLAGS, k) is not None}
  # Flags with a non-None default override the task default only when given.
  for k in ("optimizer", "schedule", "warmup_steps", "variant", "num_models"):
    if not FLAGS[k].using_default_value:
      overrides[k] = getattr(FLAGS, k)
  if FLAGS.learning_rate:
    overrides["learning_rates"] = tuple(float(s) for s in FLAGS.learning_rate)
  overrides.update(
      task=FLAGS.task, activation=FLAGS.activation, seed=FLAGS.seed,
      recurrent_activation=FLAGS.recurrent_activation, random_labels=FLAGS.random_labels,
      dtype=None if FLAGS.dtype in ("float32", "float64") else FLAGS.dtype)
  try:
    return classify.ClassifyConfig(**{**base.to_json(), **overrides})
  except ValueError as e:
    raise UsageError(str(e)) from None


def _run_classification(workdir: str) -> int:
  from jaxgru import train
  from jaxgru.tasks import classify, imdb
  if FLAGS.mode == "add":
    raise UsageError(f"--mode=add is for --task=addition, not --task={FLAGS.task}")
  if FLAGS.mode == "predict":
    if FLAGS.text is None or not FLAGS.text.strip():
      raise UsageError("--mode=predict needs a non-empty --text=\"...\" to classify")
    if not os.path.exists(os.path.join(workdir, "config.json")) or not train.has_checkpoint(workdir):
      raise UsageError(f"--mode=predict needs a trained IMDB model in --workdir={workdir}; train "
                       f"one with `python run.py --task=imdb --data_path=PATH "
                       f"--workdir={workdir}` first")
    try:
      probability = float(classify.predict(workdir, [FLAGS.text])[0])
    except (imdb.DataError, ValueError) as e:
      raise UsageError(str(e)) from None
    logging.info("probability that the review is positive: %.4f", probability)
    print(f"{probability:.6f}")
    return 0
  if FLAGS.text is not None:
    raise UsageError("--text is for --mode=predict")
  cfg = _classify_config(workdir)
  if FLAGS.mode == "eval":
    if not train.has_checkpoint(workdir):
      raise UsageError(f"--mode=eval needs a trained model in --workdir={workdir}")
    try:
      result = classify.evaluate_trained(workdir, cfg.data_path)
    except (imdb.DataError, ValueError) as e:
      raise UsageError(str(e)) from None
    print(f"test accuracy {result['accuracy']:.4f} on {result['size']} examples")
    return 0
  run_flags = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
  try:
    s = classify.train_and_evaluate(cfg, workdir, log=logging.info, flags=run_flags)
  except imdb.DataError as e:
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
    return
  import jax

  def env_int(flag, name):
    value = flag if flag is not None else os.environ.get(name)
    return None if value is None else int(value)
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=env_int(FLAGS.num_processes, "JAX_NUM_PROCESSES"),
      process_id=env_int(FLAGS.process_id, "JAX_PROCESS_ID"))
  logging.info("process %d of %d; %d devices in all", jax.process_index(), jax.process_count(),
               jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.platform:
    import jax
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.dtype == "float64":
    import jax
    jax.config.update("jax_enable_x64", True)
  _maybe_initialize_distributed()
  _check_activation("activation", FLAGS.activation)
  _check_activation("recurrent_activation", FLAGS.recurrent_activation)
  if FLAGS.mode == "predict" and FLAGS.task == "addition":  # predict needs no --task=imdb
    return _run_classification(FLAGS.workdir or os.path.join("runs", "imdb"))
  workdir = FLAGS.workdir or os.path.join("runs", FLAGS.task)
  if FLAGS.task == "addition":
    return _run_addition(workdir)
  return _run_classification(workdir)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"run.py: error: {e}", file=sys.stderr)
    sys.exit(2)


def _main(argv):
  from jaxgru import train
  try:
    sys.exit(main(argv))
  except (UsageError, train.ConfigMismatch) as e:
    print(f"run.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.Diverged as e:
    print(f"run.py: {e}", file=sys.stderr)
    sys.exit(1)
  except train.Interrupted as e:
    print(f"run.py: {e}", file=sys.stderr)
    sys.exit(130)


def _quiet_libraries(record) -> bool:
  """Keeps libraries' INFO lines (orbax's per-save lines, JAX's backend probing) out of the job's
  log; their warnings and errors still show."""
  return (record.levelno >= logging.converter.STANDARD_WARNING
          or "site-packages" not in record.pathname)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  app.run(_main, flags_parser=_parse_flags)
