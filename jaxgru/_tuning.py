"""The tuning policy of the time loop: :class:`ScanOptions` and its measured per-backend defaults.

This module owns only decisions: how long a chunk is, what the forward pass keeps for the
backward pass, whether the input projection is hoisted out of the loop (or, for few inputs,
made by multiply-adds), whether the custom derivative rule and its diagonal form are used. It
runs no loop; :mod:`jaxgru._loop` and :mod:`jaxgru._jvp` act on what it decides. None of its
choices changes a result beyond the order of floating-point additions, only speed and memory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import jax

from jaxgru import activations as _act
from jaxgru._parallel import METHODS as NEWTON_METHODS
from jaxgru.cell import GRUConfig, check_flag

# Per-backend defaults, measured with benchmarks/speed.py (see benchmarks/results/). On the CPU
# the working set decides: XLA:CPU takes a temporary buffer above 32 MB fresh from the kernel
# at every call and pays a page fault per 4 kB page it touches, which can cost more than
# recomputing the products; so a training step there keeps its residuals small.
_TUNED = {
    "cpu": {"unroll": 1,
            # Project the inputs before the loop when a step's input product has at least this
            # many multiply-adds (B*I*3H) and a (T, B, H) array is at most big_bytes; else
            # inside the loop.
            # A forward pass without derivative projects one chunk at a time and keeps nothing
            # for a backward pass, so there the memory bound does not apply and B*I*3H alone
            # decides, from forward_hoist_macs on (forward_hoist_default).
            "hoist_projection": False, "hoist_macs": 2**20, "forward_hoist_macs": 2**19,
            # ...except that from this many multiply-adds in a step's recurrent product (B*H*3H),
            # with at least forward_unroll_hidden units and at most forward_unroll_inputs
            # inputs per unit (I/H), a forward pass without derivative projects each step's
            # inputs inside the loop and unrolls it by forward_unroll: two steps per iteration
            # make more operations than XLA:CPU's runtime runs one after the other (8), so the
            # steps' input products, which do not wait for the state, run beside the recurrent
            # products. Same-process A/Bs of the forward pass, new over old: 0.84-0.96 at 12
            # such shapes (64x128x32x256: 0.86-0.87), 0.88-1.00 at three more; level or slower
            # below 2M multiply-adds; 1.05-1.19 at H=64 with B=256, or at I/H >= 1/2 with
            # B=128 (docs/performance-notes.md). One model of a reset_after cell only: not measured
            # under jax.vmap, and mixed for reset_before (0.96-1.08).
            "forward_unroll_macs": 2**21, "forward_unroll_hidden": 128,
            "forward_unroll_inputs": 0.25, "forward_unroll": 2,
            # Residuals of the whole sequence at most this: keep them all, one chunk.
            "whole_bytes": 2**24,
            # Else chunks of about this many bytes of (B, H) states...
            "chunk_bytes": 2**19,
            # ...or, when one (T, B, H) array alone exceeds this (the step cannot avoid fresh
            # memory anyway), of about this many rows (C*B), for efficient weight products.
            "big_bytes": 2**24, "chunk_rows": 2048,
            # The custom rule's products over all steps pay off from this many steps on...
            "custom_vjp_steps": 64,
            # ...for at most this many models under jax.vmap (ScanOptions.models). Vmapped over
            # models, its bulk weight products are batched per model: they stack about a dozen
            # (T, N, B, H) arrays and transpose them, where JAX's own derivative adds each step's
            # share in the loop. At the addition task's consolidation shape (B=128, T=65, H=16)
            # 16 and 64 models trained in 0.77 of the custom rule's time (benchmarks/models.py;
            # docs/performance-notes.md).
            "custom_vjp_models": 1,
            # From this many models on, JAX's derivative of the loop takes the step's own JVP
            # (jaxgru._loop._recur_step, the default cell only), which leaves the backward pass
            # five of the step's arrays to keep instead of about ten: 0.95-0.97 of the training
            # step's time at the consolidation shape, 64 models (docs/performance-notes.md).
            "step_jvp_models": 2,
            # In that loop, an input of at most this many features is projected at each step by
            # as many multiply-adds of (B, 1) by (1, 3H), which XLA fuses into the gates' pass,
            # instead of a matrix product of its own. Same-process A/Bs, 64 models, B=128, T=65,
            # H=16: the addition step (I=2) took 0.87 of the product's time, 0.91 at its solve
            # shape; a plain layer 0.90-0.97 at I=2, 0.91-0.92 at I=4, 1.01-1.06 at I=8 and 1.13
            # at I=16 (docs/performance-notes.md). Only where the loop is differentiated: without
            # derivative it keeps the product, which was 2.2-2.6 times as fast there.
            "input_terms": 4,
            # The diagonal backward at every size (None; else while a (T, B, H) array is at most
            # this many bytes). Its gate arrays joined, speed.py's training step took 0.92-0.98
            # of the per-step VJP's time above 16 MB (64x1024x32x256, 128x256x128x512), where it
            # used to be about 6% slower, and 0.94-0.99 with the heap reused
            # (docs/performance-notes.md).
            "diagonal_bytes": None,
            # benchmarks/parallel.py: the parallel method was slower at every size tried.
            "method": "sequential",
            # method=None picks the fused kernel (jaxgru._fused) where a step's recurrent
            # product has at most this many multiply-adds (B*H*3H) and the kernel's limits
            # hold. None: nowhere. Not measured: on the CPU the kernel only runs interpreted.
            "fused_macs": None},
    # Measured once, as they stand, on an NVIDIA H200 (benchmarks/results/gpu_h200, TF32
    # products): ahead of cuDNN at large batch x hidden (0.24-0.59 of its time), behind it at
    # small (1.6-4.3x; about 3.5 us per step of loop overhead). No alternative setting has been
    # measured on a GPU yet.
    "gpu": {"unroll": 8, "hoist_projection": True, "hoist_macs": None, "forward_hoist_macs": None,
            "forward_unroll_macs": None, "forward_unroll_hidden": None,
            "forward_unroll_inputs": None, "forward_unroll": None,
            "whole_bytes": None, "chunk_bytes": None,
            "big_bytes": None, "chunk_rows": None, "custom_vjp_steps": 1,
            "custom_vjp_models": None,  # not measured on a GPU: the custom rule for any number
            "step_jvp_models": None,  # not measured on a GPU: JAX's own rules
            "input_terms": 0,  # not measured on a GPU: a matrix product
            "diagonal_bytes": None,
            # Parallel on the H200: forward passes 1.7-15x faster at H <= 16, T >= 1000; training
            # slower everywhere (0.19-0.76); cells with large weights fell back (0.12x).
            "method": "sequential",
            # The fused kernel (as above): not measured on a GPU yet (the GPU suite's part
            # "fused", docs/fused.md), so never picked by default.
            "fused_macs": None},
}
# The CPU once the process reuses its heap (glibc's mmap and trim thresholds raised:
# jaxgru.training.malloc.tune_malloc, or MALLOC_MMAP_THRESHOLD_ of at least 1 GiB in the
# environment). Temporaries then cost no page faults, and the small working set above no longer
# pays: keeping every step's residuals in one chunk, projecting the inputs before the loop and
# (then) the per-step backward made the training step 0.76-0.83 of the table above's time at
# batch >= 64 (benchmarks/results/cpu_heap_reuse.md, `speed.py --mallopt`). Since the diagonal
# backward keeps its gate arrays joined it is the faster one here too (0.94-0.99). At batch 16
# (16x1024x8x64) the table above stayed faster (its bulk products over chunks of 2048 rows;
# 0.90-0.94), so batches below min_batch keep it. Past 2 GiB of residuals the table above's
# chunking decides.
_TUNED["cpu_heap"] = dict(
    _TUNED["cpu"], whole_bytes=2**31, hoist_macs=2**19, big_bytes=2**31, min_batch=32)
_HEAP_ENV = "MALLOC_MMAP_THRESHOLD_"
_heap_reused = False


def set_heap_reuse(reused: bool = True) -> bool:
  """Tells the defaults whether this process's heap is reused (``tune_malloc`` calls it when it
  applied); only the CPU's defaults depend on it. Options already resolved (traced programs)
  keep what they were. Returns the previous setting."""
  global _heap_reused
  previous, _heap_reused = _heap_reused, bool(reused)
  return previous


def heap_reused() -> bool:
  """Whether the CPU defaults take the heap-reuse table: :func:`set_heap_reuse` was told so, or
  the environment sets glibc's mmap threshold to at least 1 GiB."""
  if _heap_reused:
    return True
  try:
    return int(os.environ.get(_HEAP_ENV, "0")) >= 2**30
  except ValueError:
    return False


