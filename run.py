"""jaxgru's main job: train, evaluate and use GRU models from the command line.

  python run.py                                   # learn binary addition, then add two big numbers
  python run.py --mode=add --a=123 --b=456        # add with the trained model (exit 0 iff exact)
  python run.py --num_models=64                   # 64 independent models in one compiled program
  python run.py --task=imdb --data_path=aclImdb_labeled.tar.gz
  python run.py --mode=predict --workdir=runs/imdb --text="A wonderful film."

Only the entry point reads flags: this file and the ``cli`` package beside it, where each task's
module (``cli/addition.py``, ``cli/classify.py``) defines its flags next to the config it builds
from them and runs the task through ``run(mode, workdir) -> int``; ``cli/common.py`` holds the
shared flags. A task is one import and one entry of :data:`TASKS`. Every mistake a user can make
(a bad value, a work directory that cannot be used or holds another run or only damaged
checkpoints, settings that cannot fit in this machine's memory, a platform that is not there)
prints one line and exits with status 2 before anything is written; Ctrl-C or SIGTERM prints one
line and exits with status 130 (a checkpoint is saved first while training).

While it trains, a terminal shows one progress line (steps, rate, time left, loss), then a
summary; every log interval is a line of ``metrics.jsonl`` in the work directory, and a log line
on the console only with ``--verbosity=1`` or when stderr is not a terminal.

First thing, ``main`` raises glibc's malloc thresholds for this process (``--nomallopt`` or
JAXGRU_NO_MALLOPT=1 leaves them as they are; see ``jaxgru/training/malloc.py``): XLA:CPU's
temporaries then stay in the heap instead of being mapped and unmapped at every step.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging

from cli import addition, classify, common, rl
from cli.common import FLAGS, UsageError
from jaxgru.tasks.classify import SOURCES as CLASSIFY_SOURCES
from jaxgru.training import malloc

# --task=NAME runs TASKS[NAME].run(mode, workdir), a module of the cli package.
TASKS = {"addition": addition, **{name: classify for name in CLASSIFY_SOURCES}, "rl": rl}

flags.DEFINE_enum("task", "addition", tuple(TASKS), "What to learn.")
flags.DEFINE_boolean("mallopt", True, "Raise glibc's malloc thresholds first thing (XLA:CPU's "
                     "temporaries stay in the heap rather than being mmapped at every step; "
                     "measured 1.74 -> 0.71 of the single-model cost for 64 models); "
                     "--nomallopt (or env JAXGRU_NO_MALLOPT=1) leaves malloc as it is.")
# `run.py --help` lists the flags of the cli modules too, not only --helpfull.
for _module in (common, *dict.fromkeys(TASKS.values())):
  flags.adopt_module_key_flags(_module)


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
  # A process of a multi-host job runs its work in a child, so that JAX's runtime aborting it
  # (a dead peer, no coordinator) ends in one line here (jaxgru/training/distributed.py).
  status = common.supervise_job(__file__)
  if status is not None:
    return status
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, _raise_interrupt)
  if FLAGS.workdir is not None and not FLAGS.workdir.strip():  # --workdir=$UNSET, most likely
    raise UsageError("--workdir is empty; leave it out for runs/<task>, or name a folder")
  # --mode=predict is imdb's, and needs no --task=imdb.
  task = "imdb" if FLAGS.mode == "predict" and FLAGS.task == "addition" else FLAGS.task
  workdir = FLAGS.workdir or os.path.join("runs", task)
  common.check_workdir(workdir)
  import jax
  if FLAGS.platform:
    jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  common.initialize_distributed()
  try:
    jax.devices()
  except RuntimeError as e:
    raise UsageError(f"--platform={FLAGS.platform or os.environ.get('JAX_PLATFORMS', '')}: no "
                     f"such device here ({common.first_line(e)[:160]})") from None
  return TASKS[task].run(FLAGS.mode, workdir)


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
