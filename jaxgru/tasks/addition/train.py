"""The addition task's configuration, training and evaluation, on :mod:`jaxgru.training`.

Owns :class:`AdditionConfig` (which holds the model's :class:`jaxgru.RNNConfig`, so no cell
setting is restated here), the jitted step and evaluation over N models, :func:`steps_summary`,
and :func:`train_and_evaluate`: phase 1 trains at ``bits`` until every model is exact on held-out
problems, phase 2 consolidates on longer problems at a lower rate, then the length
generalization is measured. Shapes: N models, B problems, T steps, I = 2 inputs, L layers, H
hidden. (A few lines over the 400-line guide: the two phases and their evaluation share one
resumable loop, kept in one place.)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import training
from jaxgru.cell import INITIALIZERS, GRUConfig
from jaxgru.rnn import RNNConfig
from jaxgru.scan import ScanOptions
from jaxgru.tasks import common
from jaxgru.tasks.addition import input_pipeline
from jaxgru.tasks.addition.models import AdditionModel, loss_and_metrics
from jaxgru.training import parallel

TASK = "addition"


def _check(name: str, value: Any, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
  """Everything a training run needs; ``run.py`` fills it from flags. Defaults by measurement.

  Attributes:
    rnn: the model's stack; its cell reads 2 inputs (the two bits) and it is unidirectional.
    initializer: one of ``jaxgru.cell.INITIALIZERS``.
    bits, mixed_carries: operand length and fraction of long-carry problems in phase 1.
    consolidate_*: phase 2 (0 steps skips it): problem length, steps, long-carry fraction, batch
      size and the factor on the learning rate.
    eval_bits: operand lengths of the final length-generalization evaluation.
  """

  rnn: RNNConfig = RNNConfig(GRUConfig(input_size=2, hidden_size=16))
  initializer: str = INITIALIZERS[0]
  bits: int = 8
  mixed_carries: float = 0.0
  consolidate_bits: int = 64
  consolidate_steps: int = 2400
  consolidate_mixed: float = 0.5
  consolidate_batch_size: int = 128
  consolidate_lr_scale: float = 0.5
  batch_size: int = 64
  steps: int = 2000
  optimizer: str = "adam"
  learning_rates: tuple[float, ...] = (0.03,)
  schedule: str = "constant"
  warmup_steps: int = 0
  clip_norm: float = 1.0
  weight_decay: float = 1e-4
  seed: int = 0
  num_models: int = 1
  eval_bits: tuple[int, ...] = (16, 64, 256, 1024, 10000)
  eval_size: int = 512
  long_eval_size: int = 1000
  log_every: int = 10
  checkpoint_every: int = 100
  early_stop: bool = True

  def __post_init__(self):
    for name in ("learning_rates", "eval_bits"):  # a list is taken as the tuple it spells
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("bits", "consolidate_bits", "consolidate_batch_size", "batch_size", "steps",
                 "num_models", "eval_size", "long_eval_size", "log_every", "checkpoint_every"):
      value = getattr(self, name)
      _check(name, value, training.is_integer(value) and value >= 1, "a positive integer")
    for name in ("consolidate_steps", "seed"):
      value = getattr(self, name)
      _check(name, value, training.is_integer(value) and value >= 0, "an integer >= 0")
    for name in ("mixed_carries", "consolidate_mixed"):
      value = getattr(self, name)
      _check(name, value, training.is_number(value) and 0.0 <= value <= 1.0,
             "a fraction in [0, 1]")
    _check("consolidate_lr_scale", self.consolidate_lr_scale,
           training.is_number(self.consolidate_lr_scale)
           and 0 < self.consolidate_lr_scale < math.inf, "a positive finite number")
    training.check_learning_rates(self.learning_rates)
    _check("eval_bits", self.eval_bits,
           isinstance(self.eval_bits, tuple) and len(self.eval_bits) > 0
           and all(training.is_integer(b) and b >= 1 for b in self.eval_bits),
           "positive integers (at least one)")
    training.check_seeds(self.seed, self.num_models)
    # The step counter is int32: every step of both phases must fit.
    _check("steps + consolidate_steps", self.steps + self.consolidate_steps,
           self.steps + self.consolidate_steps < 2**31, "below 2**31 (the step counter's range)")
    _check("initializer", self.initializer, self.initializer in INITIALIZERS,
           f"one of {INITIALIZERS}")
    self.model()  # validates the stack for this task
    self.optimizer_config()

  def model(self) -> AdditionModel:
    return AdditionModel(self.rnn)

  def memory_needs(self) -> list[tuple[str, float, str]]:
    """Rough peak memory of each part of a run, ``(setting, bytes, what)``, for
    :func:`jaxgru.tasks.common.check_fits` to compare with the machine's before anything is
    allocated; ``setting`` names the one that grew the estimate the most over its default.

    Training keeps about 8 numbers per hidden unit, step, problem, layer and model for the
    backward pass (twice, for XLA's temporaries); the parameters 4 times (value, gradient, two
    Adam moments); the evaluation holds its problems whole (12 bytes per bit) and runs them in
    chunks of 250 problems by 1024 steps.
    """
    size = np.dtype(self.rnn.cell.state_dtype).itemsize
    d = AdditionConfig()
    n, layers, hidden = self.num_models, self.rnn.num_layers, self.rnn.hidden_size
    params = n * layers * 3 * hidden * (max(2, hidden) + hidden + 2) * size * 4
    needs = [(common.largest_factor({"hidden_size": (hidden, d.rnn.hidden_size),
                                     "num_layers": (layers, 1), "num_models": (n, 1)}),
              params, "the parameters and optimizer state")]
    phases = [("bits", self.bits, "batch_size", self.batch_size, d.bits, d.batch_size)]
    if self.consolidate_steps:
      phases.append(("consolidate_bits", self.consolidate_bits, "consolidate_batch_size",
                     self.consolidate_batch_size, d.consolidate_bits, d.consolidate_batch_size))
    for bits_name, bits, batch_name, batch, bits_default, batch_default in phases:
      act = n * batch * (bits + 1) * layers * hidden * 8 * size * 2
      needs.append((common.largest_factor(
          {bits_name: (bits, bits_default), batch_name: (batch, batch_default),
           "hidden_size": (hidden, d.rnn.hidden_size), "num_layers": (layers, 1),
           "num_models": (n, 1)}), params + act, f"training at {bits} bits"))
    for bits in (self.bits,) + tuple(self.eval_bits):
      problems = self.long_eval_size if bits > 256 else self.eval_size
      chunk = n * min(problems, 250) * min(bits + 1, 1024) * layers * hidden * 8 * size
      setting = "eval_bits" if bits != self.bits else "bits"
      needs.append((setting, params + 12.0 * problems * (bits + 1) + chunk,
                    f"the evaluation at {bits} bits"))
    return needs

  def optimizer_config(self) -> training.OptimizerConfig:
    return training.OptimizerConfig(
        name=self.optimizer, schedule=self.schedule, warmup_steps=self.warmup_steps,
        total_steps=self.steps, clip_norm=self.clip_norm, weight_decay=self.weight_decay)

  def to_json(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {**d, "rnn": common.rnn_to_json(self.rnn), "learning_rates": list(self.learning_rates),
            "eval_bits": list(self.eval_bits)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "AdditionConfig":
    if "rnn" not in d:
      raise common.older_layout("addition config", "rnn")
    d = dict(d)
    return cls(**{**d, "rnn": common.rnn_from_json(d["rnn"]),
                  "learning_rates": tuple(d["learning_rates"]), "eval_bits": tuple(d["eval_bits"])})


# Settings a resumed run may change: how long to train, and how often to log, save, evaluate.
# rnn.cell.precision changes no shape and, on the CPU, no result; runs saved before it existed
# do not record it.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "eval_bits", "eval_size",
                     "long_eval_size", "rnn.cell.precision")

# The entries of the metrics records the progress line shows.
SHOWN_METRICS = ("train_loss", "train_bit_accuracy", "eval_exact_match", "solved_fraction")


def init_states(cfg: AdditionConfig) -> training.TrainState:
  """N fresh model states stacked on a leading axis: model i has seed ``seed + i``."""
  model = cfg.model()
  return training.init_states(lambda key: model.init(key, cfg.initializer),
                              training.make_optimizer(cfg.optimizer_config()), cfg.num_models,
                              cfg.seed, cfg.learning_rates)


def consolidate_optimizer_config(cfg: AdditionConfig) -> training.OptimizerConfig:
  """Phase 2's optimizer: cfg's, with a cosine decay to 0 over the consolidation steps."""
  return dataclasses.replace(cfg.optimizer_config(), schedule="cosine", warmup_steps=0,
                             total_steps=max(cfg.consolidate_steps, 1))


# Many models in one step: the models are vmapped in groups whose training-step working set
# (about _RESIDUAL_BYTES_PER_UNIT bytes per model, problem, time step, layer and hidden unit) is
# at most _GROUP_BYTES; more models run as a loop over equal groups. On the CPU a larger vmapped
# group became memory-bound: at the consolidation shape (about 8.5 MB per model) 256 models in one
# group cost 0.97 of 256 separate steps, in groups of 128 0.59, of 64 0.50, of 32 0.53
# (benchmarks/models.py; docs/performance-notes.md).
_GROUP_BYTES = 2**30
_RESIDUAL_BYTES_PER_UNIT = 4 * 16


def _group_size(num_models: int, most: int) -> int:
  """Models per vmapped group: all of them up to ``most``; beyond, about equal groups, as few as
  ``most`` allows, of a size that divides ``num_models`` where one lies within a factor of 2
  (else the last group is smaller)."""
  if num_models <= most:
    return num_models
  even = -(-num_models // -(-num_models // most))
  for size in range(even, max(1, even // 2) - 1, -1):
    if num_models % size == 0:
      return size
  return even


def make_train_step(cfg: AdditionConfig, mesh: Optional[jax.sharding.Mesh] = None,
                    bits: Optional[int] = None,
                    optimizer: Optional[training.OptimizerConfig] = None,
                    mixed: Optional[float] = None, batch_size: Optional[int] = None):
  """The jitted step over N models: ``state (N, ...) -> (state, metrics (N,))``.

  ``batch_size`` problems (``cfg.batch_size`` by default) of ``bits`` bits (``cfg.bits``), a
  fraction ``mixed`` of them with long carry chains (``cfg.mixed_carries``); ``optimizer``
  defaults to cfg's.
  """
  opt = training.make_optimizer(optimizer or cfg.optimizer_config())
  bits = cfg.bits if bits is None else bits
  mixed = cfg.mixed_carries if mixed is None else mixed
  batch_size = cfg.batch_size if batch_size is None else batch_size
  per_model = (batch_size * (bits + 1) * cfg.rnn.num_layers * cfg.rnn.hidden_size
               * _RESIDUAL_BYTES_PER_UNIT)
  group = _group_size(cfg.num_models, max(1, _GROUP_BYTES // per_model))
  # The loops' defaults for `group` models under one vmap (jaxgru.ScanOptions.models).
  model = dataclasses.replace(cfg.model(), options=ScanOptions(models=group))
  mesh = parallel.batch_mesh(cfg.num_models, mesh)

  def loss_fn(params, key, step):
    del step
    x_BTI, y_BT = input_pipeline.random_batch(key, batch_size, bits, mixed)
    x_BTI, y_BT = parallel.shard_batch((x_BTI, y_BT), mesh)
    return loss_and_metrics(model, params, x_BTI, y_BT)

  one = training.make_train_step(loss_fn, opt)

  def step(states):
    if jax.tree.leaves(states)[0].shape[0] <= group:
      return jax.vmap(one)(states)
    # Groups of `group` models, each vmapped, one after another in the same program.
    return jax.lax.map(one, states, batch_size=group)

  return jax.jit(step, donate_argnums=0)


# Evaluation runs the models on chunks of problems whose gate array per step, (N, problems, 3H)
# floats, is at most _EVAL_CHUNK_BYTES: it then stays in the CPU's caches. With 64 addition models
# (H=16), 1000 problems of 1024 bits took 6-8 s in chunks of 100-125 problems, 12-15 s in chunks
# of 250 (3 MB) and more; one model was as fast in one chunk of 1000 as in chunks of 250.
_EVAL_CHUNK_BYTES = 3 * 2**19


def _eval_batch_chunk(size: int, models: int, hidden: int) -> int:
  """Problems per evaluation chunk: as many as _EVAL_CHUNK_BYTES allows, in equal chunks."""
  most = max(1, _EVAL_CHUNK_BYTES // (models * 3 * hidden * 4))
  return -(-size // -(-size // most)) if size else 1


def make_evaluate(cfg: AdditionConfig, bits: int, size: int, batch_chunk: Optional[int] = None,
                  time_chunk: int = 1024, log=None, every_seconds: float = 10.0):
  """Returns ``params (N, ...) -> exact-match (N,)`` on ``size`` held-out problems.

  Problems are the same for every model. Long problems are run in chunks of problems and of time
  steps (the state carries across time chunks), so 10,000-bit evaluation fits in memory; None
  for ``batch_chunk`` sizes the chunks of problems to the number of models. With
  ``log``, an evaluation that takes longer than ``every_seconds`` reports its progress that
  often (and, being a Python loop over chunks, it stops at the next chunk on Ctrl-C).
  """
  model = cfg.model()
  x_BTI, y_BT = input_pipeline.eval_batch(cfg.seed, bits, size)
  steps = bits + 1

  @jax.jit
  def chunk_fn(params, x_CTI, y_CT, h0_NLCH):
    logits_NCT, h_NLCH = jax.vmap(model.logits, in_axes=(0, None, 0))(params, x_CTI, h0_NLCH)
    ok_NC = ((logits_NCT > 0) == (y_CT[None] > 0)).all(axis=-1)
    return ok_NC, h_NLCH

  def evaluate(params) -> np.ndarray:
    num = jax.tree.leaves(params)[0].shape[0]
    layers, hidden = cfg.rnn.num_layers, cfg.rnn.hidden_size
    chunk = batch_chunk or _eval_batch_chunk(size, num, hidden)
    correct = []
    started = last = time.time()
    chunks = -(-size // chunk) * -(-steps // time_chunk)
    done = 0
    for b0 in range(0, size, chunk):
      x_CTI, y_CT = x_BTI[b0:b0 + chunk], y_BT[b0:b0 + chunk]
      # Host zeros: in a multi-process job jit places them like the (global) params.
      h_NLCH = np.zeros((num, layers, x_CTI.shape[0], hidden), cfg.rnn.cell.state_dtype)
      ok_NC = None
      for t0 in range(0, steps, time_chunk):
        ok_t, h_NLCH = chunk_fn(params, x_CTI[:, t0:t0 + time_chunk], y_CT[:, t0:t0 + time_chunk],
                                h_NLCH)
        ok_NC = ok_t if ok_NC is None else ok_NC & ok_t
        done += 1
        if log is not None and time.time() - last > every_seconds:
          ok_NC.block_until_ready()
          last = time.time()
          log(f"evaluating at {bits} bits: {done}/{chunks} chunks, {last - started:.0f}s")
      correct.append(ok_NC)
    # Gathered from every process holding some of the models (parallel.fetch), so that every
    # process gets the same scores and takes the same decisions from them.
    return parallel.fetch(jnp.concatenate(correct, axis=1).mean(axis=1, dtype=jnp.float32))

  return evaluate


def steps_summary(steps_to_solve: list[Optional[float]]) -> dict[str, Any]:
  """Distribution of steps-to-solve (or seconds) over models (None for unsolved)."""
  solved = sorted(s for s in steps_to_solve if s is not None)
  out = {"solved_fraction": len(solved) / max(len(steps_to_solve), 1)}
  if solved:
    out.update(min=solved[0], max=solved[-1], median=float(np.median(solved)),
               p90=float(np.percentile(solved, 90)), mean=float(np.mean(solved)))
  n = len(steps_to_solve)
  med_all = sorted(s if s is not None else math.inf for s in steps_to_solve)[(n - 1) // 2] \
      if n else None
  out["median_all"] = None if med_all is None or med_all == math.inf else med_all
  return out


def _step_of(state: training.TrainState) -> int:
  return int(parallel.fetch(state.step).reshape(-1)[0])


def train_and_evaluate(cfg: AdditionConfig, workdir: str, log=logging.info,
                       progress: Optional[training.Progress] = None,
                       flags: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """Trains ``cfg.num_models`` models (resuming from ``workdir``), evaluates, writes summary.

  Writes ``workdir/config.json`` (after the resume checks and the restore), ``metrics.jsonl``,
  ``summary.json`` (with ``flags`` recorded as they are: ``run.py`` passes its flags) and orbax
  checkpoints. Returns the summary dict. ``log`` takes the run's messages; ``progress`` shows
  both phases' log intervals on one line (by default a :class:`training.Progress` over ``log``:
  a line redrawn on stderr when it is a terminal, else a log line per interval).

  Raises:
    training.ConfigMismatch: ``workdir`` holds checkpoints of a run with other settings (beyond
      :data:`RESUMABLE_CHANGES`).
    training.Diverged: the loss became NaN or infinite.
    training.CheckpointError: checkpoints are there but none restores.
  """
  record = {"task": TASK, "config": cfg.to_json()}
  training.check_resume(workdir, record, RESUMABLE_CHANGES)
  progress = progress or training.Progress(log)
  if warning := cfg.optimizer_config().warmup_warning():
    log(warning)
  os.makedirs(workdir, exist_ok=True)
  wall_start = time.time()
  mesh = parallel.make_mesh()
  ckpt = training.Checkpointer(workdir)
  state = parallel.shard_models(init_states(cfg), mesh)
  steps_to_solve: list[Optional[int]] = [None] * cfg.num_models
  solve_end: Optional[int] = None  # the step at which phase 1 (solving) ended
  resumed_from = None
  writer = training.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  if ckpt.latest_step() is not None:
    state, extra, resumed_from = ckpt.restore_intact(state, log)
    extra = extra or {}
    steps_to_solve = list(extra.get("steps_to_solve", steps_to_solve))
    solve_end = extra.get("solve_end")
    log(f"resumed from the checkpoint at step {resumed_from} in {ckpt.directory}")
  writer.cut_after(resumed_from or 0)  # the steps after it are taken (and logged) again
  # After the checks and the restore (a refused resume leaves the stored run as it was), and
  # before the first checkpoint of a new run (a checkpoint always has its config beside it).
  training.write_json_atomic(os.path.join(workdir, "config.json"), record)

  train_step = make_train_step(cfg, mesh)
  t0 = time.time()
  train_step = train_step.lower(state).compile()
  compile_seconds = time.time() - t0
  t0 = time.time()
  eval_train_len = make_evaluate(cfg, cfg.bits, cfg.eval_size)
  eval_train_len(state.params)
  eval_compile_seconds = time.time() - t0

  seconds_to_solve: list[Optional[float]] = [None] * cfg.num_models
  loop_start = time.time()

  def evaluate(state, step):
    exact = eval_train_len(state.params)
    for i, e in enumerate(exact):
      if e == 1.0 and steps_to_solve[i] is None:
        steps_to_solve[i] = step
        seconds_to_solve[i] = time.time() - loop_start
    solved = sum(s is not None for s in steps_to_solve) / cfg.num_models
    stop = cfg.early_stop and all(s is not None for s in steps_to_solve)
    return {"eval_exact_match": float(np.mean(exact)), "solved_fraction": solved}, stop

  extra = lambda: {"steps_to_solve": steps_to_solve, "solve_end": solve_end}
  fit = functools.partial(training.fit, log_every=cfg.log_every,
                          checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt,
                          writer=writer, checkpoint_extra=extra, shown=SHOWN_METRICS,
                          progress=progress)
  all_solved = cfg.early_stop and all(s is not None for s in steps_to_solve)
  with progress:
    train_seconds = 0.0
    if solve_end is None and not all_solved:
      # Phase 1: train at cfg.bits until every model is solved (or cfg.steps).
      result = fit(state, train_step, total_steps=cfg.steps, evaluate=evaluate)
      state, train_seconds = result.state, result.train_seconds

    if cfg.consolidate_steps > 0 and any(s is not None for s in steps_to_solve):
      # Phase 2: consolidate on longer problems at a lower rate, which is what makes solved
      # models exact on far longer numbers (benchmarks/addition.py measures it).
      if solve_end is None:
        solve_end = _step_of(state)
        # A fresh optimizer state: Adam's moments from the solve phase are tiny by now and
        # would keep the steps too small to move (measured: 28 of 32 seeds exact at 10,000 bits
        # with the old moments, 31 of 32 with fresh ones, same steps and rate).
        opt = training.make_optimizer(consolidate_optimizer_config(cfg))
        state = parallel.shard_models(state._replace(
            opt_state=jax.vmap(opt.init)(state.params),
            learning_rate=state.learning_rate * cfg.consolidate_lr_scale), mesh)
        progress.message(
            f"every model solved by step {solve_end}; consolidating for {cfg.consolidate_steps} "
            f"steps, batches of {cfg.consolidate_batch_size} {cfg.consolidate_bits}-bit problems "
            f"({cfg.consolidate_mixed:.0%} with long carry chains)")
      step2 = make_train_step(cfg, mesh, bits=cfg.consolidate_bits,
                              optimizer=consolidate_optimizer_config(cfg),
                              mixed=cfg.consolidate_mixed,
                              batch_size=cfg.consolidate_batch_size).lower(state).compile()
      total = solve_end + cfg.consolidate_steps
      result = fit(state, step2, total_steps=total)
      state, train_seconds = result.state, train_seconds + result.train_seconds
  ckpt.close()

  length_generalization = {}
  per_model_long = {}
  t0 = time.time()
  for bits in cfg.eval_bits:
    size = cfg.long_eval_size if bits > 256 else cfg.eval_size
    exact = make_evaluate(cfg, bits, size, log=log)(state.params)
    per_model_long[str(bits)] = [float(e) for e in exact]
    solved = [e for e, s in zip(exact, steps_to_solve) if s is not None]
    length_generalization[str(bits)] = float(np.mean(solved if solved else exact))
    log(f"exact-match at {bits} bits over {size} problems: {length_generalization[str(bits)]:.4f}"
        + (" (solved models)" if solved else ""))
  summary = {
      "task": TASK,
      "steps": _step_of(state),
      "steps_to_solve": steps_to_solve[0] if cfg.num_models == 1 else steps_to_solve,
      "steps_to_solve_distribution": steps_summary(steps_to_solve),
      "solved_fraction": sum(s is not None for s in steps_to_solve) / cfg.num_models,
      "num_models": cfg.num_models,
      "wall_seconds": time.time() - wall_start,
      "train_seconds": train_seconds,
      "seconds_to_solve": (seconds_to_solve[0] if cfg.num_models == 1 else
                           steps_summary(seconds_to_solve).get("max")),
      "compile_seconds": compile_seconds,
      "eval_compile_seconds": eval_compile_seconds,
      "long_eval_seconds": time.time() - t0,
      "resumed_from_step": resumed_from,
      "length_generalization": length_generalization,
      "length_generalization_per_model": per_model_long,
      "devices": [str(d) for d in jax.devices()],
      "config": cfg.to_json(),
      "flags": flags,
  }
  training.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary
