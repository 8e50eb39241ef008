"""Forward-mode AD through the loop: ``jax.jvp``, ``jax.jacfwd`` and ``jax.linearize``.

The loop's derivative is a custom JVP (jaxgru/_jvp.py) that JAX transposes for reverse mode, so
forward mode must work on every path the tuning table can pick: below and above the CPU's
custom-rule threshold (64 steps), one chunk and many (remat ``none``/``products``/``full``), the
diagonal and the per-step forms, the projection hoisted or not, the GPU's defaults, lengths,
resets, both directions, the parallel method. The references are independent of that rule:
JAX's own forward mode of the plain loop of tests/reference.py, and the directional derivative
``<grad f, v>`` of reverse mode.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as plain
import tolerance
from jaxgru import GRUConfig, RNNConfig, ScanOptions, scan_layer

I, H, B = 3, 5, 4

OPTIONS = {
    "default": ScanOptions(),
    "whole": ScanOptions(chunk=1000, remat=False, custom_vjp=True),
    "chunks_hoisted": ScanOptions(chunk=16, remat=False, hoist_projection=True, unroll=2,
                                  custom_vjp=True),
    "products": ScanOptions(chunk=24, remat="products", custom_vjp=True),
    "full": ScanOptions(chunk=20, remat="full", hoist_projection=True, custom_vjp=True),
    "per_step": ScanOptions(chunk=16, remat="products", custom_vjp=True,
                            diagonal_backward=False),
    "autodiff": ScanOptions(custom_vjp=False),
    # Many models: JAX's derivative of the loop with the step's own JVP (jaxgru._loop).
    "models": ScanOptions(models=4),
    "models_chunks": ScanOptions(models=4, chunk=16, remat=True, hoist_projection=True),
}


def randn(*shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def random_params(cell, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return {n: jnp.asarray(rng.normal(scale=scale, size=s).astype(np.float32))
          for n, s in cell.param_shapes().items()}


def tangent_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [randn(*a.shape, seed=seed + i) for i, a in enumerate(leaves)])


def reference(cell, params, xs_TBI, h0, lengths, reverse):
  def one(x, h, n):
    return plain.sequence(cell, params, x, h, n, reverse)
  return jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 0))(xs_TBI, h0, lengths)


def lengths_for(steps):
  return jnp.asarray([steps, steps - 5, 1, steps // 2], jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def jvps(cell, options, reverse, params, xs, h0, lengths, tangents):
  """(primal, tangent) of scan_layer (options) or of the reference loop (options None)."""
  if options is None:
    run = lambda p, x, h: reference(cell, p, x, h, lengths, reverse)
  else:
    run = lambda p, x, h: scan_layer(cell, p, x, lengths, h, reverse=reverse, options=options)
  return jax.jvp(run, (params, xs, h0), tangents)


def jvp_terms(inputs, hidden):
  """K of a step's tangent: the products with the weights and those with their tangents."""
  return 2 * (inputs + hidden + 1)


def assert_close(got, want, steps, terms=jvp_terms(I, H)):
  """Primals and tangents of a ``steps``-step loop, to float32 rounding (tests/tolerance.py)."""
  tolerance.assert_close(got, want, steps=steps, terms=terms)


def check(cell, options, steps, reverse, seed=0):
  params = random_params(cell, seed)
  xs, h0 = randn(steps, B, cell.input_size, seed=seed + 1), randn(B, H, seed=seed + 2)
  tangents = (tangent_like(params, 10), randn(*xs.shape, seed=20), randn(*h0.shape, seed=21))
  lengths = lengths_for(steps)
  got = jvps(cell, options, reverse, params, xs, h0, lengths, tangents)
  want = jvps(cell, None, reverse, params, xs, h0, lengths, tangents)
  assert_close(got, want, steps)
  # The tangent is not trivially zero: it would hide a rule that drops terms.
  assert float(jnp.max(jnp.abs(got[1][0]))) > 1e-2


@pytest.mark.parametrize("steps", [12, 64, 70])
@pytest.mark.parametrize("variant", ["reset_after", "reset_before"])
def test_jvp_of_the_default_path_equals_the_plain_loop(steps, variant):
  """The CPU's defaults: autodiff below 64 steps, the custom rule from 64 on."""
  cell = GRUConfig(I, H, variant=variant)
  assert ScanOptions().resolved(steps, B, H, inputs=I).custom_vjp == (steps >= 64)
  check(cell, OPTIONS["default"], steps, reverse=False)


