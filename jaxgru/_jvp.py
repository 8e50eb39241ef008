"""The custom derivative of one layer's time loop: a JVP whose tangent loop JAX transposes.

This module owns how a layer is differentiated when ``ScanOptions.custom_vjp`` is on (the name
predates this design: the option selects these custom derivative rules). One rule serves both
modes: :func:`_layer_jvp` is a ``jax.custom_jvp`` whose tangent computation is LINEAR in the
tangents and built from transposable operations, so ``jax.jvp``, ``jax.jacfwd`` and
``jax.linearize`` run it forward, and ``jax.grad``/``jax.vjp`` get the reverse pass by JAX's
transposition of the same computation. No custom VJP is involved, which is what lets forward mode
work at every length.

The tangent of a step, with ``gx = x @ w_x + b_x`` and ``gh_k = a_k @ w_k + b_k`` the input
projection and the recurrent products (``a_0 = h``; reset_before has ``a_1 = r * h``), is

  dgx   = dx @ w_x + x @ dw_x + db_x          for all steps of a chunk: ONE product each
  eps_k = a_k @ dw_k + db_k                   likewise, from the saved (or recomputed) a_k
  dh'   = dF(h, gx, gh; dh, dgx, da_k @ w_k + eps_k)     in the loop

so the loop carries only ``dh`` and the weights' tangents enter it as bulk inputs. Transposed by
JAX, the bulk products become the weight gradients as one (C*B rows) product per chunk, and the
loop becomes the backward recurrence: what the earlier hand-written VJP did.

Where the cell acts on each unit alone once its products are known (reset_after with
elementwise activations: :func:`jaxgru._tuning.diagonal_backward_applies`), F's Jacobian is
diagonal per unit. Its coefficients ``dF/dh``, ``dF/dgx``, ``dF/dgh`` for a whole chunk come from
ONE vector-Jacobian product of F against ones, before the loop, and a step of the tangent loop is

  dh' = c_h * dh + sum_gates(c_gh * (dh @ w_h)) + u,   u = sum_gates(c_gx * dgx + c_gh * eps_0)

Otherwise the loop takes the JVP of each step, with each product's output replayed from the
saved values (:func:`_given`).

Residuals follow ``ScanOptions.remat``: ``"none"`` keeps every step's state, gate inputs and
products; ``"products"`` only the states (a chunk's products are recomputed from them as one
product each, under ``jax.checkpoint``, so the reverse pass recomputes them too); ``"full"``
only each chunk's first state (the chunk's loop is rerun). Gradients nobody asked for (a first
layer's inputs, a zero initial state) are never formed: their tangents are symbolic zeros.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxgru.cell import split_gates
from jaxgru._loop import (_Static, _chunked, _flat, _forward, _forward_only, _layer,
                          _over_chunks, _reset, _starts, _step)


def _is_zero(t) -> bool:
  return t is None or isinstance(t, SymbolicZero)


def _instantiate(t, like):
  return jnp.zeros(like.shape, like.dtype) if isinstance(t, SymbolicZero) else t


# -- within a step: no recurrence, so a chunk's steps can be computed at once ---------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _given(cell, k: int, params, a, out, eps):
  """The k-th recurrent product of a step, ``a @ w_k + b_k``, already known as ``out``.

  Its tangent is ``da @ w_k + deps``: the product's own derivative in its input, plus ``eps``,
  the weights' share, computed in bulk before the loop. The primal is not recomputed.
  """
  del cell, k, params, a, eps
  return out


@_given.defjvp
def _given_jvp(cell, k, primals, tangents):
  params, a, out, _ = primals
  _, da, _, deps = tangents
  size = cell.hidden_size
  _, dy = jax.jvp(lambda a: cell._recurrent_product(params, k, a), (a,), (da,))
  dy = split_gates(dy, dy.shape[-1] // size)
  return out, tuple(d + e for d, e in zip(dy, deps))


def _within_steps(cell, params, hs, gs, outs, joined=False):
  """Each step's gate inputs, product outputs and product inputs for a whole chunk.

  ``hs`` (C, B, H) are the states before each step (after any reset), ``gs`` the gate inputs
  (3 x (C, B, H) or (C, B, 3H)), ``outs`` the saved products (per product, its gates) or None
  (they are then computed here, each one (C*B, H) x (H, .) product). Returns ``(gs, outs, ins)``
  with every array (C, B, ...) and split by gate; with ``joined``, the gate inputs and the
  products computed here are returned as they were made, gates joined ((C, B, 3H)), not split.
  """
  lead = hs.shape[:2]
  rows = lambda a: a.reshape((-1,) + a.shape[2:])
  unrows = lambda a: a.reshape(lead + a.shape[1:])
  size = cell.hidden_size
  ins, got = [], []

  def product(k, a):
    ins.append(unrows(a))
    if outs is not None and k < len(outs):  # saved by the forward pass, split by gate
      got.append(tuple(outs[k]))
      return tuple(rows(o) for o in outs[k])
    y = cell._recurrent_product(params, k, a)
    parts = split_gates(y, y.shape[-1] // size)
    got.append(unrows(y) if joined else tuple(unrows(o) for o in parts))
    return parts

  split = split_gates(gs, 3)
  cell._recur_with(rows(hs), tuple(rows(g) for g in split), product)
  return gs if joined else split, tuple(got), tuple(ins)


def _bulk_tangents(cell, params, x, ins, dparams, dx, joined=False):
  """The tangents that do not recur, for a whole chunk: ``dgx`` (the input projection's, split
  by gate, or None) and ``eps`` (per product, the weights' share ``a_k @ dw_k + db_k``, split by
  gate, or None when the weights' tangents are zero). With ``joined``, not split: (C, B, 3H)."""
  size = cell.hidden_size
  lead = x.shape[:2]
  rows = lambda a: a.reshape((-1,) + a.shape[2:])
  unrows = lambda a: a.reshape(lead + a.shape[1:])
  dgx = None
  if dparams is not None or dx is not None:
    if dparams is None:
      _, dgx = jax.jvp(lambda x: cell._project_inputs(params, x), (rows(x),), (rows(dx),))
    elif dx is None:
      _, dgx = jax.jvp(lambda p: cell._project_inputs(p, rows(x)), (params,), (dparams,))
    else:
      _, dgx = jax.jvp(lambda p, x: cell._project_inputs(p, x), (params, rows(x)),
                       (dparams, rows(dx)))
    dgx = unrows(dgx) if joined else tuple(unrows(g) for g in split_gates(dgx, 3))
  eps = None
  if dparams is not None:
    eps = []
    for k, a in enumerate(ins):
      _, e = jax.jvp(lambda p, a=a, k=k: cell._recurrent_product(p, k, rows(a)), (params,),
                     (dparams,))
      eps.append(unrows(e) if joined else
                 tuple(unrows(g) for g in split_gates(e, e.shape[-1] // size)))
    eps = tuple(eps)
  return dgx, eps


# -- the tangent loop of one chunk ----------------------------------------------------------------


def _masked(s, dh, t, lengths):
  """The tangent state and output of a step whose new state's tangent is ``s``."""
  if lengths is None:
    return s, s
  valid = (t < lengths)[:, None]
  return jnp.where(valid, s, dh), jnp.where(valid, s, jnp.zeros_like(s))


def _diagonal_loop(st: _Static, params, hs, gs, outs, dgx, eps, dh, dh_init, lengths, ts,
                   resets_CB):
  """The tangent loop of a chunk whose cell acts on each unit alone (``st.diagonal``)."""
  cell = st.cell
  (out,) = outs
  size = cell.hidden_size

  def gate_major(a):
    """(C, B, 3H), or its 3 gates (C, B, H), as (C, B, 3, H): a reshape of the joined array, so
    that neither this nor its transpose makes a pass of its own."""
    if isinstance(a, (tuple, list)):
      a = jnp.concatenate(a, axis=-1)
    return a.reshape(a.shape[:-1] + (3, size))

  def gates(a):  # (C, B, 3, H) -> its 3 gates; transposed, one concatenation (slices would pad)
    return tuple(jnp.squeeze(p, 2) for p in jnp.split(a, 3, axis=2))

  def cell_fn(h, g, o):
    return cell._recur_with(h, gates(g), lambda k, a: gates(o))

  # The diagonal of each step's Jacobian, for all steps at once: F against ones.
  _, vjp_cell = jax.vjp(cell_fn, hs, gate_major(gs), gate_major(out))
  c_h, c_g, c_o = vjp_cell(jnp.ones_like(hs))
  u = None
  if dgx is not None:
    u = jnp.sum(c_g * gate_major(dgx), axis=2)
  if eps is not None:
    e = jnp.sum(c_o * gate_major(eps[0]), axis=2)
    u = e if u is None else u + e
  if u is None:
    u = jnp.zeros_like(hs)
  # The recurrent product's own derivative in its input (it is affine: any point will do).
  _, lin = jax.linearize(lambda a: cell._recurrent_product(params, 0, a), hs[0])
  batch = hs.shape[1]

  def body(dh, inp):
    c_h_t, c_o_t, u_t, t, r = inp
    dh = _reset(dh, dh_init, r)
    s = c_h_t * dh + jnp.sum(c_o_t * lin(dh).reshape((batch, 3, size)), axis=1) + u_t
    return _masked(s, dh, t, lengths)

  return jax.lax.scan(body, dh, (c_h, c_o, u, ts, resets_CB), reverse=st.reverse,
                      unroll=st.unroll)


def _per_step_loop(st: _Static, params, hs, gs, outs, dgx, eps, dh, dh_init, lengths, ts,
                   resets_CB):
  """The tangent loop of any cell: the JVP of each step, its products replayed."""
  cell = st.cell
  zero_gates = lambda o: tuple(jnp.zeros_like(p) for p in o)
  if dgx is None:
    dgx = zero_gates(gs)
  if eps is None:
    eps = tuple(zero_gates(o) for o in outs)

  # Checkpointed, so that a reverse pass recomputes each step's primal values inside its own
  # loop (one loop, as a per-step VJP would be) instead of in a loop of their own beforehand.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(dh, inp):
    h, g, out, dg, de, t, r = inp
    dh = _reset(dh, dh_init, r)

    def step(h, g, e):
      product = lambda k, a: _given(cell, k, params, a, out[k], e[k])
      return _step(cell, h, g, t, lengths, product)

    _, tangents = jax.jvp(step, (h, g, jax.tree.map(jnp.zeros_like, de)), (dh, dg, de))
    return tangents

  return jax.lax.scan(body, dh, (hs, gs, outs, dgx, eps, ts, resets_CB), reverse=st.reverse,
                      unroll=st.unroll)


def _chunk_tangent(st: _Static, params, x, h_start, saved, y, lengths, t0, resets_CB, h_init,
                   h0, dparams, dx, dh, dh_init):
  """One chunk's tangents ``(dh at the chunk's end, dys)``, linear in ``(dparams, dx, dh,
  dh_init)``. ``saved`` and ``y`` are what the forward pass kept (see :func:`_primal`); ``h0`` is
  the layer's initial state."""
  cell = st.cell
  ts = t0 + jnp.arange(x.shape[0], dtype=jnp.int32)
  if st.remat == "full":
    _, _, (hs, gs, outs) = _forward(st, params, x, h_start, lengths, t0, save="all",
                                    resets_CB=resets_CB, h_init=h_init)
  elif st.remat == "products":
    # The state before each valid step is the output one step earlier in processing order (the
    # chunk's start for its first step). Only a step past a sequence's end has a masked output
    # (zero) there, and such steps leave the state alone; their own states do not matter. In
    # reverse, a sequence starts at its last valid step from h0, which its (zero) next output
    # does not hold.
    first = h_start[None]
    if st.reverse:
      hs = jnp.concatenate([y[1:], first])
      if lengths is not None:
        start = ts[:, None] + 1 >= lengths[None, :]
        hs = jnp.where(start[:, :, None], h0[None], hs)
    else:
      hs = jnp.concatenate([first, y[:-1]])
    if resets_CB is not None:
      hs = jnp.where(resets_CB[:, :, None], h_init[None], hs)
    gs, outs = cell._project_inputs(params, x), None
  else:
    hs, gs, outs = saved
  # The diagonal loop takes every gate array as (C, B, 3, H): joined, it is a reshape.
  gs, outs, ins = _within_steps(cell, params, hs, gs, outs, st.diagonal)
  dgx, eps = _bulk_tangents(cell, params, x, ins, dparams, dx, st.diagonal)
  loop = _diagonal_loop if st.diagonal else _per_step_loop
  return loop(st, params, hs, gs, outs, dgx, eps, dh, dh_init, lengths, ts, resets_CB)


# -- the layer ------------------------------------------------------------------------------------


def _primal(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB, h_init):
  """The forward pass, keeping what the tangents need: ``(ys, h_last, h_starts, saved)``.

  Per chunk, ``h_starts`` is its first state (remat "full" and "products"; for "products" the
  other states are the outputs shifted by one step, see :func:`_chunk_tangent`) and ``saved``
  what else it keeps: (states, gate inputs, products) per step for remat "none", else None.
  With ``st.single`` no array has a chunk axis.
  """
  chunks = (xs_NCBI, _starts(st, xs_NCBI), resets_NCB)
  save = "all" if st.remat == "none" else None

  def chunk(h, inp):
    x, t0, rs = inp
    ys, h_last, r = _forward(st, params, x, h, lengths, t0, save=save, resets_CB=rs,
                             h_init=h_init)
    return h_last, (ys, h if st.remat == "full" else r)

  if st.remat == "full" or st.hoist:  # chunk by chunk (a hoisted projection is made per chunk)
    h_last, (ys, kept) = _over_chunks(st, chunk, h0, chunks)
    if st.remat == "full":
      return ys, h_last, kept, None
    saved = kept
  else:
    ys, h_last, saved = _forward(st, params, _flat(st, xs_NCBI), h0, lengths, 0, save=save,
                                 resets_CB=_flat(st, resets_NCB), h_init=h_init)
    ys, saved = jax.tree.map(lambda a: _chunked(st, a, xs_NCBI), (ys, saved))
  if saved is not None and st.remat == "none":
    hs, gs, outs = saved
    saved = (hs, split_gates(gs, 3), outs)
  if st.remat == "products":
    if st.single:  # one chunk, in either direction, starts from h0
      h_starts = h0
    elif st.reverse:
      h_starts = jnp.concatenate([ys[1:, 0], h0[None]])
    else:
      h_starts = jnp.concatenate([h0[None], ys[:-1, -1]])
  else:  # unused: the saved states hold every state
    h_starts = jnp.zeros((0,) if st.single else (xs_NCBI.shape[0], 0), h0.dtype)
  return ys, h_last, h_starts, saved


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _layer_jvp(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None, h_init=None):
  """The layer over (N, C, B, I) chunks, differentiated by the rules of this module. Run without
  a derivative it keeps nothing for one, and runs as :func:`jaxgru._loop._forward_only` says.
  A reset restores ``h_init`` (B, H), ``h0`` when None."""
  return _layer(_forward_only(st), params, xs_NCBI, h0, lengths, resets_NCB, h_init)


def _layer_jvp_rule(st: _Static, primals, tangents):
  params, xs_NCBI, h0, lengths, resets_NCB, h_init = primals
  dparams, dxs, dh0 = tangents[:3]
  leaves = jax.tree.leaves(dparams, is_leaf=lambda t: isinstance(t, SymbolicZero))
  dparams = (None if all(_is_zero(t) for t in leaves) else
             jax.tree.map(_instantiate, dparams, params,
                          is_leaf=lambda t: isinstance(t, SymbolicZero)))
  dxs = None if _is_zero(dxs) else dxs
  dh0 = None if _is_zero(dh0) else dh0
  # What reaches a reset step is the reset state's tangent: h0's unless a reset state of its own
  # is given; none where that has no tangent.
  if h_init is None:
    h_init, dh_given = h0, dh0
  else:
    dh_given = None if _is_zero(tangents[5]) else tangents[5]
  ys, h_last, h_starts, saved = _primal(st, params, xs_NCBI, h0, lengths, resets_NCB, h_init)
  if resets_NCB is None:
    h_init, dh_given = None, None
  if dparams is None and dxs is None and dh0 is None and dh_given is None:
    return (ys, h_last), (jnp.zeros_like(ys), jnp.zeros_like(h_last))
  dh_init = None
  if resets_NCB is not None:
    dh_init = jnp.zeros_like(h_init) if dh_given is None else dh_given
  ys_kept = ys if st.remat == "products" else None

  tangent = functools.partial(_chunk_tangent, st)
  if st.remat != "none":
    # The reverse pass recomputes a chunk's residuals from what the forward pass kept.
    tangent = jax.checkpoint(tangent, prevent_cse=False)

  def chunk(dh, inp):
    x, t0, h_start, sv, y, rs, dx = inp
    dh, dys = tangent(params, x, h_start, sv, y, lengths, t0, rs, h_init, h0, dparams, dx, dh,
                      dh_init)
    return dh, dys

  dh = jnp.zeros_like(h_last) if dh0 is None else dh0
  dh_last, dys = _over_chunks(
      st, chunk, dh, (xs_NCBI, _starts(st, xs_NCBI), h_starts, saved, ys_kept, resets_NCB, dxs))
  return (ys, h_last), (dys, dh_last)


_layer_jvp.defjvp(_layer_jvp_rule, symbolic_zeros=True)
