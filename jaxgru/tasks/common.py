"""What the tasks share beyond the training library: their stack configuration as JSON, and
reading the ``config.json`` of a run.

A task config holds one :class:`jaxgru.RNNConfig` (which holds the one :class:`jaxgru.GRUConfig`),
so every cell setting and its default is declared once, in the core; here it is only written out
and read back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from jaxgru.cell import GRUConfig
from jaxgru.rnn import RNNConfig


def rnn_to_json(rnn: RNNConfig) -> dict[str, Any]:
  """``rnn`` as JSON-able nested dicts (``{"cell": {...}, "num_layers": ...}``); dtypes by name."""
  cell = {}
  for f in dataclasses.fields(GRUConfig):
    value = getattr(rnn.cell, f.name)
    if isinstance(value, np.dtype):
      value = value.name
    elif callable(value):
      raise ValueError(f"a task's {f.name} must be a name from jaxgru.ACTIVATIONS to be saved, "
                       f"got {value!r}")
    cell[f.name] = value
  out = {f.name: getattr(rnn, f.name) for f in dataclasses.fields(RNNConfig) if f.name != "cell"}
  return {"cell": cell, **out}


def rnn_from_json(d: dict[str, Any]) -> RNNConfig:
  """The inverse of :func:`rnn_to_json`."""
  d = dict(d)
  return RNNConfig(GRUConfig(**d.pop("cell")), **d)


def read_run(workdir: str, tasks: Sequence[str]) -> dict[str, Any]:
  """``workdir/config.json`` (``{"task": ..., "config": {...}}``) of a run of one of ``tasks``.

  Raises:
    FileNotFoundError: no config.json there.
    ValueError: the run there is of another task.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no run in {workdir} (no config.json)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is damaged ({e}); the run's settings are unknown") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
    raise ValueError(f"{path} is not a run's record (no 'config' entry)")
  if meta.get("task") not in tasks:
    raise ValueError(f"{workdir} holds a {meta.get('task')!r} run, not one of {tuple(tasks)}")
  return meta


def older_layout(workdir_or_what: str, missing: str) -> ValueError:
  """The error for a config.json written before the task configs held an ``RNNConfig``."""
  return ValueError(f"{workdir_or_what}: a config of an older layout (no {missing!r} entry); "
                    "train again in a new work directory")


def machine_memory() -> int | None:
  """Bytes of physical memory of this machine (None where the OS does not say)."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def _size(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if n < 1024 or unit == "PiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} PiB"


class TooBig(ValueError):
  """A run's settings need more memory than the machine has; raised before anything is
  allocated or written."""


def check_fits(needs: Sequence[tuple[str, float, str]], available: int | None = None) -> None:
  """Raises :class:`TooBig` naming the setting when one estimate exceeds the machine's memory.

  Args:
    needs: ``(setting, bytes, what)`` estimates, as a task config's ``memory_needs()`` gives
      them; ``setting`` is the setting (and ``run.py`` flag) that made the estimate large.
    available: bytes to compare with (the machine's physical memory by default).
  """
  available = machine_memory() if available is None else available
  if not available:
    return
  for setting, need, what in needs:
    if need > available:
      raise TooBig(f"{setting}: {what} needs about {_size(need)} of memory, more than this "
                   f"machine's {_size(available)}")


def largest_factor(factors: dict[str, tuple[float, float]]) -> str:
  """The setting whose value is the most times its default: ``{name: (value, default)}``."""
  return max(factors, key=lambda k: factors[k][0] / max(factors[k][1], 1))
