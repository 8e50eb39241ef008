"""Parallel-in-time evaluation (jaxgru._parallel.parallel_layer) against the sequential loop.

Parts (``--parts``, comma-separated):

* ``convergence``: for random cells of each ``--conv_hiddens`` size (Keras initialization, and
  "trained-like" ones with the recurrent kernel x3), ``--conv_steps`` steps, batch 1: Newton
  iterations to reach the tolerance, whether it finished sequentially, the largest difference
  from :func:`jaxgru.scan_layer`, and the sequential depth ``iterations x ceil(log2 T)``;
* ``timing``: wall time of the forward pass (and with ``--train`` of a gradient, params and
  inputs, of a loss over all outputs) of ``parallel_layer`` and of ``scan_layer`` (default
  options) for every T x B x H of ``--steps``, ``--batches`` and ``--hiddens``; medians of
  ``--repeats`` interleaved calls after one warm-up (compilation is not timed);
* ``backward``: gradient wall time of the two gradient paths (``--backward_shapes``);
* ``trained_addition``: convergence on a trained addition model (``--addition_workdir``);
* ``trained_imdb``: convergence on every layer and direction of a trained IMDB classifier
  (``--imdb_workdir``, made by ``python run.py --task=imdb``) over ``--imdb_reviews`` real test
  reviews of ``--imdb_data``, encoded as the task encodes them, and whether the classifier's
  logits and labels stay the same with every loop parallel; skipped, with a line saying why,
  without those two flags.

Results go to ``--out`` + .json, .md and .png.

  python -m benchmarks.parallel                      # the default grid (long)
  python -m benchmarks.parallel --quick              # T <= 10000, a few repeats
  python -m benchmarks.parallel --parts=trained_imdb --imdb_workdir=DIR --imdb_data=TARBALL
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

from benchmarks import _common as common


def _ints(text):
  try:
    return [int(v) for v in text.split(",") if v]
  except ValueError:
    raise argparse.ArgumentTypeError(f"integers separated by commas, got {text!r}") from None


PARTS = ("convergence", "timing", "trained_addition", "trained_imdb", "backward")


def _check(ap, args) -> None:
  """One-line usage errors (exit status 2) for values no run can use, before anything runs."""
  parts = args.parts.split(",")
  unknown = [p for p in parts if p not in PARTS]
  if unknown or not parts:
    ap.error(f"--parts: unknown {unknown}; expected some of {', '.join(PARTS)}")
  if args.method not in ("quasi", "elk", "full"):
    ap.error(f"--method must be quasi, elk or full, got {args.method!r}")
  if any(len(shape) != 3 for shape in args.backward_shapes):
    ap.error(f"--backward_shapes takes TxBxH, three integers each, got {args.backward_shapes}")
  if not args.max_elements > 0:
    ap.error(f"--max_elements must be positive, got {args.max_elements}")
  names = ("steps", "batches", "hiddens", "conv_hiddens", "inputs", "max_iters",
           "train_max_steps", "repeats", "conv_steps", "addition_bits", "addition_batch",
           "imdb_reviews")
  try:
    common.check_positive(**{n: getattr(args, n) or [0] for n in names},
                          backward_shapes=[v for shape in args.backward_shapes for v in shape])
    common.check_writable(args.out + ".json")
  except common.UsageError as e:
    ap.error(str(e))


def build(hidden, steps, batch, inputs, scale=1.0, seed=0):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  cell = jaxgru.GRUConfig(inputs, hidden)
  params = cell.init(jax.random.key(seed))
  params = dict(params, w_h=params["w_h"] * scale)
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(steps, batch, inputs)).astype(np.float32))
  return cell, params, xs


def convergence(args, log, rows=None):
  import jax  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  from jaxgru._parallel import parallel_layer  # pylint: disable=import-outside-toplevel
  rows = [] if rows is None else rows  # main's list: rows so far survive an interrupt
  steps = args.conv_steps
  for scale in (1.0, 3.0):
    for hidden in args.conv_hiddens:
      cell, params, xs = build(hidden, steps, 1, args.inputs, scale)
      ys_ref, _ = jax.jit(lambda p, x, cell=cell: jaxgru.scan_layer(cell, p, x))(params, xs)
      for method in ("quasi", "elk", "full"):
        if method == "full" and hidden > args.full_max_hidden:
          continue
        fn = jax.jit(lambda p, x, cell=cell, m=method: parallel_layer(
            cell, p, x, method=m, max_iters=args.max_iters))
        ys, _, info = fn(params, xs)
        iters = int(info.iterations)
        row = {"scale": scale, "hidden": hidden, "steps": steps, "method": method,
               "iterations": iters, "converged": bool(info.converged),
               "fell_back": bool(info.fell_back),
               "first_unconverged": int(info.first_unconverged),
               "max_abs_error": float(np.max(np.abs(np.asarray(ys) - np.asarray(ys_ref)))),
               "parallel_depth": iters * math.ceil(math.log2(steps))}
        rows.append(row)
        log(f"convergence {row}")
  return rows


def timing(args, log, rows=None):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  from jaxgru._parallel import parallel_layer  # pylint: disable=import-outside-toplevel
  rows = [] if rows is None else rows  # main's list: rows so far survive an interrupt
  for steps in args.steps:
    for batch in args.batches:
      for hidden in args.hiddens:
        cell, params, xs = build(hidden, steps, batch, args.inputs)
        seq = lambda p, x, cell=cell: jaxgru.scan_layer(cell, p, x)[0]
        par = lambda p, x, cell=cell: parallel_layer(cell, p, x, method=args.method,
                                                     max_iters=args.max_iters)
        fns = {"sequential_forward": jax.jit(seq),
               "parallel_forward": jax.jit(lambda p, x, par=par: par(p, x)[0])}
        if args.train and steps <= args.train_max_steps:
          loss = lambda f: (lambda p, x: jnp.mean(f(p, x) ** 2))
          fns["sequential_train"] = jax.jit(jax.grad(loss(seq), argnums=(0, 1)))
          fns["parallel_train"] = jax.jit(jax.grad(loss(lambda p, x, par=par: par(p, x)[0]),
                                                   argnums=(0, 1)))
        row = {"steps": steps, "batch": batch, "hidden": hidden}
        if steps * batch * hidden > args.max_elements:
          row["error"] = f"skipped: T*B*H > --max_elements={args.max_elements:g}"
          log(f"timing {row}")
          rows.append(row)
          continue
        try:
          t0 = time.perf_counter()
          for f in fns.values():
            jax.block_until_ready(f(params, xs))
          row["compile_and_first_s"] = time.perf_counter() - t0
          times = {k: [] for k in fns}
          for _ in range(args.repeats):
            for k, f in fns.items():
              times[k] += common.time_calls(lambda f=f: f(params, xs), jax.block_until_ready,
                                            1, warmup=0)
          row.update({k: common.summary(v) for k, v in times.items()})
          info = jax.jit(par)(params, xs)[2]
          row["iterations"] = int(info.iterations)
          row["fell_back"] = bool(info.fell_back)
          row["parallel_depth"] = row["iterations"] * math.ceil(math.log2(steps))
          for phase in ("forward", "train"):
            if f"parallel_{phase}" in row:
              row[f"speedup_{phase}"] = (row[f"sequential_{phase}"]["median_ms"]
                                         / row[f"parallel_{phase}"]["median_ms"])
        except Exception as e:  # pylint: disable=broad-except  (out of memory, mostly)
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"timing {({k: (v['median_ms'] if isinstance(v, dict) else v) for k, v in row.items()})}")
        rows.append(row)
  return rows


def backward(args, log, rows=None):
  """Gradient wall time of parallel_layer with backward="adjoint" vs "rerun" (and scan_layer)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  from jaxgru._parallel import parallel_layer  # pylint: disable=import-outside-toplevel
  rows = [] if rows is None else rows  # main's list: rows so far survive an interrupt
  for steps, batch, hidden in args.backward_shapes:
    cell, params, xs = build(hidden, steps, batch, args.inputs)
    loss = lambda f: (lambda p, x: jnp.mean(f(p, x) ** 2))
    fns = {"sequential": jax.jit(jax.grad(loss(lambda p, x: jaxgru.scan_layer(cell, p, x)[0]),
                                          argnums=(0, 1)))}
    for bwd in ("adjoint", "rerun"):
      run = lambda p, x, bwd=bwd: parallel_layer(cell, p, x, method=args.method,
                                                 max_iters=args.max_iters, backward=bwd,
                                                 sequential=jaxgru.scan_layer)[0]
      fns[bwd] = jax.jit(jax.grad(loss(run), argnums=(0, 1)))
    for f in fns.values():
      jax.block_until_ready(f(params, xs))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
      for k, f in fns.items():
        times[k] += common.time_calls(lambda f=f: f(params, xs), jax.block_until_ready, 1,
                                      warmup=0)
    row = {"steps": steps, "batch": batch, "hidden": hidden}
    row.update({k: common.summary(v) for k, v in times.items()})
    log(f"backward {({k: (v['median_ms'] if isinstance(v, dict) else v) for k, v in row.items()})}")
    rows.append(row)
  return rows


