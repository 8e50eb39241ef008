"""The forward time loop of one layer: time-major, in chunks, masked by lengths.

This module owns how a layer's steps run forward: the one masked step (:func:`_step`, the only
place where ``lengths`` act on the state), the reset of a state to its initial value at episode
boundaries (:func:`_reset`, the only place where ``resets`` act on the state), the loop over one chunk's steps (:func:`_forward`,
which can also record what the backward pass needs), the loop over chunks, and
:func:`_layer`, the layer as JAX differentiates it by itself. The GRU math is the cell's
(:meth:`GRUConfig._recur_with`); its custom derivative lives in :mod:`jaxgru._jvp`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxgru.cell import GRUConfig, Params, split_gates


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



# -- one step -------------------------------------------------------------------------------------


def _project(cell: GRUConfig, params: Params, x: jax.Array) -> tuple[jax.Array, ...]:
  return split_gates(cell._project_inputs(params, x), 3)


def _step(cell: GRUConfig, h, g, t, lengths, product):
  """One step, masked by lengths (as the plain reference loop of tests/reference.py): returns
  (carry, output)."""
  h_new = cell._recur_with(h, g, product)
  if lengths is None:
    return h_new, h_new
  valid = (t < lengths)[:, None]
  h_new = jnp.where(valid, h_new, h)
  return h_new, jnp.where(valid, h_new, jnp.zeros_like(h_new))


def _reset(h, h_init, r):
  """The state a step starts from: ``h_init`` where the step's reset flag ``r`` (B,) is set.

  ``r`` is the direction's own mask (see :func:`jaxgru.scan._reset_mask`): a forward loop resets
  before the first step of a segment, a reverse one before its last step. None: no resets.
  """
  if r is None:
    return h
  return jnp.where(r[:, None], h_init, h)


def _join(parts: tuple[jax.Array, ...]) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _rows(a: jax.Array) -> jax.Array:
  return a.reshape((-1, a.shape[-1]))

# -- one chunk ------------------------------------------------------------------------------------


def _forward(st: _Static, params, x_CBI, h0, lengths, t0, save: Optional[str],
             resets_CB=None, h_init=None):
  """The loop over one chunk's steps, starting at time index t0: (ys, h_last, residuals).

  ``h0`` is the chunk's starting state; ``resets_CB`` (C, B) the direction's reset mask over the
  chunk's steps (None: none), which replaces the state by ``h_init`` (B, H), the layer's initial
  state, before the steps where it is set.

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
    g = x_or_g if st.hoist else _project(cell, params, x_or_g)
    outs = []

    def product(k, a):
      y = cell._recurrent_product(params, k, a)
      y = split_gates(y, y.shape[-1] // size)
      outs.append(y)
      return y

    h_new, y = _step(cell, h, g, t, lengths, product)
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


def _layer(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None):
  """The loop differentiated by JAX (with jax.checkpoint per chunk unless remat is "none").

  ``xs_NCBI`` (N, C, B, I) and ``resets_NCB`` (N, C, B) are in chunks, or (T, B, I) and (T, B)
  when ``st.single``; the outputs ``ys`` are shaped alike."""
  if st.remat == "none" and not st.hoist:
    # Chunks only bound the memory of a backward pass or of a hoisted projection: one loop.
    ys, h_last, _ = _forward(st, params, _flat(st, xs_NCBI), h0, lengths, 0, save=None,
                             resets_CB=_flat(st, resets_NCB), h_init=h0)
    return _chunked(st, ys, xs_NCBI), h_last

  def chunk(h, inp):
    x, t0, r = inp
    ys, h_last, _ = _forward(st, params, x, h, lengths, t0, save=None, resets_CB=r, h_init=h0)
    return h_last, ys

  if st.remat != "none":
    chunk = jax.checkpoint(chunk)
  h_last, ys = _over_chunks(st, chunk, h0, (xs_NCBI, _starts(st, xs_NCBI), resets_NCB))
  return ys, h_last
