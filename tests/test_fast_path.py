"""Tests for jaxgru.scan: the time-major loop and its custom VJP against the plain path.

The reference is the plain loop of tests/reference.py: ``jax.vmap`` of one ``lax.scan`` over
``GRUConfig.step`` per example, differentiated by ``jax.grad``. Every option of ScanOptions (chunks,
padding to whole chunks, rematerialization, the projection before or inside the loop, unrolling,
autodiff instead of the custom VJP) must give the same values and the same gradients.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
import reference as plain
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, RNNConfig, ScanOptions, scan_layer
from jaxgru import _loop
from jaxgru._tuning import forward_hoist_default, forward_unroll_default

I, H, T, B = 3, 5, 7, 4
LENGTHS = np.array([7, 0, 4, 1], np.int32)
TERMS = gru_terms(I, H, B)  # the widest sum one step makes (tests/tolerance.py)

OPTIONS = {
    "default": ScanOptions(),
    "whole": ScanOptions(chunk=1000, remat=False, custom_vjp=True),
    "chunks": ScanOptions(chunk=3, remat=False, hoist_projection=True, unroll=2,
                          custom_vjp=True),
    "remat": ScanOptions(chunk=3, remat=True, custom_vjp=True),
    "products": ScanOptions(chunk=3, remat="products", hoist_projection=True, custom_vjp=True),
    "products_whole": ScanOptions(chunk=1000, remat="products", custom_vjp=True),
    "remat_exact": ScanOptions(chunk=7, remat=True, hoist_projection=True, custom_vjp=True),
    "one_step": ScanOptions(chunk=1, remat=True, unroll=1, custom_vjp=True),
    "per_step_vjp": ScanOptions(chunk=3, remat="products", custom_vjp=True,
                                diagonal_backward=False),
    "per_step_vjp_whole": ScanOptions(chunk=1000, remat=False, custom_vjp=True,
                                      diagonal_backward=False),
    # What the CPU defaults pick once the heap is reused (tune_malloc): see below.
    "heap_reuse": ScanOptions(chunk=1000, remat=False, hoist_projection=True, custom_vjp=True,
                              diagonal_backward=True),
    "autodiff": ScanOptions(custom_vjp=False, chunk=1000),
    "autodiff_remat": ScanOptions(custom_vjp=False, chunk=2, remat=True),
    # Many models (ScanOptions.models): on the CPU, JAX's derivative of the loop with the step's
    # own JVP (jaxgru._loop._recur_step); in one chunk, and in chunks with the projection
    # hoisted and each chunk rematerialized.
    "models": ScanOptions(models=4),
    "models_chunks": ScanOptions(models=4, chunk=3, remat=True, hoist_projection=True),
}


def randn(*shape, seed=1, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def random_params(cell, seed=0):
  rng = np.random.default_rng(seed)
  return {n: jnp.asarray(rng.normal(scale=0.5, size=s).astype(cell.state_dtype))
          for n, s in cell.param_shapes().items()}


def reference(cell, params, xs_TBI, h0, lengths, reverse):
  """The plain path: vmap of the reference loop over the batch, time-major in and out."""
  def one(x, h, n):
    return plain.sequence(cell, params, x, h, n, reverse)
  if lengths is None:
    return jax.vmap(lambda x, h: one(x, h, None), in_axes=(1, 0), out_axes=(1, 0))(xs_TBI, h0)
  return jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 0))(xs_TBI, h0, lengths)


def loss(run, params, xs, h0, w_ys, w_h):
  """A loss that reads every output and the final state, weighted so no gradient cancels."""
  ys, h_last = run(params, xs, h0)
  return jnp.sum(ys * w_ys) + jnp.sum(h_last * h_last * w_h)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def values_and_grads(cell, options, reverse, masked, params, xs, h0, lengths, w_ys, w_h):
  """(outputs, gradients) of scan_layer (options) or of the reference (options None)."""
  lengths = lengths if masked else None
  if options is None:
    run = lambda p, x, h: reference(cell, p, x, h, lengths, reverse)
  else:
    run = lambda p, x, h: scan_layer(cell, p, x, lengths, h, reverse=reverse, options=options)
  outs = run(params, xs, h0)
  grads = jax.grad(functools.partial(loss, run), argnums=(0, 1, 2))(params, xs, h0, w_ys, w_h)
  return outs, grads


def check_against_reference(cell, options, reverse, masked, seed=0):
  dtype = cell.state_dtype
  args = (random_params(cell, seed), randn(T, B, I, seed=seed + 1, dtype=dtype),
          randn(B, H, seed=seed + 2, dtype=dtype),
          jnp.asarray(LENGTHS.tolist()),  # the default integer type: int64 under x64
          randn(T, B, H, seed=seed + 3, dtype=dtype), randn(B, H, seed=seed + 4, dtype=dtype))
  got = values_and_grads(cell, options, reverse, masked, *args)
  want = values_and_grads(cell, None, reverse, masked, *args)
  # Rounded to the products' dtype: float32, float64 under x64, bfloat16 (summed in float32).
  assert_close(got, want, steps=T, terms=TERMS, dtype=cell.compute_dtype)


def check_run_against_reference(run, cell, params, xs, h0, lengths, reverse, tol, grad_tol):
  """``run(params, xs)`` (outputs, final state) against the plain loop: values to ``tol``
  (the keywords of tolerance.assert_close), then gradients of a loss of both with respect to
  params and xs to ``grad_tol`` (likewise; None: values only)."""
  want = reference(cell, params, xs, h0, lengths, reverse)
  assert_close(jax.jit(run)(params, xs), want, **tol)
  if grad_tol is None:
    return
  loss_of = lambda f: lambda p, x: jnp.sum(f(p, x)[0] ** 2) + jnp.sum(f(p, x)[1])
  got = jax.jit(jax.grad(loss_of(run), (0, 1)))(params, xs)
  ref = jax.jit(jax.grad(loss_of(lambda p, x: reference(cell, p, x, h0, lengths, reverse)),
                         (0, 1)))(params, xs)
  assert_close(got, ref, **grad_tol)


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("reverse,masked", [(False, False), (True, True)])
def test_values_and_gradients_equal_the_plain_path(options, reverse, masked):
  check_against_reference(GRUConfig(I, H), OPTIONS[options], reverse, masked)


@pytest.mark.parametrize("variant,use_bias", [("reset_before", True), ("reset_after", False),
                                              ("reset_before", False)])
@pytest.mark.parametrize("options", ["default", "chunks", "remat", "products"])
def test_variants(variant, use_bias, options):
  cell = GRUConfig(I, H, variant=variant, use_bias=use_bias, activation="softsign",
                   recurrent_activation="hard_sigmoid")
  check_against_reference(cell, OPTIONS[options], True, True)


@pytest.mark.parametrize("options", ["default", "chunks", "remat", "products", "autodiff",
                                     "models"])
def test_float64_to_rounding(options):
  """In float64 the only difference left is the order of additions."""
  with jax.enable_x64(True):
    cell = GRUConfig(I, H, param_dtype=jnp.float64)
    check_against_reference(cell, OPTIONS[options], False, True)
    check_against_reference(cell, OPTIONS[options], True, False)


def test_bfloat16_products():
  """Products in bfloat16 (accumulated in float32) round alike on both paths."""
  cell = GRUConfig(I, H, dtype=jnp.bfloat16)
  check_against_reference(cell, OPTIONS["default"], False, True)


def test_padding_to_whole_chunks_is_masked_out():
  """T=7 in chunks of 3 runs 9 steps; lengths above T (under jit) still act as T."""
  cell = GRUConfig(I, H)
  params, xs, h0 = random_params(cell), randn(T, B, I), randn(B, H, seed=2)
  lengths = jnp.array([100, 7, 3, 0], jnp.int32)
  run = jax.jit(lambda n: scan_layer(cell, params, xs, n, h0, options=OPTIONS["remat"]))
  ys, h_last = run(lengths)
  want_ys, want_h = reference(cell, params, xs, h0, jnp.minimum(lengths, T), False)
  assert_close((ys, h_last), (want_ys, want_h), steps=T, terms=TERMS)


@pytest.mark.parametrize("argnums", [0, 1, 2, (1, 2)])
def test_gradients_of_some_arguments_only(argnums):
  """The custom VJP skips the gradients nobody asked for; the others must not change."""
  cell = GRUConfig(I, H)
  args = (random_params(cell), randn(T, B, I), randn(B, H, seed=2))
  w = randn(T, B, H, seed=3)

  def f(run, p, x, h):
    ys, h_last = run(p, x, h)
    return jnp.sum(ys * w) + jnp.sum(h_last)

  new = functools.partial(f, lambda p, x, h: scan_layer(cell, p, x, h0=h, options=OPTIONS["remat"]))
  old = functools.partial(f, lambda p, x, h: reference(cell, p, x, h, None, False))
  got = jax.jit(jax.grad(new, argnums))(*args)
  want = jax.jit(jax.grad(old, argnums))(*args)
  assert_close(got, want, steps=T, terms=TERMS)


@pytest.mark.parametrize("which", ["ys", "h_last"])
def test_loss_of_one_output_only(which):
  """An output the loss ignores reaches the custom VJP as a symbolic zero."""
  cell = GRUConfig(I, H)
  params, xs = random_params(cell), randn(T, B, I)
  pick = (lambda o: jnp.sum(o[0] ** 2)) if which == "ys" else (lambda o: jnp.sum(o[1] ** 2))
  got = jax.jit(jax.grad(lambda p: pick(scan_layer(cell, p, xs, options=OPTIONS["chunks"]))))(
      params)
  want = jax.jit(jax.grad(lambda p: pick(reference(cell, p, xs, jnp.zeros((B, H)), None,
                                                   False))))(params)
  for n in want:
    assert_close(got[n], want[n], steps=T, terms=TERMS, err_msg=n)


def test_empty_sequence():
  cell = GRUConfig(I, H)
  h0 = randn(B, H)
  ys, h_last = scan_layer(cell, random_params(cell), jnp.zeros((0, B, I)), h0=h0)
  assert ys.shape == (0, B, H)
  np.testing.assert_array_equal(h_last, h0)


# -- RNNConfig.apply over the fast path ------------------------------------------------------------


def apply_reference(cfg, params, xs, lengths, h0, dropout_key):
  """RNNConfig.apply by hand: vmap of the plain reference loop per layer and direction."""
  finals = []
  for l, layer in enumerate(params):
    cell, outs = cfg.layer_cell(l), []
    for i, d in enumerate(cfg.directions):
      h = h0[l * cfg.num_directions + i]
      run = lambda x, hh, n, p=layer[d], rev=(d == "bwd"): plain.sequence(cell, p, x, hh, n, rev)
      ys, hs = jax.vmap(run)(xs, h, lengths)
      outs.append(ys)
      finals.append(hs)
    xs = jnp.concatenate(outs, -1) if cfg.merge == "concat" else sum(outs[1:], outs[0])
    if dropout_key is not None and cfg.dropout > 0 and l < cfg.num_layers - 1:
      keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, l), 1.0 - cfg.dropout,
                                  xs.shape)
      xs = jnp.where(keep, xs / (1.0 - cfg.dropout), jnp.zeros_like(xs))
  return xs, jnp.stack(finals)


STACK = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True, dropout=0.3)


def stack_loss(ys, hs):
  return jnp.sum(ys * jnp.arange(ys.size, dtype=ys.dtype).reshape(ys.shape) / ys.size) + \
      jnp.sum(hs ** 2)


def stack_args():
  params = [{d: random_params(STACK.layer_cell(l), seed=2 * l + i)
             for i, d in enumerate(STACK.directions)} for l in range(STACK.num_layers)]
  return params, randn(B, T, I), randn(4, B, H, seed=2)


def outputs_and_grads(run):
  """One compiled program: run's outputs and the gradients of stack_loss over them."""
  def f(p, x, h):
    outs = run(p, x, h)
    return stack_loss(*outs), outs
  return jax.jit(lambda *a: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(*a))