def trained_addition(args, log, rows=None):
  """Convergence on the recurrent layer of a trained addition model (``--addition_workdir``, made
  by ``python run.py --workdir=DIR``) over ``--addition_bits``-bit held-out problems."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  from jaxgru._parallel import parallel_layer  # pylint: disable=import-outside-toplevel
  from jaxgru.tasks.addition import input_pipeline, predict  # pylint: disable=import-outside-toplevel
  cfg, state, steps_to_solve = predict.load_trained(args.addition_workdir)
  params = predict.best_model(state, steps_to_solve)
  rnn = cfg.model().rnn
  cell = rnn.layer_cell(0)
  layer = params["gru"][0]
  layer = layer[next(iter(layer))] if "w_h" not in layer else layer
  x_BTI, _ = input_pipeline.eval_batch(cfg.seed, args.addition_bits, args.addition_batch)
  xs_TBI = jnp.swapaxes(x_BTI, 0, 1).astype(cell.state_dtype)
  ys_ref, _ = jax.jit(lambda p, x: jaxgru.scan_layer(cell, p, x))(layer, xs_TBI)
  w = params["readout"]["w"]
  rows = [] if rows is None else rows  # main's list: rows so far survive an interrupt
  for method in ("quasi", "elk", "full"):
    ys, _, info = jax.jit(lambda p, x, m=method: parallel_layer(
        cell, p, x, method=m, max_iters=args.max_iters))(layer, xs_TBI)
    same_bits = bool(jnp.all((jnp.matmul(ys, w) > -params["readout"]["b"][0])
                             == (jnp.matmul(ys_ref, w) > -params["readout"]["b"][0])))
    row = {"method": method, "bits": args.addition_bits, "steps": int(xs_TBI.shape[0]),
           "batch": args.addition_batch, "hidden": cell.hidden_size,
           "steps_to_solve": steps_to_solve, "iterations": int(info.iterations),
           "converged": bool(info.converged), "fell_back": bool(info.fell_back),
           "first_unconverged": int(info.first_unconverged),
           "max_abs_error": float(np.max(np.abs(np.asarray(ys) - np.asarray(ys_ref)))),
           "non_finite_outputs": int(np.sum(~np.isfinite(np.asarray(ys)))),
           "same_predicted_bits": same_bits,
           "max_abs_w_h": float(jnp.max(jnp.abs(layer["w_h"])))}
    log(f"trained {row}")
    rows.append(row)
  return rows


class _GruInputs(Exception):
  """Raised by a tapped stack's ``apply``: what the classifier hands its GRU stack."""

  def __init__(self, xs, lengths):
    super().__init__("the GRU stack's inputs")
    self.xs, self.lengths = xs, lengths


