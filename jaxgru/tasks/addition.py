"""Binary addition: a GRU adds two integers of any length, read as reversed bitstrings.

At step t the input is the pair of bits (a_t, b_t), least significant first, and the target is
the sum bit s_t. Numbers of ``bits`` bits get one more step for the final carry, so a problem is
``x`` (bits + 1, 2) and ``y`` (bits + 1,). The model is a unidirectional jaxgru stack with a
per-step linear readout and a sigmoid cross-entropy per bit.

Shapes carry their names: N models, B problems, T steps, H hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgru import parallel
from jaxgru import train as _train
from jaxgru.cell import GRUConfig
from jaxgru.rnn import RNNConfig

# -- encoding --------------------------------------------------------------------------------------


def to_bits(n: int, width: int) -> np.ndarray:
  """Non-negative integer -> (width,) uint8 bits, least significant first."""
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
    raise ValueError(f"expected a non-negative integer, got {n!r}")
  n = int(n)
  if n.bit_length() > width:
    raise ValueError(f"{n} needs {n.bit_length()} bits, more than width={width}")
  raw = n.to_bytes((width + 7) // 8 or 1, "little")
  return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:width].copy()


def from_bits(bits: Any) -> int:
  """(T,) bits, least significant first -> the integer they encode (any size)."""
  bits = np.asarray(bits).astype(np.uint8).reshape(-1)
  return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def encode(a: int, b: int, bits: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """The problem ``a + b``: inputs (T, 2) float32 and target bits (T,), T = bits + 1.

  ``bits`` defaults to the longer operand's bit length (at least 1).
  """
  width = bits if bits is not None else max(int(a).bit_length(), int(b).bit_length(), 1)
  x = np.stack([to_bits(a, width + 1), to_bits(b, width + 1)], axis=-1).astype(np.float32)
  return x, to_bits(a + b, width + 1)


def random_problem(key: jax.Array, bits: int, mixed: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """ONE random problem of two ``bits``-bit numbers: x (bits+1, 2) float32, y (bits+1,) int32.

  ``mixed=False``: every bit uniform. ``mixed=True``: ``a`` uniform and ``b = a XOR m`` where each
  bit of m is 1 with a probability q drawn per problem from U(0, 1); m = 1 is the position where
  an incoming carry propagates, so q near 1 gives the long carry chains that uniform bits make
  rare (their longest chain grows only as log2(bits)), and q near 0 gives none. Each bit of b is
  still uniform on average.

  Batch it with ``jax.vmap(random_problem, in_axes=(0, None, None))(keys, bits, mixed)``.
  """
  if mixed:
    k_a, k_q, k_m = jax.random.split(key, 3)
    a = jax.random.bernoulli(k_a, 0.5, (bits,))
    m = jax.random.bernoulli(k_m, jax.random.uniform(k_q), (bits,))
    ab = jnp.stack([a, a ^ m], axis=-1).astype(jnp.int32)
  else:
    ab = jax.random.bernoulli(key, 0.5, (bits, 2)).astype(jnp.int32)
  ab = jnp.concatenate([ab, jnp.zeros((1, 2), jnp.int32)], axis=0)

  def add_bit(carry, pair):
    a, b = pair[0], pair[1]
    total = a + b + carry
    return total // 2, total % 2

  _, y = jax.lax.scan(add_bit, jnp.zeros((), jnp.int32), ab)
  return ab.astype(jnp.float32), y


def random_batch(key: jax.Array, batch: int, bits: int, mixed: float = 0.0
                 ) -> tuple[jax.Array, jax.Array]:
  """B independent problems: x (B, bits+1, 2), y (B, bits+1).

  ``mixed`` is the fraction of the batch drawn with ``random_problem(..., mixed=True)`` (the
  last ``round(mixed * B)`` problems); the others have uniform bits. A bool means 1.0 or 0.0.
  """
  mixed = float(mixed)
  if not 0.0 <= mixed <= 1.0:
    raise ValueError(f"mixed must be a fraction in [0, 1], got {mixed}")
  keys = jax.random.split(key, batch)
  num_mixed = int(round(mixed * batch))
  parts = [jax.vmap(random_problem, in_axes=(0, None, None))(k, bits, m)
           for k, m in ((keys[:batch - num_mixed], False), (keys[batch - num_mixed:], True))
           if k.shape[0]]
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate(a) for a in zip(*parts))


# -- model -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdditionModel:
  """A unidirectional jaxgru stack and a per-step linear readout to one logit."""

  rnn: RNNConfig

  def __post_init__(self):
    if self.rnn.input_size != 2 or self.rnn.bidirectional:
      raise ValueError("the addition model reads 2 bits per step with a unidirectional GRU")

  def init(self, key: jax.Array, initializer: str = "keras") -> dict[str, Any]:
    k_rnn, k_out = jax.random.split(key)
    size = self.rnn.output_size
    dtype = self.rnn.layer_cell(0).state_dtype
    return {"gru": self.rnn.init(k_rnn, initializer),
            "readout": {"w": jax.nn.initializers.lecun_normal()(k_out, (size, 1), dtype),
                        "b": jnp.zeros((1,), dtype)}}

  def logits(self, params: dict[str, Any], x_BxTx2: jax.Array, h0: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array]:
    """Per-bit logits (B, T) and the final states (L, B, H) (pass them as ``h0`` to continue)."""
    ys_BxTxH, h_last = self.rnn.apply(params["gru"], x_BxTx2, h0=h0)
    out = params["readout"]
    logits = jnp.matmul(ys_BxTxH, out["w"])[..., 0] + out["b"][0]
    return logits, h_last


def loss_and_metrics(model: AdditionModel, params, x_BxTx2, y_BxT):
  logits_BxT, _ = model.logits(params, x_BxTx2)
  labels = y_BxT.astype(logits_BxT.dtype)
  loss = optax.sigmoid_binary_cross_entropy(logits_BxT, labels).mean()
  correct_BxT = (logits_BxT > 0) == (y_BxT > 0)
  return loss, {"bit_accuracy": correct_BxT.mean(dtype=jnp.float32),
                "exact_match": correct_BxT.all(axis=1).mean(dtype=jnp.float32)}


def predict_sum(model: AdditionModel, params, a: int, b: int) -> int:
  """The model's sum of two non-negative integers of any size."""
  x, _ = encode(a, b)
  logits, _ = model.logits(params, jnp.asarray(x)[None])
  return from_bits(np.asarray(logits[0] > 0))


