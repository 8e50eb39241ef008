"""Parallel-in-time evaluation of a GRU layer: Newton iterations over the whole sequence.

The sequential loop computes ``h_t = F_t(h_{t-1})`` one step after another, T steps of depth.
DEER (Lim et al. 2023, "Parallelizing non-linear sequential models over the sequence length")
treats all T states as the unknowns of one system of equations and solves it by Newton's method.
Given a guess ``g`` of every state, each step is linearized around the guess::

  h_t ~= F_t(g_{t-1}) + J_t (h_{t-1} - g_{t-1}),       J_t = dF_t/dh at g_{t-1}  (H, H)

which is the LINEAR recurrence ``h_t = J_t h_{t-1} + c_t`` with ``c_t = F_t(g_{t-1}) - J_t g_{t-1}``
and ``h_{-1} = h0``. A linear recurrence composes associatively, ``(J2, c2) o (J1, c1) =
(J2 J1, J2 c1 + c2)``, so ``jax.lax.associative_scan`` solves it in O(log T) depth. Its solution
is the next guess. All T evaluations of ``F_t`` and of ``J_t`` are independent: one batched matrix
product over (T*B) rows per iteration. The true states are a fixed point of the iteration, and in
exact arithmetic the first k states are exact after k iterations (step 0 only depends on the known
h0), so the iteration ends within T iterations; in practice it takes a handful.

Methods (``method=``):

* ``"full"``: DEER with the dense Jacobian, (T, B, H, H) per iteration and H^3 work per step in
  the scan; quadratic convergence; only sensible for small H.
* ``"quasi"``: quasi-DEER (Gonzalez et al. 2024, "Towards scalable and stable parallelization of
  nonlinear RNNs"): only the DIAGONAL of J_t, so the scan is elementwise, O(T B H) memory.
  For the GRU (``h' = (1 - z) n + z h``, gates from ``gh = h @ w_h (+ b_h)``) the diagonal is,
  with ``W_g[j, j] = w_h[j, g*H + j]`` the diagonal of gate g's recurrent block and primes the
  activations' derivatives at the step's pre-activations ``a_z, a_r, a_n``::

    dz_j = ract'(a_z)_j W_z[j, j]           dr_j = ract'(a_r)_j W_r[j, j]
    reset_after:  dn_j = act'(a_n)_j (dr_j gh_n_j + r_j W_n[j, j])
    reset_before: dn_j = act'(a_n)_j (r_j W_n[j, j]
                                      + sum_k h_k ract'(a_r)_k W_r[j, k] W_n[k, j])
    dF/dh [j, j] = z_j + (h_j - n_j) dz_j + (1 - z_j) dn_j

  (reset_before's ``(r * h) @ w_h_n`` lets unit j reach n_j through every r_k: the sum is one
  (B, H) x (H, H) product with the elementwise product ``W_r^T * W_n``.) The off-diagonal terms
  are dropped deliberately, so convergence is linear, not quadratic, but the fixed point is
  still the exact solution.
* ``"elk"``: quasi-DEER damped as a trust region (the diagonal ELK of Gonzalez et al.). Each step
  of the linearized recurrence is replaced by the proximal problem
  ``h_t = argmin_h |h - (J_t h_{t-1} + c_t)|^2 + lambda |h - g_t|^2``, whose solution is::

    h_t = (J_t h_{t-1} + c_t + lambda g_t) / (1 + lambda)

  again a diagonal linear recurrence, with coefficient ``J_t / (1 + lambda)`` and offset
  ``(c_t + lambda g_t) / (1 + lambda)``. Shrinking the coefficients by 1/(1+lambda) keeps the
  products of Jacobians in the scan from blowing up when |J_t| > 1 (a "trained" cell with large
  recurrent weights), at the price of moving only part of the way per iteration. The true states
  are still a fixed point (``J_t g_{t-1} + c_t = F_t(g_{t-1}) = g_t``). This is the Kalman-filter
  form of ELK's smoother (each step damped towards its own guess, with no backward pass), not
  the full Levenberg-Marquardt step over all T states. ``damping`` (lambda) adapts: it is
  divided by 2 after an iteration that lowered the largest residual, and multiplied by 4 after
  one that raised it (that iterate is then discarded).

Lengths and resets enter through F_t (masked steps: ``F_t(h) = h``, J = I, c = 0, so the state
carries; a reset before step t: ``F_t(h) = f(hr)``, J = 0, c = f(hr), with ``hr`` the reset
state, ``h0`` unless one is given), and a reverse layer is the forward one over the time-flipped
sequence.

Stopping, and the guarantee. The iteration stops when the largest per-step residual
``max_t |F_t(h_{t-1}) - h_t|`` is at most ``tol``, or after ``max_iters`` iterations. (The
residual, rather than the change ``max |h^{k+1} - h^k|`` between iterates, is what the
guarantee below needs; the two agree at step 0 of an undamped iteration, and the residual costs
nothing extra: the next iteration evaluates F at the iterate anyway.) Then, if any step's residual still exceeds
``tol`` (no convergence, or a non-finite iterate), the layer FINISHES SEQUENTIALLY: from the first
step t* whose residual exceeds tol, with the converged prefix's state, a plain step-by-step loop
computes steps t*..T-1. So the result is always the sequential one up to residuals of at most
``tol`` per step (and rounding), whether or not Newton converged.

Derivatives: a custom JVP, so forward mode (``jax.jvp``, ``jax.jacfwd``) and reverse mode both
work. At the solution the states' tangents obey the linear recurrence ``ds_t = J_t ds_{t-1} +
u_t`` with the TRUE (dense) Jacobians, where ``u_t`` is step t's tangent with its starting state
held (one JVP of all T steps at once); ``backward="adjoint"`` runs that recurrence as a loop of
one step JVP each at the known states (no Newton iterations are differentiated), and JAX
transposes it, for reverse mode, into the adjoint loop ``lambda_t = dy_t + J_{t+1}^T
lambda_{t+1}`` followed by ONE VJP of all T steps against the adjoints. ``backward="rerun"`` is
the plain alternative: the derivative of the sequential :func:`jaxgru.scan_layer` from h0 (the
loop layer hands it over as ``sequential=``: this module sits below it and does not import it).
Both give the sequential derivatives; which is faster is measured in benchmarks/parallel.py and
docs/parallel.md.

Length: this module is longer than the project's 400-line guide because it holds one algorithm
whose parts only make sense together (the Jacobian diagonals, the three solvers, the sequential
finish and the custom JVP); splitting it would scatter one derivation over several files.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import activations as _act
from jaxgru.cell import GRUConfig, Params, check_lengths, check_shape, split_gates

METHODS = ("quasi", "elk", "full")
BACKWARDS = ("adjoint", "rerun")


class ParallelInfo(NamedTuple):
  """What :func:`parallel_layer` did.

  Attributes:
    iterations: Newton iterations run, () int32.
    converged: whether every step's residual was within ``tol`` after them, () bool.
    fell_back: whether it finished sequentially (= not converged), () bool.
    first_unconverged: t* (processing order), the first step the sequential finish started
      from; T when it did not fall back, () int32.
    max_residual: ``max_t |F_t(h_{t-1}) - h_t|`` of the last Newton iterate, () float.
  """
  iterations: jax.Array
  converged: jax.Array
  fell_back: jax.Array
  first_unconverged: jax.Array
  max_residual: jax.Array


def default_tol(cell: GRUConfig) -> float:
  """The default residual tolerance: 1e-5 for float32 (and narrower) states, 1e-10 for float64."""
  return 1e-10 if cell.state_dtype == np.float64 else 1e-5


def parallel_layer(cell: GRUConfig, params: Params, xs_TBI: jax.Array,
                   h0_BH: Optional[jax.Array] = None, lengths_B: Optional[jax.Array] = None,
                   resets_BT: Optional[jax.Array] = None, *,
                   reset_state_BH: Optional[jax.Array] = None, reverse: bool = False,
                   method: str = "quasi", tol: Optional[float] = None, max_iters: int = 100,
                   damping: Optional[float] = None, backward: str = "adjoint",
                   sequential: Optional[Callable[..., tuple[jax.Array, jax.Array]]] = None,
                   ) -> tuple[jax.Array, jax.Array, ParallelInfo]:
  """Runs ``cell`` over a time-major batch by Newton iterations over time (module docstring).

  Same semantics as :func:`jaxgru.scan_layer` (lengths: steps t >= L keep the state and output
  zeros; ``reverse`` reads from step L-1 down; ``resets_BT[b, t]`` replaces the state by
  ``h0_BH[b]``, or ``reset_state_BH[b]`` where given, before step t, in reverse before step t
  where ``resets_BT[b, t+1]``), and the same
  values and gradients up to a per-step residual of ``tol``.

  Args:
    cell: the cell configuration. ``"quasi"`` and ``"elk"`` need elementwise activations.
    params: the cell's parameters.
    xs_TBI: inputs, (T, B, I), time-major.
    h0_BH: initial states, (B, H); zeros when None.
    lengths_B: optional valid lengths, (B,) signed integers in [0, T].
    resets_BT: optional episode boundaries, (B, T) booleans, batch-major.
    reset_state_BH: optional (B, H): the state a reset restores; ``h0_BH`` when None.
    reverse: read the sequences from their (valid) ends; outputs stay in input order.
    method: ``"quasi"`` (diagonal Jacobian, default), ``"elk"`` (diagonal, damped) or
      ``"full"`` (dense Jacobian; memory T*B*H*H).
    tol: the largest per-step residual ``|F_t(h_{t-1}) - h_t|`` accepted; None:
      :func:`default_tol`.
    max_iters: Newton iterations at most before finishing sequentially (>= 0).
    damping: the initial lambda of ``"elk"`` (default 1.0); for ``"quasi"``/``"full"`` a fixed
      lambda (default 0.0, undamped).
    backward: ``"adjoint"`` (default) or ``"rerun"``, how gradients are computed.
    sequential: the sequential loop, with :func:`jaxgru.scan_layer`'s signature, that
      ``backward="rerun"`` differentiates; required then. The loop layer hands it over (this
      module sits below it and does not import it).

  Returns:
    ``(ys_TBH, h_last_BH, info)``: every step's output, the final states, and a
    :class:`ParallelInfo`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
  if method != "full" and not (_act.is_elementwise(cell.activation)
                               and _act.is_elementwise(cell.recurrent_activation)):
    raise ValueError(f"method={method!r} needs elementwise activations (a name in "
                     "jaxgru.ACTIVATIONS); use method='full' for other callables")
  if backward == "rerun" and not callable(sequential):
    raise ValueError("backward='rerun' differentiates the sequential loop: pass "
                     "sequential=jaxgru.scan_layer")
  if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)) or max_iters < 0:
    raise ValueError(f"max_iters must be a non-negative integer, got {max_iters!r}")
  cell.check_params(params)
  xs_TBI = check_shape("parallel_layer xs_TBI", xs_TBI, (None, None, cell.input_size),
                       f"(T, B, input_size={cell.input_size})")
  steps, batch = xs_TBI.shape[0], xs_TBI.shape[1]
  dtype = cell.state_dtype
  h0_BH = jnp.zeros((batch, cell.hidden_size), dtype) if h0_BH is None else h0_BH
  h0_BH = check_shape("parallel_layer h0_BH", h0_BH, (batch, cell.hidden_size),
                      f"(B={batch}, hidden_size={cell.hidden_size})")
  h0_BH = jnp.asarray(h0_BH).astype(dtype)
  if reset_state_BH is None:
    hr_BH = h0_BH
  else:
    hr_BH = check_shape("parallel_layer reset_state_BH", reset_state_BH,
                        (batch, cell.hidden_size), f"(B={batch}, hidden_size={cell.hidden_size})")
    hr_BH = jnp.asarray(hr_BH).astype(dtype)
  tol = default_tol(cell) if tol is None else float(tol)
  if damping is None:
    damping = 1.0 if method == "elk" else 0.0
  if steps == 0:
    zero = jnp.zeros((), jnp.int32)
    info = ParallelInfo(zero, jnp.bool_(True), jnp.bool_(False), zero, jnp.zeros((), dtype))
    return jnp.zeros((0, batch, cell.hidden_size), dtype), h0_BH, info

  ts = jnp.arange(steps, dtype=jnp.int32)
  if lengths_B is None:
    valid_TB = jnp.ones((steps, batch), jnp.bool_)
  else:
    check_lengths(lengths_B, steps)
    check_shape("parallel_layer lengths_B", lengths_B, (batch,), f"(B={batch},)")
    lengths_B = jnp.minimum(jnp.asarray(lengths_B).astype(jnp.int32), steps)
    valid_TB = ts[:, None] < lengths_B[None, :]
  if resets_BT is None:
    reset_TB = jnp.zeros((steps, batch), jnp.bool_)
  else:
    resets_BT = jnp.asarray(resets_BT)
    check_shape("parallel_layer resets_BT", resets_BT, (batch, steps), f"(B={batch}, T={steps})")
    if resets_BT.dtype != jnp.bool_:
      raise ValueError(f"parallel_layer resets_BT: expected booleans, got dtype {resets_BT.dtype}")
    reset_TB = jnp.swapaxes(resets_BT, 0, 1)
    if reverse:  # a reverse loop resets before step t when step t+1 starts a segment
      reset_TB = jnp.concatenate([reset_TB[1:], jnp.zeros_like(reset_TB[:1])])
    # Flags at or past a sequence's length are dropped (those steps keep the state).
    reset_TB = reset_TB & jnp.concatenate([valid_TB[1:], valid_TB[:1] & False]
                                          if reverse else [valid_TB])

  flip = (lambda a: a[::-1]) if reverse else (lambda a: a)
  st = _Static(cell, method, tol, int(max_iters), float(damping), backward, bool(reverse),
               sequential)
  states_TBH, info = _solve(st, params, flip(xs_TBI), h0_BH, hr_BH, flip(valid_TB),
                            flip(reset_TB))
  valid_TB1 = flip(valid_TB)[:, :, None]
  ys_TBH = flip(jnp.where(valid_TB1, states_TBH, jnp.zeros_like(states_TBH)))
  return ys_TBH, states_TBH[-1], info