def _table(backend: str, batch: int) -> dict:
  if backend == "cpu" and batch >= _TUNED["cpu_heap"]["min_batch"] and heap_reused():
    return _TUNED["cpu_heap"]
  return _TUNED.get(backend, _TUNED["gpu"])


REMAT = ("none", "products", "full")
SCAN_METHODS = ("sequential", "parallel", "fused")
# Arrays of (B, H) floats a step keeps for the backward pass without rematerialization (the
# state, gate inputs and products, their cotangents, the outputs and theirs), about.
_RESIDUALS_PER_STEP = 16


@dataclasses.dataclass(frozen=True)
class ScanOptions:
  """How :func:`scan_layer` runs the time loop; none of it changes the results, except that
  ``method="parallel"`` gives them within its tolerance.

  Every None picks the default measured for the backend (``jax.default_backend()``; TPUs take
  the GPU's) and the shape. The CPU rules below are those of a process whose large temporaries
  are fresh pages; once it reuses its heap (:func:`heap_reused`: ``tune_malloc`` applied, as
  ``run.py`` does), every None at batch 32 and above picks what that setting measured instead:
  remat ``"none"`` and one chunk up to 2 GiB of residuals, and the inputs projected before the
  loop from 2**19 multiply-adds per step on.

  Attributes:
    unroll: steps per iteration of the inner loops (``lax.scan``'s ``unroll``). None: 1 on the
      CPU, 8 off it; on the CPU a forward pass without derivative, with ``hoist_projection``
      None too, takes 2 (and projects each step's inputs inside the loop) from 2**21
      multiply-adds in a step's recurrent product (B*H*3H), with H >= 128 and I <= H/4, for one
      model of a reset_after cell (:func:`forward_unroll_default`).
    chunk: steps per chunk C of the training loops (the whole sequence when larger than T).
      None: T off the CPU; on the CPU, T when the whole sequence's residuals are small, else
      about 512 kB of (B, H) states per chunk, or 2048 rows (C*B) for very large layers.
    remat: what the forward pass of a training step keeps for the backward pass.
      ``"none"`` (or False): every step's residuals.
      ``"products"``: every step's state only; the backward pass recomputes a chunk's input
      projections and recurrent products from the states, each as ONE (C*B, .) matrix product.
      ``"full"`` (or True): each chunk's initial state only; the backward pass reruns the
      chunk's loop (as ``jax.checkpoint`` of each chunk would), the least memory.
      None: ``"none"`` where the whole sequence's residuals are small (and off the CPU), else
      ``"products"``.
    hoist_projection: project a chunk's inputs in one product before its loop (True) or each
      step's inside it (False). None: True off the CPU; on the CPU, True when a step's input
      product has at least 2**20 multiply-adds (B*I*3H) and a (T, B, H) array is at most 16 MB.
      A forward pass of the custom rule (``custom_vjp``) without derivative holds one chunk's
      projection at a time and keeps nothing for a backward pass: there None drops the memory
      bound and takes 2**19 multiply-adds (:func:`forward_hoist_default`), except where the
      unroll rule above applies.
    custom_vjp: differentiate with jaxgru's own derivative rule (True) or with JAX's autodiff
      of the loop (False; ``jax.checkpoint`` per chunk unless remat is ``"none"``). The rule is
      a custom JVP (:mod:`jaxgru._jvp`; the option keeps its older name) that serves forward
      mode as it stands and reverse mode through JAX's transposition, with the weights' share
      as one product per chunk. Both settings support ``jax.grad``, ``jax.jvp``, ``jax.jacfwd``
      and ``jax.linearize``. None: the custom rule, except on the CPU for sequences shorter
      than 64 steps or for more than one model (``models``).
    diagonal_backward: in the custom rule, compute the step Jacobians' diagonals of a chunk in
      bulk before its loop (True), or take the JVP of each step inside the loop (False).
      Only a cell that acts on each unit alone allows it (:func:`diagonal_backward_applies`);
      any other takes the per-step form whatever this says. None: True.
    method: ``"sequential"`` (the loop above) or ``"parallel"``: Newton iterations over the
      whole sequence whose linear steps are associative scans, O(log T) deep each (DEER and its
      quasi/damped forms; :func:`jaxgru._parallel.parallel_layer`). Equal to the sequential
      result within ``tol`` per step: it finishes sequentially from the first unconverged step
      when ``max_iters`` is reached. None: ``"sequential"`` everywhere. On the CPU the parallel
      method was slower at every size tried. On a GPU (an H200) its forward pass was up to 15x
      faster at H <= 16, but training was slower everywhere and cells with large weights fell
      back (docs/parallel.md): choose it for forward passes of small cells. ``"fused"``: one
      Pallas kernel per layer and direction runs all T steps with ``w_h`` and the state on
      chip, and a second one the backward recurrence (:mod:`jaxgru._fused`, docs/fused.md);
      the same results up to the order of additions. Within its limits only (float32 state,
      H <= 64 with float32 products, H <= 128 with bfloat16, on a GPU; the CPU interprets it,
      slowly, for tests); elsewhere it runs the sequential loop, with a one-time warning.
      ``method=None`` never picks it until a measurement in the tuning table says so: none yet.
    newton: the parallel method's Jacobian: ``"quasi"`` (its diagonal), ``"elk"`` (diagonal,
      damped) or ``"full"`` (dense, memory T*B*H*H).
    tol: the parallel method's largest accepted per-step residual; None: 1e-5 (float32),
      1e-10 (float64).
    max_iters: the parallel method's Newton iterations at most, before it finishes sequentially.
    models: how many models run this loop at once under ``jax.vmap`` over their parameters
      (an ensemble, a population, a sweep). The loop cannot see such a vmap; its defaults can
      differ for it: on the CPU, from 2 models on, JAX's own derivative (``custom_vjp`` off),
      which trained 16 and 64 addition models (hidden size 16) 1.3 times as fast, and in it,
      for the default cell (reset_after, tanh, sigmoid), the step's own JVP, which leaves the
      backward pass 5 arrays per step to keep instead of about 10 (0.95-0.97 of the time at 64
      models), with an input of at most 4 features projected by multiply-adds instead of a
      matrix product (0.87 at 64 addition models); not yet measured for larger cells. All of
      this is how the loop is differentiated: run without derivative, it runs as the custom
      rule's forward pass does (no hint, the product, the forward projection rule). Nothing
      else reads it.
  """

  unroll: Optional[int] = None
  chunk: Optional[int] = None
  remat: Union[None, bool, str] = None
  hoist_projection: Optional[bool] = None
  custom_vjp: Optional[bool] = None
  diagonal_backward: Optional[bool] = None
  method: Optional[str] = None
  newton: str = "quasi"
  tol: Optional[float] = None
  max_iters: int = 100
  models: int = 1

  def __post_init__(self):
    if self.method is not None and self.method not in SCAN_METHODS:
      raise ValueError(f"method must be one of {SCAN_METHODS} or None, got {self.method!r}")
    if self.newton not in NEWTON_METHODS:
      raise ValueError(f"newton must be one of {NEWTON_METHODS}, got {self.newton!r}")
    if self.tol is not None and (isinstance(self.tol, bool) or not self.tol > 0):
      raise ValueError(f"tol must be a positive number or None, got {self.tol!r}")
    if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int) \
        or self.max_iters < 0:
      raise ValueError(f"max_iters must be a non-negative integer, got {self.max_iters!r}")
    if isinstance(self.models, bool) or not isinstance(self.models, int) or self.models < 1:
      raise ValueError(f"models must be a positive integer, got {self.models!r}")
    for name in ("unroll", "chunk"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    for name in ("hoist_projection", "custom_vjp", "diagonal_backward"):
      check_flag(name, getattr(self, name), optional=True)
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat is not None and self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, a bool or None, got {self.remat!r}")

  def resolved(self, steps: int, batch: int, hidden: int = 1,
               backend: Optional[str] = None, inputs: int = 1) -> "ScanOptions":
    """These options with every None replaced by the default for the backend and shape
    (``inputs`` is I, the input features)."""
    tuned = _table(backend or jax.default_backend(), batch)
    step_bytes = 4 * max(batch, 1) * max(hidden, 1)
    small = (tuned["whole_bytes"] is None
             or steps * step_bytes * _RESIDUALS_PER_STEP <= tuned["whole_bytes"])
    chunk = self.chunk
    if chunk is None:
      if small:
        chunk = steps
      elif steps * step_bytes > tuned["big_bytes"]:
        chunk = _divisor_near(steps, tuned["chunk_rows"] // max(batch, 1))
      else:
        chunk = _divisor_near(steps, tuned["chunk_bytes"] // step_bytes)
    remat = self.remat
    if remat is None:
      remat = "none" if small else "products"
    custom_vjp = self.custom_vjp
    if custom_vjp is None:
      custom_vjp = (steps >= tuned["custom_vjp_steps"]
                    and (tuned["custom_vjp_models"] is None
                         or self.models <= tuned["custom_vjp_models"]))
    diagonal = self.diagonal_backward
    if diagonal is None:
      diagonal = tuned["diagonal_bytes"] is None or steps * step_bytes <= tuned["diagonal_bytes"]
    hoist = self.hoist_projection
    if hoist is None:
      hoist = tuned["hoist_projection"]
      if tuned["hoist_macs"] is not None:
        hoist = (batch * inputs * 3 * hidden >= tuned["hoist_macs"]
                 and steps * step_bytes <= tuned["big_bytes"])
    pick = lambda value, name: tuned[name] if value is None else value
    return dataclasses.replace(
        self, unroll=pick(self.unroll, "unroll"), chunk=max(1, min(chunk, steps)),
        remat=remat, hoist_projection=hoist,
        custom_vjp=custom_vjp, diagonal_backward=diagonal,
        method=self.method or _default_method(tuned, batch, hidden))


def _default_method(tuned: dict, batch: int, hidden: int) -> str:
  """The method that ``method=None`` picks: the fused kernel only where the table holds a
  measured bound for it (``fused_macs``), else the table's method. Whether the kernel's limits
  hold is checked where it runs (:func:`jaxgru._fused.fused_plan`), which falls back."""
  if tuned["fused_macs"] is not None and batch * hidden * 3 * hidden <= tuned["fused_macs"]:
    return "fused"
  return tuned["method"]


def step_jvp_default(models: int, batch: int, backend: Optional[str] = None) -> bool:
  """Whether JAX's derivative of the loop, for ``models`` models under jax.vmap, takes the
  step's own JVP (where the cell allows it) by default on the backend."""
  least = _table(backend or jax.default_backend(), batch)["step_jvp_models"]
  return least is not None and models >= least


def forward_hoist_default(batch: int, inputs: int, hidden: int,
                          backend: Optional[str] = None) -> bool:
  """Whether a layer run without derivative (the custom rule's primal) projects each chunk's
  inputs before its loop. A forward pass holds one chunk's projection at a time, so the memory
  bound of ``ScanOptions.resolved``'s rule, which exists for the residuals of a training step,
  does not apply; on the CPU a step's input product of ``forward_hoist_macs`` (B*I*3H) decides.
  Same-process A/Bs of the forward pass on this CPU (docs/performance-notes.md): 0.93-0.98 of the
  in-loop projection's time at 128x256x128x512 and 0.94 at 64x1024x32x256 (above 16 MB);
  0.90-0.98 at the five 64x256x64x64 stack shapes (2**19 <= B*I*3H < 2**20)."""
  tuned = _table(backend or jax.default_backend(), batch)
  if tuned["forward_hoist_macs"] is None:
    return tuned["hoist_projection"]
  return batch * inputs * 3 * hidden >= tuned["forward_hoist_macs"]


def forward_unroll_default(batch: int, inputs: int, hidden: int,
                           backend: Optional[str] = None) -> Optional[int]:
  """The unroll of a layer run without derivative (one model, a reset_after cell) whose
  ``ScanOptions`` leave both ``unroll`` and ``hoist_projection`` to the defaults:
  ``forward_unroll`` (2 on the CPU), with each step's inputs projected inside the loop, from
  ``forward_unroll_macs`` multiply-adds in a step's recurrent product (B*H*3H), with at least
  ``forward_unroll_hidden`` units and at most ``forward_unroll_inputs`` input features per unit
  (I/H). None otherwise, or on a backend without the rule, where :func:`forward_hoist_default`
  and the options' unroll decide. Two steps per iteration give XLA:CPU's runtime enough
  operations (more than 8) to run the input products, which do not wait for the state, beside
  the recurrent ones; a large input product (I/H) or a narrow state (H=64 at B=256) loses
  that."""
  tuned = _table(backend or jax.default_backend(), batch)
  if tuned["forward_unroll_macs"] is None:
    return None
  if (batch * hidden * 3 * hidden < tuned["forward_unroll_macs"]
      or hidden < tuned["forward_unroll_hidden"]
      or inputs > tuned["forward_unroll_inputs"] * hidden):
    return None
  return tuned["forward_unroll"]


def forward_loop_default(options: ScanOptions, cell: GRUConfig, batch: int,
                         backend: Optional[str] = None) -> tuple[bool, Optional[int]]:
  """(hoist, unroll) of a layer run without derivative, for ``options`` as the user gave them
  (unresolved): an explicit ``hoist_projection`` holds; where ``unroll`` and
  ``hoist_projection`` are both left to the defaults, one model of a cell with one recurrent
  product per step (reset_after, as measured) takes :func:`forward_unroll_default`, with the
  projection in the loop; else :func:`forward_hoist_default` decides, and the unroll (None) is
  the options'."""
  if options.hoist_projection is not None:
    return options.hoist_projection, None
  unroll = None
  if options.unroll is None and options.models == 1 and cell._num_recurrent_products == 1:
    unroll = forward_unroll_default(batch, cell.input_size, cell.hidden_size, backend)
  hoist = unroll is None and forward_hoist_default(batch, cell.input_size, cell.hidden_size,
                                                   backend)
  return hoist, unroll


def input_terms_default(inputs: int, batch: int, backend: Optional[str] = None) -> bool:
  """Whether a loop that takes the step's own JVP (:func:`step_jvp_default`) and projects its
  inputs at each step does so for ``inputs`` features by multiply-adds, one per feature,
  instead of a matrix product, where it is differentiated; a pass without derivative keeps the
  product (``jaxgru._loop._layer_autodiff``)."""
  return inputs <= _table(backend or jax.default_backend(), batch)["input_terms"]


def diagonal_backward_applies(cell: GRUConfig) -> bool:
  """Whether ``cell``'s step, given its input projection and its recurrent product, acts on each
  hidden unit alone: reset_after (reset_before makes a second product inside the step) with
  activations known to be elementwise. Its Jacobian is then diagonal per unit, and one VJP
  against ones yields it for every step at once."""
  return (cell._num_recurrent_products == 1 and _act.is_elementwise(cell.activation)
          and _act.is_elementwise(cell.recurrent_activation))


def _divisor_near(steps: int, target: int) -> int:
  """A chunk length near ``target``: a divisor of ``steps`` within a factor of 2 if there is
  one (no padding), else the length that splits ``steps`` into the fewest, most even chunks."""
  target = max(1, min(target, steps))
  near = [d for d in range(max(1, (target + 1) // 2), min(steps, 2 * target) + 1)
          if steps % d == 0]
  if near:
    return min(near, key=lambda d: (abs(d - target), -d))
  return -(-steps // -(-steps // target))

