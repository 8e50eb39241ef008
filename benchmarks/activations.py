"""The activation study: which candidate and gate activations train, on addition and on IMDB.

For every candidate activation (``--activations``) and gate activation
(``--recurrent_activations``) it trains ``--seeds`` models of the same architecture at once
(``jax.vmap`` over models, one compilation per pair) with the task's default optimizer and
learning rate, and records each model's training-loss curve, whether its loss ever became NaN or
infinite (a diverged model keeps training beside the others, it is only counted), and its final
held-out metric:

* addition: exact-match (every bit right) on 512 held-out 8-bit problems and on 512 32-bit
  problems (length generalization), after ``--addition_steps`` steps of the default model's
  first phase (8-bit problems, constant learning rate; no consolidation phase);
* IMDB: accuracy on ``--imdb_subset`` held-out test reviews after ``--imdb_epochs`` epochs over
  ``--imdb_subset`` training reviews (a smaller model and shorter reviews than ``run.py``'s
  default, so the study stays within minutes on a CPU).

  python -m benchmarks.activations --data_path=aclImdb_v1.tar.gz

Writes ``<out>.md`` (the table), ``<out>.json`` (every number, curves included) and
``<out>.png`` (learning curves: training loss for addition, held-out accuracy for IMDB; needs
matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np
from absl import flags

from benchmarks import _common

ROOT = _common.ROOT

flags.DEFINE_list("tasks", ["addition", "imdb"], "Tasks to study.")
flags.DEFINE_string("data_path", None, "IMDB: the aclImdb folder or the .tar.gz archive.")
flags.DEFINE_list("activations", ["tanh", "relu", "gelu", "softsign", "linear"],
                  "Candidate activations.")
flags.DEFINE_list("recurrent_activations", ["sigmoid", "hard_sigmoid"], "Gate activations.")
flags.DEFINE_integer("seeds", 4, "Models (seeds) per activation pair, trained at once.")
flags.DEFINE_integer("addition_steps", 1500, "Addition: training steps.")
flags.DEFINE_list("addition_learning_rates", ["0.03", "0.3"],
                  "Addition: learning rates, each its own study (the default's, and a stress "
                  "test at ten times it).")
flags.DEFINE_integer("imdb_subset", 2500, "IMDB: reviews per split (class-balanced).")
flags.DEFINE_integer("imdb_epochs", 3, "IMDB: epochs.")
flags.DEFINE_integer("imdb_max_length", 200, "IMDB: words kept per review.")
flags.DEFINE_integer("imdb_batch_size", 64, "IMDB: reviews per step.")
flags.DEFINE_integer("imdb_probe_size", 500, "IMDB: held-out reviews for the learning curves.")
flags.DEFINE_integer("log_every", 10, "Steps between learning-curve points.")
flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "activations"),
                    "Output path without extension.")
FLAGS = flags.FLAGS


UsageError = _common.UsageError


def _train_models(state, train_step, total_steps, log_every, batch_fn=None, probe=None):
  """Runs the vmapped ``train_step``.

  Returns the state, the curve's steps (points,), the mean training loss of each interval
  (points, N; NaN once non-finite), ``probe(state)`` at each point (points, N; or None) and a
  per-model flag of a non-finite loss at any step.
  """
  import jax
  steps, curve, probes, pending = [], [], [], []
  bad = None
  for step in range(total_steps):
    state, metrics = train_step(state, *(batch_fn(step) if batch_fn else ()))
    pending.append(metrics["loss"])
    if (step + 1) % log_every == 0 or step + 1 == total_steps:
      losses = np.stack(jax.device_get(pending))  # (interval, N)
      pending = []
      finite = np.isfinite(losses).all(axis=0)
      bad = ~finite if bad is None else bad | ~finite
      with np.errstate(invalid="ignore"):
        curve.append(np.where(finite, losses.mean(axis=0), np.nan))
      if probe is not None:
        probes.append(np.asarray(probe(state)))
      steps.append(step + 1)
  return (state, np.asarray(steps), np.stack(curve), np.stack(probes) if probe else None, bad)


def study_addition(act: str, ract: str, lr: float) -> dict:
  from jaxgru.tasks import addition
  import dataclasses  # pylint: disable=import-outside-toplevel
  base = addition.AdditionConfig()
  rnn = dataclasses.replace(base.rnn, cell=dataclasses.replace(
      base.rnn.cell, activation=act, recurrent_activation=ract))
  cfg = addition.AdditionConfig(rnn=rnn, learning_rates=(lr,), num_models=FLAGS.seeds,
                                steps=FLAGS.addition_steps, seed=0)
  state = addition.init_states(cfg)
  exact8 = addition.make_evaluate(cfg, cfg.bits, 512)
  t0 = time.time()
  state, steps, curve, probes, diverged = _train_models(
      state, addition.make_train_step(cfg), cfg.steps, FLAGS.log_every,
      probe=lambda st: exact8(st.params))
  seconds = time.time() - t0
  solved = probes >= 1.0  # (points, N)
  to_solve = [float(steps[np.argmax(solved[:, i])]) if solved[:, i].any() else float("nan")
              for i in range(cfg.num_models)]
  metrics = {"steps_to_solve": to_solve, "exact_match_8bit": probes[-1].tolist()}
  for bits in (32, 128):
    metrics[f"exact_match_{bits}bit"] = addition.make_evaluate(cfg, bits, 512)(
        state.params).tolist()
  return {"steps": steps.tolist(), "curve": curve.T.tolist(), "diverged": diverged.tolist(),
          "metrics": metrics, "train_seconds": seconds}


def _imdb_base(act: str = "tanh", ract: str = "sigmoid"):
  from jaxgru import GRUConfig, RNNConfig
  from jaxgru.tasks import classify
  return classify.ClassifyConfig(
      data=classify.ImdbData(data_path=FLAGS.data_path, subset=FLAGS.imdb_subset,
                             max_length=FLAGS.imdb_max_length, vocab_size=10000),
      rnn=RNNConfig(GRUConfig(input_size=32, hidden_size=32, activation=act,
                              recurrent_activation=ract), bidirectional=True),
      bucket=FLAGS.imdb_max_length, bigram_buckets=0, epochs=FLAGS.imdb_epochs,
      batch_size=FLAGS.imdb_batch_size, num_models=FLAGS.seeds, warmup_steps=20)


def study_imdb(act: str, ract: str, data, probe_split) -> dict:
  from jaxgru.tasks import classify
  cfg = _imdb_base(act, ract)
  batches = classify.TrainBatches(data.train, cfg.batch_size, cfg.bucket, cfg.seed)
  total = cfg.epochs * batches.steps_per_epoch
  state = classify.init_states(cfg, total)
  predict = classify.make_predict(cfg.model())
  probe = lambda st: classify.evaluate(predict, st.params, probe_split, cfg.eval_batch_size,
                                       cfg.bucket)["accuracy"]
  t0 = time.time()
  state, steps, curve, probes, diverged = _train_models(
      state, classify.make_train_step(cfg, total), total, FLAGS.log_every, batches, probe)
  seconds = time.time() - t0
  m = classify.evaluate(predict, state.params, data.test, cfg.eval_batch_size, cfg.bucket)
  return {"steps": steps.tolist(), "curve": curve.T.tolist(), "probe": probes.T.tolist(),
          "diverged": diverged.tolist(), "metrics": {"test_accuracy": m["accuracy"].tolist()},
          "train_seconds": seconds}


def _spread(values, diverged, digits=3):
  v = np.asarray(values, np.float64)[~np.asarray(diverged)]
  v = v[np.isfinite(v)]
  if v.size == 0:
    return "n/a"
  f = f".{digits}f"
  return f"{v.mean():{f}} ± {v.std():{f}} ({v.min():{f}}–{v.max():{f}})"


def _table(task: str, results: dict) -> list[str]:
  metrics = next(iter(results.values()))["metrics"].keys()
  head = ["activation", "gate"] + [f"{m} mean ± std (min–max)" for m in metrics] + (
      ["solved"] if "steps_to_solve" in metrics else []) + [
      "diverged (NaN)", "final train loss (median)", "peak train loss (max)", "train s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (act, ract), r in results.items():
    div = np.asarray(r["diverged"])
    curve = np.asarray(r["curve"], np.float64)
    final = curve[:, -1]
    ok = final[~div & np.isfinite(final)]
    peak = curve[~div].max() if (~div).any() else float("nan")
    row = [f"`{act}`", f"`{ract}`"] + [
        _spread(r["metrics"][m], div, 0 if m == "steps_to_solve" else 3) for m in metrics] + [
        *([f"{np.isfinite(r['metrics']['steps_to_solve']).sum()}/{div.size}"]
          if "steps_to_solve" in metrics else []),
        f"{div.sum()}/{div.size}", f"{np.median(ok):.3g}" if ok.size else "n/a",
        f"{peak:.3g}",
        f"{r['train_seconds']:.0f}"]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def _plot(all_results: dict, path: str) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed (pip install jaxgru[bench]); no plot written",
          file=sys.stderr)
    return False
  tasks = list(all_results)
  racts = list(FLAGS.recurrent_activations)
  fig, axes = plt.subplots(len(tasks), len(racts), figsize=(5.5 * len(racts), 3.8 * len(tasks)),
                           squeeze=False)
  colors = dict(zip(FLAGS.activations, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for i, task in enumerate(tasks):
    for j, ract in enumerate(racts):
      ax = axes[i][j]
      for (act, r_act), r in all_results[task].items():
        if r_act != ract:
          continue
        steps = np.asarray(r["steps"])
        # (N, points): held-out accuracy where the task has it, else the training loss
        curve = np.asarray(r.get("probe", r["curve"]), np.float64)
        div = np.asarray(r["diverged"])
        if (~div).any():
          c = curve[~div]
          ax.plot(steps, c.mean(axis=0), color=colors[act],
                  label=f"{act} ({div.sum()}/{div.size} NaN)" if div.any() else act)
          ax.fill_between(steps, c.min(axis=0), c.max(axis=0), color=colors[act], alpha=0.2)
        else:
          ax.plot([], [], color=colors[act], label=f"{act} (all NaN)")
      ax.set_title(f"{task}: gate {ract}")
      ax.set_xlabel("step")
      if "probe" in next(iter(all_results[task].values())):
        ax.set_ylabel("held-out accuracy")
      else:
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_ylim(top=10.0)  # spikes above this are in the table's peak column
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle("GRU candidate activation x gate activation, mean over seeds (band: min-max; "
               "diverged seeds left out): addition training loss, IMDB held-out accuracy",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  from jaxgru import ACTIVATIONS
  for a in FLAGS.activations + FLAGS.recurrent_activations:
    if a not in ACTIVATIONS:
      raise UsageError(f"unknown activation {a!r}")
  unknown = set(FLAGS.tasks) - {"addition", "imdb"}
  if unknown:
    raise UsageError(f"unknown tasks {sorted(unknown)}; expected addition, imdb")
  if "imdb" in FLAGS.tasks and not FLAGS.data_path:
    raise UsageError("the IMDB part needs --data_path (or --tasks=addition)")
  _common.check_positive(seeds=FLAGS.seeds, addition_steps=FLAGS.addition_steps,
                         imdb_subset=FLAGS.imdb_subset, imdb_epochs=FLAGS.imdb_epochs,
                         imdb_max_length=FLAGS.imdb_max_length,
                         imdb_batch_size=FLAGS.imdb_batch_size,
                         imdb_probe_size=FLAGS.imdb_probe_size, log_every=FLAGS.log_every)
  try:
    rates = [float(v) for v in FLAGS.addition_learning_rates]
  except ValueError:
    rates = []
  if not rates or not all(0 < r < float("inf") for r in rates):
    raise UsageError(f"--addition_learning_rates takes positive numbers, got "
                     f"{FLAGS.addition_learning_rates}")
  _common.check_writable(FLAGS.out + ".json")
  import jax
  from jaxgru.tasks import classify
  from jaxgru.tasks.classify import imdb
  wall = time.time()
  pairs = [(a, r) for r in FLAGS.recurrent_activations for a in FLAGS.activations]
  results: dict[str, dict] = {}
  settings = {}
  if "addition" in FLAGS.tasks:
    from jaxgru.tasks import addition
    base = addition.AdditionConfig()
    for lr in (float(v) for v in FLAGS.addition_learning_rates):
      task = f"addition, learning rate {lr:g}"
      settings[task] = {k: getattr(base, k) for k in (
          "bits", "batch_size", "optimizer", "clip_norm")}
      settings[task]["hidden_size"] = base.rnn.cell.hidden_size
      settings[task].update(learning_rate=lr, steps=FLAGS.addition_steps,
                            steps_to_solve="first curve point with exact-match 1.0 on 512 "
                                           "held-out 8-bit problems")
      results[task] = {}
      for act, ract in pairs:
        results[task][act, ract] = r = study_addition(act, ract, lr)
        print(f"{task} {act}/{ract}: steps to solve {r['metrics']['steps_to_solve']}, "
              f"diverged {sum(r['diverged'])}/{len(r['diverged'])}, {r['train_seconds']:.0f}s",
              flush=True)
  if "imdb" in FLAGS.tasks:
    base = _imdb_base()
    try:
      data = classify.load_data(base, log=lambda m: print(m, flush=True))
    except imdb.DataError as e:
      raise UsageError(str(e)) from None
    settings["imdb"] = {k: getattr(base, k) for k in (
        "bigram_buckets", "pooling", "batch_size", "epochs", "optimizer", "learning_rates",
        "schedule", "clip_norm", "embed_dropout", "dropout")}
    settings["imdb"].update({k: getattr(base.data, k) for k in (
        "subset", "max_length", "vocab_size")})
    settings["imdb"].update(embed_size=base.rnn.cell.input_size,
                            hidden_size=base.rnn.cell.hidden_size,
                            bidirectional=base.rnn.bidirectional)
    settings["imdb"].update(train_size=len(data.train), test_size=len(data.test))
    rows = np.random.default_rng(0).choice(len(data.test), min(FLAGS.imdb_probe_size,
                                                                len(data.test)), replace=False)
    probe_split = classify.Split(data.test.inputs[rows], data.test.lengths[rows],
                                 data.test.labels[rows])
    settings["imdb"]["curve"] = (f"accuracy on {len(rows)} of the test reviews every "
                                 f"{FLAGS.log_every} steps")
    results["imdb"] = {}
    for act, ract in pairs:
      results["imdb"][act, ract] = r = study_imdb(act, ract, data, probe_split)
      print(f"imdb {act}/{ract}: test accuracy {np.round(r['metrics']['test_accuracy'], 3)}, "
            f"diverged {sum(r['diverged'])}/{len(r['diverged'])}, {r['train_seconds']:.0f}s",
            flush=True)

  out = FLAGS.out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  machine = {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
             "load_average_end": os.getloadavg()[0], "python": platform.python_version(),
             "jax": jax.__version__, "wall_seconds": time.time() - wall}
  command = "python -m benchmarks.activations " + " ".join(
      f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in (
          ("tasks", FLAGS.tasks), ("seeds", FLAGS.seeds), ("addition_steps", FLAGS.addition_steps),
          ("addition_learning_rates", FLAGS.addition_learning_rates),
          ("imdb_subset", FLAGS.imdb_subset), ("imdb_epochs", FLAGS.imdb_epochs),
          ("imdb_max_length", FLAGS.imdb_max_length), ("imdb_batch_size", FLAGS.imdb_batch_size),
          ("imdb_probe_size", FLAGS.imdb_probe_size),
          ("log_every", FLAGS.log_every)))
  def no_nan(x):  # strict JSON: NaN (unsolved, diverged) becomes null; 6 significant digits
    if isinstance(x, float):
      return float(f"{x:.6g}") if np.isfinite(x) else None
    if isinstance(x, dict):
      return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [no_nan(v) for v in x]
    return x

  with open(out + ".json", "w") as f:
    json.dump(no_nan({"command": command, "machine": machine, "settings": settings,
                      "results": {t: {f"{a}/{r}": v for (a, r), v in res.items()}
                                  for t, res in results.items()}}), f)
  lines = ["# Activation study", "",
           f"`{command} --data_path=...`", "",
           f"{FLAGS.seeds} seeds per pair, trained at once with `jax.vmap`; same architecture, "
           "optimizer and learning rate for every pair (the task defaults). Spread: mean ± "
           "standard deviation (min–max) over the seeds whose loss stayed finite; "
           "\"diverged\" counts seeds whose training loss became NaN or infinite at any step.",
           "", f"Machine: {machine['cpu_count']} CPU cores ({', '.join(machine['devices'])}), "
           f"shared with other jobs (load average {machine['load_average_end']:.1f} at the end), "
           f"jax {machine['jax']}; whole study {machine['wall_seconds'] / 60:.1f} min.", ""]
  for task, res in results.items():
    lines += [f"## {task}", "", "Settings: " + ", ".join(f"{k}={v}" for k, v in
                                                        settings[task].items()), ""]
    lines += _table(task, res) + [""]
  plotted = _plot(results, out + ".png")
  if plotted:
    lines += [f"![learning curves]({os.path.basename(out)}.png)", ""]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  _common.absl_main(main, "activations.py")
