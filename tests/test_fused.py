"""Tests for the fused method (``ScanOptions(method="fused")``, jaxgru._fused), in Pallas's
interpret mode on the CPU (on a GPU, the same tests check the compiled kernels).

Values and gradients (params, inputs, initial state) of a loss over the outputs and the final
states are compared against the sequential loop (:func:`jaxgru.scan_layer` with its defaults, or
chunked) and, where there are no resets, against the plain loop of tests/reference.py: both
variants and directions, lengths, resets, h0, a non-default activation, T below and above the
CPU's custom-rule threshold (64 steps), batches that fill one and two of the kernel's batch tiles,
a 2-layer bidirectional stack, bfloat16 products, jax.vmap over models, forward mode (which falls
back to the sequential rule) and a second derivative. Interpret mode compiles slowly: each case
compiles one program for the values and gradients together, and the sizes are tiny.
"""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
from jaxgru import GRUConfig, RNNConfig, ScanOptions, scan_layer
from jaxgru import _fused
from jaxgru._loop import _Static
from jaxgru._tuning import _TUNED
from tests import reference

I = 3
FUSED = ScanOptions(method="fused")
_SCAN_ARGS = inspect.signature(scan_layer).parameters


def _tol(steps: int, scale: float = 1.0) -> dict:
  """float32 rounding, accumulated over ``steps`` steps (a gradient sums T terms)."""
  return dict(rtol=2e-6 * steps * scale, atol=2e-6 * steps * scale)


def run(cell, params, xs, h0, lengths=None, resets=None, reverse=False, options=FUSED):
  """scan_layer with h0, lengths and resets by keyword, whatever the keywords are called."""
  names = {"h0": ("h0", "h0_BH"), "lengths": ("lengths", "lengths_B"),
           "resets": ("resets", "resets_BT")}
  kw = {}
  for key, value in (("h0", h0), ("lengths", lengths), ("resets", resets)):
    if value is not None:
      kw[next(n for n in names[key] if n in _SCAN_ARGS)] = value
  return scan_layer(cell, params, xs, reverse=reverse, options=options, **kw)


def data(steps, batch, hidden, seed=0):
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(steps, batch, I)).astype(np.float32))
  h0 = jnp.asarray(0.5 * rng.normal(size=(batch, hidden)).astype(np.float32))
  w_ys = jnp.asarray(rng.normal(size=(steps, batch, hidden)).astype(np.float32))
  w_h = jnp.asarray(rng.normal(size=(batch, hidden)).astype(np.float32))
  lengths = rng.integers(0, steps + 1, size=batch).astype(np.int32)
  lengths[0], lengths[1] = steps, 0
  resets = rng.random((batch, steps)) < 0.1
  resets[0, 2] = resets[-1, steps - 1] = True
  return xs, h0, w_ys, w_h, jnp.asarray(lengths), jnp.asarray(resets)


def value_and_grads(fn, w_ys, w_h):
  """jit(value_and_grad) of a loss over ``fn(params, xs, h0) = (ys, h_last)``."""
  def loss(p, x, h):
    ys, h_last = fn(p, x, h)
    return jnp.sum(ys * w_ys) + jnp.sum(h_last * w_h), (ys, h_last)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_close(got, want, tol):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.fixture(autouse=True)
def _no_warnings():
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="jaxgru: method='fused'")
    yield