@functools.lru_cache(maxsize=None)
def stack_reference():
  """The plain path's outputs and gradients, computed once for both parametrizations."""
  key = jax.random.key(3)
  old = lambda p, x, h: apply_reference(STACK, p, x, jnp.asarray(LENGTHS), h, key)
  (_, outs), grads = outputs_and_grads(old)(*stack_args())
  return outs, grads


@pytest.mark.parametrize("time_major,options", [(False, None), (True, "products")])
def test_apply_stack_with_dropout_equals_the_plain_path(time_major, options):
  cfg = STACK
  lengths, key = jnp.asarray(LENGTHS), jax.random.key(3)

  def new(p, x, h):
    x_in = jnp.swapaxes(x, 0, 1) if time_major else x
    ys, hs = cfg.apply(p, x_in, lengths, h, dropout_key=key, time_major=time_major,
                       options=OPTIONS.get(options))
    return (jnp.swapaxes(ys, 0, 1) if time_major else ys), hs

  (_, got), got_grads = outputs_and_grads(new)(*stack_args())
  want, want_grads = stack_reference()
  # Two layers (the first one's error enters the second), the second one's input 2H wide.
  stack_tol = dict(steps=2 * T, terms=gru_terms(2 * H, H, B))
  assert_close(got, want, **stack_tol)
  assert_close(got_grads, want_grads, **stack_tol)