# -- training --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
  """Everything a training run needs; ``run.py`` fills it from flags. Defaults by measurement."""

  hidden_size: int = 16
  num_layers: int = 1
  variant: str = "reset_after"
  activation: str = "tanh"
  recurrent_activation: str = "sigmoid"
  initializer: str = "keras"
  dtype: Optional[str] = None
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

  def model(self) -> AdditionModel:
    return AdditionModel(RNNConfig(GRUConfig(
        input_size=2, hidden_size=self.hidden_size,
        variant=self.variant, activation=self.activation,
        recurrent_activation=self.recurrent_activation, dtype=self.dtype),
        num_layers=self.num_layers))

  def optimizer_config(self) -> _train.OptimizerConfig:
    return _train.OptimizerConfig(
        name=self.optimizer, schedule=self.schedule, warmup_steps=self.warmup_steps,
        total_steps=self.steps, clip_norm=self.clip_norm, weight_decay=self.weight_decay)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "AdditionConfig":
    d = dict(d)
    for k in ("learning_rates", "eval_bits"):
      d[k] = tuple(d[k])
    return cls(**d)


EVAL_SALT = 0x5EED  # held-out problems come from a key stream training never uses


# Settings a resumed run may change: how long to train, and how often to log, save, evaluate.
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every", "eval_bits", "eval_size",
                     "long_eval_size")


def init_states(cfg: AdditionConfig) -> _train.TrainState:
  """N fresh model states stacked on a leading axis: model i has seed ``seed + i``."""
  model = cfg.model()
  return _train.init_states(lambda key: model.init(key, cfg.initializer),
                            _train.make_optimizer(cfg.optimizer_config()), cfg.num_models,
                            cfg.seed, cfg.learning_rates)


def consolidate_optimizer_config(cfg: AdditionConfig) -> _train.OptimizerConfig:
  """Phase 2's optimizer: cfg's, with a cosine decay to 0 over the consolidation steps."""
  return dataclasses.replace(cfg.optimizer_config(), schedule="cosine", warmup_steps=0,
                             total_steps=max(cfg.consolidate_steps, 1))


