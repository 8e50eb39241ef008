"""Compares ways to consolidate solved addition models, from the same solved starting point.

Phase 1 (solving at ``--bits``, early stop) runs once for ``--num_models`` seeds from ``--seed``
with the library's defaults. Each variant then continues from those solved parameters with a
fresh Adam state and a cosine decay, and is scored like the target of the addition issue: how
many models are exact on ALL of ``--eval_size`` random problems at each of ``--eval_bits``.
The held-out problems come from ``--eval_seed``, which neither phase trains on.

  python -m benchmarks.addition_consolidation --seed=100 \\
      --variants=uniform_400,mixed_400,mixed_1200,mixed_2400,mixed_2400_b128

A variant is ``<data>_<steps>`` with data ``uniform`` (every bit uniform, the old default),
``mixed`` (half of each batch with long carry chains, ``consolidate_mixed=0.5``) or ``chains``
(all of it), and an optional ``_b<batch>`` (default 64) or ``_lr<scale>`` suffix. The results go to
``<out_dir>/addition_consolidation_seed<seed>.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time

from absl import flags, logging

from benchmarks import _common

ROOT = _common.ROOT

flags.DEFINE_integer("seed", 100, "First seed of phase 1 (seeds seed .. seed+num_models-1).")
flags.DEFINE_integer("num_models", 64, "Models trained at once.")
flags.DEFINE_list("variants", ["uniform_400", "mixed_400", "mixed_1200", "mixed_2400",
                                "mixed_2400_b128"],
                  "Consolidation variants, <uniform|mixed|chains>_<steps>[_b<batch>][_lr<x>].")
flags.DEFINE_list("eval_bits", ["1024", "10000"], "Lengths to score.")
flags.DEFINE_integer("eval_size", 1000, "Problems per length.")
flags.DEFINE_integer("eval_seed", 777, "Seed of the held-out problems.")
flags.DEFINE_string("out_dir", os.path.join(ROOT, "benchmarks", "results"), "Output folder.")
FLAGS = flags.FLAGS

_VARIANT = re.compile(r"(uniform|mixed|chains)_(\d+)((?:_b\d+|_lr[\d.]+)*)")
_MIXED = {"uniform": 0.0, "mixed": 0.5, "chains": 1.0}


def parse_variant(text: str) -> dict:
  m = _VARIANT.fullmatch(text)
  if not m:
    raise _common.UsageError(f"bad variant {text!r}: expected <uniform|mixed|chains>_<steps>"
                         "[_b<batch>][_lr<scale>]")
  out = {"consolidate_mixed": _MIXED[m.group(1)], "consolidate_steps": int(m.group(2)),
         "consolidate_batch_size": 64}
  for part in filter(None, m.group(3).split("_")):
    if part.startswith("b"):
      out["consolidate_batch_size"] = int(part[1:])
    else:
      out["consolidate_lr_scale"] = float(part[2:])
  return out


def consolidate(cfg, state):
  """Phase 2 of addition.train_and_evaluate, from ``state``, with cfg's consolidation fields."""
  import jax
  from jaxgru import training as _train
  from jaxgru.tasks import addition
  opt_cfg = addition.consolidate_optimizer_config(cfg)
  opt = _train.make_optimizer(opt_cfg)
  state = state._replace(opt_state=jax.vmap(opt.init)(state.params),
                         learning_rate=state.learning_rate * cfg.consolidate_lr_scale)
  step = addition.make_train_step(cfg, bits=cfg.consolidate_bits, optimizer=opt_cfg,
                                  mixed=cfg.consolidate_mixed,
                                  batch_size=cfg.consolidate_batch_size)
  for _ in range(cfg.consolidate_steps):
    state, _ = step(state)
  return jax.block_until_ready(state)


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  variants = {v: parse_variant(v) for v in FLAGS.variants}
  eval_bits = _common.ints(FLAGS.eval_bits, "eval_bits")
  _common.check_positive(num_models=FLAGS.num_models, eval_size=FLAGS.eval_size,
                         eval_bits=eval_bits)
  if FLAGS.seed < 0 or FLAGS.eval_seed < 0:
    raise _common.UsageError(f"--seed and --eval_seed must be >= 0, got {FLAGS.seed} and "
                             f"{FLAGS.eval_seed}")
  _common.check_writable(FLAGS.out_dir, "--out_dir", folder=True)
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  import jax
  import numpy as np
  from jaxgru.tasks import addition

  base = addition.AdditionConfig(num_models=FLAGS.num_models, seed=FLAGS.seed,
                                 consolidate_steps=0, eval_bits=())  # phase 1 alone
  t0 = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    summary = addition.train_and_evaluate(base, workdir, log=lambda m: None)
    _, solved_state, steps_to_solve = addition.load_trained(workdir)
  phase1_seconds = time.time() - t0
  solved = [i for i, s in enumerate(steps_to_solve) if s is not None]
  print(f"phase 1: {len(solved)} of {FLAGS.num_models} solved in {phase1_seconds:.0f} s "
        f"(median {summary['steps_to_solve_distribution'].get('median')} steps)", flush=True)
  evals = {b: addition.make_evaluate(dataclasses.replace(base, seed=FLAGS.eval_seed), b,
                                     FLAGS.eval_size) for b in eval_bits}
  records = []
  for name, fields in variants.items():
    cfg = dataclasses.replace(base, **fields)
    t0 = time.time()
    state = consolidate(cfg, solved_state)
    seconds = time.time() - t0
    record = {"variant": name, "fields": fields, "train_seconds": seconds}
    for bits, evaluate in evals.items():
      exact = evaluate(state.params)
      record[str(bits)] = {"exact_models": int(sum(exact[i] == 1.0 for i in solved)),
                           "mean_exact_match": float(np.mean(exact[solved])),
                           "failing_models": [i for i in solved if exact[i] < 1.0]}
    records.append(record)
    print(name, f"{seconds:.0f} s;", ", ".join(
        f"{b} bits: {record[str(b)]['exact_models']}/{len(solved)} exact"
        f" (failing {record[str(b)]['failing_models']})" for b in eval_bits), flush=True)

  result = {"seed": FLAGS.seed, "num_models": FLAGS.num_models, "solved": len(solved),
            "eval_size": FLAGS.eval_size, "eval_seed": FLAGS.eval_seed,
            "phase1_seconds": phase1_seconds, "device": str(jax.devices()[0]),
            "load_average": os.getloadavg(), "records": records}
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  stem = os.path.join(FLAGS.out_dir, f"addition_consolidation_seed{FLAGS.seed}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  lines = [f"# Consolidation variants, seeds {FLAGS.seed}..{FLAGS.seed + FLAGS.num_models - 1}",
           "", f"{len(solved)} of {FLAGS.num_models} models solved in phase 1; each variant "
           f"continues from the same solved parameters. Models exact on all {FLAGS.eval_size} "
           f"random problems (held-out seed {FLAGS.eval_seed}).", "",
           "| variant | train s | " + " | ".join(f"exact at {b} bits" for b in eval_bits) + " |",
           "|---|---|" + "---|" * len(eval_bits)]
  for r in records:
    lines.append(f"| {r['variant']} | {r['train_seconds']:.0f} | " + " | ".join(
        f"{r[str(b)]['exact_models']} / {len(solved)}" for b in eval_bits) + " |")
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
  _common.absl_main(main, "addition_consolidation.py")