# -- the pieces -----------------------------------------------------------------------------------


class _Static(NamedTuple):
  cell: GRUConfig
  method: str
  tol: float
  max_iters: int
  damping: float
  backward: str
  reverse: bool
  sequential: Optional[Callable[..., Any]]  # the loop backward="rerun" differentiates


def _deriv(fn, a):
  """The derivative of an elementwise ``fn`` at every element of ``a``."""
  return jax.jvp(fn, (a,), (jnp.ones_like(a),))[1]


def _step_and_diag(cell: GRUConfig, params: Params, a_NH, gx_N3H, diagonal: bool):
  """One step of the cell for N rows, ``f(a)`` (N, H), and when ``diagonal`` the diagonal of its
  Jacobian ``df_j/da_j`` (N, H) (module docstring), else None.

  The step itself is the cell's (:meth:`GRUConfig._recur_with`); its recurrent products are
  recorded so that the diagonal reuses them.
  """
  size = cell.hidden_size
  products = []

  def product(k, a):
    y = cell._recurrent_product(params, k, a)
    products.append(y)
    return y

  f = cell._recur_with(a_NH, gx_N3H, product)
  if not diagonal:
    return f, None
  act = _act.resolve(cell.activation)
  ract = _act.resolve(cell.recurrent_activation)
  w_h = params["w_h"].astype(cell.state_dtype)
  # (3, 1, H): W_g[j, j] of each gate, as rows.
  diag_w = jnp.diagonal(w_h.reshape(size, 3, size), axis1=0, axis2=2)[:, None, :]
  gx_z, gx_r, gx_n = split_gates(gx_N3H, 3)
  a = a_NH.astype(cell.state_dtype)
  if cell.variant == "reset_after":
    gh_z, gh_r, gh_n = split_gates(products[0], 3)
  else:
    gh_z, gh_r = split_gates(products[0], 2)
    (gh_n,) = split_gates(products[1], 1)
  pre_z, pre_r = gx_z + gh_z, gx_r + gh_r
  z, r = ract(pre_z), ract(pre_r)
  dr_pre = _deriv(ract, pre_r)
  dz = _deriv(ract, pre_z) * diag_w[0]
  dr = dr_pre * diag_w[1]
  if cell.variant == "reset_after":
    pre_n = gx_n + r * gh_n
    dn_pre = dr * gh_n + r * diag_w[2]
  else:
    pre_n = gx_n + gh_n
    # sum_k a_k ract'_k W_r[j, k] W_n[k, j]: (a * ract') @ (W_r^T * W_n)
    cross = w_h[:, size:2 * size].T * w_h[:, 2 * size:]
    dn_pre = r * diag_w[2] + jnp.matmul(a * dr_pre, cross, precision=cell.precision)
  n = act(pre_n)
  dn = _deriv(act, pre_n) * dn_pre
  return f, z + (a - n) * dz + (1.0 - z) * dn


