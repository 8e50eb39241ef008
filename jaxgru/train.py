"""Task-agnostic training pieces: optimizers, train state, checkpoints, metrics, progress.

Nothing here reads flags; ``run.py`` builds a config and passes it in. A task supplies a loss
function ``loss_fn(params, key, step) -> (loss, metrics)`` and gets back one jitted step, which
works on one model or, vmapped, on many models at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine")


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays, saved whole in checkpoints.

  With many models every field gains a leading model axis (N,).
  """
  step: jax.Array           # () int32, steps taken
  params: Any               # the model's parameter pytree
  opt_state: Any            # optax state
  learning_rate: jax.Array  # () float32, the peak learning rate (per model when vmapped)
  rng: jax.Array            # (2,) uint32, raw PRNG key of this model's data and dropout


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Static optimizer settings; the peak learning rate lives in :class:`TrainState`.

  Attributes:
    name: one of ``OPTIMIZERS``.
    schedule: ``"constant"`` or ``"cosine"`` (decay to ``final_fraction`` of the peak by
      ``total_steps``), either after ``warmup_steps`` of linear warm-up.
    clip_norm: global-norm clipping threshold; 0 disables it.
    weight_decay: decoupled weight decay (adamw only).
  """
  name: str = "adam"
  schedule: str = "constant"
  warmup_steps: int = 0
  total_steps: int = 1000
  final_fraction: float = 0.0
  clip_norm: float = 0.0
  weight_decay: float = 1e-4
  momentum: float = 0.9

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


def lr_shape(cfg: OptimizerConfig) -> optax.Schedule:
  """The learning-rate schedule with a peak of 1, to be multiplied by the state's rate."""
  warmup = max(int(cfg.warmup_steps), 0)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else 1.0, 1.0, warmup, max(int(cfg.total_steps), warmup + 1),
        cfg.final_fraction)
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)], [warmup])
  return optax.constant_schedule(1.0)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """The optax transformation for a peak learning rate of 1 (scaled per model in the step)."""
  shape = lr_shape(cfg)
  base = {
      "adam": lambda: optax.adam(shape),
      "adamw": lambda: optax.adamw(shape, weight_decay=cfg.weight_decay),
      "sgd": lambda: optax.sgd(shape, momentum=cfg.momentum or None),
      "rmsprop": lambda: optax.rmsprop(shape),
  }[cfg.name]()
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
  return base


def init_state(params: Any, optimizer: optax.GradientTransformation, learning_rate: float,
               seed: int) -> TrainState:
  """A fresh :class:`TrainState` for one model."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    learning_rate=jnp.asarray(learning_rate, jnp.float32),
                    rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32))


def init_states(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                num_models: int, seed: int, learning_rates: Sequence[float]) -> TrainState:
  """N fresh states stacked on a leading axis: model i has seed ``seed + i`` and learning rate
  ``learning_rates[i % len(learning_rates)]``; its params are ``init_params(PRNGKey(seed + i))``.
  """
  states = []
  for i in range(num_models):
    params = init_params(jax.random.PRNGKey(seed + i))
    lr = learning_rates[i % len(learning_rates)]
    states.append(init_state(params, optimizer, lr, seed + i))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


LossFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure step ``state -> (state, metrics)`` for ONE model.

  The step's key is ``fold_in(key(state.rng), state.step)``, so the data of step s depends only
  on (seed, s): a resumed run sees exactly the batches an uninterrupted one would. ``metrics``
  holds the loss and whatever ``loss_fn`` returns, plus ``grad_norm``.
  """
  def step(state: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, key, state.step)
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int counts and floats
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (u * state.learning_rate).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return step


# -- checkpoints -----------------------------------------------------------------------------------

