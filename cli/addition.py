"""``--task=addition``: its flags, its config, and ``run(mode, workdir)`` (train, add, eval)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys

from absl import flags, logging

from cli import common
from cli.common import FLAGS, UsageError

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
flags.DEFINE_string("a", None, "--mode=add: first non-negative integer (any number of digits).")
flags.DEFINE_string("b", None, "--mode=add: second non-negative integer.")


def config():
  """Maps the flags onto an ``AdditionConfig``; unset flags keep the task's defaults."""
  from jaxgru.tasks import addition
  base = addition.AdditionConfig()
  fields = common.given(*common.TRAINING_FLAGS, "bits", "consolidate_steps", "consolidate_bits",
                        "consolidate_mixed", "consolidate_batch_size")
  for name, key, kind in (("learning_rate", "learning_rates", float),
                          ("eval_bits", "eval_bits", int)):
    if (values := common.numbers(name, kind)) is not None:
      fields[key] = values
  return common.configured(lambda: dataclasses.replace(base, rnn=common.rnn(base.rnn), **fields))


def run(mode: str, workdir: str) -> int:
  """``--mode=train`` (or show the finished run), ``add`` or ``eval``; returns the exit status."""
  from jaxgru import training
  from jaxgru.tasks import addition
  if mode == "add":
    a, b = _non_negative_int("a", FLAGS.a), _non_negative_int("b", FLAGS.b)
    if not training.has_checkpoint(workdir):
      raise UsageError(f"--mode=add needs a trained model in --workdir={workdir}; train one with "
                       f"`python run.py --workdir={workdir}` first")
    common.stored_run(workdir, (addition.TASK,), "addition")
    return 0 if _show(workdir, a, b) else 1
  if mode == "eval":
    return _evaluate(workdir)
  if mode == "predict":
    raise UsageError("--mode=predict is for --task=imdb; use --mode=add for addition")
  cfg = config()
  # Before showing a finished run too: one made with other settings is not what was asked for.
  training.check_resume(workdir, {"task": "addition", "config": cfg.to_json()},
                        addition.RESUMABLE_CHANGES)
  if _finished(workdir, cfg.to_json()):
    logging.info("a finished run with these settings is in %s; showing it (delete the folder, or "
                 "ask for more --steps, to train again)", workdir)
  else:
    s = addition.train_and_evaluate(cfg, workdir, log=logging.info, progress=common.progress(),
                                    flags=common.run_flags(sys.modules[__name__]))
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
  _show(workdir, rng.getrandbits(1000), rng.getrandbits(1000))
  return 0


def _evaluate(workdir: str) -> int:
  """``--mode=eval``: exact match of the stored run at its bits and --eval_bits."""
  import numpy as np
  from jaxgru.tasks import addition
  meta = common.stored_run(workdir, (addition.TASK,), "addition")
  stored = common.loaded(addition.AdditionConfig.from_json, meta["config"])
  eval_bits = common.numbers("eval_bits", int)
  if eval_bits is not None:
    stored = common.configured(lambda: dataclasses.replace(stored, eval_bits=eval_bits))
  common.fits(stored)
  cfg, state, _ = common.loaded(addition.load_trained, workdir)
  for bits in (cfg.bits,) + stored.eval_bits:
    size = cfg.long_eval_size if bits > 256 else cfg.eval_size
    exact = addition.make_evaluate(cfg, bits, size, log=logging.info)(state.params)
    print(f"{bits} bits: exact-match {np.mean(exact):.4f} over {size} problems "
          f"x {cfg.num_models} model(s)")
  return 0


def _non_negative_int(name: str, value: str | None) -> int:
  if value is None:
    raise UsageError(f"--mode=add needs --{name}=INT")
  if not re.fullmatch(r"[ \t]*\+?[0-9]+[ \t]*", value):  # ASCII digits only, any number
    raise UsageError(f"--{name} must be a non-negative integer in ASCII digits, got "
                     f"{value[:40]!r}{'...' if len(value) > 40 else ''}")
  sys.set_int_max_str_digits(0)
  return int(value)


def _show(workdir: str, a: int, b: int) -> bool:
  """Prints ``a + b`` as the trained run's best model computes it; whether it is exact."""
  import jax
  from jaxgru.tasks import addition
  cfg, state, steps_to_solve = common.loaded(addition.load_trained, workdir)
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


def _finished(workdir: str, config: dict) -> bool:
  """Whether ``workdir`` holds a finished run of exactly ``config`` (its summary records the same
  settings, steps included): then there is nothing to train, only the run to show."""
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