def test_apply_unroll_and_options_do_not_change_results():
  cfg = RNNConfig(GRUConfig(I, H))
  params, xs = cfg.init(jax.random.key(0)), randn(B, T, I)
  want = cfg.apply(params, xs)
  for kwargs in ({"unroll": 3}, {"options": OPTIONS["one_step"]}, {"options": OPTIONS["autodiff"]},
                 {"options": OPTIONS["chunks"], "unroll": 1}):
    got = cfg.apply(params, xs, **kwargs)
    assert_close(got, want, steps=T, terms=TERMS, err_msg=str(kwargs))


def test_train_step_does_not_recompile():
  cfg = RNNConfig(GRUConfig(I, H))
  params, xs = cfg.init(jax.random.key(0)), randn(B, T, I)

  @jax.jit
  def step(p, x):
    g = jax.grad(lambda q: jnp.mean(cfg.apply(q, x)[0] ** 2))(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

  params = step(params, xs)
  params = step(params, xs + 1.0)
  assert step._cache_size() == 1


# -- options ---------------------------------------------------------------------------------------


def test_options_resolve_per_backend_and_shape():
  cpu = ScanOptions().resolved(steps=1000, batch=16, hidden=64, backend="cpu")
  gpu = ScanOptions().resolved(steps=1000, batch=16, hidden=64, backend="gpu")
  for opts in (cpu, gpu):
    assert None not in (opts.unroll, opts.chunk, opts.remat, opts.hoist_projection)
    assert 1 <= opts.chunk <= 1000 and opts.remat in ("none", "products", "full")
  assert ScanOptions().resolved(steps=10, batch=2, hidden=3, backend="cpu").chunk == 10
  assert ScanOptions(chunk=50).resolved(steps=10, batch=4).chunk == 10
  assert ScanOptions(unroll=3, remat=True).resolved(10, 4, 5, "gpu").unroll == 3
  assert ScanOptions(remat=True).remat == "full" and ScanOptions(remat=False).remat == "none"
  assert cpu.custom_vjp and not ScanOptions().resolved(16, 256, 32, "cpu").custom_vjp
  for steps, batch, hidden in [(16, 256, 32), (128, 64, 256), (1024, 16, 64), (256, 128, 512),
                               (100_000, 8, 64)]:
    opts = ScanOptions().resolved(steps, batch, hidden, "cpu")
    assert 1 <= opts.chunk <= steps and opts.remat in ("none", "products")
    assert steps % opts.chunk == 0  # a divisor near the target: no padded steps
  # The projection before the loop: on the CPU only for a large input product, not too long.
  assert ScanOptions().resolved(128, 64, 256, "cpu", inputs=32).hoist_projection
  assert not ScanOptions().resolved(1024, 16, 64, "cpu", inputs=8).hoist_projection
  assert not ScanOptions().resolved(256, 128, 512, "cpu", inputs=128).hoist_projection
  assert ScanOptions().resolved(1024, 16, 64, "gpu", inputs=8).hoist_projection
  # A forward pass without derivative: the input product alone decides, not the memory bound.
  assert forward_hoist_default(128, 128, 512, "cpu") and forward_hoist_default(64, 32, 256, "cpu")
  assert forward_hoist_default(64, 64, 64, "cpu")  # 786,432 multiply-adds
  assert not ScanOptions().resolved(256, 64, 64, "cpu", inputs=64).hoist_projection
  assert not forward_hoist_default(16, 8, 64, "cpu") and forward_hoist_default(16, 8, 64, "gpu")
  # ...and unrolls by 2 with the projection in the loop from 2**21 recurrent multiply-adds,
  # H >= 128 and I <= H/4 (B, I, H).
  assert forward_unroll_default(64, 32, 256, "cpu") == 2
  assert forward_unroll_default(16, 64, 256, "cpu") == 2
  assert forward_unroll_default(128, 128, 512, "cpu") == 2
  assert forward_unroll_default(64, 64, 64, "cpu") is None  # 786,432 multiply-adds
  assert forward_unroll_default(43, 32, 128, "cpu") == 2
  assert forward_unroll_default(42, 32, 128, "cpu") is None  # 2,064,384 < 2**21
  assert forward_unroll_default(256, 16, 64, "cpu") is None  # H < 128
  assert forward_unroll_default(128, 33, 128, "cpu") is None  # I > H/4
  assert forward_unroll_default(64, 32, 256, "gpu") is None
  # The diagonal backward: the default at every size and backend; an explicit False holds.
  assert ScanOptions().resolved(128, 64, 256, "cpu").diagonal_backward
  assert ScanOptions().resolved(256, 128, 512, "cpu").diagonal_backward
  assert ScanOptions().resolved(256, 128, 512, "gpu").diagonal_backward
  assert not ScanOptions(diagonal_backward=False).resolved(128, 64, 256, "gpu").diagonal_backward


@pytest.mark.parametrize("heap_reused", [False, True])
def test_many_models_take_jax_autodiff_on_the_cpu(heap_reused, monkeypatch):
  """ScanOptions(models=N), N >= 2: the CPU defaults drop the custom rule, in either table; the
  GPU's (not measured for it) keep it; an explicit custom_vjp wins; nothing else changes."""
  from jaxgru import _tuning  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_tuning, "_heap_reused", heap_reused)
  one = ScanOptions().resolved(65, 128, 16, "cpu")
  assert one.custom_vjp
  for n in (2, 64):
    many = ScanOptions(models=n).resolved(65, 128, 16, "cpu")
    assert not many.custom_vjp
    assert dataclasses.replace(many, custom_vjp=True, models=1) == one
    assert ScanOptions(models=n).resolved(65, 128, 16, "gpu").custom_vjp
    assert ScanOptions(models=n, custom_vjp=True).resolved(65, 128, 16, "cpu").custom_vjp