@pytest.mark.parametrize("variant,reverse,steps,batch,masks,act", [
    ("reset_after", False, 20, 5, "resets", ("tanh", "sigmoid")),
    ("reset_after", True, 70, 18, "lengths", ("tanh", "sigmoid")),
    ("reset_before", True, 20, 5, "resets", ("softsign", "hard_sigmoid")),
    ("reset_before", False, 70, 5, "lengths", ("tanh", "sigmoid")),
])
def test_matches_sequential_and_reference(variant, reverse, steps, batch, masks, act):
  """T=70 is above the CPU's custom-rule threshold (64 steps), where the sequential loop also
  runs chunked here (chunk=16) and differentiates by its own rule; T=20 below it. B=18 fills two
  batch tiles of 16. With resets the reference is the sequential loop alone (the plain loop has
  no resets); with lengths only, the plain loop too."""
  hidden = 6
  cell = GRUConfig(I, hidden, variant=variant, activation=act[0], recurrent_activation=act[1])
  params = cell.init(jax.random.key(1), "pytorch")
  xs, h0, w_ys, w_h, lengths, resets = data(steps, batch, hidden)
  resets = resets if masks == "resets" else None
  seq_opts = ScanOptions(chunk=16) if steps > 64 else ScanOptions()
  fused = value_and_grads(lambda p, x, h: run(cell, p, x, h, lengths, resets, reverse), w_ys, w_h)
  seq = value_and_grads(lambda p, x, h: run(cell, p, x, h, lengths, resets, reverse, seq_opts),
                        w_ys, w_h)
  got, want = fused(params, xs, h0), seq(params, xs, h0)
  assert_close(got, want, _tol(steps))
  if resets is None:
    def plain(p, x, h):
      one = lambda x_TI, h_H, n: reference.sequence(cell, p, x_TI, h_H, n, reverse=reverse)
      return jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 0))(x, h, lengths)
    assert_close(got, value_and_grads(plain, w_ys, w_h)(params, xs, h0), _tol(steps))


def test_stack_bidirectional_two_layers():
  rnn = RNNConfig(GRUConfig(I, 5), num_layers=2, bidirectional=True)
  params = rnn.init(jax.random.key(2), "pytorch")
  steps, batch = 12, 4
  xs, _, _, _, lengths, resets = data(steps, batch, 5, seed=3)
  xs_BTI = jnp.swapaxes(xs, 0, 1)
  h0 = jnp.asarray(np.random.default_rng(4).normal(size=(4, batch, 5)).astype(np.float32))
  w_ys = jnp.asarray(np.random.default_rng(5).normal(size=(batch, steps, 10)).astype(np.float32))
  w_h = jnp.ones((4, batch, 5), jnp.float32)

  def stack(options):
    return lambda p, x, h: rnn.apply(p, x, lengths, h, options=options, resets=resets)

  got = value_and_grads(stack(FUSED), w_ys, w_h)(params, xs_BTI, h0)
  want = value_and_grads(stack(ScanOptions()), w_ys, w_h)(params, xs_BTI, h0)
  assert_close(got, want, _tol(2 * steps))


def test_bfloat16_products():
  """Products in bfloat16 (parameters and state float32). The fused kernel keeps its cotangents
  in float32 where JAX's transposition of the loop rounds some to bfloat16, so the two differ by
  bfloat16 roundings (2**-8): each is compared with the float32 cell's results, and the fused
  one's error must be no larger than about the loop's."""
  cell = GRUConfig(I, 8, dtype=jnp.bfloat16)
  params = cell.init(jax.random.key(3), "pytorch")
  steps = 20
  xs, h0, w_ys, w_h, lengths, resets = data(steps, 5, 8, seed=6)
  fn = lambda c, options: lambda p, x, h: run(c, p, x, h, lengths, resets, options=options)
  got = value_and_grads(fn(cell, FUSED), w_ys, w_h)(params, xs, h0)
  loop = value_and_grads(fn(cell, ScanOptions()), w_ys, w_h)(params, xs, h0)
  exact = value_and_grads(fn(GRUConfig(I, 8), ScanOptions()), w_ys, w_h)(params, xs, h0)
  for a, b, want in zip(*(jax.tree.leaves(r) for r in (got, loop, exact))):
    scale = float(jnp.max(jnp.abs(want)))
    err, err_loop = (float(jnp.max(jnp.abs(r - want))) for r in (a, b))
    assert err <= 2 * err_loop + 2**-9 * scale, (err, err_loop, scale)
    assert err <= 2**-6 * scale, (err, scale)