def _evaluate(st: _Static, params, gx_TB3H, hr_BH, valid_TB, reset_TB, prev_TBH):
  """``F_t(prev_t)`` for every t at once, (T, B, H), and its Jacobian in h: the diagonal
  (T, B, H), or for ``"full"`` the dense (T, B, H, H). A reset restores ``hr_BH``."""
  cell = st.cell
  steps, batch, size = prev_TBH.shape
  a_TBH = jnp.where(reset_TB[:, :, None], hr_BH[None], prev_TBH)
  rows = steps * batch
  if st.method == "full":
    step = lambda h, g: cell._recur(params, h, g)
    f_N = step(a_TBH.reshape(rows, size), gx_TB3H.reshape(rows, -1))
    jac_NHH = jax.vmap(jax.jacfwd(step))(a_TBH.reshape(rows, size), gx_TB3H.reshape(rows, -1))
    f_TBH = f_N.reshape(steps, batch, size)
    jac = jac_NHH.reshape(steps, batch, size, size)
    eye = jnp.broadcast_to(jnp.eye(size, dtype=jac.dtype), jac.shape)
    jac = jnp.where(valid_TB[:, :, None, None], jac, eye)
    jac = jnp.where(reset_TB[:, :, None, None], jnp.zeros_like(jac), jac)
  else:
    f_N, d_N = _step_and_diag(cell, params, a_TBH.reshape(rows, size),
                              gx_TB3H.reshape(rows, -1), True)
    f_TBH, jac = f_N.reshape(steps, batch, size), d_N.reshape(steps, batch, size)
    jac = jnp.where(valid_TB[:, :, None], jac, jnp.ones_like(jac))
    jac = jnp.where(reset_TB[:, :, None], jnp.zeros_like(jac), jac)
  f_TBH = jnp.where(valid_TB[:, :, None], f_TBH, a_TBH)
  return f_TBH, jac