@pytest.mark.parametrize("name, reverse", [("whole", False), ("chunks_hoisted", True),
                                           ("products", False), ("full", True),
                                           ("per_step", True), ("autodiff", False),
                                           ("models", True), ("models_chunks", False)])
def test_jvp_of_every_option_equals_the_plain_loop(name, reverse):
  check(GRUConfig(I, H), OPTIONS[name], 70, reverse)


@pytest.mark.parametrize("name", ["whole", "products", "per_step"])
def test_jvp_of_reset_before_options_equals_the_plain_loop(name):
  check(GRUConfig(I, H, variant="reset_before"), OPTIONS[name], 70, reverse=True)


def test_jvp_with_the_gpu_defaults_equals_the_plain_loop():
  """The GPU's tuning (custom rule from step 1, projection hoisted, unrolled), run here."""
  options = ScanOptions().resolved(70, B, H, backend="gpu", inputs=I)
  assert options.custom_vjp and options.hoist_projection
  check(GRUConfig(I, H), options, 70, reverse=False)


def test_jvp_past_the_chunking_thresholds_of_the_cpu_defaults():
  """A sequence whose residuals exceed the CPU's whole-sequence budget: chunks and remat
  "products" by default, as users' long sequences get."""
  cell, steps, batch, hidden = GRUConfig(2, 64), 600, 8, 64
  options = ScanOptions().resolved(steps, batch, hidden, inputs=2)
  assert options.remat == "products" and options.chunk < steps
  params = random_params(cell, scale=0.2)
  xs, h0 = randn(steps, batch, 2, seed=3), randn(batch, hidden, seed=4)
  lengths = jnp.asarray(np.linspace(steps // 2, steps, batch).astype(np.int32))
  tangents = (tangent_like(params, 30), randn(*xs.shape, seed=40), jnp.zeros_like(h0))
  got = jvps(cell, ScanOptions(), False, params, xs, h0, lengths, tangents)
  want = jvps(cell, None, False, params, xs, h0, lengths, tangents)
  assert_close(got, want, steps, jvp_terms(2, hidden))


def directional_check(f, args, tangents, steps, terms):
  """``jvp(f)(v) == <grad f, v>`` for a scalar f of a ``steps``-step loop whose steps sum
  ``terms`` products: each side carries that loop's rounding, and the dot product sums N more
  terms, so they agree to ``(steps * terms + N) * eps * sum_i |grad_i v_i|``."""
  _, forward = jax.jit(lambda a, t: jax.jvp(f, a, t))(args, tangents)
  grads = jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))(*args)
  pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(tangents), strict=True))
  backward = sum(jnp.vdot(g, t) for g, t in pairs)
  size = sum(np.size(g) for g, _ in pairs)
  magnitude = sum(float(jnp.vdot(jnp.abs(g), jnp.abs(t))) for g, t in pairs)
  tolerance.assert_close(forward, backward, steps=1, terms=steps * terms + size, scale=magnitude)
  assert abs(float(forward)) > 1e-2


@pytest.mark.parametrize("variant, steps", [("reset_after", 12), ("reset_after", 200),
                                            ("reset_before", 70)])
def test_jvp_of_a_stack_equals_the_gradients_directional_derivative(steps, variant):
  """RNNConfig.apply: two bidirectional layers, lengths, resets, default options."""
  model = RNNConfig(GRUConfig(I, H, variant=variant), num_layers=2, bidirectional=True)
  params = model.init(jax.random.PRNGKey(0))
  xs = randn(B, steps, I, seed=5)
  lengths = lengths_for(steps)
  resets = jnp.asarray(np.random.default_rng(6).random((B, steps)) < 0.05)
  weights = randn(B, steps, 2 * H, seed=7)

  def f(params, xs):
    ys, h_last = model.apply(params, xs, lengths=lengths, resets=resets)
    return jnp.sum(jnp.sin(ys) * weights) + jnp.sum(h_last ** 2)

  # Two layers (the first one's error enters the second), the second one's input 2H wide.
  directional_check(f, (params, xs), (tangent_like(params, 50), randn(*xs.shape, seed=60)),
                    2 * steps, jvp_terms(2 * H, H))


def test_jacfwd_equals_jacrev_past_the_threshold():
  cell, steps = GRUConfig(I, H), 70
  params = random_params(cell)
  xs = randn(steps, 2, I, seed=8)

  def f(h0):
    ys, h_last = scan_layer(cell, params, xs, h0=h0)
    return jnp.concatenate([ys[::7].reshape(-1), h_last.reshape(-1)])

  h0 = randn(2, H, seed=9)
  assert_close(jax.jit(jax.jacfwd(f))(h0), jax.jit(jax.jacrev(f))(h0), steps)


