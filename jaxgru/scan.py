"""The time loop of one GRU layer over a batch: time-major, in chunks, with a custom VJP.

:func:`scan_layer` runs :meth:`GRUConfig.recur_with` (the GRU math, kept in :mod:`jaxgru.cell`)
over a time-major batch. What it adds is only how the loop is run and differentiated:

* one carry, the (B, H) state; inputs and outputs time-major, (T, B, ...), so the loop slices the
  leading axis and nothing is transposed inside it;
* time in chunks of C steps: an outer loop over chunks, an inner loop over the steps of a chunk.
  A chunk's input projection ``x @ w_x + b_x`` can be one product for its C steps before its
  loop, and whatever a chunk needs for the backward pass is C steps long, not T;
* the projected inputs and the saved products kept as separate gate arrays (C, B, H): XLA:CPU
  turns column slices of a wide (C, B, 3H) array inside a loop into slow element loops;
* a custom VJP. The backward loop differentiates the gates step by step but leaves the weights
  alone. Where the cell acts on each hidden unit alone once its products are known (reset_after
  with elementwise activations), the gates' derivatives are computed for a whole chunk before the
  loop, as ONE vector-Jacobian product of the cell against a cotangent of ones (which yields the
  diagonal of each step's Jacobian), and a step of the loop is then only ``s = dh + dy``,
  ``dgh = s * dF/dgh`` and ``dh_prev = s * dF/dh + dgh @ w_h^T``. Otherwise the loop takes the
  VJP of each step. Either way the loop it stacks, for every step, the input ``a`` and the output cotangent ``dy`` of each
  recurrent product, and the weight gradient is then ONE product per chunk, e.g.
  ``dw_h = h_prev^T @ dgh`` as (H, C*B) x (C*B, 3H), instead of C small ones added into an
  accumulator. The input projection's gradient is likewise one product per chunk; gradients
  nobody asked for (the inputs' of a first layer, the initial state's) are skipped;
* rematerialization, at two levels: ``remat="products"`` keeps every step's state only (the
  outputs themselves, when no lengths are given) and recomputes a chunk's projections and
  recurrent products from them, each as one large product; ``remat="full"`` keeps each chunk's
  initial state only and reruns the chunk's loop, so that training memory grows with T no more
  than the inputs and outputs themselves do.

The custom VJP computes the same gradients as ``jax.grad`` of the plain loop, up to the order of
floating-point additions (tests/test_fast_path.py checks this).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxgru import activations as _act
from jaxgru.cell import GRUConfig, Params, split_gates

# Per-backend defaults, measured with benchmarks/speed.py (see benchmarks/results/). On the CPU
# the working set decides: XLA:CPU takes a temporary buffer above 32 MB fresh from the kernel
# at every call and pays a page fault per 4 kB page it touches, which can cost more than
# recomputing the products; so a training step there keeps its residuals small.
_TUNED = {
    "cpu": {"unroll": 1,
            # Project the inputs before the loop when a step's input product has at least this
            # many multiply-adds (B*I*3H) and a (T, B, H) array is at most big_bytes; else
            # inside the loop.
            "hoist_projection": False, "hoist_macs": 2**20,
            # Residuals of the whole sequence at most this: keep them all, one chunk.
            "whole_bytes": 2**24,
            # Else chunks of about this many bytes of (B, H) states...
            "chunk_bytes": 2**19,
            # ...or, when one (T, B, H) array alone exceeds this (the step cannot avoid fresh
            # memory anyway), of about this many rows (C*B), for efficient weight products.
            "big_bytes": 2**24, "chunk_rows": 2048,
            # The custom VJP's products over all steps pay off from this many steps on.
            "custom_vjp_steps": 64,
            # The diagonal backward writes about twice the per-chunk arrays of the per-step VJP:
            # a gain while a (T, B, H) array is at most this large, a loss beyond (page faults).
            "diagonal_bytes": 2**24},
    "gpu": {"unroll": 8, "hoist_projection": True, "hoist_macs": None, "whole_bytes": None, "chunk_bytes": None,
            "big_bytes": None, "chunk_rows": None, "custom_vjp_steps": 1,
            "diagonal_bytes": None},
}
REMAT = ("none", "products", "full")
# Arrays of (B, H) floats a step keeps for the backward pass without rematerialization (the
# state, gate inputs and products, their cotangents, the outputs and theirs), about.
_RESIDUALS_PER_STEP = 16


@dataclasses.dataclass(frozen=True)
class ScanOptions:
  """How :func:`scan_layer` runs the time loop; none of it changes the results.

  Every None picks the default measured for the backend (``jax.default_backend()``; TPUs take
  the GPU's) and the shape.

  Attributes:
    unroll: steps per iteration of the inner loops (``lax.scan``'s ``unroll``).
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
    custom_vjp: differentiate with the custom VJP (one weight-gradient product per chunk) or,
      False, with JAX's autodiff of the loop (``jax.checkpoint`` per chunk unless remat is
      ``"none"``). None: the custom VJP, except on the CPU for sequences shorter than 64 steps.
    diagonal_backward: in the custom VJP, compute the gates' derivatives of a chunk before its
      backward loop, in bulk (True), or take the VJP of each step inside the loop (False).
      Only a cell that acts on each unit alone allows it (:func:`diagonal_backward_applies`);
      any other takes the per-step VJP whatever this says. None: True off the CPU; on the CPU,
      True while one (T, B, H) array is at most 16 MB (beyond, its larger per-chunk arrays cost
      more than it saves).
  """

  unroll: Optional[int] = None
  chunk: Optional[int] = None
  remat: Union[None, bool, str] = None
  hoist_projection: Optional[bool] = None
  custom_vjp: Optional[bool] = None
  diagonal_backward: Optional[bool] = None

  def __post_init__(self):
    for name in ("unroll", "chunk"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if self.diagonal_backward is not None and not isinstance(self.diagonal_backward, bool):
      raise ValueError(
          f"diagonal_backward must be True, False or None, got {self.diagonal_backward!r}")
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat is not None and self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, a bool or None, got {self.remat!r}")

  def resolved(self, steps: int, batch: int, hidden: int = 1,
               backend: Optional[str] = None, inputs: int = 1) -> "ScanOptions":
    """These options with every None replaced by the default for the backend and shape
    (``inputs`` is I, the input features)."""
    tuned = _TUNED.get(backend or jax.default_backend(), _TUNED["gpu"])
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
      custom_vjp = steps >= tuned["custom_vjp_steps"]
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
        custom_vjp=custom_vjp, diagonal_backward=diagonal)


def diagonal_backward_applies(cell: GRUConfig) -> bool:
  """Whether ``cell``'s step, given its input projection and its recurrent product, acts on each
  hidden unit alone: reset_after (reset_before makes a second product inside the step) with
  activations known to be elementwise. Its Jacobian is then diagonal per unit, and one VJP
  against ones yields it for every step at once."""
  return (cell.num_recurrent_products == 1 and _act.is_elementwise(cell.activation)
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


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one layer's loop (a nondiff argument of the custom VJP)."""
  cell: GRUConfig
  reverse: bool
  unroll: int
  hoist: bool
  remat: str
  diagonal: bool = False


def scan_layer(cell: GRUConfig, params: Params, xs_TBI: jax.Array,
               h0_BH: Optional[jax.Array] = None, lengths_B: Optional[jax.Array] = None, *,
               reverse: bool = False,
               options: ScanOptions = ScanOptions()) -> tuple[jax.Array, jax.Array]:
  """Runs ``cell`` over a time-major batch of sequences.

  The results equal ``jax.vmap(cell.sequence)`` over the batch (with the time axis moved), and
  so do their gradients, up to the order of floating-point additions.

  Args:
    cell: the cell configuration.
    params: the cell's parameters.
    xs_TBI: inputs, (T, B, I), time-major.
    h0_BH: initial states, (B, H); zeros when None.
    lengths_B: optional valid lengths, (B,) integers in [0, T], as in :meth:`GRUConfig.sequence`.
    reverse: read the sequences from their (valid) ends; outputs stay in input order.
    options: how to run the loop (:class:`ScanOptions`).

  Returns:
    ``(ys_TBH, h_last_BH)``: every step's output and the final states.
  """
  steps, batch = xs_TBI.shape[0], xs_TBI.shape[1]
  dtype = cell.state_dtype
  if h0_BH is None:
    h0_BH = jnp.zeros((batch, cell.hidden_size), dtype)
  h0_BH = h0_BH.astype(dtype)
  if steps == 0:
    return jnp.zeros((0, batch, cell.hidden_size), dtype), h0_BH
  opts = options.resolved(steps, batch, cell.hidden_size, inputs=xs_TBI.shape[-1])
  chunk = opts.chunk
  num_chunks = -(-steps // chunk)
  pad = num_chunks * chunk - steps
  if lengths_B is not None:
    # Under jit a length above T acts as T; with padding it must not reach the padded steps.
    lengths_B = jnp.minimum(jnp.asarray(lengths_B).astype(jnp.int32), steps)
  if pad:
    # Whole chunks only: the padded steps are masked out, so states and outputs are unchanged.
    xs_TBI = jnp.concatenate([xs_TBI, jnp.zeros((pad,) + xs_TBI.shape[1:], xs_TBI.dtype)])
    if lengths_B is None:
      lengths_B = jnp.full((batch,), steps, jnp.int32)
  xs_NCBI = xs_TBI.reshape((num_chunks, chunk) + xs_TBI.shape[1:])
  st = _Static(cell, bool(reverse), opts.unroll, opts.hoist_projection, opts.remat,
               opts.diagonal_backward and diagonal_backward_applies(cell))
  run = _layer_vjp if opts.custom_vjp else _layer
  ys_NCBH, h_last = run(st, params, xs_NCBI, h0_BH, lengths_B)
  return ys_NCBH.reshape((num_chunks * chunk,) + ys_NCBH.shape[2:])[:steps], h_last


# -- one step -------------------------------------------------------------------------------------


def _project(cell: GRUConfig, params: Params, x: jax.Array) -> tuple[jax.Array, ...]:
  return split_gates(cell.project_inputs(params, x), 3)


def _step(cell: GRUConfig, h, g, t, lengths, product):
  """One step, masked as in :meth:`GRUConfig.scan_projected`: returns (carry, output)."""
  h_new = cell.recur_with(h, g, product)
  if lengths is None:
    return h_new, h_new
  valid = (t < lengths)[:, None]
  h_new = jnp.where(valid, h_new, h)
  return h_new, jnp.where(valid, h_new, jnp.zeros_like(h_new))


def _join(parts: tuple[jax.Array, ...]) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _rows(a: jax.Array) -> jax.Array:
  return a.reshape((-1, a.shape[-1]))


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
  _, vjp = jax.vjp(lambda a: cell.recurrent_product(params, k, a), a)
  (da,) = vjp(_join(dy))
  return jax.tree.map(jnp.zeros_like, params), da, dy


_replay.defvjp(_replay_fwd, _replay_bwd)


# -- one chunk ------------------------------------------------------------------------------------


def _forward(st: _Static, params, x_CBI, h0, lengths, t0, save: Optional[str]):
  """The loop over one chunk's steps, starting at time index t0: (ys, h_last, residuals).

  ``save`` is None (no residuals), ``"all"`` (per step: the state before the step, the gate
  inputs and the outputs of the recurrent products, split by gate) or ``"states"`` (the state
  before each step, only when masking makes it differ from the previous output; else None).
  """
  cell = st.cell
  size = cell.hidden_size
  ts = t0 + jnp.arange(x_CBI.shape[0], dtype=jnp.int32)
  seq = _project(cell, params, x_CBI) if st.hoist else x_CBI

  def body(h, inp):
    x_or_g, t = inp
    g = x_or_g if st.hoist else _project(cell, params, x_or_g)
    outs = []

    def product(k, a):
      y = cell.recurrent_product(params, k, a)
      y = split_gates(y, y.shape[-1] // size)
      outs.append(y)
      return y

    h_new, y = _step(cell, h, g, t, lengths, product)
    if save == "all":
      res = (h, None if st.hoist else g, tuple(outs))
    elif save == "states" and lengths is not None:
      res = h
    else:
      res = None
    return h_new, (y, res)

  h_last, (ys, res) = jax.lax.scan(body, h0, (seq, ts), reverse=st.reverse, unroll=st.unroll)
  if save == "all" and st.hoist:
    res = (res[0], seq, res[2])
  return ys, h_last, res


def _recompute_products(st: _Static, params, x_CBI, h_start, ys, hs):
  """The residuals of a chunk from its states alone, each product one matrix product.

  The states before each step are ``hs`` when saved, else the chunk's outputs shifted by one
  step with ``h_start`` in front (behind, reading in reverse). Product 0 reads the state, so all
  of its steps are one (C*B, H) x (H, .) product; the later products read values of the step
  itself and are left to the backward loop.
  """
  cell = st.cell
  if hs is None:
    first = h_start[None]
    hs = (jnp.concatenate([ys[1:], first]) if st.reverse else
          jnp.concatenate([first, ys[:-1]]))
  y0 = cell.recurrent_product(params, 0, _rows(hs))
  y0 = y0.reshape(hs.shape[:2] + y0.shape[-1:])
  gx = cell.project_inputs(params, x_CBI)
  if st.diagonal:  # kept whole: the diagonal backward reads them gate-major, (C, B, 3, H)
    return hs, gx, (y0,)
  return hs, split_gates(gx, 3), (split_gates(y0, y0.shape[-1] // cell.hidden_size),)


def _backward(st: _Static, params, x_CBI, lengths, t0, res, dys, dh_last, need_dx: bool):
  """The backward loop of one chunk; returns (dparams, dx or None, dh at the chunk's start).

  ``res`` holds, per step, the state before the step, the gate inputs and the outputs of the
  first ``len(outs)`` recurrent products; the loop recomputes the others (they read values of
  the step itself) and reads their output cotangents through an added zero.
  """
  cell = st.cell
  hs, gs, outs = res
  ts = t0 + jnp.arange(x_CBI.shape[0], dtype=jnp.int32)
  batch = hs.shape[1]
  zeros = tuple(
      jnp.zeros(jax.eval_shape(lambda k=k: cell.recurrent_product(
          params, k, jnp.zeros((batch, cell.hidden_size), cell.state_dtype))).shape,
                cell.state_dtype)
      for k in range(len(outs), cell.num_recurrent_products))

  where = []

  def body(dh, inp):
    dy, h, g, out, t = inp

    def step(h, g, out, eps):
      ins = []

      def product(k, a):
        if k:  # the input of product 0 is the state itself, already saved
          ins.append(a)
        if k < len(out):
          return _replay(cell, k, params, a, out[k])
        y = cell.recurrent_product(params, k, a) + eps[k - len(out)]
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
    return dh_prev, (tuple(unique), ins)

  if st.diagonal:
    dh0, dgs, douts = _diagonal_loop(st, params, hs, gs, outs, dys, dh_last, lengths, ts)
    deps, ins = (), ()
  else:
    dh0, (unique, ins) = jax.lax.scan(body, dh_last, (dys, hs, gs, outs, ts),
                                      reverse=not st.reverse, unroll=st.unroll)
    dgs, douts, deps = jax.tree.unflatten(
        jax.tree.structure((gs, outs, zeros)), [unique[i] for i in where])

  # The weight gradients: one product over the chunk's C*B rows each.
  ins = (hs,) + tuple(ins)
  douts = tuple(_rows(_join(d)) for d in douts) + tuple(_rows(d) for d in deps)
  _, vjp_rec = jax.vjp(
      lambda p: [cell.recurrent_product(p, k, _rows(a)) for k, a in enumerate(ins)], params)
  (dp_rec,) = vjp_rec(list(douts))
  dgs = _join(dgs)
  if need_dx:
    _, vjp_in = jax.vjp(lambda p, x: cell.project_inputs(p, x), params, x_CBI)
    dp_in, dx = vjp_in(dgs)
  else:
    _, vjp_in = jax.vjp(lambda p: cell.project_inputs(p, _rows(x_CBI)), params)
    (dp_in,), dx = vjp_in(_rows(dgs)), None
  return jax.tree.map(jnp.add, dp_rec, dp_in), dx, dh0


def _diagonal_loop(st: _Static, params, hs, gs, outs, dys, dh_last, lengths, ts):
  """The backward loop of a chunk whose cell acts on each unit alone (``st.diagonal``).

  With the products known, the cell is ``h' = F(h, gx, gh)`` and each unit of ``h'`` reads the
  same unit of ``h``, ``gx`` and ``gh`` only, so its Jacobian is diagonal and the VJP of F against
  ones is that diagonal: ``dF/dh``, ``dF/dgx``, ``dF/dgh``, for all C steps in one elementwise
  pass over the chunk. A step of the loop is then, with ``s`` the cotangent of F's output,

    s = dh + dy                 (zero where masked)
    dh_prev = s * dF/dh + (s * dF/dgh) @ w_h^T      (dh itself where masked)

  and ``dgx = s * dF/dgx``, ``dgh = s * dF/dgh`` are formed after the loop, for all steps at once.
  Returns ``(dh at the chunk's start, dgs, douts)`` shaped as ``_backward``'s.
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
    return cell.recur_with(h, gates(g), lambda k, a: gates(o))

  # Gate-major coefficients: a step's are one (B, 3, H) array, and the gradients after the loop
  # are (C, B, 3, H), which is (C*B, 3H) as it stands: nothing to join.
  _, vjp_cell = jax.vjp(cell_fn, hs, gate_major(gs), gate_major(out))
  c_h, c_g, c_o = vjp_cell(jnp.ones_like(hs))
  # The transpose of the recurrent product (affine in its input, so any point will do).
  _, vjp_product = jax.vjp(lambda a: cell.recurrent_product(params, 0, a), hs[0])

  def body(dh, inp):
    dy, c_h_t, c_o_t, t = inp
    s = dh + dy
    if lengths is not None:
      valid = (t < lengths)[:, None]
      s = jnp.where(valid, s, jnp.zeros_like(s))
    (back,) = vjp_product((s[:, None, :] * c_o_t).reshape((batch, 3 * size)))
    dh_prev = s * c_h_t + back
    if lengths is not None:
      dh_prev = jnp.where(valid, dh_prev, dh)
    return dh_prev, s

  dh0, s_CBH = jax.lax.scan(body, dh_last, (dys, c_h, c_o, ts),
                            reverse=not st.reverse, unroll=st.unroll)
  joined = lambda c: (s_CBH[:, :, None, :] * c).reshape(c.shape[:2] + (3 * size,))
  return dh0, (joined(c_g),), ((joined(c_o),),)


# -- over the chunks ------------------------------------------------------------------------------


def _over_chunks(fn, carry, xs, reverse: bool):
  """``lax.scan(fn, carry, xs)`` over the leading (chunk) axis; a plain call for one chunk."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    carry, out = fn(carry, jax.tree.map(lambda a: a[0], xs))
    return carry, jax.tree.map(lambda a: a[None], out)
  return jax.lax.scan(fn, carry, xs, reverse=reverse)


def _starts(xs_NCBI):
  return jnp.arange(xs_NCBI.shape[0], dtype=jnp.int32) * xs_NCBI.shape[1]


def _layer(st: _Static, params, xs_NCBI, h0, lengths):
  """The loop differentiated by JAX (with jax.checkpoint per chunk unless remat is "none")."""
  if st.remat == "none" and not st.hoist:
    # Chunks only bound the memory of a backward pass or of a hoisted projection: one loop.
    n, c = xs_NCBI.shape[:2]
    ys, h_last, _ = _forward(st, params, xs_NCBI.reshape((n * c,) + xs_NCBI.shape[2:]), h0,
                             lengths, 0, save=None)
    return ys.reshape((n, c) + ys.shape[1:]), h_last

  def chunk(h, inp):
    x, t0 = inp
    ys, h_last, _ = _forward(st, params, x, h, lengths, t0, save=None)
    return h_last, ys

  if st.remat != "none":
    chunk = jax.checkpoint(chunk)
  h_last, ys = _over_chunks(chunk, h0, (xs_NCBI, _starts(xs_NCBI)), st.reverse)
  return ys, h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_vjp(st: _Static, params, xs_NCBI, h0, lengths):
  return _layer(dataclasses.replace(st, remat="none"), params, xs_NCBI, h0, lengths)


def _value(tree):
  return jax.tree.map(lambda leaf: leaf.value, tree)


def _layer_vjp_fwd(st: _Static, params, xs_NCBI, h0, lengths):
  # With symbolic zeros, every leaf comes as CustomVJPPrimal(value, perturbed): a gradient
  # nobody needs (a first layer's inputs, a zero initial state) is not computed.
  need_dx, need_dh0 = xs_NCBI.perturbed, h0.perturbed
  params, xs_NCBI, h0, lengths = _value((params, xs_NCBI, h0, lengths))
  n, c = xs_NCBI.shape[:2]
  ys_res = None
  if st.remat == "full":
    # Chunk by chunk, keeping each chunk's initial state (the carry, which masking can make
    # differ from the previous output).
    def chunk(h, inp):
      x, t0 = inp
      ys, h_last, _ = _forward(st, params, x, h, lengths, t0, save=None)
      return h_last, (ys, h)

    h_last, (ys, h_starts) = _over_chunks(chunk, h0, (xs_NCBI, _starts(xs_NCBI)), st.reverse)
    res = (h_starts, None)
  else:
    # One loop over all steps; its residuals are cut into chunks for the backward pass.
    save = "all" if st.remat == "none" else "states"
    flat = xs_NCBI.reshape((n * c,) + xs_NCBI.shape[2:])
    if st.hoist:  # the projection is made (and kept) chunk by chunk
      def chunk(h, inp):
        x, t0 = inp
        ys, h_last, r = _forward(st, params, x, h, lengths, t0, save=save)
        return h_last, (ys, r)

      h_last, (ys, r) = _over_chunks(chunk, h0, (xs_NCBI, _starts(xs_NCBI)), st.reverse)
    else:
      ys, h_last, r = _forward(st, params, flat, h0, lengths, 0, save=save)
      ys, r = jax.tree.map(lambda a: a.reshape((n, c) + a.shape[1:]), (ys, r))
    if st.remat == "products" and lengths is None:
      # The states are the outputs, shifted by one step: keep only each chunk's first.
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
  return (ys, h_last), (params, xs_NCBI, lengths, res, ys_res, flags)


def _layer_vjp_bwd(st: _Static, resid, cts):
  params, xs_NCBI, lengths, res, ys, (need_dx, need_dh0) = resid
  need_dx, need_dh0 = need_dx is not None, need_dh0 is not None
  dys, dh_last = cts
  if isinstance(dys, SymbolicZero):
    dys = jnp.zeros(dys.shape, dys.dtype)
  if isinstance(dh_last, SymbolicZero):
    dh_last = jnp.zeros(dh_last.shape, dh_last.dtype)

  def chunk(carry, inp):
    dh, dparams = carry
    x, t0, (h_start, r), y, dy = inp
    if st.remat == "full":
      _, _, r = _forward(st, params, x, h_start, lengths, t0, save="all")
    elif st.remat == "products":
      r = _recompute_products(st, params, x, h_start, y, r)
    dp, dx, dh = _backward(st, params, x, lengths, t0, r, dy, dh, need_dx)
    return (dh, jax.tree.map(jnp.add, dparams, dp)), dx

  zeros = jax.tree.map(jnp.zeros_like, params)
  (dh0, dparams), dxs = _over_chunks(chunk, (dh_last, zeros),
                                     (xs_NCBI, _starts(xs_NCBI), res, ys, dys), not st.reverse)
  return dparams, dxs, dh0 if need_dh0 else None, None


_layer_vjp.defvjp(_layer_vjp_fwd, _layer_vjp_bwd, symbolic_zeros=True)