def test_vmap_over_models():
  cell = GRUConfig(I, 4)
  models = jax.vmap(lambda k: cell.init(k, "pytorch"))(jax.random.split(jax.random.key(4), 3))
  steps = 10
  xs, h0, w_ys, w_h, lengths, resets = data(steps, 3, 4, seed=7)

  def derivatives(options):
    """Per model: the loss and its gradient (the backward kernel under vmap), and a JVP (the
    tangent primitive's batching rule), in one program."""
    f = lambda p: run(cell, p, xs, h0, lengths, resets, options=options)
    loss = lambda p: jnp.sum(f(p)[0] * w_ys) + jnp.sum(f(p)[1] * w_h)
    both = lambda p: (jax.value_and_grad(loss)(p), jax.jvp(f, (p,), (p,)))
    return jax.jit(jax.vmap(both))(models)

  assert_close(derivatives(FUSED), derivatives(ScanOptions()), _tol(steps))


def test_forward_mode_and_second_derivatives():
  """jax.jvp runs the sequential rule (no kernel in its tangents); a Hessian-vector product
  (forward over reverse) goes through the sequential rules too."""
  cell = GRUConfig(I, 4, variant="reset_before")
  params = cell.init(jax.random.key(5), "pytorch")
  steps = 8
  xs, h0, w_ys, _, lengths, resets = data(steps, 3, 4, seed=8)
  tangent = jax.tree.map(jnp.ones_like, params)

  def derivatives(options):  # one program each: compiling dominates
    f = lambda p, x: run(cell, p, x, h0, lengths, resets, options=options)
    loss = lambda p: jnp.sum(f(p, xs)[0] * w_ys)
    return jax.jit(lambda p, x: (jax.jvp(f, (p, x), (tangent, x)),
                                 jax.jvp(jax.grad(loss), (p,), (tangent,))[1]))(params, xs)

  (jvp, hvp), (jvp_seq, hvp_seq) = derivatives(FUSED), derivatives(ScanOptions())
  assert_close(jvp, jvp_seq, _tol(steps))
  assert_close(hvp, hvp_seq, _tol(steps, 10))


def test_kernel_runs_where_asked_and_warns_once(monkeypatch):
  """On the CPU the kernel runs interpreted (a pallas_call in the program), with one warning per
  process; on a GPU compiled, without it. The sequential loop has none."""
  monkeypatch.setattr(_fused, "_warned", set())
  cell = GRUConfig(I, 4)
  params = cell.init(jax.random.key(6), "pytorch")
  xs = jnp.zeros((5, 2, I), jnp.float32)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = str(jax.make_jaxpr(lambda p: run(cell, p, xs, None))(params))
    jax.make_jaxpr(lambda p: run(cell, p, xs, None))(params)
  assert "pallas_call" in text
  interpret = [w for w in caught if "interpret mode" in str(w.message)]
  on_cpu = jax.default_backend() == "cpu"
  assert len(interpret) == (1 if on_cpu else 0), [str(w.message) for w in caught]
  assert ("interpret=True" in text) == on_cpu
  sequential = str(jax.make_jaxpr(lambda p: run(cell, p, xs, None, options=ScanOptions()))(params))
  assert "pallas_call" not in sequential