def _shift(h0_BH, states_TBH):
  """The state before each step: ``[h0, h_0, ..., h_{T-2}]`` (T, B, H)."""
  return jnp.concatenate([h0_BH[None], states_TBH[:-1]])


def _linear_scan(jac, c_TBH, full: bool, precision=None):
  """Solves ``h_t = J_t h_{t-1} + c_t`` from ``h_{-1} = 0`` by an associative scan over t
  (``precision``: of the dense Jacobians' products, the cell's)."""
  if full:
    def combine(first, second):
      a1, b1 = first
      a2, b2 = second
      return (jnp.matmul(a2, a1, precision=precision),
              jnp.einsum("...ij,...j->...i", a2, b1, precision=precision) + b2)
  else:
    def combine(first, second):
      a1, b1 = first
      a2, b2 = second
      return a2 * a1, a2 * b1 + b2
  return jax.lax.associative_scan(combine, (jac, c_TBH))[1]


def _apply(jac, h, full: bool, precision=None):
  return jnp.einsum("...ij,...j->...i", jac, h, precision=precision) if full else jac * h


def _newton(st: _Static, params, gx_TB3H, h0_BH, hr_BH, valid_TB, reset_TB):
  """The Newton iterations, then the sequential finish: (states_TBH, info)."""
  full = st.method == "full"
  adaptive = st.method == "elk"
  prec = st.cell.precision
  evaluate = functools.partial(_evaluate, st, params, gx_TB3H, hr_BH, valid_TB, reset_TB)

  def residual(g_TBH, f_TBH):
    # NaN -> inf BEFORE the reduction: XLA's max need not propagate NaN.
    d = jnp.abs(f_TBH - g_TBH)
    return jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d), axis=(1, 2))  # (T,)

  def update(g_TBH, f_TBH, jac, lam):
    prev_TBH = _shift(h0_BH, g_TBH)
    c_TBH = f_TBH - _apply(jac, prev_TBH, full, prec)
    scale = 1.0 / (1.0 + lam)
    c_TBH = (c_TBH + lam * g_TBH) * scale
    jac = jac * scale
    # h_{-1} = h0 folded into step 0's offset.
    c_TBH = c_TBH.at[0].add(_apply(jac[0], h0_BH, full, prec))
    return _linear_scan(jac, c_TBH, full, prec)

  g0 = jnp.broadcast_to(h0_BH[None], gx_TB3H.shape[:2] + h0_BH.shape[1:])
  f0, j0 = evaluate(_shift(h0_BH, g0))
  r0 = residual(g0, f0)
  dtype = g0.dtype
  # Loop state: k, lambda, the accepted iterate (g, F(g), J(g), residuals).
  init = (jnp.zeros((), jnp.int32), jnp.asarray(st.damping, dtype), g0, f0, j0, r0)

  def cond(state):
    k, _, _, _, _, r = state
    return (k < st.max_iters) & (jnp.max(r) > st.tol)

  def body(state):
    k, lam, g, f, jac, r = state
    g_new = update(g, f, jac, lam)
    f_new, j_new = evaluate(_shift(h0_BH, g_new))
    r_new = residual(g_new, f_new)
    if not adaptive:
      return k + 1, lam, g_new, f_new, j_new, r_new
    better = jnp.max(r_new) <= jnp.max(r)
    keep = lambda new, old: jnp.where(better, new, old)
    lam = jnp.where(better, lam * 0.5, lam * 4.0)
    return (k + 1, lam, keep(g_new, g), keep(f_new, f), keep(j_new, jac), keep(r_new, r))

  k, _, g, _, _, r = jax.lax.while_loop(cond, body, init)
  bad_T = r > st.tol
  converged = ~jnp.any(bad_T)
  steps = g.shape[0]
  first = jnp.where(converged, steps, jnp.argmax(bad_T)).astype(jnp.int32)
  states = jax.lax.cond(converged, lambda g: g,
                        lambda g: _finish(st, params, gx_TB3H, h0_BH, hr_BH, valid_TB,
                                          reset_TB, g, first), g)
  info = ParallelInfo(k, converged, ~converged, first, jnp.max(r))
  return states, info


def _finish(st: _Static, params, gx_TB3H, h0_BH, hr_BH, valid_TB, reset_TB, g_TBH, first):
  """Steps ``first``..T-1 one after another, from the state before step ``first``."""
  cell = st.cell
  h_start = jnp.where(first > 0, g_TBH[jnp.maximum(first - 1, 0)], h0_BH)

  def body(t, carry):
    h, out = carry
    a = jnp.where(reset_TB[t][:, None], hr_BH, h)
    f = cell._recur(params, a, gx_TB3H[t])
    h = jnp.where(valid_TB[t][:, None], f, a)
    return h, jax.lax.dynamic_update_index_in_dim(out, h, t, 0)

  _, out = jax.lax.fori_loop(first, g_TBH.shape[0], body, (h_start, g_TBH))
  return out


# -- the custom JVP -------------------------------------------------------------------------------


def _steps_of(st: _Static, params, xs_TBI, hr_BH, valid_TB, reset_TB, prev_TBH):
  """``F_t(prev_t)`` of all t, as a function of what has gradients here (params, xs, the reset
  state)."""
  cell = st.cell
  gx = cell._project_inputs(params, xs_TBI)
  a = jnp.where(reset_TB[:, :, None], hr_BH[None], prev_TBH)
  return jnp.where(valid_TB[:, :, None], cell._recur(params, a, gx), a)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _solve(st: _Static, params, xs_TBI, h0_BH, hr_BH, valid_TB, reset_TB):
  """States (T, B, H) in processing order, and the info."""
  gx = st.cell._project_inputs(params, xs_TBI)
  return _newton(st, params, gx, h0_BH, hr_BH, valid_TB, reset_TB)


@_solve.defjvp
def _solve_jvp(st, primals, tangents):
  states_TBH, info = _solve(st, *primals)
  if st.backward == "rerun":
    dstates_TBH = _rerun_tangent(st, primals, tangents[:4])
  else:
    dstates_TBH = _adjoint_tangent(st, primals, tangents[:4], states_TBH)
  info_tangent = jax.tree.map(
      lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact)
                 else np.zeros(a.shape, jax.dtypes.float0)), info)
  return (states_TBH, info), (dstates_TBH, info_tangent)


def _adjoint_tangent(st, primals, tangents, states_TBH):
  """The states' tangents at the solution: ``ds_t = J_t ds_{t-1} + u_t`` from ``ds_{-1} = dh0``.

  ``u_t`` is the tangent of step t with its starting state held (params, inputs, and the reset
  state where a segment starts), one JVP of all T steps at once; the loop applies each step's TRUE Jacobian
  ``J_t`` at the known states. Linear in the tangents, so JAX transposes it into the adjoint
  recurrence ``lambda_t = dy_t + J_{t+1}^T lambda_{t+1}`` for reverse mode.
  """
  params, xs_TBI, h0_BH, hr_BH, valid_TB, reset_TB = primals
  dparams, dxs_TBI, dh0_BH, dhr_BH = tangents
  cell = st.cell
  prev_TBH = _shift(h0_BH, states_TBH)
  _, u_TBH = jax.jvp(lambda p, x, hr: _steps_of(st, p, x, hr, valid_TB, reset_TB, prev_TBH),
                     (params, xs_TBI, hr_BH), (dparams, dxs_TBI, dhr_BH))
  gx_TB3H = cell._project_inputs(params, xs_TBI)

  # Checkpointed: a reverse pass recomputes each step inside its own loop.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(dprev, inp):
    h, gx, valid, reset, u = inp

    def one_step(h):
      a = jnp.where(reset[:, None], jnp.zeros_like(h), h)  # the reset state's share is in u
      return jnp.where(valid[:, None], cell._recur(params, a, gx), a)

    _, d = jax.jvp(one_step, (h,), (dprev,))
    return d + u, d + u

  _, ds_TBH = jax.lax.scan(body, dh0_BH, (prev_TBH, gx_TB3H, valid_TB, reset_TB, u_TBH))
  return ds_TBH