def test_options_resolve_to_the_heap_reuse_table_once_malloc_is_tuned(monkeypatch):
  from jaxgru import _tuning  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
  monkeypatch.setattr(_tuning, "_heap_reused", False)
  fresh = ScanOptions().resolved(128, 64, 256, "cpu", inputs=32)
  gpu = ScanOptions().resolved(256, 128, 512, "gpu", inputs=128)
  fresh_small = ScanOptions().resolved(1024, 16, 64, "cpu", inputs=8)
  assert not _tuning.heap_reused() and fresh.remat == "products" and fresh.chunk < 128
  _tuning.set_heap_reuse(True)  # as tune_malloc does when it applied
  assert _tuning.heap_reused()
  # Every step's residuals in one chunk, the projection hoisted from 2**19 multiply-adds per
  # step (B*I*3H) on, the diagonal backward.
  heap = ScanOptions().resolved(128, 64, 256, "cpu", inputs=32)
  assert (heap.chunk, heap.remat, heap.diagonal_backward, heap.hoist_projection) == (
      128, "none", True, True)
  tested = OPTIONS["heap_reuse"]  # against the plain loop above, at its T = 7 (one chunk)
  assert heap.custom_vjp and all(getattr(heap, k) == getattr(tested, k) for k in (
      "remat", "hoist_projection", "custom_vjp", "diagonal_backward"))
  assert ScanOptions().resolved(128, 256, 64, "cpu", inputs=16).hoist_projection  # 786k MACs
  # Below batch 32 the fresh-page table stays (measured faster at 16x1024x8x64).
  assert ScanOptions().resolved(1024, 16, 64, "cpu", inputs=8) == fresh_small
  # Past 2 GiB of residuals the chunked table decides; the GPU's table does not change.
  long = ScanOptions().resolved(100_000, 64, 64, "cpu")
  assert long.remat == "products" and long.chunk < 100_000
  assert ScanOptions().resolved(256, 128, 512, "gpu", inputs=128) == gpu
  # glibc's threshold set in the environment counts too, from 1 GiB on.
  _tuning.set_heap_reuse(False)
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "2000000000")
  assert _tuning.heap_reused()
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
  assert not _tuning.heap_reused()
  monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "lots")
  assert not _tuning.heap_reused()


