"""Tests for parallel-in-time evaluation (jaxgru._parallel.parallel_layer).

Every case compares the values (outputs, final states) and the gradients (params, xs, h0) of a
loss over both against the sequential loop, :func:`jaxgru.scan_layer` with its default options:
random cells of several sizes, "trained-like" cells (recurrent weights x3, where undamped
quasi-DEER may diverge), lengths, resets, both directions, both variants, other activations, and
the sequential finish after too few iterations. Sizes are small: the file compiles many loops.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
from jaxgru import GRUConfig, scan_layer
from jaxgru._parallel import ParallelInfo, _step_and_diag, default_tol, parallel_layer
from tolerance import assert_close, gru_terms

I, B = 3, 3


def make(hidden, variant="reset_after", scale=1.0, seed=0, **kw):
  cell = GRUConfig(I, hidden, variant=variant, **kw)
  params = cell.init(jax.random.key(seed), "pytorch")
  params = dict(params, w_h=params["w_h"] * scale)
  return cell, params


def data(steps, hidden, seed=1):
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(steps, B, I)).astype(np.float32))
  h0 = jnp.asarray(0.5 * rng.normal(size=(B, hidden)).astype(np.float32))
  w_ys = jnp.asarray(rng.normal(size=(steps, B, hidden)).astype(np.float32))
  w_h = jnp.asarray(rng.normal(size=(B, hidden)).astype(np.float32))
  return xs, h0, w_ys, w_h


def lengths_resets(steps, seed=2):
  rng = np.random.default_rng(seed)
  lengths = np.array([steps, steps - 3, 4], np.int32)
  resets = rng.random((B, steps)) < 0.1
  resets[0, 5] = resets[0, 6] = resets[1, steps - 1] = resets[2, 2] = True
  return jnp.asarray(lengths), jnp.asarray(resets)


_SEQUENTIAL = {}  # (cell, steps, reverse, masks, grads) -> the jitted reference


def sequential(cell, steps, reverse, masks, grads):
  """The jitted scan_layer reference for these settings, compiled once per module: cases that
  differ only in the parallel method (or in the parameters' values) share it."""
  key = (cell, steps, reverse, masks, grads)
  if key not in _SEQUENTIAL:
    _, _, w_ys, w_h = data(steps, cell.hidden_size)
    lengths, resets = lengths_resets(steps) if masks else (None, None)

    def seq(p, x, h):
      return scan_layer(cell, p, x, lengths, h, resets=resets, reverse=reverse)

    loss = lambda out: jnp.sum(out[0] * w_ys) + jnp.sum(out[1] * w_h)
    seq_g = jax.value_and_grad(lambda *a: (lambda o: (loss(o), o))(seq(*a)),
                               argnums=(0, 1, 2), has_aux=True)
    _SEQUENTIAL[key] = jax.jit(seq_g if grads else seq)
  return _SEQUENTIAL[key]


def check(cell, params, steps, *, reverse=False, masks=False, grads=True, **kw):
  """Values and gradients of parallel_layer(**kw) against scan_layer; returns the info."""
  xs, h0, w_ys, w_h = data(steps, cell.hidden_size)
  lengths, resets = lengths_resets(steps) if masks else (None, None)

  def par(p, x, h):
    ys, h_last, info = parallel_layer(cell, p, x, h, lengths, resets, reverse=reverse,
                                      sequential=scan_layer, **kw)
    return (ys, h_last), info

  loss = lambda out: jnp.sum(out[0] * w_ys) + jnp.sum(out[1] * w_h)
  # One compiled function each for values and gradients together: compiling dominates here.
  seq = sequential(cell, steps, reverse, masks, grads)
  # Each step within the solver's residual (tol, 1e-5) besides float32 rounding.
  tol = dict(steps=steps, terms=gru_terms(I, cell.hidden_size, B),
             residual=kw.get("tol", default_tol(cell)))
  if grads:
    par_g = jax.value_and_grad(lambda *a: (lambda o: (loss(o[0]), o))(par(*a)),
                               argnums=(0, 1, 2), has_aux=True)
    (_, ((ys, h_last), info)), g = jax.jit(par_g)(params, xs, h0)
    (_, (ys_ref, h_ref)), g_ref = seq(params, xs, h0)
    assert_close(g, g_ref, **tol)
  else:
    (ys, h_last), info = jax.jit(par)(params, xs, h0)
    ys_ref, h_ref = seq(params, xs, h0)
  assert_close((ys, h_last), (ys_ref, h_ref), **tol)
  assert isinstance(info, ParallelInfo)
  return info


@pytest.mark.parametrize("variant", ["reset_after", "reset_before"])
@pytest.mark.parametrize("act", [("tanh", "sigmoid"), ("softsign", "hard_sigmoid")])
def test_diagonal_is_the_jacobians(variant, act):
  cell, params = make(5, variant, scale=3.0, activation=act[0], recurrent_activation=act[1])
  h = jax.random.normal(jax.random.key(3), (2, 5))
  gx = 2.0 * jax.random.normal(jax.random.key(4), (2, 15))
  # Each side in a program of its own (op by op, the Jacobian cost seconds of tiny compiles).
  _, diag = jax.jit(lambda p, h, g: _step_and_diag(cell, p, h, g, True))(params, h, gx)
  jacobian = jax.jit(jax.jacfwd(lambda p, h_H, g: cell._recur(p, h_H, g), argnums=1))
  for b in range(2):
    jac = jacobian(params, h[b], gx[b])
    assert_close(diag[b], jnp.diagonal(jac), steps=1, terms=gru_terms(I, 5))


@pytest.mark.parametrize("hidden,variant,method,reverse,masks", [
    (1, "reset_after", "quasi", False, False),
    (4, "reset_before", "quasi", True, True),
    (16, "reset_after", "quasi", True, True),
    (16, "reset_before", "elk", False, True),
    (4, "reset_before", "full", True, True),
])
def test_matches_sequential(hidden, variant, method, reverse, masks):
  cell, params = make(hidden, variant)
  info = check(cell, params, 40, reverse=reverse, masks=masks, method=method)
  assert bool(info.converged) and not bool(info.fell_back)
  assert int(info.first_unconverged) == 40 and float(info.max_residual) <= 1e-5


@pytest.mark.parametrize("method", ["quasi", "elk"])
def test_trained_like_cells(method):
  """Recurrent weights x3: whatever the iteration does, the result is the sequential one."""
  cell, params = make(16, "reset_after", scale=3.0, seed=5)
  info = check(cell, params, 120, masks=True, method=method, max_iters=30,
               grads=method == "quasi")
  assert int(info.iterations) <= 30
  assert bool(info.fell_back) == (not bool(info.converged))


def test_other_activations_and_rerun_backward():
  cell, params = make(4, "reset_before", activation="softsign",
                      recurrent_activation="hard_sigmoid")
  info = check(cell, params, 30, reverse=True, masks=True, backward="rerun")
  assert bool(info.converged)


def test_fallback_finishes_sequentially():
  cell, params = make(16, "reset_after", scale=2.0)
  info = check(cell, params, 50, reverse=True, masks=True, max_iters=1)
  assert int(info.iterations) == 1
  assert bool(info.fell_back) and not bool(info.converged)
  assert 1 <= int(info.first_unconverged) < 50  # one iteration makes the first step exact
  cell, params = make(4, "reset_before")
  info = check(cell, params, 50, grads=False, max_iters=0)
  assert bool(info.fell_back) and int(info.first_unconverged) == 0


def test_arguments():
  cell, params = make(4)
  xs = jnp.zeros((5, B, I))
  with pytest.raises(ValueError, match="method"):
    parallel_layer(cell, params, xs, method="newton")
  odd = GRUConfig(I, 4, activation=lambda x: x / (1 + jnp.abs(x)))
  with pytest.raises(ValueError, match="elementwise"):
    parallel_layer(odd, odd.init(jax.random.key(0)), xs)
  ys, h_last, info = parallel_layer(cell, params, xs[:0])
  assert ys.shape == (0, B, 4) and h_last.shape == (B, 4) and not bool(info.fell_back)


# -- selected through ScanOptions(method="parallel") -----------------------------------------------

def test_scan_options_select_the_parallel_method():
  """scan_layer, RNNConfig.apply and the default choice: the parallel method runs only when asked
  (it was measured slower on the CPU everywhere), and then equals the sequential loop within its
  tolerance, values and gradients, with lengths and resets, in both directions."""
  from jaxgru import RNNConfig
  assert jaxgru.ScanOptions().resolved(10_000, 1, 16).method == "sequential"
  with pytest.raises(ValueError, match="method must be one of"):
    jaxgru.ScanOptions(method="newton")
  with pytest.raises(ValueError, match="newton must be one of"):
    jaxgru.ScanOptions(method="parallel", newton="dense")
  cfg = RNNConfig(jaxgru.GRUConfig(3, 4), bidirectional=True)
  params = cfg.init(jax.random.key(3))
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(2, 40, 3)).astype(np.float32))
  lengths = jnp.array([40, 25], jnp.int32)
  resets = jnp.asarray(rng.random((2, 40)) < 0.1)
  parallel = jaxgru.ScanOptions(method="parallel", max_iters=50)

  def run(options, p):
    ys, h = cfg.apply(p, xs, lengths, options=options, resets=resets)
    return jnp.sum(ys * ys) + jnp.sum(h), (ys, h)

  (_, (ys_p, h_p)), g_p = jax.jit(jax.value_and_grad(lambda p: run(parallel, p), has_aux=True))(params)
  (_, (ys_s, h_s)), g_s = jax.jit(jax.value_and_grad(lambda p: run(None, p), has_aux=True))(params)
  tol = dict(steps=40, terms=gru_terms(3, 4, 2), residual=default_tol(cfg.cell))
  assert_close((ys_p, h_p), (ys_s, h_s), **tol)
  assert_close(g_p, g_s, **tol)
