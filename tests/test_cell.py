"""Tests for jaxgru.cell: GRUConfig's values against an independent NumPy reference."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxgru
from jaxgru import GRUConfig
import tolerance

I, H, T, B = 3, 5, 6, 4
VARIANTS = ("reset_after", "reset_before")


# -- an independent reference, written from the GRU formulas in float64 NumPy ---------------------

def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

NP_ACTIVATIONS = {
    "tanh": np.tanh,
    "sigmoid": _np_sigmoid,
    # Keras 3: 0 for x <= -3, 1 for x >= 3, x / 6 + 1/2 between (keras.activations.hard_sigmoid).
    "hard_sigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "relu": lambda x: np.maximum(x, 0.0),
    # Keras's gelu is the exact one, x * Phi(x), not the tanh approximation.
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "selu": lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(np.minimum(x, 0.0))),
    "silu": lambda x: x * _np_sigmoid(x),
    "swish": lambda x: x * _np_sigmoid(x),
    "linear": lambda x: x,
}


def scaled_tanh(x):
  """A custom activation (LeCun's), to check that any callable works."""
  return 1.7159 * jnp.tanh(2.0 / 3.0 * x)


def np_scaled_tanh(x):
  return 1.7159 * np.tanh(2.0 / 3.0 * x)


def np_step(params, h, x, variant="reset_after", act=np.tanh, ract=_np_sigmoid):
  """One GRU step in float64 NumPy, gate by gate, with no fused matrices."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h, x = np.asarray(h, np.float64), np.asarray(x, np.float64)
  size = h.shape[-1]
  zeros = np.zeros(3 * size)
  b_x, b_h = p.get("b_x", zeros), p.get("b_h", zeros)
  blocks = {g: slice(k * size, (k + 1) * size) for k, g in enumerate("zrn")}  # z | r | n
  wx = {g: p["w_x"][:, s] for g, s in blocks.items()}
  wh = {g: p["w_h"][:, s] for g, s in blocks.items()}
  bx = {g: b_x[s] for g, s in blocks.items()}
  bh = {g: b_h[s] for g, s in blocks.items()}
  z = ract(x @ wx["z"] + bx["z"] + h @ wh["z"] + bh["z"])
  r = ract(x @ wx["r"] + bx["r"] + h @ wh["r"] + bh["r"])
  if variant == "reset_after":
    n = act(x @ wx["n"] + bx["n"] + r * (h @ wh["n"] + bh["n"]))
  else:
    n = act(x @ wx["n"] + bx["n"] + (r * h) @ wh["n"])
  return (1.0 - z) * n + z * h


def np_sequence(params, xs, h0, **kwargs):
  h, ys = np.asarray(h0, np.float64), []
  for x in xs:
    h = np_step(params, h, x, **kwargs)
    ys.append(h)
  return np.stack(ys), h


# -- helpers --------------------------------------------------------------------------------------

def random_params(cfg, seed=0, scale=0.5, dtype=np.float32):
  """Random parameters of every shape (non-zero biases, unlike the Keras initializer)."""
  rng = np.random.default_rng(seed)
  return {n: jnp.asarray(rng.normal(scale=scale, size=s).astype(dtype))
          for n, s in cfg.param_shapes().items()}


def randn(*shape, seed=1, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def assert_close(actual, expected, steps=T, dtype=None, terms=tolerance.gru_terms(I, H)):
  """Values of ``steps`` GRU steps against another computation of them, to the rounding of
  ``dtype`` (the products'; None: the arrays') over ``terms`` terms a step (tests/tolerance.py)."""
  tolerance.assert_close(actual, expected, steps=steps, terms=terms, dtype=dtype)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def seq(cfg, params, xs, h0=None, length=None, reverse=False, unroll=1):
  """GRUConfig.sequence, jitted with the config static: one compilation per shape and config
  (eager lax.scan traces and compiles again at every call)."""
  return cfg.sequence(params, xs, h0, length, reverse, unroll)


def init(cfg, key, initializer="keras"):
  # Eager on purpose: eager random ops are compiled once per shape for the whole session, while a
  # jitted init compiles its random bits again for every configuration.
  return cfg.init(key, initializer)


def python_loop(cfg, params, xs, h0, length=None, reverse=False):
  """A sequence as a plain Python loop over GRUConfig.step."""
  steps = xs.shape[0] if length is None else int(length)
  order = range(steps - 1, -1, -1) if reverse else range(steps)
  h, ys = h0, [jnp.zeros_like(h0)] * xs.shape[0]
  for t in order:
    h = cfg.step(params, h, xs[t])
    ys[t] = h
  return jnp.stack(ys), h


# -- the step against the reference --------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_step_matches_numpy_reference(variant, use_bias):
  cfg = GRUConfig(I, H, variant=variant, use_bias=use_bias)
  params = random_params(cfg)
  h, x = randn(H, seed=1), randn(I, seed=2)
  out = cfg.step(params, h, x)
  assert out.shape == (H,) and out.dtype == jnp.float32
  assert_close(out, np_step(params, h, x, variant), steps=1)


def test_variants_differ():
  # Guards the reference and the switch: with no recurrent bias, the two variants still differ
  # (the reset gate applies before or after the recurrent product).
  params = random_params(GRUConfig(I, H, variant="reset_before"))
  h, x = randn(H, seed=1), randn(I, seed=2)
  before = GRUConfig(I, H, variant="reset_before").step(params, h, x)
  after = GRUConfig(I, H).step({**params, "b_h": jnp.zeros(3 * H)}, h, x)
  assert np.max(np.abs(before - after)) > 1e-3


def test_activations_table_has_a_reference_for_every_name():
  assert set(jaxgru.ACTIVATIONS) == set(NP_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
def test_activation_function_matches_numpy(name):
  # Includes the kinks of relu and hard_sigmoid (0, -3, 3) and both sides of them.
  x = np.array([-6.0, -3.0, -2.9, -1.0, -1e-3, 0.0, 1e-3, 0.5, 2.9, 3.0, 6.0], np.float32)
  # One elementwise function: a few roundings (XLA's exp and tanh approximations: ~2 ulps).
  assert_close(jaxgru.ACTIVATIONS[name](jnp.asarray(x)), NP_ACTIVATIONS[name](x.astype(np.float64)),
               steps=1, terms=4)


def test_hard_sigmoid_is_keras3s():
  # Keras 3: relu6(x + 3) / 6 (Keras 2 used 0.2 * x + 0.5, which differs at x = 1).
  x = jnp.array([-4.0, -3.0, -1.5, 0.0, 1.0, 1.5, 3.0, 4.0])
  np.testing.assert_allclose(jaxgru.hard_sigmoid(x),
                             [0.0, 0.0, 0.25, 0.5, 2.0 / 3.0, 0.75, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(NP_ACTIVATIONS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_with_each_activation(name, variant):
  x, h = randn(I, seed=2), randn(H, seed=1)
  # As the candidate activation, then as the gate activation.
  for kw, ref in (({"activation": name}, {"act": NP_ACTIVATIONS[name]}),
                  ({"recurrent_activation": name}, {"ract": NP_ACTIVATIONS[name]})):
    cfg = GRUConfig(I, H, variant=variant, **kw)
    params = random_params(cfg)
    assert_close(cfg.step(params, h, x), np_step(params, h, x, variant, **ref), steps=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_with_custom_callables(variant):
  cfg = GRUConfig(I, H, variant=variant, activation=scaled_tanh, recurrent_activation=jnp.tanh)
  params = random_params(cfg)
  h, x = randn(H, seed=1), randn(I, seed=2)
  assert_close(cfg.step(params, h, x),
               np_step(params, h, x, variant, act=np_scaled_tanh, ract=np.tanh), steps=1)


# -- sequences: lax.scan against a Python loop, jit, vmap, unroll ---------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [None, 4, 0])
def test_sequence_matches_python_loop_over_step(variant, reverse, length):
  cfg = GRUConfig(I, H, variant=variant)
  params = random_params(cfg)
  xs, h0 = randn(T, I, seed=3), randn(H, seed=4)
  ys, h_last = seq(cfg, params, xs, h0,
                            None if length is None else jnp.asarray(length), reverse)
  ys_ref, h_ref = python_loop(cfg, params, xs, h0, length, reverse)
  assert ys.shape == (T, H) and h_last.shape == (H,)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_matches_numpy_reference(variant):
  cfg = GRUConfig(I, H, variant=variant)
  params = random_params(cfg)
  xs, h0 = randn(T, I, seed=3), randn(H, seed=4)
  ys, h_last = seq(cfg, params, xs, h0)
  ys_ref, h_ref = np_sequence(params, xs, h0, variant=variant)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


def test_sequence_default_h0_is_zeros():
  cfg = GRUConfig(I, H)
  params = random_params(cfg)
  xs = randn(T, I, seed=3)
  ys, h_last = seq(cfg, params, xs)
  ys0, h0_last = seq(cfg, params, xs, jnp.zeros(H))
  np.testing.assert_array_equal(ys, ys0)
  np.testing.assert_array_equal(h_last, h0_last)


def test_jit_equals_eager():
  cfg = GRUConfig(I, H)
  params = random_params(cfg)
  xs, h0 = randn(T, I, seed=3), randn(H, seed=4)
  eager = cfg.sequence(params, xs, h0, jnp.asarray(5), True)
  jitted = jax.jit(cfg.sequence, static_argnums=(4,))(params, xs, h0, jnp.asarray(5), True)
  for e, j in zip(eager, jitted):
    assert_close(j, e)
  assert_close(jax.jit(cfg.step)(params, h0, xs[0]), cfg.step(params, h0, xs[0]), steps=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_equals_loop_over_examples(variant):
  cfg = GRUConfig(I, H, variant=variant)
  params = random_params(cfg)
  xs, h0 = randn(B, T, I, seed=3), randn(B, H, seed=4)
  lengths = jnp.array([T, 3, 0, 1])
  ys, h_last = jax.vmap(cfg.sequence, in_axes=(None, 0, 0, 0))(params, xs, h0, lengths)
  steps = jax.vmap(cfg.step, in_axes=(None, 0, 0))(params, h0, xs[:, 0])
  for b in range(B):
    ys_b, h_b = seq(cfg, params, xs[b], h0[b], lengths[b])
    assert_close(ys[b], ys_b)
    assert_close(h_last[b], h_b)
    assert_close(steps[b], cfg.step(params, h0[b], xs[b, 0]), steps=1)


@pytest.mark.parametrize("unroll, length, reverse", [(3, T - 1, True), (T, None, False)])
def test_unroll_equals_no_unroll(unroll, length, reverse):
  cfg = GRUConfig(I, H)
  params = random_params(cfg)
  xs, h0 = randn(T, I, seed=3), randn(H, seed=4)
  length = None if length is None else jnp.asarray(length)
  ys1, h1 = seq(cfg, params, xs, h0, length, reverse, unroll=1)
  ysu, hu = seq(cfg, params, xs, h0, length, reverse, unroll=unroll)
  assert_close(ysu, ys1)
  assert_close(hu, h1)


# -- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, length, reverse", [
    ("reset_after", None, False),
    ("reset_before", 3, True),  # the masked path (a valid length), backwards
])
def test_gradients_of_sequence(variant, length, reverse):
  # Reverse-mode derivatives wrt params, inputs and h0 against finite differences, which need
  # float64; jit compiles the many evaluations once.
  with jax.enable_x64(True):
    cfg = GRUConfig(2, 3, variant=variant)
    params = random_params(cfg, dtype=np.float64)
    xs, h0 = randn(4, 2, seed=3, dtype=np.float64), randn(3, seed=4, dtype=np.float64)
    length = None if length is None else jnp.asarray(length)
    check_grads(jax.jit(lambda p, x, h: cfg.sequence(p, x, h, length, reverse)),
                (params, xs, h0), order=1, modes=("rev",))


# -- initializers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_keras_initializer(variant):
  cfg = GRUConfig(4, 6, variant=variant)
  params = init(cfg, jax.random.key(0))  # "keras" is the default
  assert set(params) == set(cfg.param_shapes())
  for n, s in cfg.param_shapes().items():
    assert params[n].shape == s and params[n].dtype == jnp.float32
  # Glorot uniform over the fused (I, 3H) kernel, as Keras: limit sqrt(6 / (fan_in + fan_out)).
  limit = math.sqrt(6.0 / (4 + 3 * 6))
  w_x = np.asarray(params["w_x"])
  assert np.all(np.abs(w_x) <= limit) and np.max(np.abs(w_x)) > 0.5 * limit
  # Orthogonal (H, 3H) recurrent kernel: its rows are orthonormal.
  w_h = np.asarray(params["w_h"], np.float64)
  np.testing.assert_allclose(w_h @ w_h.T, np.eye(6), atol=1e-5)
  for n in ("b_x", "b_h"):
    if n in params:
      np.testing.assert_array_equal(params[n], 0.0)
  assert ("b_h" in params) == (variant == "reset_after")


def test_pytorch_initializer():
  cfg = GRUConfig(4, 6)
  params = init(cfg, jax.random.key(0), "pytorch")
  bound = 1.0 / math.sqrt(6)
  for n, s in cfg.param_shapes().items():
    p = np.asarray(params[n])
    assert p.shape == s and p.dtype == np.float32
    assert np.all(np.abs(p) <= bound), n
    assert np.max(np.abs(p)) > 0.5 * bound, n  # spread over the range, biases included


def test_init_depends_only_on_the_key():
  cfg = GRUConfig(4, 6)  # the shapes of the initializer tests, to reuse their compilations
  a, b = init(cfg, jax.random.key(0)), init(cfg, jax.random.key(0))
  c = init(cfg, jax.random.key(1))
  for n in ("w_x", "w_h"):
    np.testing.assert_array_equal(a[n], b[n])
    assert not np.allclose(a[n], c[n])


# -- dtypes ---------------------------------------------------------------------------------------

def test_float32_by_default():
  cfg = GRUConfig(I, H)
  assert cfg.state_dtype == np.float32 and cfg.compute_dtype == np.float32
  ys, h_last = seq(cfg, random_params(cfg), randn(T, I))
  assert ys.dtype == jnp.float32 and h_last.dtype == jnp.float32


@pytest.mark.parametrize("variant, dtype", [
    ("reset_after", jnp.bfloat16), ("reset_before", jnp.bfloat16), ("reset_after", jnp.float16)])
def test_half_precision_compute_with_float32_params(variant, dtype):
  cfg32 = GRUConfig(I, H, variant=variant)
  cfg16 = GRUConfig(I, H, variant=variant, dtype=dtype)
  # (4, 6): the shapes of the initializer tests, whose compilations this reuses.
  fresh = init(GRUConfig(4, 6, variant=variant, dtype=dtype), jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in fresh.values())  # the dtype is for products only
  params = random_params(cfg16)
  xs, h0 = randn(T, I, seed=3), randn(H, seed=4)
  ys16, h16 = seq(cfg16, params, xs, h0)
  ys32, h32 = seq(cfg32, params, xs, h0)
  assert ys16.dtype == jnp.float32 and h16.dtype == jnp.float32  # the state stays float32
  # Each product's factors rounded to dtype, the sum in float32: an error of eps (dtype's) per
  # product, not growing with the number summed (terms=1), carried over T steps.
  assert_close(ys16, ys32, dtype=dtype, terms=1)
  assert np.max(np.abs(ys16 - ys32)) > 0  # half-precision products really happened
  # half-precision inputs are accepted too, and the gradients stay float32.
  ys16b, _ = seq(cfg16, params, xs.astype(dtype), h0)
  assert ys16b.dtype == jnp.float32
  assert_close(ys16b, ys32, dtype=dtype, terms=1)
  if variant == "reset_after":
    grads = jax.jit(jax.grad(lambda p: jnp.sum(cfg16.sequence(p, xs, h0)[0])))(params)
    assert all(g.dtype == jnp.float32 for g in grads.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_float64_under_x64(variant):
  with jax.enable_x64(True):
    cfg = GRUConfig(I, H, variant=variant)
    assert cfg.state_dtype == np.float64
    if variant == "reset_after":
      assert all(p.dtype == jnp.float64 for p in init(cfg, jax.random.key(0)).values())
    params = random_params(cfg, dtype=np.float64)
    xs, h0 = randn(T, I, seed=3, dtype=np.float64), randn(H, seed=4, dtype=np.float64)
    ys, h_last = seq(cfg, params, xs, h0)
    assert ys.dtype == jnp.float64 and h_last.dtype == jnp.float64
    ys_ref, h_ref = np_sequence(params, xs, h0, variant=variant)
    assert_close(ys, ys_ref)
    assert_close(h_last, h_ref)


@pytest.mark.parametrize("field", ["param_dtype", "dtype"])
def test_64_bit_dtypes_need_x64(field):
  # Outside x64 mode JAX would make float64 arrays float32 with only a warning; the config says
  # so instead, when it is used (so a config made before x64 is turned on still works).
  assert not jax.config.jax_enable_x64
  cfg = GRUConfig(I, H, **{field: "float64"})
  with pytest.raises(ValueError, match=f"^{field}=float64 needs JAX's x64 mode"):
    init(cfg, jax.random.key(0)) if field == "param_dtype" else cfg.compute_dtype
  with jax.enable_x64(True):
    assert cfg.compute_dtype == np.float64


def test_bfloat16_params():
  # Both initializers work in bfloat16 (LAPACK's QR behind "orthogonal" has no bfloat16 kernel),
  # and the state then is bfloat16 too.
  cfg = GRUConfig(I, H, param_dtype=jnp.bfloat16)
  assert cfg.state_dtype == jnp.bfloat16 and cfg.compute_dtype == jnp.bfloat16
  params = init(cfg, jax.random.key(0))  # the "keras" initializer
  assert all(p.dtype == jnp.bfloat16 for p in params.values())
  w_h = np.asarray(params["w_h"], np.float64)
  np.testing.assert_allclose(w_h @ w_h.T, np.eye(H), atol=3e-2)
  ys, h_last = seq(cfg, params, randn(T, I))
  assert ys.dtype == jnp.bfloat16 and h_last.dtype == jnp.bfloat16
  ys_ref, _ = np_sequence(params, randn(T, I), np.zeros(H))
  assert_close(ys, ys_ref, dtype=jnp.bfloat16)


# -- biases at the first step from a zero state ---------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_state_first_step_applies_every_bias(variant):
  cfg = GRUConfig(I, H, variant=variant)
  params = {n: (v if n.startswith("b_") else jnp.zeros_like(v))
            for n, v in random_params(cfg, scale=1.0).items()}
  xs = randn(T, I, seed=3)
  ys, _ = seq(cfg, params, xs)
  bx = np.split(np.asarray(params["b_x"], np.float64), 3)
  bh = (np.split(np.asarray(params["b_h"], np.float64), 3) if variant == "reset_after"
        else [np.zeros(H)] * 3)
  z, r = _np_sigmoid(bx[0] + bh[0]), _np_sigmoid(bx[1] + bh[1])
  n = np.tanh(bx[2] + r * bh[2])
  assert_close(ys[0], (1.0 - z) * n, steps=1)
  assert_close(cfg.step(params, jnp.zeros(H), xs[0]), (1.0 - z) * n, steps=1)
  if variant == "reset_after":
    # Even though h = 0, the recurrent bias reaches the output: through z, r and n.
    for block in range(3):
      shifted = dict(params)
      shifted["b_h"] = params["b_h"].at[block * H:(block + 1) * H].add(1.0)
      assert np.min(np.abs(seq(cfg, shifted, xs)[0][0] - ys[0])) > 1e-4, block


# -- compilation ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _run_sequence(cfg, params, xs, h0):
  return cfg.sequence(params, xs, h0)


def test_second_call_does_not_recompile():
  # A fresh but equal config is the same static argument: one compilation for both calls.
  cfg_a, cfg_b = GRUConfig(I, H), GRUConfig(I, H)
  assert cfg_a == cfg_b and hash(cfg_a) == hash(cfg_b)
  before = _run_sequence._cache_size()
  _run_sequence(cfg_a, random_params(cfg_a, seed=0), randn(T, I, seed=1), randn(H, seed=2))
  _run_sequence(cfg_b, random_params(cfg_b, seed=5), randn(T, I, seed=6), randn(H, seed=7))
  assert _run_sequence._cache_size() == before + 1
