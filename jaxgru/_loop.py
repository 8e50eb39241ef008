"""The forward time loop of one layer: time-major, in chunks, masked by lengths.

This module owns how a layer's steps run forward: the one masked step (:func:`_step`, the only
place where ``lengths`` act on the state), the reset of a state to its reset state (the initial
state unless given) at episode boundaries (:func:`_reset`, the only place where ``resets`` act on the state), the loop over one chunk's steps (:func:`_forward`,
which can also record what the backward pass needs), the loop over chunks, and
:func:`_layer`, the layer as JAX differentiates it by itself (:func:`_layer_autodiff` runs it
where nothing is differentiated as the custom rule's forward pass). The GRU math is the cell's
(:meth:`GRUConfig._recur_with`); its custom derivative lives in :mod:`jaxgru._jvp`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxgru import activations as _act
from jaxgru.cell import GRUConfig, Params, add_bias, split_gates


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one layer's loop (a nondiff argument of the custom JVP)."""
  cell: GRUConfig
  reverse: bool
  unroll: int
  hoist: bool
  remat: str
  diagonal: bool = False
  # One chunk: the layer's arrays carry no chunk axis, (T, B, ...) instead of (1, T, B, ...).
  # Under jax.vmap (many models) every reshape moves the models' axis to the front, so adding
  # and removing a unit chunk axis around the time loops (whose stacked arrays hold that axis
  # second) would transpose every residual, twice.
  single: bool = False
  # The step's own JVP (:func:`_recur_step`) in the loop JAX differentiates: for many models.
  step_jvp: bool = False
  # The per-step input projection as I multiply-adds (GRUConfig._project_inputs(terms=True)).
  input_terms: bool = False
  # ``hoist`` for the custom rule's primal, which runs only where nothing is differentiated
  # (None: ``hoist``).
  forward_hoist: Optional[bool] = None
  # ``unroll`` for that primal (None: ``unroll``).
  forward_unroll: Optional[int] = None



# -- one step -------------------------------------------------------------------------------------


def _project(cell: GRUConfig, params: Params, x: jax.Array, terms: bool = False
             ) -> tuple[jax.Array, ...]:
  return split_gates(cell._project_inputs(params, x, terms), 3)


def _step(cell: GRUConfig, h, g, t, lengths, product, recur=None):
  """One step, masked by lengths (as the plain reference loop of tests/reference.py): returns
  (carry, output). ``recur(h, g)``, if given, replaces the cell's step (:func:`_recur_step`)."""
  h_new = cell._recur_with(h, g, product) if recur is None else recur(h, g)
  if lengths is None:
    return h_new, h_new
  valid = (t < lengths)[:, None]
  h_new = jnp.where(valid, h_new, h)
  return h_new, jnp.where(valid, h_new, jnp.zeros_like(h_new))


def step_jvp_applies(cell: GRUConfig) -> bool:
  """Whether :func:`_recur_step` can stand for ``cell``'s step: reset_after, with tanh and
  sigmoid, whose derivatives it writes from their outputs."""
  return (cell.variant == "reset_after"
          and _act.resolve(cell.activation) is _act.ACTIVATIONS["tanh"]
          and _act.resolve(cell.recurrent_activation) is _act.ACTIVATIONS["sigmoid"])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _recur_step(cell: GRUConfig, w: Params, h: jax.Array, g: tuple[jax.Array, ...]) -> jax.Array:
  """The cell's reset_after step (:meth:`GRUConfig._recur_gates`) from the recurrent weights
  ``w`` (``w_h``, and ``b_h`` with a bias), the state ``h`` (B, H) and the projected input ``g``
  (three (B, H) gates), with a JVP of its own (:func:`_recur_step_jvp`)."""
  return cell._recur_gates(h, g, cell._recurrent_product(w, 0, h))[0]


@_recur_step.defjvp
def _recur_step_jvp(cell, primals, tangents):
  """The step's JVP, written so that every product of a tangent with a value of the step takes
  one of ``h, z, r, n, gh_n`` as that value. JAX, which saves for the backward pass each value
  that multiplies a tangent, then keeps these five per step, not the ten or so that its own
  rules for sigmoid, tanh and the update leave (``z * (1 - z)``, ``1 - z``, ``1 - n**2``, ...):
  with ``dA = dgx_A + dgh_A`` (dgh = dh @ w_h + h @ dw_h + db_h),

    dz = dA_z * z * (1 - z)      dr = dA_r * r * (1 - r)
    dn = (dgx_n + dr * gh_n + dgh_n * r) * (1 - n**2)
    dh' = dn * (1 - z) + dz * (h - n) + dh * z

  each product expanded so that a tangent comes first. Under jax.vmap over 64 addition models
  (B=128, T=65, H=16) the training step took 0.95-0.97 of the time of JAX's own rules
  (docs/performance-notes.md).
  """
  w, h, g = primals
  dw, dh, dg = tangents
  h_new, (z, r, n, gh_n) = cell._recur_gates(h, g, cell._recurrent_product(w, 0, h))
  dgh = cell._dot(dh, w["w_h"]) + cell._dot(h, dw["w_h"])
  if "b_h" in dw:
    dgh = add_bias(dgh, dw["b_h"].astype(dgh.dtype))
  # jnp.split (not slicing): its transpose concatenates the gates' cotangents in one pass,
  # where a slice's would pad each to 3H and add them.
  dgh_z, dgh_r, dgh_n = split_gates(dgh, 3)
  dg_z, dg_r, dg_n = split_gates(dg, 3)
  da_z = dg_z + dgh_z
  dz = da_z * z - (da_z * z) * z
  da_r = dg_r + dgh_r
  dr = da_r * r - (da_r * r) * r
  da_n = dg_n + dr * gh_n + dgh_n * r
  dn = da_n - (da_n * n) * n
  return h_new, dn - dn * z + dz * h - dz * n + dh * z


def _reset(h, h_init, r):
  """The state a step starts from: ``h_init`` where the step's reset flag ``r`` (B,) is set.

  ``r`` is the direction's own mask (see :func:`jaxgru.scan._reset_mask`): a forward loop resets
  before the first step of a segment, a reverse one before its last step. None: no resets.
  """
  if r is None:
    return h
  return jnp.where(r[:, None], h_init, h)


def _recurrent_weights(params: Params) -> Params:
  return {k: params[k] for k in ("w_h", "b_h") if k in params}


def _join(parts: tuple[jax.Array, ...]) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _rows(a: jax.Array) -> jax.Array:
  return a.reshape((-1, a.shape[-1]))

# -- one chunk ------------------------------------------------------------------------------------


