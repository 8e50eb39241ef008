"""Data parallelism over all visible devices with ``jax.sharding``: the mesh and the shardings.

One 1-D mesh with axis ``"data"`` spans every device JAX sees (on many hosts, after
``jax.distributed.initialize()``, that is every device of every host). Training batches are
sharded along their batch axis and parameters are replicated; XLA's SPMD partitioner inserts
the gradient all-reduce. With many models and a model count divisible by the device count, the
model axis is sharded instead, so each device trains its own models.

In a multi-process job (``jax.distributed``) every process runs the same program on global
arrays; a value one process needs whole on the host (metrics, evaluation scores, a model to
use) is gathered with :func:`fetch`, never read from a global array, and decisions that every
process must take alike are agreed with :func:`any_process`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices: Optional[list] = None) -> Optional[Mesh]:
  """A mesh over ``devices`` (all of them by default), or None when there is only one."""
  devices = jax.devices() if devices is None else devices
  if len(devices) == 1:
    return None
  return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
  """Constrains every array of ``batch`` to be split along its first (batch) axis.

  Used inside the jitted step; under ``jax.vmap`` over models it applies to the per-model
  batch axis. A batch that does not divide evenly over the devices is left to XLA.
  """
  if mesh is None:
    return batch
  size = mesh.devices.size

  def constrain(x):
    if x.ndim == 0 or x.shape[0] % size:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(AXIS)))
  return jax.tree.map(constrain, batch)


def shard_models(state: Any, mesh: Optional[Mesh]) -> Any:
  """Places a stack of N model states (leading axis N) on the mesh.

  The model axis is split over the devices when N is a multiple of the device count; otherwise
  every device holds every model (and the batch is what gets split).
  """
  if mesh is None:
    return state
  leaves = jax.tree.leaves(state)
  n = leaves[0].shape[0] if leaves and leaves[0].ndim else 1
  spec = P(AXIS) if splits_models(n, mesh) else P()
  return jax.device_put(state, NamedSharding(mesh, spec))


def splits_models(num_models: int, mesh: Optional[Mesh]) -> bool:
  """Whether :func:`shard_models` splits ``num_models`` models over ``mesh``'s devices (then
  each device trains whole models on whole batches, and :func:`batch_mesh` is None)."""
  return mesh is not None and num_models > 1 and num_models % mesh.devices.size == 0


def batch_mesh(num_models: int, mesh: Optional[Mesh]) -> Optional[Mesh]:
  """The mesh to split each model's batch over (:func:`shard_batch`): ``mesh`` when the models
  are replicated, None when they are split. One axis, one use: a batch split over the devices
  that each hold other models would add a gradient all-reduce for nothing, and make the results
  depend on the order in which the collectives add."""
  return None if splits_models(num_models, mesh) else mesh


def is_multiprocess() -> bool:
  """Whether this process is one of several in a ``jax.distributed`` job."""
  return jax.process_count() > 1


def fetch(tree: Any) -> Any:
  """Host NumPy copies of every array of ``tree``, whichever process holds which part.

  An array that spans other processes' devices (a model axis sharded over every host) cannot be
  read from one process; it is gathered with :func:`jax.experimental.multihost_utils.
  process_allgather` (a collective: every process of the job must call ``fetch`` on arrays of
  the same shapes, in the same order) and every process gets the whole value. Arrays this
  process holds whole are copied as they are.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is true on any process of the job (a collective where there are several;
  every process must call it). Used so that all processes take the same decision, such as
  stopping after one of them received SIGTERM: a process that stopped alone would leave the
  others waiting in the next step's collectives."""
  if not is_multiprocess():
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
  return bool(np.asarray(flags).any())


def barrier(name: str) -> None:
  """Waits until every process of the job reaches ``name`` (nothing to wait for alone)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)