def test_heap_reuse_defaults_past_the_custom_vjp_threshold_equal_the_plain_path(monkeypatch):
  # What run.py runs once tune_malloc applied: the defaults at T >= 64 and batch >= 32.
  from jaxgru import _tuning  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(_tuning, "_heap_reused", True)
  steps, batch = 70, 32
  cell = GRUConfig(I, H)
  opts = ScanOptions().resolved(steps, batch, H, inputs=I)
  assert (opts.custom_vjp, opts.chunk, opts.remat, opts.diagonal_backward) == (
      True, steps, "none", True)
  lengths = jnp.asarray(np.random.default_rng(5).integers(0, steps + 1, batch).astype(np.int32))
  args = (random_params(cell, 3), randn(steps, batch, I, seed=4), randn(batch, H, seed=5),
          randn(steps, batch, H, seed=6), randn(batch, H, seed=7))

  def run_with(fn):  # a fresh jit: the defaults are resolved while it traces, under the patch
    @jax.jit
    def both(params, xs, h0, w_ys, w_h):
      run = lambda p, x, h: fn(p, x, h)
      grads = jax.grad(functools.partial(loss, run), argnums=(0, 1, 2))(params, xs, h0, w_ys,
                                                                         w_h)
      return run(params, xs, h0), grads
    return both(*args)

  got = run_with(lambda p, x, h: scan_layer(cell, p, x, lengths, h, reverse=True))
  want = run_with(lambda p, x, h: reference(cell, p, x, h, lengths, True))
  # The kernels' gradients sum 70 x 32 terms, in another order on each path.
  assert_close(got, want, steps=steps, terms=gru_terms(I, H, batch))


