"""Checkpoints and the run's files: what a work directory holds and whether a run may resume.

Owns :class:`Checkpointer` (orbax checkpoints of a :class:`~jaxgru.training.state.TrainState`),
:func:`has_checkpoint`, :func:`check_resume` and :class:`ConfigMismatch`, :func:`is_writer` and
:func:`write_json_atomic` (config.json and summary.json, written only by process 0).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jaxgru._extras import require
from jaxgru.training import parallel
from jaxgru.training.state import TrainState


COMMIT_MARKER = "commit_success.txt"  # orbax writes it last into a finished step directory


class CheckpointError(Exception):
  """No checkpoint of a work directory could be restored (every one is missing or damaged)."""


def intact_steps(workdir: str) -> list[int]:
  """The steps of ``workdir/checkpoints`` whose directories orbax finished (they hold its commit
  marker), oldest first. Half-written step directories and orbax's ``*.orbax-checkpoint-tmp*``
  directories are not checkpoints."""
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return []
  return sorted(int(n) for n in os.listdir(ckpts)
                if n.isdigit() and os.path.isfile(os.path.join(ckpts, n, COMMIT_MARKER)))


def _leftovers(directory: str) -> list[str]:
  """Entries of a checkpoints folder that are not finished checkpoints: orbax's temporary
  directories and step directories without the commit marker."""
  if not os.path.isdir(directory):
    return []
  out = []
  for n in os.listdir(directory):
    path = os.path.join(directory, n)
    if ".orbax-checkpoint-tmp" in n or (n.isdigit() and not os.path.isfile(
        os.path.join(path, COMMIT_MARKER))):
      out.append(path)
  return sorted(out)


class _DeferSignals:
  """Holds SIGTERM and SIGINT back while a checkpoint is written, so that no signal (a second
  Ctrl-C, a second SIGTERM) can stop orbax half-way; they are delivered when the save is done."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)
  depth = 0  # > 0 while a save runs; Python-level handlers ask :func:`saving`
  pending: Optional[int] = None  # a signal a handler put off (:func:`defer_signal`)

  def __enter__(self):
    _DeferSignals.depth += 1
    self._old = None
    try:
      self._old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
    except (AttributeError, ValueError, OSError):  # no POSIX signals here
      pass
    return self

  def __exit__(self, *exc):
    _DeferSignals.depth -= 1
    if self._old is not None:
      signal.pthread_sigmask(signal.SIG_SETMASK, self._old)
    if _DeferSignals.depth == 0 and _DeferSignals.pending is not None:
      # The save is done: deliver the signal a handler put off, to whatever handles it now.
      signum, _DeferSignals.pending = _DeferSignals.pending, None
      signal.raise_signal(signum)
    return False


def defer_signal(signum: int) -> None:
  """For a signal handler that runs while :func:`saving`: the signal is raised again as soon as
  the save is done (once, however many arrived), instead of being lost."""
  if _DeferSignals.pending is None:
    _DeferSignals.pending = signum


def saving() -> bool:
  """Whether a checkpoint is being written now: a signal handler must then not raise (a signal
  can reach a thread that does not block it, and Python runs its handler in the main thread)."""
  return _DeferSignals.depth > 0