def _forward(st: _Static, params, x_CBI, h0, lengths, t0, save: Optional[str],
             resets_CB=None, h_init=None):
  """The loop over one chunk's steps, starting at time index t0: (ys, h_last, residuals).

  ``h0`` is the chunk's starting state; ``resets_CB`` (C, B) the direction's reset mask over the
  chunk's steps (None: none), which replaces the state by ``h_init`` (B, H), the state a reset
  restores (the layer's initial state unless the caller gives another), before the steps where it
  is set.

  ``save`` is None (no residuals) or ``"all"`` (per step: the state before the step, after any
  reset, the gate inputs and the outputs of the recurrent products, split by gate).
  """
  cell = st.cell
  size = cell.hidden_size
  ts = t0 + jnp.arange(x_CBI.shape[0], dtype=jnp.int32)
  seq = _project(cell, params, x_CBI) if st.hoist else x_CBI
  resets_next = None
  if resets_CB is not None:
    # The reset before the chunk's first step (in processing order) is made here; every other
    # one at the end of the step before it, in the elementwise pass that makes that step's
    # state (a select there costs no pass of its own). The chunk's last step resets nothing,
    # so its carry, the chunk's final state, is the state itself.
    h0 = _reset(h0, h_init, resets_CB[-1 if st.reverse else 0])
    none = jnp.zeros_like(resets_CB[:1])
    resets_next = (jnp.concatenate([none, resets_CB[:-1]]) if st.reverse else
                   jnp.concatenate([resets_CB[1:], none]))

  def body(h, inp):
    x_or_g, t, r_next = inp
    g = x_or_g if st.hoist else _project(cell, params, x_or_g, st.input_terms)
    outs = []

    def product(k, a):
      y = cell._recurrent_product(params, k, a)
      y = split_gates(y, y.shape[-1] // size)
      outs.append(y)
      return y

    recur = None
    if st.step_jvp and save is None:
      recur = lambda h, g: _recur_step(cell, _recurrent_weights(params), h, tuple(g))
    h_new, y = _step(cell, h, g, t, lengths, product, recur)
    res = (h, None if st.hoist else g, tuple(outs)) if save == "all" else None
    return _reset(h_new, h_init, r_next), (y, res)

  h_last, (ys, res) = jax.lax.scan(body, h0, (seq, ts, resets_next), reverse=st.reverse,
                                   unroll=st.unroll)
  if save == "all" and st.hoist:
    res = (res[0], seq, res[2])
  return ys, h_last, res

# -- over the chunks ------------------------------------------------------------------------------


def _over_chunks(st: _Static, fn, carry, xs):
  """``lax.scan(fn, carry, xs)`` over the leading (chunk) axis; one call when ``st.single``."""
  if st.single:
    return fn(carry, xs)
  return jax.lax.scan(fn, carry, xs, reverse=st.reverse)


def _starts(st: _Static, xs_NCBI):
  """Each chunk's first time index."""
  if st.single:
    return jnp.zeros((), jnp.int32)
  return jnp.arange(xs_NCBI.shape[0], dtype=jnp.int32) * xs_NCBI.shape[1]


def _flat(st: _Static, a):
  """(N, C, ...) -> (N*C, ...); None, or an array without a chunk axis, stays as it is."""
  return a if a is None or st.single else a.reshape((-1,) + a.shape[2:])


def _chunked(st: _Static, a, like_NCBI):
  """(N*C, ...) -> (N, C, ...) as ``like_NCBI`` is chunked (unchanged when ``st.single``)."""
  return a if st.single else a.reshape(like_NCBI.shape[:2] + a.shape[1:])


def _layer(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None, h_init=None):
  """The loop differentiated by JAX (with jax.checkpoint per chunk unless remat is "none").

  ``xs_NCBI`` (N, C, B, I) and ``resets_NCB`` (N, C, B) are in chunks, or (T, B, I) and (T, B)
  when ``st.single``; the outputs ``ys`` are shaped alike. A reset restores ``h_init`` (B, H),
  ``h0`` when None."""
  h_init = h0 if h_init is None else h_init
  if st.remat == "none" and not st.hoist:
    # Chunks only bound the memory of a backward pass or of a hoisted projection: one loop.
    ys, h_last, _ = _forward(st, params, _flat(st, xs_NCBI), h0, lengths, 0, save=None,
                             resets_CB=_flat(st, resets_NCB), h_init=h_init)
    return _chunked(st, ys, xs_NCBI), h_last

  def chunk(h, inp):
    x, t0, r = inp
    ys, h_last, _ = _forward(st, params, x, h, lengths, t0, save=None, resets_CB=r,
                             h_init=h_init)
    return h_last, ys

  if st.remat != "none":
    chunk = jax.checkpoint(chunk)
  h_last, ys = _over_chunks(st, chunk, h0, (xs_NCBI, _starts(st, xs_NCBI), resets_NCB))
  return ys, h_last


def _forward_only(st: _Static) -> _Static:
  """How a layer runs where nothing is differentiated: it keeps nothing for a backward pass
  (remat "none"), projects the inputs and unrolls its loop as ``st.forward_hoist`` and
  ``st.forward_unroll`` say (:func:`jaxgru._tuning.forward_hoist_default`,
  :func:`jaxgru._tuning.forward_unroll_default`), and drops what exists only for JAX's
  derivative (the step's own JVP, the multiply-add projection)."""
  hoist = st.hoist if st.forward_hoist is None else st.forward_hoist
  unroll = st.unroll if st.forward_unroll is None else st.forward_unroll
  return dataclasses.replace(st, remat="none", hoist=hoist, unroll=unroll, step_jvp=False,
                             input_terms=False)


def _jvp_of_live(fn, primals, tangents):
  """``jax.jvp(fn, primals, tangents)`` over the arguments whose tangents are not symbolic zeros
  (as a ``custom_jvp`` rule with ``symbolic_zeros=True`` receives them), the others held fixed:
  no work on a tangent known to be zero."""
  leaves, tree = jax.tree.flatten(primals)
  dleaves = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, SymbolicZero))
  assert len(dleaves) == len(leaves), (len(dleaves), len(leaves))
  live = [i for i, t in enumerate(dleaves) if not isinstance(t, SymbolicZero)]

  def of_live(*values):
    full = list(leaves)
    for i, v in zip(live, values):
      full[i] = v
    return fn(*jax.tree.unflatten(tree, full))

  return jax.jvp(of_live, [leaves[i] for i in live], [dleaves[i] for i in live])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _layer_autodiff(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None, h_init=None):
  """:func:`_layer` as JAX differentiates it (``ScanOptions.custom_vjp`` off), which runs where
  nothing is differentiated as the custom rule's forward pass does (:func:`_forward_only`).

  Under jax.vmap, that forward pass took 0.88 of the time of the loop JAX differentiates at 4
  models of 64x256x64x64 (B x T x I x H), 0.92 at 8 of 32x128x32x128, and 0.43 at 64 addition
  models (128x65x2x16), whose multiply-add projection made the loop's own forward pass slow
  (docs/performance-notes.md). Its JVP is JAX's JVP of :func:`_layer`, so a differentiated program is
  what it was without this rule.
  """
  return _layer(_forward_only(st), params, xs_NCBI, h0, lengths, resets_NCB, h_init)


@functools.partial(_layer_autodiff.defjvp, symbolic_zeros=True)
def _layer_autodiff_jvp(st, primals, tangents):
  return _jvp_of_live(functools.partial(_layer, st), primals, tangents)