def _rerun_tangent(st, primals, tangents):
  """The states' tangents from the JVP of the sequential loop ``st.sequential``
  (:func:`jaxgru.scan_layer`) from h0, mapped to processing order."""
  params, xs_TBI, h0_BH, hr_BH, valid_TB, reset_TB = primals
  flip = (lambda a: a[::-1]) if st.reverse else (lambda a: a)
  lengths_B = jnp.sum(valid_TB, axis=0).astype(jnp.int32)
  # Back to the caller's time order; a reverse loop's mask at t is the flag of step t+1.
  mask_TB = flip(reset_TB)
  if st.reverse:
    mask_TB = jnp.concatenate([jnp.zeros_like(mask_TB[:1]), mask_TB[:-1]])
  resets_BT = jnp.swapaxes(mask_TB, 0, 1)

  def run(p, x, h0, hr):
    ys, _ = st.sequential(st.cell, p, flip(x), lengths_B, h0, resets=resets_BT,
                          reset_state=hr, reverse=st.reverse)
    return flip(ys)

  _, dys_TBH = jax.jvp(run, (params, xs_TBI, h0_BH, hr_BH), tangents)

  # The outputs are zero at masked steps, whose state is the one before them: carry the last
  # valid step's tangent (or h0's) forward over them.
  def carry(acc, inp):
    d, valid = inp
    acc = jnp.where(valid[:, None], d, acc)
    return acc, acc

  _, ds_TBH = jax.lax.scan(carry, tangents[2], (dys_TBH, valid_TB))
  return ds_TBH