def make_train_step(cfg: AdditionConfig, mesh: Optional[jax.sharding.Mesh] = None,
                    bits: Optional[int] = None,
                    optimizer: Optional[_train.OptimizerConfig] = None,
                    mixed: Optional[float] = None, batch_size: Optional[int] = None):
  """The jitted step over N models: ``state (N, ...) -> (state, metrics (N,))``.

  ``batch_size`` problems (``cfg.batch_size`` by default) of ``bits`` bits (``cfg.bits``), a
  fraction ``mixed`` of them with long carry chains (``cfg.mixed_carries``); ``optimizer``
  defaults to cfg's.
  """
  model = cfg.model()
  opt = _train.make_optimizer(optimizer or cfg.optimizer_config())
  bits = cfg.bits if bits is None else bits
  mixed = cfg.mixed_carries if mixed is None else mixed
  batch_size = cfg.batch_size if batch_size is None else batch_size

  def loss_fn(params, key, step):
    del step
    x, y = random_batch(key, batch_size, bits, mixed)
    x, y = parallel.shard_batch((x, y), mesh)
    return loss_and_metrics(model, params, x, y)

  step = jax.vmap(_train.make_train_step(loss_fn, opt))
  return jax.jit(step, donate_argnums=0)


def make_evaluate(cfg: AdditionConfig, bits: int, size: int, batch_chunk: int = 250,
                  time_chunk: int = 1024):
  """Returns jitted ``params (N, ...) -> exact-match (N,)`` on ``size`` held-out problems.

  Problems are the same for every model. Long problems are run in chunks of problems and of time
  steps (the state carries across time chunks), so 10,000-bit evaluation fits in memory.
  """
  model = cfg.model()
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), EVAL_SALT + bits)
  x_all, y_all = random_batch(key, size, bits)
  steps = bits + 1

  @jax.jit
  def chunk_fn(params, x, y, h0):
    logits, h_last = jax.vmap(model.logits, in_axes=(0, None, 0))(params, x, h0)
    ok = ((logits > 0) == (y[None] > 0)).all(axis=-1)
    return ok, h_last

  def evaluate(params) -> np.ndarray:
    num = jax.tree.leaves(params)[0].shape[0]
    layers, hidden = cfg.num_layers, cfg.hidden_size
    correct = []
    for b0 in range(0, size, batch_chunk):
      xb, yb = x_all[b0:b0 + batch_chunk], y_all[b0:b0 + batch_chunk]
      h = jnp.zeros((num, layers, xb.shape[0], hidden), model.rnn.layer_cell(0).state_dtype)
      ok = jnp.ones((num, xb.shape[0]), bool)
      for t0 in range(0, steps, time_chunk):
        ok_t, h = chunk_fn(params, xb[:, t0:t0 + time_chunk], yb[:, t0:t0 + time_chunk], h)
        ok = ok & ok_t
      correct.append(ok)
    return np.asarray(jnp.concatenate(correct, axis=1).mean(axis=1, dtype=jnp.float32))

  return evaluate