class Checkpointer:
  """Orbax checkpoints of a :class:`TrainState` under ``workdir/checkpoints``.

  Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  process killed mid-write leaves the previous checkpoint as the latest readable one.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, extra: Optional[dict] = None) -> None:
    """Saves ``state`` (and JSON-able ``extra``) as checkpoint ``step``; waits until done."""
    args = {"state": self._ocp.args.StandardSave(state)}
    if extra is not None:
      args["extra"] = self._ocp.args.JsonSave(extra)
    self.manager.save(step, args=self._ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()

  def restore(self, target: TrainState, step: Optional[int] = None
              ) -> tuple[TrainState, Optional[dict]]:
    """Restores checkpoint ``step`` (the latest by default) into the structure of ``target``."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            target)
    args = {"state": self._ocp.args.StandardRestore(abstract)}
    # item_metadata() cannot tell a JSON item's presence in a fresh process (it reports None
    # for every item whose handler is not registered yet), so look for its folder instead.
    if os.path.isdir(os.path.join(self.directory, str(step), "extra")):
      args["extra"] = self._ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=self._ocp.args.Composite(**args))
    return restored["state"], restored.get("extra") if "extra" in args else None

  def close(self) -> None:
    self.manager.close()


class ConfigMismatch(ValueError):
  """A work directory holds checkpoints of a run with another configuration."""


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one finished checkpoint."""
  ckpts = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))


def check_resume(workdir: str, record: dict[str, Any], may_differ: Sequence[str] = ()) -> None:
  """Raises :class:`ConfigMismatch` unless ``workdir``'s run can resume under ``record``.

  ``record`` is what the run writes to ``workdir/config.json``: ``{"task": ..., "config":
  {...}}``. A work directory without checkpoints, or without that file, can always be used.
  Otherwise every config entry must match the stored one, except those in ``may_differ``
  (ones that change neither the shapes of the state nor what a step computes, such as how
  often to log). Checked before anything is written, so the stored run stays as it was.
  """
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoint(workdir) and os.path.exists(path)):
    return
  with open(path) as f:
    stored = json.load(f)
  # Through JSON, so tuples and lists (and ints and floats) compare as they were stored.
  record = json.loads(json.dumps(record, default=_json_default))
  if stored.get("task") != record.get("task"):
    raise ConfigMismatch(f"{workdir} holds checkpoints of a {stored.get('task')!r} run, not "
                         f"{record.get('task')!r}; use another work directory")
  old, new = stored.get("config", {}), record.get("config", {})
  differ = [k for k in sorted(set(old) | set(new))
            if k not in may_differ and old.get(k) != new.get(k)]
  if differ:
    shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ConfigMismatch(f"{workdir} holds checkpoints of a run with other settings: {shown}"
                         f"{more}; resume with the same settings or use another work directory")


def is_writer() -> bool:
  """Whether this process writes the run's files: in a multi-host job every process runs the
  same program, and only process 0 writes config, metrics and summary (orbax coordinates its
  checkpoints itself)."""
  return jax.process_index() == 0


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path`` through a temporary file and a rename, so readers never see half.

  Only on the writing process (:func:`is_writer`); a no-op on the others.
  """
  if not is_writer():
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


class MetricsWriter:
  """Appends one JSON line per log interval to ``metrics.jsonl`` (on the writing process)."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: dict[str, Any]) -> None:
    if not is_writer():
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=_json_default, sort_keys=True) + "\n")


class Progress:
  """A one-line progress bar in a terminal; plain log lines through ``log`` otherwise."""

  def __init__(self, total: int, log: Callable[[str], None], stream=None):
    self.total, self.log = total, log
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.time()

  def update(self, step: int, text: str) -> None:
    if self.tty:
      frac = min(step / max(self.total, 1), 1.0)
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      rate = step / max(time.time() - self.start, 1e-9)
      self.stream.write(f"\r[{bar}] {step}/{self.total} {text} ({rate:.0f} steps/s) ")
      self.stream.flush()
    else:
      self.log(f"step {step}/{self.total}: {text}")

  def close(self) -> None:
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


class Interrupted(Exception):
  """Raised by :class:`StopSignals` after SIGTERM or SIGINT, at a safe point."""


class StopSignals:
  """Turns SIGTERM/SIGINT into a flag checked between steps, so a checkpoint can be written."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not in the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: give up at once
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False


