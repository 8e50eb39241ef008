"""Checkpoints and the run's files: what a work directory holds and whether a run may resume.

Owns :class:`Checkpointer` (orbax checkpoints of a :class:`~jaxgru.training.state.TrainState`),
:func:`has_checkpoint`, :func:`check_resume` and :class:`ConfigMismatch`, :func:`is_writer` and
:func:`write_json_atomic` (config.json and summary.json, written only by process 0).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxgru._extras import require
from jaxgru.training.state import TrainState


class Checkpointer:
  """Orbax checkpoints of a :class:`TrainState` under ``workdir/checkpoints``.

  Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
  process killed mid-write leaves the previous checkpoint as the latest readable one.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    ocp = require("orbax.checkpoint")  # imported here: it is slow to import
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
  Otherwise every config entry must match the stored one (nested entries compared one by one,
  by dotted name such as ``"rnn.cell.hidden_size"``), except those in ``may_differ``
  (ones that change neither the shapes of the state nor what a step computes, such as how
  often to log). Checked before anything is written, so the stored run stays as it was.
  """
  path = os.path.join(workdir, "config.json")
  if not (has_checkpoint(workdir) and os.path.exists(path)):
    return
  with open(path) as f:
    stored = json.load(f)
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