class Checkpointer:
  """Orbax checkpoints of a :class:`TrainState` under ``workdir/checkpoints``.

  Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  process killed mid-write leaves the previous checkpoint as the latest readable one. Only step
  directories holding orbax's commit marker count (:func:`intact_steps`); leftovers of killed
  saves are removed before the next save. While a save runs SIGTERM and SIGINT are held back.

  In a multi-process job every process constructs the Checkpointer and calls ``save`` and
  ``restore`` alike: each writes and reads the shards of the global arrays it holds, and orbax's
  primary process (0) writes the metadata, the JSON items and the commit. The folder must be one
  that every process sees (a shared file system on a cluster).

  Args:
    workdir: the run's folder.
    max_to_keep: finished checkpoints kept.
    read_only: for a run that is only used (evaluated, asked to add): the folder is neither
      created nor cleaned.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False):
    ocp = require("orbax.checkpoint")  # imported here: it is slow to import
    self._ocp = ocp
    self.read_only = read_only
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not read_only:
      self.clean()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                             enable_async_checkpointing=False))

  def clean(self) -> list[str]:
    """Removes what killed saves left behind (see :func:`_leftovers`); returns those paths.

    In a multi-process job process 0 removes them and every process waits for it (each must
    call ``clean``), so that none reads the folder half-cleaned.
    """
    removed = _leftovers(self.directory) if is_writer() else []
    for path in removed:
      shutil.rmtree(path, ignore_errors=True)
    parallel.barrier("jaxgru-checkpoints-clean")
    if hasattr(self, "manager"):
      self.manager.reload()
    return removed

  def latest_step(self) -> Optional[int]:
    """The newest finished checkpoint's step (None if there is none)."""
    steps = intact_steps(self.workdir)
    return steps[-1] if steps else None

  def save(self, step: int, state: TrainState, extra: Optional[dict] = None) -> None:
    """Saves ``state`` (and JSON-able ``extra``) as checkpoint ``step``; waits until done."""
    args = {"state": self._ocp.args.StandardSave(state)}
    if extra is not None:
      args["extra"] = self._ocp.args.JsonSave(extra)
    with _DeferSignals():
      self.clean()
      if step in (self.manager.all_steps() or ()):  # a damaged one (it failed to restore)
        self.manager.delete(step)
      self.manager.save(step, args=self._ocp.args.Composite(**args), force=True)
      self.manager.wait_until_finished()

  def restore(self, target: TrainState, step: Optional[int] = None
              ) -> tuple[TrainState, Optional[dict]]:
    """Restores checkpoint ``step`` (the latest by default) into the structure of ``target``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no finished checkpoint in {self.directory}")
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

  def restore_intact(self, target: TrainState, log: Callable[[str], None] = logging.warning
                     ) -> tuple[TrainState, Optional[dict], int]:
    """Restores the newest checkpoint that restores: ``(state, extra, step)``.

    Each damaged checkpoint (one that fails to restore) is skipped, and reported in one line
    through ``log`` once an older one has restored; a writing Checkpointer deletes those newer than the one restored, so the run
    goes on from there.

    Raises:
      CheckpointError: none restores (the message names the directory).
    """
    steps = intact_steps(self.workdir)
    damaged, notes, reasons = [], [], []
    for step in reversed(steps):
      try:
        state, extra = self.restore(target, step)
      except Exception as e:  # orbax and tensorstore raise many kinds  # noqa: BLE001
        reason = " ".join(str(e).split())[:160]
        reasons.append(f"{type(e).__name__}: {reason}")
        notes.append(f"checkpoint {step} in {self.directory} is damaged ({reasons[-1]})")
        damaged.append(step)
        continue
      for note in notes:  # reported only when an older one serves instead
        log(f"{note}; using checkpoint {step}")
      if damaged and not self.read_only:
        for bad in damaged if is_writer() else ():
          shutil.rmtree(os.path.join(self.directory, str(bad)), ignore_errors=True)
        parallel.barrier("jaxgru-checkpoints-damaged")
        self.manager.reload()
      return state, extra, step
    what = (f"all {len(steps)} checkpoint(s) are damaged (the newest: {reasons[0]})"
            if steps else "no finished checkpoint")
    raise CheckpointError(f"{self.directory}: {what}; nothing to restore")

  def close(self) -> None:
    self.manager.close()


class ConfigMismatch(ValueError):
  """A work directory holds checkpoints of a run with another configuration."""


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds at least one finished checkpoint."""
  return bool(intact_steps(workdir))


def read_config(workdir: str) -> Optional[dict[str, Any]]:
  """``workdir/config.json``, or None when the folder holds no checkpoint.

  Raises:
    ConfigMismatch: checkpoints are there but config.json is missing, truncated or not a run's
      record, so nothing tells what they hold.
  """
  if not has_checkpoint(workdir):
    return None
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise ConfigMismatch(f"{workdir} holds checkpoints but no config.json, so their settings "
                         "are unknown; use another work directory") from None
  except (OSError, ValueError) as e:
    raise ConfigMismatch(f"{path} is damaged ({type(e).__name__}: {e}); the settings of the "
                         "checkpoints beside it are unknown; use another work directory") from None
  if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
    raise ConfigMismatch(f"{path} is not a run's record (no 'config' entry); use another work "
                         "directory")
  return stored


def check_resume(workdir: str, record: dict[str, Any], may_differ: Sequence[str] = ()) -> None:
  """Raises :class:`ConfigMismatch` unless ``workdir``'s run can resume under ``record``.

  ``record`` is what the run writes to ``workdir/config.json``: ``{"task": ..., "config":
  {...}}``. A work directory without checkpoints can always be used; one with checkpoints but
  without a readable config.json never can.
  Otherwise every config entry must match the stored one (nested entries compared one by one,
  by dotted name such as ``"rnn.cell.hidden_size"``), except those in ``may_differ``
  (ones that change neither the shapes of the state nor what a step computes, such as how
  often to log). Checked before anything is written, so the stored run stays as it was.
  """
  stored = read_config(workdir)
  if stored is None:
    return
  # Through JSON, so tuples and lists (and ints and floats) compare as they were stored.
  record = json.loads(json.dumps(record, default=json_default))
  if stored.get("task") != record.get("task"):
    raise ConfigMismatch(f"{workdir} holds checkpoints of a {stored.get('task')!r} run, not "
                         f"{record.get('task')!r}; use another work directory")
  old, new = _flatten(stored.get("config", {})), _flatten(record.get("config", {}))
  differ = [k for k in sorted(set(old) | set(new))
            if k not in may_differ and old.get(k) != new.get(k)]
  if differ:
    shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} now" for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ConfigMismatch(f"{workdir} holds checkpoints of a run with other settings: {shown}"
                         f"{more}; resume with the same settings or use another work directory")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested settings as one level with dotted names: ``{"rnn": {"num_layers": 1}}`` ->
  ``{"rnn.num_layers": 1}``, so a mismatch names the one setting that differs."""
  flat = {}
  for k, v in config.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f"{prefix}{k}."))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


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
    json.dump(obj, f, indent=2, sort_keys=True, default=json_default)
    f.write("\n")
  os.replace(tmp, path)


def json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
