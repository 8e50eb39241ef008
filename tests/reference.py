"""The plain time loop the fast one is checked against: ``jax.lax.scan`` over ``GRUConfig.step``.

It is what ``GRUConfig.sequence`` was before the library kept one public loop (``scan_layer``):
one example, one step after another, masked by a scalar length, differentiated by JAX's own
autodiff. It shares nothing with jaxgru's loop but the public, per-example step.
"""

import jax
import jax.numpy as jnp


def sequence(cell, params, xs_TI, h0_H=None, length=None, reverse=False):
  """``(ys_TH, h_last_H)`` of ``cell`` over one sequence; steps t >= length keep the state and
  output zeros, and ``reverse`` reads from step length-1 down to 0 (outputs in input order)."""
  h0_H = cell.initial_state() if h0_H is None else h0_H.astype(cell.state_dtype)
  steps = jnp.arange(xs_TI.shape[0], dtype=jnp.int32)
  limit = xs_TI.shape[0] if length is None else jnp.asarray(length).astype(jnp.int32)

  def body(h, inputs):
    x, t = inputs
    valid = t < limit
    h_new = jnp.where(valid, cell.step(params, h, x), h)
    return h_new, jnp.where(valid, h_new, jnp.zeros_like(h_new))

  h_last, ys = jax.lax.scan(body, h0_H, (xs_TI, steps), reverse=reverse)
  return ys, h_last