@pytest.mark.parametrize("kwargs", [{"unroll": 0}, {"chunk": -1}, {"chunk": True},
                                    {"unroll": 1.5}, {"remat": "some"},
                                    {"diagonal_backward": "yes"}])
def test_options_reject_bad_values(kwargs):
  with pytest.raises(ValueError):
    ScanOptions(**kwargs)


def test_public_names():
  assert "ScanOptions" in jaxgru.__all__ and "scan_layer" in jaxgru.__all__


def test_diagonal_backward_applies_only_to_cells_acting_on_each_unit_alone():
  assert jaxgru.scan.diagonal_backward_applies(GRUConfig(I, H))
  assert jaxgru.scan.diagonal_backward_applies(GRUConfig(I, H, activation=jax.nn.relu))
  assert jaxgru.scan.diagonal_backward_applies(
      GRUConfig(I, H, activation="relu", recurrent_activation="hard_sigmoid"))
  assert not jaxgru.scan.diagonal_backward_applies(GRUConfig(I, H, variant="reset_before"))
  assert not jaxgru.scan.diagonal_backward_applies(GRUConfig(I, H, activation=lambda x: x))
  assert not jaxgru.scan.diagonal_backward_applies(GRUConfig(I, H, activation=jax.nn.softmax))


def test_activation_that_mixes_units_takes_the_per_step_vjp(monkeypatch):
  """A softmax candidate activation mixes units: the bulk diagonal would be wrong for it, so the
  fallback must be taken; forcing the diagonal path shows the check against the reference can
  fail."""
  cell = GRUConfig(I, H, activation=jax.nn.softmax)
  options = ScanOptions(chunk=3, remat="products", custom_vjp=True, diagonal_backward=True)
  check_against_reference(cell, options, True, True)
  monkeypatch.setattr(jaxgru.scan, "diagonal_backward_applies", lambda cell: True)
  jax.clear_caches()
  with pytest.raises(AssertionError):
    check_against_reference(cell, options, True, True)


@pytest.mark.parametrize("path", ["custom_rule", "models"])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_pass_without_derivative_hoists_as_its_own_rule_says(reverse, path, monkeypatch):
  """A forward pass where nothing is differentiated (the custom rule's primal, or the value of
  the loop JAX differentiates for many models) projects each chunk's inputs before its loop
  where forward_hoist_default says so, whatever the training step's hoist_projection; an
  explicit hoist_projection holds for both. The loop JAX differentiates does not. Values equal
  the plain loop's, and so do gradients, with lengths and padded chunks."""
  monkeypatch.setattr(jaxgru._tuning, "forward_hoist_default", lambda *args: True)
  cell = GRUConfig(I, H)
  params, xs, h0 = random_params(cell), randn(70, B, I), randn(B, H, seed=2)
  lengths = jnp.asarray([70, 0, 33, 69], jnp.int32)
  options = (ScanOptions(chunk=16, remat="products", custom_vjp=True) if path == "custom_rule"
             else ScanOptions(chunk=16, remat="products", models=2))
  assert options.resolved(70, B, H, "cpu", inputs=I).custom_vjp == (path == "custom_rule")
  run = lambda p, x, o=options: scan_layer(cell, p, x, lengths, h0, reverse=reverse, options=o)

  def hoisted(o, derivative=False):  # a product of a whole chunk's (C, B, I) inputs
    f = lambda p: run(p, xs, o)
    if derivative:
      f = lambda p, f=f: jax.jvp(f, (p,), (p,))[1]
    return f"f32[16,{B},{3 * H}] = dot_general" in str(jax.make_jaxpr(f)(params))
  assert hoisted(options)
  if path == "models":  # (the custom rule's tangents are made of chunk-wide products anyway)
    assert not hoisted(options, derivative=True)
  assert not hoisted(dataclasses.replace(options, hoist_projection=False))
  assert options.resolved(70, B, H, "cpu", inputs=I).hoist_projection is False

  tol = dict(steps=70, terms=TERMS)
  check_run_against_reference(run, cell, params, xs, h0, lengths, reverse, tol, tol)