def train_and_evaluate(cfg: AdditionConfig, workdir: str,
                       log=logging.info, progress_stream=None) -> dict[str, Any]:
  """Trains ``cfg.num_models`` models (resuming from ``workdir``), evaluates, writes summary.

  Writes ``workdir/config.json``, ``metrics.jsonl``, ``summary.json`` and orbax checkpoints.
  Returns the summary dict.

  Raises:
    train.ConfigMismatch: ``workdir`` holds checkpoints of a run with other settings (beyond
      :data:`RESUMABLE_CHANGES`).
  """
  record = {"task": "addition", "config": cfg.to_json()}
  _train.check_resume(workdir, record, RESUMABLE_CHANGES)
  os.makedirs(workdir, exist_ok=True)
  wall_start = time.time()
  _train.write_json_atomic(os.path.join(workdir, "config.json"), record)
  mesh = parallel.make_mesh()
  ckpt = _train.Checkpointer(workdir)
  state = parallel.shard_models(init_states(cfg), mesh)
  steps_to_solve: list[Optional[int]] = [None] * cfg.num_models
  solve_end: Optional[int] = None  # the step at which phase 1 (solving) ended
  resumed_from = ckpt.latest_step()
  if resumed_from is not None:
    state, extra = ckpt.restore(state)
    extra = extra or {}
    steps_to_solve = list(extra.get("steps_to_solve", steps_to_solve))
    solve_end = extra.get("solve_end")
    log(f"resumed from the checkpoint at step {resumed_from} in {ckpt.directory}")

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

  writer = _train.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  extra = lambda: {"steps_to_solve": steps_to_solve, "solve_end": solve_end}
  all_solved = cfg.early_stop and all(s is not None for s in steps_to_solve)
  train_seconds = 0.0
  if solve_end is None and not all_solved:
    # Phase 1: train at cfg.bits until every model is solved (or cfg.steps).
    result = _train.fit(
        state, train_step, total_steps=cfg.steps, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt, writer=writer,
        progress=_train.Progress(cfg.steps, log, progress_stream), evaluate=evaluate,
        checkpoint_extra=extra)
    state, train_seconds = result.state, result.train_seconds
  step_now = int(np.asarray(state.step).reshape(-1)[0])

  if cfg.consolidate_steps > 0 and any(s is not None for s in steps_to_solve):
    # Phase 2: consolidate on longer problems at a lower rate, which is what makes solved models
    # exact on far longer numbers (benchmarks/addition.py measures it).
    if solve_end is None:
      solve_end = step_now
      # A fresh optimizer state: Adam's moments from the solve phase are tiny by now and would
      # keep the steps too small to move (measured: 28 of 32 seeds exact at 10,000 bits with the
      # old moments, 31 of 32 with fresh ones, same steps and rate).
      opt = _train.make_optimizer(consolidate_optimizer_config(cfg))
      state = parallel.shard_models(state._replace(
          opt_state=jax.vmap(opt.init)(state.params),
          learning_rate=state.learning_rate * cfg.consolidate_lr_scale), mesh)
      log(f"every model solved by step {solve_end}; consolidating for {cfg.consolidate_steps} "
          f"steps, batches of {cfg.consolidate_batch_size} {cfg.consolidate_bits}-bit problems "
          f"({cfg.consolidate_mixed:.0%} with long carry chains)")
    step2 = make_train_step(cfg, mesh, bits=cfg.consolidate_bits,
                            optimizer=consolidate_optimizer_config(cfg),
                            mixed=cfg.consolidate_mixed,
                            batch_size=cfg.consolidate_batch_size).lower(state).compile()
    total = solve_end + cfg.consolidate_steps
    result = _train.fit(
        state, step2, total_steps=total, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt, writer=writer,
        progress=_train.Progress(total, log, progress_stream), checkpoint_extra=extra)
    state, train_seconds = result.state, train_seconds + result.train_seconds
  ckpt.close()
  result = _train.LoopResult(state=state, steps=int(np.asarray(state.step).reshape(-1)[0]),
                             stopped_early=False, train_seconds=train_seconds)

  length_generalization = {}
  per_model_long = {}
  t0 = time.time()
  for bits in cfg.eval_bits:
    size = cfg.long_eval_size if bits > 256 else cfg.eval_size
    exact = make_evaluate(cfg, bits, size)(result.state.params)
    per_model_long[str(bits)] = [float(e) for e in exact]
    solved = [e for e, s in zip(exact, steps_to_solve) if s is not None]
    length_generalization[str(bits)] = float(np.mean(solved if solved else exact))
    log(f"exact-match at {bits} bits over {size} problems: {length_generalization[str(bits)]:.4f}"
        + (" (solved models)" if solved else ""))
  summary = {
      "task": "addition",
      "steps": result.steps,
      "steps_to_solve": steps_to_solve[0] if cfg.num_models == 1 else steps_to_solve,
      "steps_to_solve_distribution": _train.steps_summary(steps_to_solve),
      "solved_fraction": sum(s is not None for s in steps_to_solve) / cfg.num_models,
      "num_models": cfg.num_models,
      "wall_seconds": time.time() - wall_start,
      "train_seconds": train_seconds,
      "seconds_to_solve": (seconds_to_solve[0] if cfg.num_models == 1 else
                           _train.steps_summary(seconds_to_solve).get("max")),
      "compile_seconds": compile_seconds,
      "eval_compile_seconds": eval_compile_seconds,
      "long_eval_seconds": time.time() - t0,
      "resumed_from_step": resumed_from,
      "length_generalization": length_generalization,
      "length_generalization_per_model": per_model_long,
      "devices": [str(d) for d in jax.devices()],
      "config": cfg.to_json(),
  }
  _train.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  return summary


def load_trained(workdir: str) -> tuple[AdditionConfig, _train.TrainState, list]:
  """The config, the states of all N models (stacked) and their steps-to-solve, from a run."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no trained run in {workdir} (missing config.json)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("task") != "addition":
    raise ValueError(f"{workdir} holds a {meta.get('task')!r} run, not an addition run")
  cfg = AdditionConfig.from_json(meta["config"])
  ckpt = _train.Checkpointer(workdir)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  state, extra = ckpt.restore(init_states(cfg))
  ckpt.close()
  steps_to_solve = (extra or {}).get("steps_to_solve", [None] * cfg.num_models)
  return cfg, state, steps_to_solve


def best_model(state: _train.TrainState, steps_to_solve: Sequence[Optional[int]]) -> Any:
  """The params of the first solved model (the first model if none solved)."""
  solved = [i for i, s in enumerate(steps_to_solve) if s is not None]
  i = solved[0] if solved else 0
  return jax.tree.map(lambda x: x[i], state.params)