def test_linearize_equals_jvp_and_its_transpose_equals_vjp():
  cell, steps = GRUConfig(I, H), 80
  params = random_params(cell)
  xs = randn(steps, B, I, seed=10)
  lengths = lengths_for(steps)
  run = lambda p, x: scan_layer(cell, p, x, lengths)[0]
  v = (tangent_like(params, 70), randn(*xs.shape, seed=80))
  ct = randn(steps, B, H, seed=90)  # the shape of ys
  # Each in a program of its own (one program could merge the equal computations).
  ys, lin_v = jax.jit(lambda p, x, v: (lambda o: (o[0], o[1](*v)))(jax.linearize(run, p, x)))(
      params, xs, v)
  assert ys.shape == ct.shape
  ys_dot = jax.jit(lambda p, x, v: jax.jvp(run, (p, x), v)[1])(params, xs, v)
  assert_close(lin_v, ys_dot, steps)
  transposed = jax.jit(
      lambda p, x, c: jax.linear_transpose(jax.linearize(run, p, x)[1], p, x)(c))(params, xs, ct)
  vjp_ct = jax.jit(lambda p, x, c: jax.vjp(run, p, x)[1](c))(params, xs, ct)
  assert_close(transposed, vjp_ct, steps, tolerance.gru_terms(I, H, B))


def test_forward_over_reverse_equals_autodiff():
  """A Hessian-vector product (jvp of grad) through the custom rule equals the one through
  JAX's autodiff of the loop."""
  cell, steps = GRUConfig(I, H), 70
  params = random_params(cell)
  xs = randn(steps, B, I, seed=11)

  def hvp(options):
    f = lambda p: jnp.sum(scan_layer(cell, p, xs, options=options)[0] ** 2)
    return jax.jit(lambda p, v: jax.jvp(jax.grad(f), (p,), (v,))[1])(params,
                                                                     tangent_like(params, 3))

  # Forward over reverse: the tangent of the backward recurrence (2 x its 3H terms, or the
  # batch's), after the forward one; the two directions add their errors.
  assert_close(hvp(ScanOptions(custom_vjp=True)), hvp(ScanOptions(custom_vjp=False)), 2 * steps,
               2 * tolerance.gru_terms(I, H, B))


@pytest.mark.parametrize("backward", ["adjoint", "rerun"])
def test_jvp_of_the_parallel_method_equals_the_sequential_one(backward):
  from jaxgru._parallel import parallel_layer
  cell, steps = GRUConfig(I, H), 70
  params = random_params(cell)
  xs, h0 = randn(steps, B, I, seed=12), randn(B, H, seed=13)
  lengths = lengths_for(steps)
  resets = jnp.asarray(np.random.default_rng(14).random((B, steps)) < 0.05)
  tangents = (tangent_like(params, 100), randn(*xs.shape, seed=110), randn(*h0.shape, seed=111))

  def parallel(p, x, h):
    return parallel_layer(cell, p, x, h, lengths, resets, reverse=True, backward=backward,
                          tol=1e-6, sequential=scan_layer)[:2]

  def sequential(p, x, h):
    return scan_layer(cell, p, x, lengths, h, resets=resets, reverse=True,
                      options=ScanOptions(custom_vjp=False))

  got = jax.jit(lambda *a: jax.jvp(parallel, a, tangents))(params, xs, h0)
  want = jax.jit(lambda *a: jax.jvp(sequential, a, tangents))(params, xs, h0)
  # Newton stops at a per-step residual of tol (1e-6): a solver's error on top of rounding.
  tolerance.assert_close(got, want, steps=steps, terms=jvp_terms(I, H), residual=1e-6)


def test_jvp_through_the_linen_module_past_the_threshold():
  flax = pytest.importorskip("flax")
  del flax
  from jaxgru.linen import GRU
  module = GRU(hidden_size=H, bidirectional=True)
  xs = randn(B, 70, I, seed=15)
  variables = module.init(jax.random.PRNGKey(0), xs)
  lengths = lengths_for(70)

  def f(variables, xs):
    ys, _ = module.apply(variables, xs, lengths=lengths)
    return jnp.sum(jnp.cos(ys))

  directional_check(f, (variables, xs), (tangent_like(variables, 120), randn(*xs.shape, seed=130)),
                    70, jvp_terms(I, H))