@pytest.mark.parametrize("reverse", [False, True])
def test_forward_pass_without_derivative_unrolls_as_its_own_rule_says(reverse):
  """From 2**21 multiply-adds in a step's recurrent product (B*H*3H; here 16 x 256 x 768),
  with H >= 128 and I <= H/4 (here 64), a forward pass where nothing is differentiated runs one
  loop unrolled by 2 with each step's inputs projected inside it, where the options leave
  unroll and hoist_projection to the defaults. An explicit unroll or hoist_projection, many
  models, a reset_before cell or I > H/4 keeps the projection rule (before the loop here:
  16 x 64 x 768 >= 2**19) and the options' unroll. The training step's loop is not unrolled.
  Values equal the plain loop's with lengths, at 70 steps (the custom rule), and so do
  gradients (forward in time: the differentiated program is the one the other tests here
  run)."""
  cell = GRUConfig(64, 256)
  b, t = 16, 70
  # Weights of scale 0.05: with 256 units, larger ones make 70 steps chaotic.
  params = jax.tree.map(lambda a: a / 10, random_params(cell))
  xs, h0 = randn(t, b, 64), randn(b, 256, seed=2)
  lengths = jnp.asarray(np.arange(b) * 5 % (t + 1), jnp.int32)
  run = lambda p, x, o=ScanOptions(): scan_layer(cell, p, x, lengths, h0, reverse=reverse,
                                                 options=o)
  assert ScanOptions().resolved(t, b, 256, "cpu", inputs=64).custom_vjp

  def loops(o, derivative=False):
    """The unroll of every scan in the program, and whether a chunk-wide product projects."""
    f = lambda p: run(p, xs, o)
    if derivative:
      f = lambda p, f=f: jax.jvp(f, (p,), (p,))[1]
    jaxpr = jax.make_jaxpr(f)(params)
    unrolls = set()

    def visit(jx):
      for eqn in jx.eqns:
        if eqn.primitive.name == "scan":
          unrolls.add(eqn.params["unroll"])
        for value in eqn.params.values():
          for sub in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):  # a Jaxpr or a ClosedJaxpr
              visit(getattr(sub, "jaxpr", sub))
    visit(jaxpr.jaxpr)
    chunk_product = any(f"f32[{c},{b},768] = dot_general" in str(jaxpr) for c in (t, 35, 10, 14))
    return unrolls, chunk_product

  assert loops(ScanOptions()) == ({2}, False)
  assert 2 not in loops(ScanOptions(), derivative=True)[0]
  assert loops(ScanOptions(unroll=1)) == ({1}, True)
  assert loops(ScanOptions(hoist_projection=False)) == ({1}, False)
  assert loops(ScanOptions(models=2)) == ({1}, True)
  wide = GRUConfig(65, 256)  # I > H/4
  text = str(jax.make_jaxpr(lambda p: scan_layer(wide, p, randn(t, b, 65))[0])(
      random_params(wide)))
  assert "unroll=1" in text and "unroll=2" not in text
  before = GRUConfig(64, 256, variant="reset_before")  # two recurrent products per step
  text = str(jax.make_jaxpr(lambda p: scan_layer(before, p, xs)[0])(random_params(before)))
  assert "unroll=1" in text and "unroll=2" not in text

  tol = dict(steps=t, terms=gru_terms(64, 256, b))
  check_run_against_reference(run, cell, params, xs, h0, lengths, reverse, tol,
                              None if reverse else tol)