def _imdb_reviews(args):
  """The trained IMDB run and ``--imdb_reviews`` of its test reviews encoded as it encodes them.

  Returns ``(cfg, model, params, ids_BT, lengths_B, labels_B)``, or a string saying why the part
  is skipped.
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  from jaxgru.tasks import classify  # pylint: disable=import-outside-toplevel
  if not args.imdb_workdir or not args.imdb_data:
    return "skipped: needs --imdb_workdir (a finished run.py --task=imdb run) and --imdb_data " \
           "(the labeled IMDB tarball)"
  try:
    cfg, model, params, vocab = classify.load_trained(args.imdb_workdir)
  except (FileNotFoundError, ValueError) as e:
    return f"skipped: cannot load --imdb_workdir={args.imdb_workdir}: {e}"
  if cfg.task != "imdb" or vocab is None:
    return f"skipped: --imdb_workdir={args.imdb_workdir} is a {cfg.task!r} run, not an IMDB one"
  data = dataclasses.replace(cfg.data, data_path=args.imdb_data,
                             max_length=args.imdb_max_length or cfg.data.max_length)
  try:  # the task's own reading, tokenizing and encoding, with the run's vocabulary
    test = data.test_split(cfg.seed, vocab)
  except (OSError, ValueError) as e:  # imdb.DataError is a ValueError
    return f"skipped: cannot read --imdb_data={args.imdb_data}: {e}"
  sample = classify.eval_sample(test, args.imdb_reviews, cfg.seed)
  steps = max(int(sample.lengths.max()), 1)  # as predict does: no steps past the longest
  return cfg, model, params, sample.inputs[:, :steps], sample.lengths, sample.labels


def trained_imdb(args, log, rows=None):
  """Convergence on the recurrent layers of a trained IMDB classifier (``--imdb_workdir``, made by
  ``python run.py --task=imdb``) over ``--imdb_reviews`` real test reviews of ``--imdb_data``.

  Every model of the run (an ensemble stacks them), every layer and direction: the inputs are
  the ones the classifier's own code hands its GRU stack (its embeddings, and hashed word pairs
  where it has them; layers after the first read the SEQUENTIAL outputs of the layers before),
  with the reviews' lengths. Then the whole classifier once more with every loop parallel
  (``ScanOptions(method="parallel")``): are its logits and labels the sequential ones?
  """
  import dataclasses  # pylint: disable=import-outside-toplevel
  from typing import Any  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import jaxgru  # pylint: disable=import-outside-toplevel
  from jaxgru._parallel import parallel_layer  # pylint: disable=import-outside-toplevel
  loaded = _imdb_reviews(args)
  if isinstance(loaded, str):
    log(f"trained_imdb {loaded}")
    return {"skipped": loaded}
  cfg, model, params, ids_BT, lengths_np, labels_np = loaded
  rnn = model.rnn

  @dataclasses.dataclass(frozen=True)
  class Stack(type(rnn)):
    """The model's stack, run with ``options``; with ``tap``, stops at its inputs instead."""
    options: Any = None
    tap: bool = False

    def apply(self, params, xs, lengths=None, h0=None, **kw):  # pylint: disable=arguments-differ
      if self.tap:
        raise _GruInputs(xs, lengths)
      return super().apply(params, xs, lengths, h0, **dict(kw, options=self.options))

  def with_stack(**extra):
    fields = {f.name: getattr(rnn, f.name) for f in dataclasses.fields(rnn)}
    return dataclasses.replace(model, rnn=Stack(**fields, **extra))

  num_models = jax.tree.leaves(params)[0].shape[0]
  lengths_B = jnp.asarray(lengths_np)
  steps, batch = int(ids_BT.shape[1]), int(ids_BT.shape[0])
  valid_TB = np.arange(steps)[:, None] < lengths_np[None, :]
  methods = [m for m in ("quasi", "elk", "full")
             if m != "full" or rnn.hidden_size <= args.full_max_hidden]
  seq = jax.jit(lambda cell, p, x, n, rev: jaxgru.scan_layer(cell, p, x, n, reverse=rev),
                static_argnums=(0, 4))
  par = jax.jit(lambda cell, p, x, n, rev, m: parallel_layer(
      cell, p, x, None, n, reverse=rev, method=m, max_iters=args.max_iters),
                static_argnums=(0, 4, 5))
  tapped = with_stack(tap=True)
  rows = [] if rows is None else rows  # main's list: rows so far survive an interrupt
  for k in range(num_models):
    p_k = jax.tree.map(lambda a, k=k: a[k], params)
    try:
      tapped.pooled(p_k, ids_BT, lengths_B)  # eager: embeds, then stops at the stack
      raise RuntimeError("the classifier did not call its GRU stack")
    except _GruInputs as got:
      x_BTI, n_B = got.xs, got.lengths
    for l in range(rnn.num_layers):
      if l == 0:
        xs_TBF = jnp.swapaxes(x_BTI, 0, 1)
      else:  # the sequential outputs of layers 0..l-1, by the stack's own code
        xs_TBF = dataclasses.replace(rnn, num_layers=l).apply(p_k["gru"][:l], x_BTI, n_B)[0]
        xs_TBF = jnp.swapaxes(xs_TBF, 0, 1)
      cell = rnn.layer_cell(l)
      for d in rnn.directions:
        layer = p_k["gru"][l][d]
        ys_ref, h_ref = seq(cell, layer, xs_TBF, n_B, d == "bwd")
        ys_ref, h_ref = np.asarray(ys_ref), np.asarray(h_ref)
        for method in methods:
          ys, h_last, info = par(cell, layer, xs_TBF, n_B, d == "bwd", method)
          ys, iters = np.asarray(ys), int(info.iterations)
          row = {"model": k, "layer": l, "direction": d, "method": method, "steps": steps,
                 "batch": batch, "hidden": cell.hidden_size, "inputs": cell.input_size,
                 "iterations": iters, "converged": bool(info.converged),
                 "fell_back": bool(info.fell_back),
                 "first_unconverged": int(info.first_unconverged),
                 "max_abs_error": float(np.max(np.abs(ys - ys_ref)[valid_TB], initial=0.0)),
                 "max_abs_error_h_last": float(np.max(np.abs(np.asarray(h_last) - h_ref))),
                 "non_finite_outputs": int(np.sum(~np.isfinite(ys))),
                 "parallel_depth": iters * math.ceil(math.log2(max(steps, 2))),
                 "max_abs_w_h": float(jnp.max(jnp.abs(layer["w_h"])))}
          log(f"trained_imdb {row}")
          rows.append(row)

  logits = lambda m: jax.jit(jax.vmap(m.logits, in_axes=(0, None, None)))
  ref_NB = np.asarray(logits(model)(params, ids_BT, lengths_B))
  ensemble = lambda l_NB: jax.nn.sigmoid(jnp.asarray(l_NB)).mean(axis=0) > 0.5
  positive = labels_np > 0
  predictions = []
  for method in methods:
    options = jaxgru.ScanOptions(method="parallel", newton=method, max_iters=args.max_iters)
    par_NB = np.asarray(logits(with_stack(options=options))(params, ids_BT, lengths_B))
    row = {"method": method,
           "max_abs_logit_difference": float(np.max(np.abs(par_NB - ref_NB))),
           "labels_changed": int(np.sum((par_NB > 0) != (ref_NB > 0))),
           "labels": int(ref_NB.size),
           "same_ensemble_labels": bool(np.all(ensemble(par_NB) == ensemble(ref_NB))),
           "accuracy_sequential": float(np.mean(np.asarray(ensemble(ref_NB)) == positive)),
           "accuracy_parallel": float(np.mean(np.asarray(ensemble(par_NB)) == positive))}
    log(f"trained_imdb predictions {row}")
    predictions.append(row)
  return {"workdir": args.imdb_workdir, "reviews": batch, "steps": steps,
          "lengths": {"min": int(lengths_np.min()), "mean": float(lengths_np.mean()),
                      "max": int(lengths_np.max())},
          "max_length": int(args.imdb_max_length or cfg.data.max_length),
          "truncate": cfg.data.truncate, "num_models": num_models, "num_layers": rnn.num_layers,
          "directions": list(rnn.directions), "hidden": rnn.hidden_size,
          "embed": rnn.input_size, "bigram_buckets": model.bigram_buckets,
          "pooling": model.pooling, "methods": methods, "layers": rows,
          "predictions": predictions}


