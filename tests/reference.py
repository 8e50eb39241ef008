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


def stack(rnn, params, xs_BTI, lengths=None, h0=None):
  """``(ys_BTF, h_n)`` of the stack ``rnn`` (a ``jaxgru.RNNConfig``) from :func:`sequence`: every
  cell of every layer runs the plain loop, vmapped over the batch, and the directions are merged
  as the config says. ``h_n`` is ``(L * D, B, H)`` in torch's order. No dropout."""
  batch, steps = xs_BTI.shape[:2]
  lengths_B = (jnp.full((batch,), steps, jnp.int32) if lengths is None
               else jnp.asarray(lengths).astype(jnp.int32))
  x_BTF, finals = xs_BTI, []
  for l, layer in enumerate(params):
    cell = rnn.layer_cell(l)
    outs = []
    for i, d in enumerate(rnn.directions):
      h0_BH = (jnp.zeros((batch, rnn.hidden_size), cell.state_dtype) if h0 is None
               else h0[l * rnn.num_directions + i])
      run = lambda xs_TI, h_H, n, p=layer[d], rev=d == "bwd": sequence(cell, p, xs_TI, h_H, n,
                                                                        reverse=rev)
      ys_BTH, h_BH = jax.vmap(run)(x_BTF, h0_BH, lengths_B)
      outs.append(ys_BTH)
      finals.append(h_BH)
    if len(outs) == 1:
      x_BTF = outs[0]
    else:
      x_BTF = jnp.concatenate(outs, axis=-1) if rnn.merge == "concat" else outs[0] + outs[1]
  return x_BTF, jnp.stack(finals)


def plain_rnn(rnn):
  """``rnn`` (a ``jaxgru.RNNConfig``) as a config whose ``apply`` runs :func:`stack`: a task's
  model built on it computes its outputs, loss and gradients through the plain loop, with the
  same parameters. It keeps the config's sizes and layer cells; only the loop is replaced."""
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class PlainRNN(type(rnn)):
    def apply(self, params, xs, lengths=None, h0=None, *, dropout_key=None, options=None,
              **rest):
      del options  # how jaxgru's loops run (ScanOptions) changes no result; the plain loop has none
      if rest or (dropout_key is not None and self.dropout > 0):
        raise NotImplementedError(f"the plain stack has no {sorted(rest) or 'dropout'}")
      return stack(self, params, xs, lengths, h0)

  return PlainRNN(**{f.name: getattr(rnn, f.name) for f in dataclasses.fields(rnn)})
