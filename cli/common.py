"""The flags every task of run.py shares, and the helpers that turn flags into a task's config.

Choices and cell defaults come from the library; every setting left unset (None) takes the task
config's default, and the configs validate the values (their ValueErrors become usage errors).
Only the parsing of list flags is checked here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from absl import flags, logging

from jaxgru import ACTIVATIONS, GRUConfig
from jaxgru.cell import PRECISIONS, VARIANTS, field_default
from jaxgru.training import OPTIMIZERS, SCHEDULES, distributed

MODES = ("train", "add", "eval", "predict")

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "train", MODES,
                  "train (resumes from --workdir), add (addition: --a + --b), eval, "
                  "predict (imdb: --text).")
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (default runs/<task>).")
flags.DEFINE_integer("hidden_size", None, "GRU state size (task default if unset).")
flags.DEFINE_integer("num_layers", None, "Stacked GRU layers (task default if unset).")
flags.DEFINE_boolean("bidirectional", None,
                     "Classifier: bidirectional GRU (task default if unset).")
flags.DEFINE_enum("variant", field_default(GRUConfig, "variant"), VARIANTS, "GRU variant.")
flags.DEFINE_enum("activation", field_default(GRUConfig, "activation"), sorted(ACTIVATIONS),
                  "Candidate activation.")
flags.DEFINE_enum("recurrent_activation", field_default(GRUConfig, "recurrent_activation"),
                  sorted(ACTIVATIONS), "Gate activation.")
flags.DEFINE_integer("batch_size", None, "Examples per step (task default if unset).")
flags.DEFINE_integer("steps", None, "Maximum training steps (task default if unset).")
flags.DEFINE_enum("optimizer", None, OPTIMIZERS, "Optimizer (task default if unset).")
flags.DEFINE_list("learning_rate", None,
                  "Peak learning rate; a comma list cycles over --num_models models.")
flags.DEFINE_enum("schedule", None, SCHEDULES, "Learning-rate schedule (task default if unset).")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps (task default if unset).")
flags.DEFINE_float("clip_norm", None, "Global-norm gradient clipping (0 disables).")
flags.DEFINE_float("weight_decay", None, "adamw: decoupled weight decay.")
flags.DEFINE_integer("seed", 0, "Random seed; model i of --num_models uses seed + i.")
flags.DEFINE_integer("num_models", None, "Independent models trained at once (vmap).")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_integer("log_every", None, "Steps between metric fetches, logs and evaluations "
                     "(each one a line of metrics.jsonl; on a terminal, one progress line shows "
                     "them, and --verbosity=1 prints a log line each as well).")
flags.DEFINE_enum("platform", None, ("cpu", "gpu", "tpu"),
                  "JAX platform (default: what JAX finds).")
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
flags.DEFINE_integer("initialization_timeout", distributed.INITIALIZATION_TIMEOUT,
                     "Multi-host: seconds to wait for every process to join (exit 2 after).")
flags.DEFINE_integer("heartbeat_timeout", distributed.HEARTBEAT_TIMEOUT,
                     "Multi-host: seconds without a heartbeat after which a process counts as "
                     "dead; the others then exit 1 with one line.")

# Flags that map one to one onto a field of a task's config, when given.
TRAINING_FLAGS = ("batch_size", "steps", "optimizer", "schedule", "warmup_steps", "clip_norm",
                  "weight_decay", "seed", "num_models", "checkpoint_every", "log_every")


class UsageError(Exception):
  """A user mistake: reported in one line with exit status 2."""


def numbers(name: str, kind: type) -> tuple | None:
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


def given(*names: str) -> dict:
  """The flags among ``names`` that were set (unset ones, and config fields with no flag, take
  the config's default)."""
  return {k: getattr(FLAGS, k) for k in names if getattr(FLAGS, k, None) is not None}


def configured(build):
  """``build()``, with the configs' ValueErrors turned into usage errors; then the memory the
  run would need is compared with the machine's (before anything is allocated or written)."""
  try:
    cfg = build()
  except ValueError as e:
    raise UsageError(f"invalid settings: {e}") from None
  fits(cfg)
  return cfg


def fits(cfg) -> None:
  """Refuses, as a usage error naming the flag, a config that cannot fit in memory."""
  from jaxgru.tasks import common
  try:
    common.check_fits(cfg.memory_needs())
  except common.TooBig as e:
    raise UsageError(f"--{e}") from None


def rnn(base, input_size: int | None = None):
  """``base`` (an RNNConfig) with the cell and stack flags applied."""
  # The precision is recorded as given: float64 parameters (JAX's x64 mode is on), float32 ones,
  # or float32 ones with bfloat16 matrix products.
  cell = dict(variant=FLAGS.variant, activation=FLAGS.activation,
              recurrent_activation=FLAGS.recurrent_activation,
              param_dtype="float64" if FLAGS.dtype == "float64" else "float32",
              dtype="bfloat16" if FLAGS.dtype == "bfloat16" else None,
              precision=FLAGS.matmul_precision, **given("hidden_size"))
  if input_size is not None:
    cell["input_size"] = input_size
  return dataclasses.replace(base, cell=dataclasses.replace(base.cell, **cell),
                             **given("num_layers", "bidirectional"))


def _precision(rnn_json: dict) -> str:
  """The --dtype a run was made with, from its stored stack settings."""
  cell = rnn_json.get("cell", {})
  if cell.get("dtype") == "bfloat16":
    return "bfloat16"
  return "float64" if cell.get("param_dtype") == "float64" else "float32"


def stored_run(workdir: str, tasks: tuple, what: str) -> dict:
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


def loaded(load, *args):
  """``load(*args)`` (a task's load_trained and the like), its errors as usage errors."""
  from jaxgru import training
  try:
    return load(*args)
  except (OSError, ValueError, TypeError, KeyError, training.CheckpointError) as e:
    raise UsageError(str(e)) from None


def run_flags(task_module) -> dict:
  """The run's flags and their values, recorded in its summary: run.py's, the shared ones here,
  and those of ``task_module`` (the task's cli module)."""
  names = {FLAGS.find_module_defining_flag("task"), __name__, task_module.__name__}
  return {f.name: f.value for module, defined in FLAGS.flags_by_module_dict().items()
          if module in names for f in defined}


def progress():
  """How training shows its log intervals on the console (the verbosity handling): a line
  redrawn in place when stderr is a terminal, else a log line per interval, as with
  --verbosity=1 (absl's flag; debug logging) on a terminal too. Every interval is in
  metrics.jsonl either way."""
  from jaxgru import training
  return training.Progress(logging.info, sys.stderr, bar=False if FLAGS.verbosity >= 1 else None)


def first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def initialize_distributed() -> None:
  """Joins a multi-host job when asked to; JAX's own runtime does the rest."""
  address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not (address or FLAGS.distributed):
    named = [f"--{n}" for n in ("num_processes", "process_id") if getattr(FLAGS, n) is not None]
    if named:  # a multi-host job meant, and this process would train alone
      verb = "joins" if len(named) == 1 else "join"
      raise UsageError(f"{' and '.join(named)} {verb} a multi-host job: give "
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
  for name in ("initialization_timeout", "heartbeat_timeout"):
    if getattr(FLAGS, name) < 1:
      raise UsageError(f"--{name} must be a positive number of seconds, got {getattr(FLAGS, name)}")
  try:
    distributed.initialize(address, num_processes, process_id,
                           initialization_timeout=FLAGS.initialization_timeout,
                           heartbeat_timeout=FLAGS.heartbeat_timeout)
  except (RuntimeError, ValueError) as e:
    raise UsageError(f"joining the multi-host job failed: {first_line(e)}") from None
  logging.info("process %d of %d; %d devices in all", jax.process_index(), jax.process_count(),
               jax.device_count())
  if jax.process_index() != 0:  # every process computes; process 0 alone logs and prints
    logging.set_verbosity(logging.WARNING)
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with


def joins_job() -> bool:
  """Whether this run is one process of a multi-host job (flags or JAX's environment)."""
  return bool(FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
              or FLAGS.distributed)


def supervise_job(script: str) -> int | None:
  """Runs ``script`` again with the flags as parsed, in a child that JAX's runtime may abort (a
  dead peer, no coordinator), and returns its exit status; None inside that child."""
  if not joins_job() or os.environ.get(distributed.CHILD_ENV):
    return None
  present = {id(f): f for fs in FLAGS.flags_by_module_dict().values() for f in fs if f.present}
  argv = [os.path.abspath(script), *(f.serialize() for f in present.values())]
  return distributed.supervise(
      argv, os.path.basename(script),
      FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
      FLAGS.initialization_timeout, FLAGS.heartbeat_timeout)


def check_workdir(workdir: str) -> None:
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