def test_many_models_take_the_steps_own_jvp_on_the_cpu_defaults(monkeypatch):
  """From 2 models on (ScanOptions.models) the CPU's defaults differentiate the loop by JAX with
  the step's own JVP, for the default cell only; one model, other activations, reset_before and
  the custom rule keep JAX's rules for the step. What JAX differentiates there is
  ``jaxgru._loop._layer`` (the JVP of ``_layer_autodiff``); a pass without derivative runs the
  custom rule's forward pass, without the hint."""
  def takes_it(cell, options):
    xs, h0 = randn(70, B, I), randn(B, H, seed=2)
    params = random_params(cell)
    seen = []
    real = jaxgru.scan._layer_autodiff
    monkeypatch.setattr(jaxgru.scan, "_layer_autodiff",
                        lambda st, *args: seen.append(st) or real(st, *args))
    forward = str(jax.make_jaxpr(lambda p: scan_layer(cell, p, xs, h0=h0, options=options))(params))
    assert "jvp=_recur_step_jvp" not in forward
    if not seen:  # the custom rule
      return False
    differentiated = jax.make_jaxpr(functools.partial(_loop._layer, seen[0]))(params, xs, h0, None)
    return "jvp=_recur_step_jvp" in str(differentiated)
  cell = GRUConfig(I, H)
  assert takes_it(cell, ScanOptions(models=2))
  assert takes_it(GRUConfig(I, H, use_bias=False), ScanOptions(models=2))
  assert not takes_it(cell, ScanOptions())
  assert not takes_it(cell, ScanOptions(models=2, custom_vjp=True))
  assert not takes_it(GRUConfig(I, H, activation="softsign"), ScanOptions(models=2))
  assert not takes_it(GRUConfig(I, H, variant="reset_before"), ScanOptions(models=2))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_many_models_project_few_inputs_by_multiply_adds(dtype):
  """Where the step's own JVP applies, a differentiated loop projects an input of at most 4
  features at each step by multiply-adds, not a matrix product: its JVP makes three products
  per step (the recurrent one and its two tangent terms), not five. A pass without derivative
  keeps the input product (the multiply-adds made it 2.2-2.6 times as slow). Values and
  gradients equal the plain loop's (a matrix product per step), also with bfloat16 products
  (each factor rounded to bfloat16, the sum in float32), and so do the values of the pass
  without derivative."""
  def products(cell, options):
    xs = randn(70, B, cell.input_size)
    run = lambda p: scan_layer(cell, p, xs, options=options)
    params = random_params(cell)
    forward = str(jax.make_jaxpr(run)(params)).count("dot_general")
    jvp = str(jax.make_jaxpr(lambda p: jax.jvp(run, (p,), (p,)))(params)).count("dot_general")
    return forward, jvp
  for inputs, want in ((1, (2, 3)), (4, (2, 3)), (5, (2, 5))):
    assert products(GRUConfig(inputs, H), ScanOptions(models=2)) == want, inputs
  assert products(GRUConfig(2, H), ScanOptions(models=2, hoist_projection=True)) == (2, 5)
  assert products(GRUConfig(2, H), ScanOptions())[0] == 2

  cell = GRUConfig(2, H, dtype=dtype)
  params = random_params(cell)
  xs, h0, w = randn(70, B, 2), randn(B, H, seed=2), randn(70, B, H, seed=3)
  lengths = jnp.asarray([70, 0, 33, 69], jnp.int32)

  def loss(run, p, x):
    ys, h_last = run(p, x)
    return jnp.sum(ys * w) + jnp.sum(h_last ** 2)

  fast = lambda p, x: scan_layer(cell, p, x, lengths, h0, options=ScanOptions(models=2))
  slow = lambda p, x: reference(cell, p, x, h0, lengths, False)
  many = jax.jit(jax.value_and_grad(functools.partial(loss, fast), (0, 1)))
  plain_loop = jax.jit(jax.value_and_grad(functools.partial(loss, slow), (0, 1)))
  tol = dict(steps=70, terms=gru_terms(2, H, B), dtype=cell.compute_dtype)
  # The gradients (the loss is a function of the outputs, compared next).
  assert_close(many(params, xs)[1], plain_loop(params, xs)[1], **tol)
  assert_close(jax.jit(fast)(params, xs), jax.jit(slow)(params, xs), **tol)
  # Only the weights', or only the inputs', tangents live (the others symbolic zeros).
  for argnums in ((0, 1) if dtype is None else ()):
    got = jax.jit(jax.grad(functools.partial(loss, fast), argnums))(params, xs)
    want = jax.jit(jax.grad(functools.partial(loss, slow), argnums))(params, xs)
    assert_close(got, want, **tol)


def test_many_models_under_vmap_equal_each_model_alone():
  """What the hint is for: N models vmapped over their parameters, with lengths, at T=70 (past
  the custom rule's threshold, which one model alone takes): each model's values and
  gradients equal its own plain loop's."""
  cell, n, steps = GRUConfig(I, H), 3, 70
  params = jax.vmap(lambda s: random_params(cell, 0))(jnp.arange(n))
  params = jax.tree.map(lambda a: a * jnp.linspace(0.5, 1.5, n).reshape((n,) + (1,) * (a.ndim - 1)),
                        params)
  xs, h0, w = randn(steps, B, I), randn(B, H, seed=2), randn(steps, B, H, seed=3)
  lengths = jnp.asarray([steps, 0, 33, 69], jnp.int32)

  def loss(run, p):
    ys, h_last = run(p)
    return jnp.sum(ys * w) + jnp.sum(h_last ** 2)

  fast = lambda p: scan_layer(cell, p, xs, lengths, h0, options=ScanOptions(models=n))
  slow = lambda p: reference(cell, p, xs, h0, lengths, False)
  def both(run):
    return jax.jit(jax.vmap(lambda p: (run(p), jax.grad(functools.partial(loss, run))(p))))
  # The reference vmapped too: the plain loop per model, JAX's own rules (no hint to read).
  got, want = both(fast)(params), both(slow)(params)
  assert_close(got, want, steps=steps, terms=TERMS)
