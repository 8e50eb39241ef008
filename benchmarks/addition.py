"""Measures the addition task's targets and writes them to benchmarks/results/.

1. Reliability: one ``--num_models`` run (64 seeds by default) of the default configuration in one
   compiled program: median steps-to-solve, the fraction solved within 500 steps, and exact-match
   of every solved model on ``--long_eval_size`` random problems at each of ``--eval_bits``.
2. Speed of the main job: ``python run.py`` with its defaults in a fresh process and workdir:
   compile seconds of the first step and wall seconds from the end of compilation to solved.

  python -m benchmarks.addition --part=reliability   # -> benchmarks/results/addition_reliability.*
  python -m benchmarks.addition --part=run_py        # -> benchmarks/results/addition_run_py.*

Each part writes ``<out_dir>/addition_<part>.json`` (every figure, device, library versions, git
revision, load average) and ``.md``. Run the timing part on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags, logging

from benchmarks import _common
from jaxgru.training import malloc as _malloc

ROOT = _common.ROOT

flags.DEFINE_integer("num_models", 64, "Seeds trained at once.")
flags.DEFINE_integer("steps", None, "Maximum steps (the default config's if unset).")
flags.DEFINE_list("eval_bits", ["16", "64", "256", "1024", "10000"], "Generalization lengths.")
flags.DEFINE_integer("long_eval_size", 1000, "Problems per length above 256 bits.")
flags.DEFINE_integer("run_py_repeats", 3, "Fresh `python run.py` runs to time (median reported).")
flags.DEFINE_list("run_py_args", [],
                  "run_py: extra flags for run.py (a quick check: --steps=30,"
                  "--consolidate_steps=0,--eval_bits=16); the targets assume none.")
flags.DEFINE_enum("part", "reliability", ("reliability", "run_py"), "What to measure.")
flags.DEFINE_string("out_dir", os.path.join(ROOT, "benchmarks", "results"), "Output folder.")
_MALLOPT = _common.define_mallopt_flag(True)  # as run.py: reliability trains 64 models at once
FLAGS = flags.FLAGS


def reliability(workdir: str) -> dict:
  from jaxgru.tasks import addition
  fields = {"num_models": FLAGS.num_models, "eval_bits": tuple(int(b) for b in FLAGS.eval_bits),
            "long_eval_size": FLAGS.long_eval_size, "seed": 1000}
  if FLAGS.steps:
    fields["steps"] = FLAGS.steps
  cfg = addition.AdditionConfig(**fields)
  summary = addition.train_and_evaluate(cfg, workdir, log=lambda m: None)
  steps = summary["steps_to_solve"]
  per_model = summary["length_generalization_per_model"]
  solved = [i for i, s in enumerate(steps) if s is not None]
  within_500 = sum(1 for s in steps if s is not None and s <= 500) / len(steps)
  perfect = {b: sum(1 for i in solved if per_model[b][i] == 1.0) for b in per_model}
  return {"summary": summary, "solved_within_500": within_500, "solved_models": len(solved),
          "solved_models_perfect_at": perfect}


def run_py_timing(repeats: int) -> list[dict]:
  runs = []
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as work:
      t0 = time.time()
      proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), f"--workdir={work}",
                             *FLAGS.run_py_args],
                            capture_output=True, text=True, cwd=ROOT)
      total = time.time() - t0
      if proc.returncode != 0:
        raise RuntimeError(f"run.py failed: {proc.stderr[-2000:]}")
      s = json.load(open(os.path.join(work, "summary.json")))
      runs.append({"process_seconds": total, "compile_seconds": s["compile_seconds"],
                   "seconds_to_solve": s["seconds_to_solve"], "steps_to_solve": s["steps_to_solve"],
                   "train_seconds": s["train_seconds"], "wall_seconds": s["wall_seconds"],
                   "length_generalization": s["length_generalization"],
                   "correct_demo": "correct:" in proc.stdout})
  return runs


def _short_revision():
  git = _common.git_revision()
  return git["revision"] and git["revision"][:7] + ("+uncommitted" if git["dirty"] else "")


def _median(xs):
  xs = sorted(x for x in xs if x is not None)
  return xs[len(xs) // 2] if xs else None


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  _common.check_positive(num_models=FLAGS.num_models, long_eval_size=FLAGS.long_eval_size,
                         run_py_repeats=FLAGS.run_py_repeats,
                         eval_bits=_common.ints(FLAGS.eval_bits, "eval_bits"))
  if FLAGS.steps is not None:
    _common.check_positive(steps=FLAGS.steps)
  _common.check_writable(FLAGS.out_dir, "--out_dir", folder=True)
  malloc = _malloc.tune_malloc(enable=_MALLOPT.value)  # before JAX allocates anything
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  import jax
  out = os.path.join(FLAGS.out_dir, f"addition_{FLAGS.part}")
  record = {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
            "versions": _common.versions(), "git_revision": _short_revision(),
            "load_average_at_start": os.getloadavg()[0], "malloc": malloc}
  header = (f"# Addition benchmark: {FLAGS.part} ({record['platform']}, {record['device']}, "
            f"git {record['git_revision']})")
  if FLAGS.part == "reliability":
    with tempfile.TemporaryDirectory() as work:
      t0 = time.time()
      rel = reliability(work)
      record["seconds"] = time.time() - t0
    record["reliability"] = rel
    s = rel["summary"]
    dist = s["steps_to_solve_distribution"]
    record["targets"] = {
        "median_steps_to_solve<=100": dist.get("median_all") is not None
                                      and dist["median_all"] <= 100,
        "solved_within_500>=0.95": rel["solved_within_500"] >= 0.95,
        "every_solved_model_exact_at_10000_bits":
            rel["solved_models_perfect_at"].get("10000") == rel["solved_models"]}
    lines = [header, "",
             f"One run of {s['num_models']} models (seeds 1000..{999 + s['num_models']}) in one "
             f"compiled program, default configuration, {record['seconds']:.0f} s in all.", "",
             "| figure | value | target |", "|---|---|---|",
             f"| median steps to solve (all seeds) | {dist.get('median_all')} | <= 100 |",
             f"| solved within 500 steps | {rel['solved_within_500']:.1%} | >= 95% |",
             f"| steps to solve: min / p90 / max | {dist.get('min')} / {dist.get('p90')} / "
             f"{dist.get('max')} | |"]
    for b, n in rel["solved_models_perfect_at"].items():
      size = s["config"]["long_eval_size"] if int(b) > 256 else s["config"]["eval_size"]
      lines.append(f"| solved models 100% exact at {b} bits ({size} problems each) | {n} / "
                   f"{rel['solved_models']} | all |")
    lines += [f"| mean exact-match at {b} bits (solved models) | "
              f"{s['length_generalization'][b]:.6f} | |" for b in s["length_generalization"]]
  else:
    timing = run_py_timing(FLAGS.run_py_repeats)
    record["run_py"] = timing
    compile_s = _median([r["compile_seconds"] for r in timing])
    solve_s = _median([r["seconds_to_solve"] for r in timing])
    record["targets"] = {"compile<=3s": compile_s <= 3.0,
                         "solved_within_5s": solve_s is not None and solve_s <= 5.0}
    lines = [header, "", f"`python run.py` with its defaults, {len(timing)} fresh processes and "
             "workdirs; medians.", "", "| figure | value | target |", "|---|---|---|",
             f"| compile of the first train step | {compile_s:.2f} s | <= 3 s |",
             f"| wall seconds from compiled to solved | "
             f"{'not solved' if solve_s is None else f'{solve_s:.2f} s'} | <= 5 s |",
             f"| steps to solve | {_median([r['steps_to_solve'] for r in timing])} | |",
             f"| training incl. consolidation | "
             f"{_median([r['train_seconds'] for r in timing]):.2f} s | |",
             f"| whole process (imports, training, evaluation to 10,000 bits, demo) | "
             f"{_median([r['process_seconds'] for r in timing]):.1f} s | |",
             f"| demo addition of two 300-digit numbers correct | "
             f"{sum(r['correct_demo'] for r in timing)} / {len(timing)} | |"]
  lines += ["", f"Load average at start: {record['load_average_at_start']:.2f}. glibc malloc "
            f"thresholds raised (`--mallopt`): {'yes' if malloc['applied'] else 'no'}."]
  record["run_py_args"] = FLAGS.run_py_args
  _common.write_json(out + ".json", record)
  _common.write_text(out + ".md", "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  _common.absl_main(main, "addition.py")