def report(record, out):
  args, env = record["args"], record["environment"]
  lines = [f"# Parallel-in-time GRU (quasi-DEER) vs the sequential loop, {env['platform']}\n",
           f"`{env['command']}`; {common.describe(env)}\n",
           "Tolerance: the default (largest per-step residual 1e-5, float32). The sequential "
           "depth of a parallel run is iterations x ceil(log2 T) (associative scans); the "
           "sequential loop's is T.\n"]
  conv = record.get("convergence")
  if conv:
    lines.append(f"## Convergence, T={args['conv_steps']}, B=1, max_iters={args['max_iters']}\n")
    lines.append("Random cells (Keras initialization; `w_h x 3` = trained-like, larger recurrent "
                 "weights). Error: the largest |parallel - sequential| over all outputs.\n")
    lines.append(common.table(
        ["w_h scale", "H", "method", "iterations", "fell back (from step)", "max error",
         "depth"],
        [[r["scale"], r["hidden"], r["method"], r["iterations"],
          f"yes ({r['first_unconverged']})" if r["fell_back"] else "no",
          f"{r['max_abs_error']:.1e}", r["parallel_depth"]] for r in conv]))
  tim = record.get("timing")
  if tim:
    lines.append(f"\n## Wall time, method={args['method']} (median ms of {args['repeats']} "
                 "interleaved calls; speedup = sequential / parallel, > 1 means parallel is "
                 "faster)\n")
    fmt = lambda r, k: common.fmt_ms(r[k]["median_ms"]) if k in r else "-"
    lines.append(common.table(
        ["T", "B", "H", "iters", "depth", "seq fwd ms", "par fwd ms", "fwd speedup",
         "seq train ms", "par train ms", "train speedup"],
        [[r["steps"], r["batch"], r["hidden"], r.get("iterations", "-"),
          r.get("parallel_depth", "-"), fmt(r, "sequential_forward"),
          fmt(r, "parallel_forward"),
          f"{r['speedup_forward']:.2f}" if "speedup_forward" in r else r.get("error", "-"),
          fmt(r, "sequential_train"), fmt(r, "parallel_train"),
          f"{r['speedup_train']:.2f}" if "speedup_train" in r else "-"] for r in tim]))
  tr = record.get("trained_addition")
  if tr:
    lines.append(f"\n## A trained addition model (`python run.py --workdir=DIR`), "
                 f"{tr[0]['bits']}-bit held-out problems, B={tr[0]['batch']}, "
                 f"H={tr[0]['hidden']}, max_iters={args['max_iters']}\n")
    lines.append(common.table(
        ["method", "iterations", "fell back (from step)", "max error", "same predicted bits"],
        [[r["method"], r["iterations"],
          f"yes ({r['first_unconverged']})" if r["fell_back"] else "no",
          f"{r['max_abs_error']:.1e}", r["same_predicted_bits"]] for r in tr]))
  im = record.get("trained_imdb")
  if im and "skipped" in im:
    lines.append(f"\n## A trained IMDB model: {im['skipped']}\n")
  elif im:
    lens = im["lengths"]
    lines.append(f"\n## A trained IMDB model (`python run.py --task=imdb`), {im['reviews']} real "
                 f"test reviews of {lens['min']}-{lens['max']} words (mean {lens['mean']:.0f}; "
                 f"T={im['steps']}, max_length={im['max_length']}), {im['num_models']} model(s) x "
                 f"{im['num_layers']} layer(s) x {len(im['directions'])} direction(s), "
                 f"H={im['hidden']}, inputs {im['embed']}, max_iters={args['max_iters']}\n")
    lines.append("Each layer and direction of each model, run on the inputs the classifier hands "
                 "its GRU (its embeddings" + (" plus hashed word pairs" if im["bigram_buckets"]
                                               else "") +
                 ", the reviews' lengths; layers after the first read the sequential outputs of "
                 "the layer before). Errors: the largest |parallel - sequential| over the valid "
                 "steps, and of the final states. `full` only when H <= "
                 f"--full_max_hidden={args['full_max_hidden']}.\n")
    lines.append(common.table(
        ["model", "layer", "direction", "method", "iterations", "fell back (from step)",
         "max error", "h_last error", "depth"],
        [[r["model"], r["layer"], r["direction"], r["method"], r["iterations"],
          f"yes ({r['first_unconverged']})" if r["fell_back"] else "no",
          f"{r['max_abs_error']:.1e}", f"{r['max_abs_error_h_last']:.1e}", r["parallel_depth"]]
         for r in im["layers"]]))
    lines.append("\nThe whole classifier with every loop parallel "
                 "(`ScanOptions(method=\"parallel\", newton=method)`) against the sequential one, "
                 "on the same reviews (accuracy: of the models' averaged probabilities, against "
                 "the reviews' labels):\n")
    lines.append(common.table(
        ["method", "max abs logit difference", "labels changed (of models x reviews)",
         "same ensemble labels", "accuracy sequential", "accuracy parallel"],
        [[r["method"], f"{r['max_abs_logit_difference']:.1e}",
          f"{r['labels_changed']} of {r['labels']}", r["same_ensemble_labels"],
          f"{r['accuracy_sequential']:.3f}", f"{r['accuracy_parallel']:.3f}"]
         for r in im["predictions"]]))
  bwd = record.get("backward")
  if bwd:
    lines.append("\n## Gradient paths (train step: gradient of a loss over all outputs wrt params "
                 "and inputs; median ms)\n")
    lines.append("`adjoint`: parallel forward, then the adjoint recurrence as a reverse loop of "
                 "step VJPs at the known states and one batched VJP for the weights; `rerun`: "
                 "parallel forward, then the VJP of the sequential scan_layer (which reruns its "
                 "forward); `sequential`: scan_layer alone.\n")
    lines.append(common.table(
        ["T", "B", "H", "sequential ms", "parallel + adjoint ms", "parallel + rerun ms"],
        [[r["steps"], r["batch"], r["hidden"]] + [common.fmt_ms(r[k]["median_ms"])
                                                   for k in ("sequential", "adjoint", "rerun")]
         for r in bwd]))
  text = "\n".join(lines)
  common.write_text(out + ".md", text)
  return text


