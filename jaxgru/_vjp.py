"""The custom VJP of one layer's time loop.

This module owns how a layer is differentiated when ``ScanOptions.custom_vjp`` is on: the
forward pass records (or, with rematerialization, later recomputes) per-step residuals chunk by
chunk; the backward loop differentiates the gates step by step, or for a whole chunk at once
where the cell acts on each unit alone (the diagonal backward); and the weight gradients are ONE
matrix product per chunk over its C*B rows instead of one per step. The forward loop itself is
:func:`jaxgru._loop._forward`. The gradients equal JAX's autodiff of the plain loop up to the
order of floating-point additions (tests/test_fast_path.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxgru.cell import GRUConfig, Params, split_gates
from jaxgru._loop import (_Static, _flat, _forward, _join, _layer, _over_chunks, _reset, _rows,
                          _starts, _step)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _replay(cell: GRUConfig, k: int, params: Params, a: jax.Array, y: tuple[jax.Array, ...]):
  """``recurrent_product(params, k, a)``, already computed as ``y`` by the forward pass.

  Its VJP passes ``dy`` back to ``a`` (through the product) and to ``y`` (so the backward loop
  can read the product's output cotangent), but not to ``params``: their gradient is taken
  after the loop, over all steps at once.
  """
  del cell, k, params, a
  return y


def _replay_fwd(cell, k, params, a, y):
  del cell, k
  return y, (params, a)


def _replay_bwd(cell, k, res, dy):
  params, a = res
  _, vjp = jax.vjp(lambda a: cell._recurrent_product(params, k, a), a)
  (da,) = vjp(_join(dy))
  return jax.tree.map(jnp.zeros_like, params), da, dy


_replay.defvjp(_replay_fwd, _replay_bwd)

def _recompute_products(st: _Static, params, x_CBI, h_start, ys, hs, resets_CB, h_init):
  """The residuals of a chunk from its states alone, each product one matrix product.

  The states before each step are ``hs`` when saved, else the chunk's outputs shifted by one
  step with ``h_start`` in front (behind, reading in reverse), and ``h_init`` where the step's
  reset flag (``resets_CB``, C x B) is set. Product 0 reads the state, so all of its steps are
  one (C*B, H) x (H, .) product; the later products read values of the step itself and are
  left to the backward loop.
  """
  cell = st.cell
  if hs is None:
    first = h_start[None]
    hs = (jnp.concatenate([ys[1:], first]) if st.reverse else
          jnp.concatenate([first, ys[:-1]]))
    if resets_CB is not None:
      hs = jnp.where(resets_CB[:, :, None], h_init[None], hs)
  y0 = cell._recurrent_product(params, 0, _rows(hs))
  y0 = y0.reshape(hs.shape[:2] + y0.shape[-1:])
  gx = cell._project_inputs(params, x_CBI)
  if st.diagonal:  # kept whole: the diagonal backward reads them gate-major, (C, B, 3, H)
    return hs, gx, (y0,)
  return hs, split_gates(gx, 3), (split_gates(y0, y0.shape[-1] // cell.hidden_size),)


def _backward(st: _Static, params, x_CBI, lengths, t0, res, dys, dh_last, need_dx: bool,
              resets_CB=None, dh_init=None):
  """The backward loop of one chunk; returns (dparams, dx or None, dh at the chunk's start,
  dh_init).

  ``res`` holds, per step, the state before the step (after any reset), the gate inputs and the
  outputs of the first ``len(outs)`` recurrent products; the loop recomputes the others (they
  read values of the step itself) and reads their output cotangents through an added zero.

  Where a step's reset flag (``resets_CB``, C x B) is set, its state was the layer's initial
  state: the cotangent of that state is added to ``dh_init`` (B, H; None when nobody needs the
  initial state's gradient) and the earlier steps receive none.
  """
  cell = st.cell
  hs, gs, outs = res
  ts = t0 + jnp.arange(x_CBI.shape[0], dtype=jnp.int32)
  batch = hs.shape[1]
  zeros = tuple(
      jnp.zeros(jax.eval_shape(lambda k=k: cell._recurrent_product(
          params, k, jnp.zeros((batch, cell.hidden_size), cell.state_dtype))).shape,
                cell.state_dtype)
      for k in range(len(outs), cell._num_recurrent_products))

  where = []

  def body(carry, inp):
    dh, acc = carry
    dy, h, g, out, t, r = inp

    def step(h, g, out, eps):
      ins = []

      def product(k, a):
        if k:  # the input of product 0 is the state itself, already saved
          ins.append(a)
        if k < len(out):
          return _replay(cell, k, params, a, out[k])
        y = cell._recurrent_product(params, k, a) + eps[k - len(out)]
        return split_gates(y, y.shape[-1] // cell.hidden_size)

      return _step(cell, h, g, t, lengths, product), tuple(ins)

    _, vjp, ins = jax.vjp(step, h, g, out, zeros, has_aux=True)
    dh_prev, dg, dout, deps = vjp((dh, dy))
    # Stored gate by gate: joining them here would fuse a concatenation into the loop's
    # element loops, which XLA:CPU makes slow. A cotangent that reaches two places (dz
    # reaches gx_z and gh_z) is stored once.
    cts = jax.tree.leaves((dg, dout, deps))
    unique = []
    for a in cts:
      if not any(a is u for u in unique):
        unique.append(a)
    where[:] = [next(i for i, u in enumerate(unique) if a is u) for a in cts]
    return _unreset(dh_prev, acc, r), (tuple(unique), ins)

  if st.diagonal:
    (dh0, dh_init), dgs, douts = _diagonal_loop(st, params, hs, gs, outs, dys, dh_last, lengths,
                                                ts, resets_CB, dh_init)
    deps, ins = (), ()
  else:
    (dh0, dh_init), (unique, ins) = jax.lax.scan(
        body, (dh_last, dh_init), (dys, hs, gs, outs, ts, resets_CB), reverse=not st.reverse,
        unroll=st.unroll)
    dgs, douts, deps = jax.tree.unflatten(
        jax.tree.structure((gs, outs, zeros)), [unique[i] for i in where])

  # The weight gradients: one product over the chunk's C*B rows each.
  ins = (hs,) + tuple(ins)
  douts = tuple(_rows(_join(d)) for d in douts) + tuple(_rows(d) for d in deps)
  _, vjp_rec = jax.vjp(
      lambda p: [cell._recurrent_product(p, k, _rows(a)) for k, a in enumerate(ins)], params)
  (dp_rec,) = vjp_rec(list(douts))
  dgs = _join(dgs)
  if need_dx:
    _, vjp_in = jax.vjp(lambda p, x: cell._project_inputs(p, x), params, x_CBI)
    dp_in, dx = vjp_in(dgs)
  else:
    _, vjp_in = jax.vjp(lambda p: cell._project_inputs(p, _rows(x_CBI)), params)
    (dp_in,), dx = vjp_in(_rows(dgs)), None
  return jax.tree.map(jnp.add, dp_rec, dp_in), dx, dh0, dh_init


def _unreset(dh, acc, r):
  """The transpose of :func:`jaxgru._loop._reset`: ``(dh, acc)`` for the carry of a backward loop.

  Where the flag ``r`` (B,) is set, the state's cotangent ``dh`` goes to the initial state's
  accumulator ``acc`` (when it is not None) and none flows to the previous step.
  """
  if r is None:
    return dh, acc
  r = r[:, None]
  if acc is not None:
    acc = acc + jnp.where(r, dh, jnp.zeros_like(dh))
  return jnp.where(r, jnp.zeros_like(dh), dh), acc


def _diagonal_loop(st: _Static, params, hs, gs, outs, dys, dh_last, lengths, ts, resets_CB=None,
                   dh_init=None):
  """The backward loop of a chunk whose cell acts on each unit alone (``st.diagonal``).

  With the products known, the cell is ``h' = F(h, gx, gh)`` and each unit of ``h'`` reads the
  same unit of ``h``, ``gx`` and ``gh`` only, so its Jacobian is diagonal and the VJP of F against
  ones is that diagonal: ``dF/dh``, ``dF/dgx``, ``dF/dgh``, for all C steps in one elementwise
  pass over the chunk. A step of the loop is then, with ``s`` the cotangent of F's output,

    s = dh + dy                 (zero where masked)
    dh_prev = s * dF/dh + (s * dF/dgh) @ w_h^T      (dh itself where masked)

  and ``dgx = s * dF/dgx``, ``dgh = s * dF/dgh`` are formed after the loop, for all steps at once;
  resets move ``dh_prev`` to ``dh_init`` as in :func:`_backward`. Returns
  ``((dh at the chunk's start, dh_init), dgs, douts)`` shaped as ``_backward``'s.
  """
  cell = st.cell
  (out,) = outs
  batch, size = hs.shape[1], cell.hidden_size

  def gate_major(a):  # (C, B, 3H) or 3 x (C, B, H) -> (C, B, 3, H)
    if isinstance(a, (tuple, list)):
      return jnp.stack(a, axis=2)
    return a.reshape(a.shape[:2] + (3, size))

  def cell_fn(h, g, o):
    gates = lambda a: tuple(a[:, :, i] for i in range(3))
    return cell._recur_with(h, gates(g), lambda k, a: gates(o))

  # Gate-major coefficients: a step's are one (B, 3, H) array, and the gradients after the loop
  # are (C, B, 3, H), which is (C*B, 3H) as it stands: nothing to join.
  _, vjp_cell = jax.vjp(cell_fn, hs, gate_major(gs), gate_major(out))
  c_h, c_g, c_o = vjp_cell(jnp.ones_like(hs))
  # The transpose of the recurrent product (affine in its input, so any point will do).
  _, vjp_product = jax.vjp(lambda a: cell._recurrent_product(params, 0, a), hs[0])

  def body(carry, inp):
    dh, acc = carry
    dy, c_h_t, c_o_t, t, r = inp
    s = dh + dy
    if lengths is not None:
      valid = (t < lengths)[:, None]
      s = jnp.where(valid, s, jnp.zeros_like(s))
    (back,) = vjp_product((s[:, None, :] * c_o_t).reshape((batch, 3 * size)))
    dh_prev = s * c_h_t + back
    if lengths is not None:
      dh_prev = jnp.where(valid, dh_prev, dh)
    return _unreset(dh_prev, acc, r), s

  carry, s_CBH = jax.lax.scan(body, (dh_last, dh_init), (dys, c_h, c_o, ts, resets_CB),
                              reverse=not st.reverse, unroll=st.unroll)
  joined = lambda c: (s_CBH[:, :, None, :] * c).reshape(c.shape[:2] + (3 * size,))
  return carry, (joined(c_g),), ((joined(c_o),),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_vjp(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None):
  return _layer(dataclasses.replace(st, remat="none"), params, xs_NCBI, h0, lengths, resets_NCB)


def _value(tree):
  return jax.tree.map(lambda leaf: leaf.value, tree)


def _layer_vjp_fwd(st: _Static, params, xs_NCBI, h0, lengths, resets_NCB=None):
  # With symbolic zeros, every leaf comes as CustomVJPPrimal(value, perturbed): a gradient
  # nobody needs (a first layer's inputs, a zero initial state) is not computed.
  need_dx, need_dh0 = xs_NCBI.perturbed, h0.perturbed
  params, xs_NCBI, h0, lengths, resets_NCB = _value((params, xs_NCBI, h0, lengths, resets_NCB))
  n, c = xs_NCBI.shape[:2]
  ys_res = None
  chunks = (xs_NCBI, _starts(xs_NCBI), resets_NCB)
  if st.remat == "full":
    # Chunk by chunk, keeping each chunk's initial state (the carry, which masking can make
    # differ from the previous output).
    def chunk(h, inp):
      x, t0, rs = inp
      ys, h_last, _ = _forward(st, params, x, h, lengths, t0, save=None, resets_CB=rs,
                               h_init=h0)
      return h_last, (ys, h)

    h_last, (ys, h_starts) = _over_chunks(chunk, h0, chunks, st.reverse)
    res = (h_starts, None)
  else:
    # One loop over all steps; its residuals are cut into chunks for the backward pass.
    save = "all" if st.remat == "none" else "states"
    if st.hoist:  # the projection is made (and kept) chunk by chunk
      def chunk(h, inp):
        x, t0, rs = inp
        ys, h_last, r = _forward(st, params, x, h, lengths, t0, save=save, resets_CB=rs,
                                 h_init=h0)
        return h_last, (ys, r)

      h_last, (ys, r) = _over_chunks(chunk, h0, chunks, st.reverse)
    else:
      ys, h_last, r = _forward(st, params, _flat(xs_NCBI), h0, lengths, 0, save=save,
                               resets_CB=_flat(resets_NCB), h_init=h0)
      ys, r = jax.tree.map(lambda a: a.reshape((n, c) + a.shape[1:]), (ys, r))
    if st.remat == "products" and lengths is None:
      # The states are the outputs, shifted by one step (h0 where a segment starts, see
      # _recompute_products): keep only each chunk's first.
      ys_res = ys
      if st.reverse:
        h_starts = jnp.concatenate([ys[1:, 0], h0[None]])
      else:
        h_starts = jnp.concatenate([h0[None], ys[:-1, -1]])
    else:
      h_starts = jnp.zeros((n, 0), h0.dtype)  # unused: the residuals hold every state
    res = (h_starts, r)
  # Python flags travel as the residuals' tree structure: () for True, None for False.
  flags = (() if need_dx else None, () if need_dh0 else None)
  # The initial state is needed again only where resets read it.
  h_init = None if resets_NCB is None else h0
  return (ys, h_last), (params, xs_NCBI, lengths, res, ys_res, flags, resets_NCB, h_init)


def _layer_vjp_bwd(st: _Static, resid, cts):
  params, xs_NCBI, lengths, res, ys, (need_dx, need_dh0), resets_NCB, h_init = resid
  need_dx, need_dh0 = need_dx is not None, need_dh0 is not None
  dys, dh_last = cts
  if isinstance(dys, SymbolicZero):
    dys = jnp.zeros(dys.shape, dys.dtype)
  if isinstance(dh_last, SymbolicZero):
    dh_last = jnp.zeros(dh_last.shape, dh_last.dtype)

  def chunk(carry, inp):
    dh, dparams, acc = carry
    x, t0, (h_start, r), y, dy, rs = inp
    if st.remat == "full":
      _, _, r = _forward(st, params, x, h_start, lengths, t0, save="all", resets_CB=rs,
                         h_init=h_init)
    elif st.remat == "products":
      r = _recompute_products(st, params, x, h_start, y, r, rs, h_init)
    dp, dx, dh, acc = _backward(st, params, x, lengths, t0, r, dy, dh, need_dx, rs, acc)
    return (dh, jax.tree.map(jnp.add, dparams, dp), acc), dx

  zeros = jax.tree.map(jnp.zeros_like, params)
  # The initial state's cotangent: what reaches the first step, plus every segment start's.
  acc = jnp.zeros_like(dh_last) if need_dh0 and resets_NCB is not None else None
  (dh0, dparams, acc), dxs = _over_chunks(
      chunk, (dh_last, zeros, acc), (xs_NCBI, _starts(xs_NCBI), res, ys, dys, resets_NCB),
      not st.reverse)
  if acc is not None:
    dh0 = dh0 + acc
  return dparams, dxs, dh0 if need_dh0 else None, None, None


_layer_vjp.defvjp(_layer_vjp_fwd, _layer_vjp_bwd, symbolic_zeros=True)