def first_nan_step(losses: np.ndarray, first_step: int) -> Optional[int]:
  """The step number of the first non-finite entry of ``losses`` (steps from ``first_step``)."""
  bad = ~np.isfinite(losses)
  if not bad.any():
    return None
  return first_step + int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))


def steps_summary(steps_to_solve: list[Optional[int]]) -> dict[str, Any]:
  """Distribution of steps-to-solve over models (None for unsolved)."""
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


class Diverged(FloatingPointError):
  """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  steps: int                      # steps taken in total (including before a resume)
  stopped_early: bool             # ``evaluate`` asked to stop
  train_seconds: float            # wall time of this process's training loop


def fit(state: TrainState, train_step: Callable[..., tuple[TrainState, dict]], *,
        total_steps: int, log_every: int, checkpoint_every: int,
        checkpointer: Optional[Checkpointer], writer: Optional[MetricsWriter],
        progress: Optional[Progress],
        evaluate: Optional[Callable[[TrainState, int], tuple[dict, bool]]] = None,
        batch_fn: Optional[Callable[[int], tuple]] = None,
        checkpoint_extra: Optional[Callable[[], dict]] = None) -> LoopResult:
  """Runs ``train_step`` until ``total_steps`` or until ``evaluate`` says stop.

  Metrics stay on the device between log intervals and are fetched once per interval. At each
  interval the loss is checked (a non-finite loss raises :class:`Diverged` naming the step,
  before anything is saved), ``evaluate(state, step) -> (record, stop)`` runs, one line goes to
  ``writer`` and a checkpoint is written every ``checkpoint_every`` steps, at a stop, at the end,
  and on SIGTERM/SIGINT (which then raise :class:`Interrupted`).

  Args:
    state: the state to start from (its ``step`` may be > 0 after a resume; with many models,
      every model is at the same step).
    train_step: jitted ``(state, *batch) -> (state, metrics)``.
    batch_fn: ``step -> batch tuple`` for tasks whose data come from the host.
  """
  step = int(np.asarray(state.step).reshape(-1)[0])
  start = time.time()
  stopped = False
  with StopSignals() as signals:
    while step < total_steps:
      n = min(log_every - step % log_every, total_steps - step)
      pending = []
      for _ in range(n):
        state, metrics = train_step(state, *(batch_fn(step) if batch_fn else ()))
        pending.append(metrics)
        step += 1
        if signals.signum is not None:
          break
      fetched = jax.device_get(pending)
      losses = np.stack([np.asarray(m["loss"]) for m in fetched])
      bad = first_nan_step(losses, step - len(fetched) + 1)
      if bad is not None:
        raise Diverged(f"loss became non-finite at step {bad}; training stopped, the last good "
                       f"checkpoint is kept")
      record = {"step": step}
      for k in fetched[-1]:
        record[f"train_{k}"] = float(np.mean([np.mean(m[k]) for m in fetched]))
      stop = False
      if evaluate is not None and (step % log_every == 0 or step == total_steps):
        extra, stop = evaluate(state, step)
        record.update(extra)
      record["elapsed_seconds"] = time.time() - start
      if writer is not None:
        writer.write(record)
      if progress is not None:
        shown = {k: v for k, v in record.items() if k in (
            "train_loss", "train_bit_accuracy", "train_accuracy", "eval_exact_match",
            "eval_accuracy", "solved_fraction")}
        progress.update(step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))
      done = stop or step >= total_steps or signals.signum is not None
      if checkpointer is not None and (done or step % checkpoint_every == 0):
        checkpointer.save(step, state, checkpoint_extra() if checkpoint_extra else None)
      if signals.signum is not None:
        raise Interrupted(f"stopped by signal {signals.signum} at step {step}; checkpoint saved, "
                          "run the same command again to resume")
      if stop:
        stopped = True
        break
  if progress is not None:
    progress.close()
  return LoopResult(state=state, steps=step, stopped_early=stopped,
                    train_seconds=time.time() - start)