def plot(record, out):
  plt = common.pyplot()
  if plt is None or not (record.get("timing") or record.get("convergence")):
    return  # nothing to draw
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  tim = [r for r in record.get("timing", []) if "speedup_forward" in r]
  for batch in sorted({r["batch"] for r in tim}):
    for hidden in sorted({r["hidden"] for r in tim}):
      rs = sorted([r for r in tim if r["batch"] == batch and r["hidden"] == hidden],
                  key=lambda r: r["steps"])
      if rs:
        axes[0].plot([r["steps"] for r in rs], [r["speedup_forward"] for r in rs], "o-",
                     label=f"B={batch} H={hidden}")
  axes[0].axhline(1.0, color="k", lw=0.8)
  axes[0].set(xscale="log", yscale="log", xlabel="T", ylabel="sequential / parallel (forward)",
              title="speedup of quasi-DEER on this CPU")
  axes[0].legend(fontsize=7)
  conv = record.get("convergence", [])
  for scale in sorted({r["scale"] for r in conv}):
    for method in ("quasi", "elk", "full"):
      rs = [r for r in conv if r["scale"] == scale and r["method"] == method]
      if rs:
        axes[1].plot([r["hidden"] for r in rs], [r["iterations"] for r in rs], "o-",
                     label=f"{method}, w_h x{scale:g}")
  axes[1].set(xscale="log", xlabel="H", ylabel="Newton iterations",
              title=f"iterations to tol, T={record['args']['conv_steps']}")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=100)