def test_limits_and_fallback(monkeypatch):
  """The on-chip bound (H <= 64 with float32 products, H <= 128 with bfloat16, on a GPU), the
  TPU, and an activation not known to be elementwise: outside the limits the sequential loop
  runs (same values), with a warning that says why, never an error."""
  gpu = lambda cell: _fused.fused_limit(cell, 100, "gpu")
  assert gpu(GRUConfig(I, 64)) is None and gpu(GRUConfig(I, 33)) is None
  assert "hidden size 65" in gpu(GRUConfig(I, 65))
  assert gpu(GRUConfig(I, 128, dtype=jnp.bfloat16)) is None
  assert "hidden size 129" in gpu(GRUConfig(I, 129, dtype=jnp.bfloat16))
  assert "TPU" in _fused.fused_limit(GRUConfig(I, 8), 100, "tpu")
  softmax = lambda x: jax.nn.softmax(x, axis=-1)
  assert "elementwise" in gpu(GRUConfig(I, 8, activation=softmax))
  assert "erfc" in gpu(GRUConfig(I, 8, recurrent_activation="gelu"))

  monkeypatch.setattr(_fused, "_warned", set())
  cell = GRUConfig(I, 65)
  params = cell.init(jax.random.key(7), "pytorch")
  xs = jax.random.normal(jax.random.key(8), (4, 2, I))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jaxpr = str(jax.make_jaxpr(lambda p: run(cell, p, xs, None))(params))
  assert "pallas_call" not in jaxpr
  assert any("runs the sequential loop instead" in str(w.message) for w in caught)
  assert_close(jax.jit(lambda p: run(cell, p, xs, None))(params),
               jax.jit(lambda p: run(cell, p, xs, None, options=ScanOptions()))(params),
               _tol(4))


def test_default_never_picks_fused_without_a_measurement():
  """method=None picks the fused kernel only where the tuning table holds a measured bound
  (``fused_macs``); while none is committed, every backend keeps the sequential loop."""
  shapes = [(256, 16, 32), (64, 128, 256), (16, 1024, 64), (128, 256, 512), (1, 5, 1)]
  for backend, table in _TUNED.items():
    assert "fused_macs" in table
    if table["fused_macs"] is not None:
      continue
    for batch, steps, hidden in shapes:
      opts = ScanOptions().resolved(steps, batch, hidden, backend=backend.split("_")[0])
      assert opts.method == "sequential", (backend, batch, steps, hidden)
  assert ScanOptions(method="fused").resolved(10, 4, 8).method == "fused"
  # The GPU's table has no measurement yet: docs/fused.md names the command that makes one.
  assert _TUNED["gpu"]["fused_macs"] is None


@pytest.mark.parametrize("variant,dtype,act", [
    ("reset_after", None, ("tanh", "sigmoid")),
    ("reset_before", jnp.bfloat16, ("elu", "hard_sigmoid")),
])
def test_kernels_lower_for_gpu(variant, dtype, act):
  """Without a GPU, the forward and backward kernels still lower to Triton for CUDA (jax 0.10):
  every shape they load and store is a power of two, every operation has a Triton lowering.
  (Every activation but gelu lowered so, checked once by hand.) Newer JAX needs a GPU (or an
  abstract one) to lower for it: skipped there."""
  cell = GRUConfig(I, 64, variant=variant, dtype=dtype, activation=act[0],
                   recurrent_activation=act[1])
  params = cell.init(jax.random.key(9), "pytorch")
  steps, batch = 10, 5
  seq = _Static(cell, True, 1, True, "none", False, True)
  fs = _fused._Fused(cell, True, _fused.padded_hidden(64), _fused.BLOCK_BATCH, False, seq)
  lengths = jnp.full((batch,), steps, jnp.int32)
  resets = jnp.zeros((steps, batch), jnp.bool_)

  def loss(p, x, h):
    ys, h_last = _fused.fused_layer(fs, p, x, h, lengths, resets)
    return jnp.sum(ys) + jnp.sum(h_last)

  args = (params, jnp.zeros((steps, batch, I)), jnp.zeros((batch, 64)))
  try:
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  except RuntimeError as e:
    if "No supported GPU devices" in str(e):
      pytest.skip(f"jax {jax.__version__} lowers Pallas for a GPU only with one: {e}")
    raise
  # The forward kernel and the backward one, each a Triton call.
  assert text.count("triton") >= 2, text[:2000]
  assert jaxgru.__version__
