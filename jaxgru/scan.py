"""The one public time loop: :func:`scan_layer` runs a GRU cell over a time-major batch.

Everything that runs a GRU over time goes through it: :meth:`GRUConfig.sequence` (one
sequence), :meth:`RNNConfig.apply` (stacks and directions), the Flax and Equinox modules and the
tasks. The loop is split by concern into private modules:

* :mod:`jaxgru._tuning`: :class:`ScanOptions` and the measured per-backend defaults;
* :mod:`jaxgru._loop`: the forward loop, its chunks and the length masking;
* :mod:`jaxgru._jvp`: the loop's derivative, a custom JVP that JAX transposes for reverse mode
  (the weights' share as one product per chunk);
* :mod:`jaxgru._parallel`: the parallel-in-time method (``ScanOptions(method="parallel")``):
  Newton iterations over the whole sequence, each an associative scan;
* :mod:`jaxgru._fused`: the fused method (``ScanOptions(method="fused")``): one Pallas kernel
  runs all T steps with the recurrent weights and the state on chip.

:func:`scan_layer` runs :meth:`GRUConfig._recur_with` (the GRU math, kept in :mod:`jaxgru.cell`)
over a time-major batch. What it adds is only how the loop is run and differentiated:

* one carry, the (B, H) state; inputs and outputs time-major, (T, B, ...), so the loop slices the
  leading axis and nothing is transposed inside it;
* time in chunks of C steps: an outer loop over chunks, an inner loop over the steps of a chunk.
  A chunk's input projection ``x @ w_x + b_x`` can be one product for its C steps before its
  loop, and whatever a chunk needs for the backward pass is C steps long, not T;
* the projected inputs and the saved products kept as separate gate arrays (C, B, H): XLA:CPU
  turns column slices of a wide (C, B, 3H) array inside a loop into slow element loops;
* a custom derivative, in both modes from ONE rule: a custom JVP whose tangent loop carries only
  the (B, H) state's tangent, with the weights' and inputs' tangents formed before the loop for
  a whole chunk, ``x @ dw_x + dx @ w_x`` and ``h_prev @ dw_h`` as one (C*B, .) product each.
  ``jax.jvp``/``jax.jacfwd``/``jax.linearize`` run it forward; ``jax.grad`` gets the reverse
  pass from JAX's transposition of the same linear loop, in which those bulk products become the
  weight gradients, one product per chunk (e.g. ``dw_h = h_prev^T @ dgh`` as (H, C*B) x
  (C*B, 3H)) instead of C small ones added into an accumulator. Where the cell acts on each
  hidden unit alone once its products are known (reset_after with elementwise activations), the
  step's Jacobian is diagonal per unit and its coefficients for a whole chunk come from ONE
  vector-Jacobian product of the cell against ones, so a step of the loop is
  ``dh' = c_h * dh + c_gh * (dh @ w_h) + u`` (summed over gates); otherwise the loop takes the
  JVP of each step. Gradients nobody asked for (the inputs' of a first layer, the initial
  state's) are never formed: their tangents are symbolic zeros;
* episode resets (``resets_BT``): where a flag is set, the state is replaced by its initial
  state (or by ``reset_state``, where given) before that step (forward) or before the segment's last step (reverse), so a sequence
  holds independent segments, each run as if alone (see docs/resets.md). One ``jnp.where`` per
  step forward; backward, the same select on the carried cotangent, whose share at each segment
  start goes to the initial (or reset) state's gradient;
* rematerialization, at two levels: ``remat="products"`` keeps every step's state only (the
  outputs themselves, when no lengths are given) and recomputes a chunk's projections and
  recurrent products from them, each as one large product; ``remat="full"`` keeps each chunk's
  initial state only and reruns the chunk's loop, so that training memory grows with T no more
  than the inputs and outputs themselves do.

The custom derivative gives the same derivatives as JAX's autodiff of the plain loop, up to the
order of floating-point additions (tests/test_fast_path.py checks this).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru._deprecation import renamed
from jaxgru._loop import _Static, _layer_autodiff, step_jvp_applies
from jaxgru._fused import fused_layer, fused_plan
from jaxgru._parallel import parallel_layer
from jaxgru._tuning import (REMAT, ScanOptions, diagonal_backward_applies, forward_loop_default,
                            input_terms_default, step_jvp_default)
from jaxgru._jvp import _layer_jvp
from jaxgru.cell import (GRUConfig, Params, check_flag, check_lengths, check_shape,
                         set_sequence_loop)

__all__ = ("REMAT", "ScanOptions", "diagonal_backward_applies", "scan_layer")


def check_options(options, name: str) -> None:
  """A clear error for options that are not a :class:`ScanOptions` (a dict, say)."""
  if not isinstance(options, ScanOptions):
    raise TypeError(f"{name}: expected a jaxgru.ScanOptions (for instance "
                    f"ScanOptions(unroll=2)), got {type(options).__name__}")


def check_resets(resets, shape: tuple[int, int], spelled: str, name: str = "resets") -> None:
  """Raises ValueError unless ``resets`` is a boolean array of ``shape`` (spelled e.g. "(B=4, T=9)")."""
  got = tuple(getattr(resets, "shape", ()))
  if got != tuple(shape):
    raise ValueError(f"{name}: expected a boolean array of shape {spelled}, one flag per sequence "
                     f"and step; got shape {got}")
  dtype = getattr(resets, "dtype", None)
  if dtype is None or jnp.dtype(dtype) != jnp.bool_:
    raise ValueError(f"{name}: expected a boolean array of shape {spelled}, got dtype {dtype}")


def _reset_mask(resets_BT: jax.Array, lengths_B: Optional[jax.Array], reverse: bool):
  """The direction's reset flags, (T, B): reset the state to h0 before step t where set.

  Forward, a segment starts where ``resets_BT`` is set. Reverse, the loop reads each segment from
  its last step, so the state is reset before step t where step t+1 starts a segment. Flags at or
  past a sequence's length are dropped (those steps keep the state, as without resets).
  """
  r_TB = jnp.swapaxes(resets_BT, 0, 1)
  steps = r_TB.shape[0]
  if reverse:
    r_TB = jnp.concatenate([r_TB[1:], jnp.zeros_like(r_TB[:1])])
  if lengths_B is not None:
    first = jnp.arange(steps, dtype=jnp.int32)[:, None] + (1 if reverse else 0)
    r_TB = r_TB & (first < lengths_B[None, :])
  return r_TB


def _old_order(lengths: Any, h0: Any) -> bool:
  """Whether ``scan_layer(cell, params, xs, lengths, h0)`` was called in the old positional
  order ``(xs_TBI, h0_BH, lengths_B)``: lengths are (B,), states (B, H), so a rank-2 value in
  the ``lengths`` slot (beside an empty or rank-1 ``h0``), or a rank-1 value in the ``h0`` slot
  with no ``lengths``, can only be the other argument."""
  def rank(a):
    try:
      return None if a is None else len(np.shape(a))
    except ValueError:  # a ragged nested list: the shape checks below say so
      return -1

  if rank(lengths) == 2:
    return rank(h0) in (None, 1)
  return lengths is None and rank(h0) == 1


@renamed("jaxgru.scan_layer", xs_TBI="xs", lengths_B="lengths", h0_BH="h0", resets_BT="resets")
def scan_layer(cell: GRUConfig, params: Params, xs: jax.Array,
               lengths: Optional[jax.Array] = None, h0: Optional[jax.Array] = None, *,
               resets: Optional[jax.Array] = None, reset_state: Optional[jax.Array] = None,
               reverse: bool = False,
               options: ScanOptions = ScanOptions()) -> tuple[jax.Array, jax.Array]:
  """Runs ``cell`` over a time-major batch of sequences.

  The results equal ``jax.vmap(cell.sequence)`` over the batch (with the time axis moved), and
  so do their gradients, up to the order of floating-point additions.

  Args:
    cell: the cell configuration.
    params: the cell's parameters.
    xs: inputs ``xs_TBI``, (T, B, I), time-major.
    lengths: optional valid lengths ``lengths_B``, (B,) integers in [0, T], as in
      :meth:`GRUConfig.sequence`.
    h0: initial states ``h0_BH``, (B, H); zeros when None.
    resets: optional episode boundaries ``resets_BT``, (B, T) booleans, BATCH-major. Where
      ``resets[b, t]`` is set, step t starts a new segment of sequence b: forward, its state
      is replaced by ``h0[b]`` before step t; in reverse, before the segment's last step. Each
      segment then gives what it gives run alone from ``h0[b]`` (values and gradients; the
      gradient of ``h0`` sums every segment's). Flags at t=0 change nothing (unless
      ``reset_state`` is given); flags at or past a sequence's length are ignored.
    reset_state: optional ``h_reset_BH``, (B, H): the state a reset restores, in the place of
      ``h0``. Then only the segment read first (forward: from step 0, unless ``resets[b, 0]``
      is set; in reverse: the one that holds the last valid step) starts from ``h0``, and
      every other one from ``reset_state[b]``: as in reinforcement learning, where a rollout
      segment continues a stored state and each episode that starts in it, at its first step
      too, starts from zeros. The gradient of
      ``h0`` is then the first segment's, that of ``reset_state`` the sum of the others'. Used
      only with ``resets``. (The fused GPU kernel restores ``h0`` only: with a reset state of
      its own, the sequential loop runs instead.)
    reverse: read the sequences from their (valid) ends; outputs stay in input order.
    options: how to run the loop (:class:`ScanOptions`).

  Returns:
    ``(ys_TBH, h_last_BH)``: every step's output, (T, B, H), and the final states, (B, H).

  The fourth and fifth positional arguments used to be ``h0_BH, lengths_B``. For one release,
  such a call still runs, with a DeprecationWarning, where the ranks tell the two apart: a
  rank-2 array where the (B,) lengths go, or a rank-1 array where the (B, H) states go and no
  lengths. The former keywords ``xs_TBI=``, ``lengths_B=``, ``h0_BH=`` and ``resets_BT=`` still
  work likewise.
  """
  if _old_order(lengths, h0):
    warnings.warn("jaxgru.scan_layer: the positional order (xs, h0, lengths) is deprecated and "
                  "will be removed in the next release; call scan_layer(cell, params, xs, "
                  "lengths, h0) or pass lengths= and h0= by name", DeprecationWarning,
                  stacklevel=3)
    lengths, h0 = h0, lengths
  xs_TBI, lengths_B, h0_BH, resets_BT = xs, lengths, h0, resets
  check_options(options, "scan_layer options")
  check_flag("scan_layer reverse", reverse)
  if isinstance(params, Mapping) and not isinstance(params, dict):
    # A read-only mapping (types.MappingProxyType, say) is not a pytree; the loops' custom
    # derivative rules take their arguments as pytrees.
    params = dict(params)
  cell.check_params(params)
  xs_TBI = check_shape("scan_layer xs", xs_TBI, (None, None, cell.input_size),
                       f"(T, B, input_size={cell.input_size})")
  steps, batch = xs_TBI.shape[0], xs_TBI.shape[1]
  dtype = cell.state_dtype
  if h0_BH is None:
    h0_BH = jnp.zeros((batch, cell.hidden_size), dtype)
  check_shape("scan_layer h0", h0_BH, (batch, cell.hidden_size),
              f"(B={batch}, hidden_size={cell.hidden_size})")
  if lengths_B is not None:
    check_shape("scan_layer lengths", lengths_B, (batch,), f"(B={batch},), one per sequence")
    check_lengths(lengths_B, steps)
  h0_BH = jnp.asarray(h0_BH).astype(dtype)
  if resets_BT is not None:
    if isinstance(resets_BT, (list, tuple)):
      resets_BT = jnp.asarray(resets_BT)
    check_resets(resets_BT, (batch, steps), f"(B={batch}, T={steps})", "scan_layer resets")
  h_reset_BH = None
  if reset_state is not None and resets_BT is not None:
    h_reset_BH = check_shape("scan_layer reset_state", reset_state, (batch, cell.hidden_size),
                             f"(B={batch}, hidden_size={cell.hidden_size})")
    h_reset_BH = jnp.asarray(h_reset_BH).astype(dtype)
  if steps == 0 or batch == 0:  # nothing to run (an empty batch has no chunks to reshape)
    return jnp.zeros((steps, batch, cell.hidden_size), dtype), h0_BH
  opts = options.resolved(steps, batch, cell.hidden_size, inputs=xs_TBI.shape[-1])
  if opts.method == "parallel":
    ys_TBH, h_last_BH, _ = parallel_layer(
        cell, params, xs_TBI, h0_BH, lengths_B, resets_BT, reset_state_BH=h_reset_BH,
        reverse=reverse, method=opts.newton,
        tol=opts.tol, max_iters=opts.max_iters, sequential=scan_layer)
    return ys_TBH, h_last_BH
  if opts.method == "fused":
    seq = _Static(cell, bool(reverse), opts.unroll, opts.hoist_projection, "none",
                  opts.diagonal_backward and diagonal_backward_applies(cell))
    plan = fused_plan(cell, seq, steps, reset_state=h_reset_BH is not None)
    if plan is not None:  # else (outside the kernel's limits) the sequential loop below
      if lengths_B is not None:
        lengths_B = jnp.minimum(jnp.asarray(lengths_B).astype(jnp.int32), steps)
      resets_TB = (None if resets_BT is None
                   else _reset_mask(jnp.asarray(resets_BT), lengths_B, reverse))
      return fused_layer(plan, params, xs_TBI, h0_BH, lengths_B, resets_TB)
  chunk = opts.chunk
  num_chunks = -(-steps // chunk)
  pad = num_chunks * chunk - steps
  # One chunk runs on (T, ...) arrays: under jax.vmap a unit chunk axis would cost transposes.
  single = num_chunks == 1
  if lengths_B is not None:
    # Under jit a length above T acts as T; with padding it must not reach the padded steps.
    lengths_B = jnp.minimum(jnp.asarray(lengths_B).astype(jnp.int32), steps)
  resets_NCB = None
  if resets_BT is not None:
    resets_TB = _reset_mask(jnp.asarray(resets_BT), lengths_B, reverse)
    if pad:
      resets_TB = jnp.concatenate([resets_TB, jnp.zeros((pad, batch), jnp.bool_)])
    resets_NCB = resets_TB if single else resets_TB.reshape((num_chunks, chunk, batch))
  if pad:
    # Whole chunks only: the padded steps are masked out, so states and outputs are unchanged.
    xs_TBI = jnp.concatenate([xs_TBI, jnp.zeros((pad,) + xs_TBI.shape[1:], xs_TBI.dtype)])
    if lengths_B is None:
      lengths_B = jnp.full((batch,), steps, jnp.int32)
  xs_NCBI = xs_TBI if single else xs_TBI.reshape((num_chunks, chunk) + xs_TBI.shape[1:])
  step_jvp = (not opts.custom_vjp and step_jvp_applies(cell)
              and step_jvp_default(opts.models, batch))
  forward_hoist, forward_unroll = forward_loop_default(options, cell, batch)
  st = _Static(cell, bool(reverse), opts.unroll, opts.hoist_projection, opts.remat,
               opts.diagonal_backward and diagonal_backward_applies(cell), single,
               step_jvp=step_jvp,
               input_terms=(step_jvp and not opts.hoist_projection
                            and input_terms_default(cell.input_size, batch)),
               forward_hoist=forward_hoist, forward_unroll=forward_unroll)
  run = _layer_jvp if opts.custom_vjp else _layer_autodiff
  ys, h_last = run(st, params, xs_NCBI, h0_BH, lengths_B, resets_NCB, h_reset_BH)
  if not single:
    ys = ys.reshape((num_chunks * chunk,) + ys.shape[2:])
  return (ys[:steps] if pad else ys), h_last


def sequence(cell: GRUConfig, params: Params, xs: jax.Array, h0: Optional[jax.Array] = None,
             length: Optional[jax.Array] = None, reverse: bool = False,
             unroll: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """:meth:`GRUConfig.sequence` (see there): ONE sequence ``xs_TI`` (T, I), from ``h0_H`` (H,),
  run as :func:`scan_layer` over a batch of one; returns ``(ys_TH, h_last_H)``.

  The loop lives in this layer and the cell in the one below, which imports nothing above it: so
  the cell's method calls this function, which this module hands it when it is imported
  (:func:`jaxgru.cell.set_sequence_loop`, below).
  """
  cell.check_params(params)
  xs_TI = check_shape("GRU sequence xs", xs, (None, cell.input_size),
                      f"(T, input_size={cell.input_size})")
  h0_H = cell.initial_state() if h0 is None else h0
  h0_H = check_shape("GRU sequence h0", h0_H, (cell.hidden_size,),
                     f"(hidden_size={cell.hidden_size},)")
  lengths_1 = None
  if length is not None:
    check_shape("GRU sequence length", length, (), "() (a scalar)")
    check_lengths(length, xs_TI.shape[0])
    lengths_1 = jnp.reshape(jnp.asarray(length), (1,))
  ys_T1H, h_last_1H = scan_layer(cell, params, xs_TI[:, None, :], lengths_1, h0_H[None],
                                 reverse=reverse, options=ScanOptions(unroll=unroll))
  return ys_T1H[:, 0], h_last_1H[0]


set_sequence_loop(sequence)