def main(argv=None):
  ap = common.argument_parser(prog="parallel.py", description=__doc__.split("\n")[0])
  ap.add_argument("--parts", default="convergence,timing,backward")
  ap.add_argument("--backward_shapes", type=lambda t: [tuple(_ints(v.replace("x", ",")))
                                                       for v in t.split(",") if v],
                  default=[(1000, 16, 16), (10000, 16, 16)], help="TxBxH,...")
  ap.add_argument("--quick", action="store_true",
                  help="T in 1000,10000 and 3 repeats (unless given)")
  ap.add_argument("--steps", type=_ints, default=None, help="default 1000,10000,100000")
  ap.add_argument("--batches", type=_ints, default=[1, 16])
  ap.add_argument("--hiddens", type=_ints, default=[1, 16, 64])
  ap.add_argument("--inputs", type=int, default=8)
  ap.add_argument("--method", default="quasi")
  ap.add_argument("--max_iters", type=int, default=100)
  ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True)
  ap.add_argument("--train_max_steps", type=int, default=10000)
  ap.add_argument("--max_elements", type=float, default=3e7,
                  help="skip shapes with T*B*H above this (memory on a shared machine)")
  ap.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
  ap.add_argument("--conv_steps", type=int, default=1000)
  ap.add_argument("--conv_hiddens", type=_ints, default=[1, 4, 16, 64, 256])
  ap.add_argument("--full_max_hidden", type=int, default=16)
  ap.add_argument("--addition_workdir", default="runs/addition")
  ap.add_argument("--addition_bits", type=int, default=10000)
  ap.add_argument("--addition_batch", type=int, default=16)
  ap.add_argument("--imdb_workdir", default=None,
                  help="trained_imdb: a finished run.py --task=imdb --workdir (skipped without)")
  ap.add_argument("--imdb_data", default=None,
                  help="trained_imdb: the labeled IMDB tarball (or folder) for its test reviews")
  ap.add_argument("--imdb_reviews", type=int, default=16,
                  help="trained_imdb: test reviews drawn (one batch)")
  ap.add_argument("--imdb_max_length", type=int, default=None,
                  help="trained_imdb: words kept per review; default the run's max_length")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "parallel_cpu"))
  args = ap.parse_args(argv)
  if args.steps is None:
    args.steps = [1000, 10000] if args.quick else [1000, 10000, 100000]
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  _check(ap, args)

  log = lambda msg: print(msg, flush=True)
  env = common.environment()
  record = {"benchmark": "parallel", "args": vars(args), "environment": env}
  parts = args.parts.split(",")
  for name, part in (("convergence", convergence), ("timing", timing),
                     ("trained_addition", trained_addition), ("trained_imdb", trained_imdb),
                     ("backward", backward)):
    if name in parts:
      record[name] = []
      try:
        result = part(args, log, record[name])
      except KeyboardInterrupt:  # a time limit (gpu_suite sends SIGINT): keep the rows so far
        record["interrupted_in"] = name
        common.write_json(args.out + ".json", record)
        print(f"interrupted in {name}; rows so far written to {args.out}.json", flush=True)
        sys.exit(130)
      record[name] = result
      common.write_json(args.out + ".json", record)  # what is done so far survives a crash
  env["load_average_at_end"] = common.load_average()
  common.write_json(args.out + ".json", record)
  print(report(record, args.out))
  plot(record, args.out)


if __name__ == "__main__":
  main()
