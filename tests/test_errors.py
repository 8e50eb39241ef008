"""Bad input raises ValueError naming both what was expected and what was given."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
import jaxgru.linen
import reference as plain
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, RNNConfig

I, H, T, B = 3, 4, 6, 2


def raises(*parts):
  """pytest.raises(ValueError) whose message contains every part, in order, literally."""
  return pytest.raises(ValueError, match=".*".join(re.escape(p) for p in parts))


def zeros_params(cfg):
  return {n: np.zeros(s, np.float32) for n, s in cfg.param_shapes().items()}


def zeros_stack(cfg):
  return [{d: zeros_params(cfg.layer_cell(l)) for d in cfg.directions} for l in range(cfg.num_layers)]


# -- configurations -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, parts", [
    ({"variant": "reset_middle"}, ("variant", "reset_after", "reset_before", "'reset_middle'")),
    ({"activation": "tanhh"}, ("unknown activation 'tanhh'", "'tanh'")),
    ({"recurrent_activation": "hardsigmoid"},
     ("unknown activation 'hardsigmoid'", "'hard_sigmoid'")),
    ({"activation": 3}, ("unknown activation 3", "or a callable")),
    ({"hidden_size": 0}, ("hidden_size must be a positive integer", "got 0")),
    ({"input_size": 2.5}, ("input_size must be a positive integer", "got 2.5")),
    ({"dtype": jnp.int32}, ("dtype must be a floating dtype", "int32")),
    ({"param_dtype": "not-a-dtype"}, ("param_dtype must be a floating dtype", "'not-a-dtype'")),
])
def test_bad_cell_config(kwargs, parts):
  args = {"input_size": I, "hidden_size": H, **kwargs}
  with raises(*parts):
    GRUConfig(**args)
  with raises(*parts):  # the Flax module builds the same config, so it reports the same way
    jaxgru.linen.GRU(**{k: v for k, v in args.items() if k != "input_size"}).config(
        args["input_size"])


@pytest.mark.parametrize("kwargs, parts", [
    ({"merge": "mean"}, ("merge must be one of", "'concat'", "'sum'", "got 'mean'")),
    ({"dropout": 1.0}, ("dropout must lie in [0, 1)", "got 1.0")),
    ({"dropout": -0.1}, ("dropout must lie in [0, 1)", "got -0.1")),
    ({"num_layers": 0}, ("num_layers must be a positive integer", "got 0")),
])
def test_bad_rnn_config(kwargs, parts):
  with raises(*parts):
    RNNConfig(GRUConfig(I, H), **kwargs)


def test_rnn_config_needs_a_cell():
  with raises("cell must be a jaxgru.GRUConfig", "got int"):
    RNNConfig(I, H)


def test_unknown_initializer():
  with raises("initializer must be one of", "'keras'", "'pytorch'", "got 'glorot'"):
    GRUConfig(I, H).init(np.zeros(2, np.uint32), "glorot")


# -- the cell's inputs ----------------------------------------------------------------------------

def test_step_wrong_shapes():
  cfg = GRUConfig(I, H)
  params = zeros_params(cfg)
  with raises("GRU step x", "expected shape (input_size=3,)", "got (4,)"):
    cfg.step(params, jnp.zeros(H), jnp.zeros(I + 1))
  with raises("GRU step x", "expected shape (input_size=3,)", "got (2, 3)"):  # a batch: vmap it
    cfg.step(params, jnp.zeros(H), jnp.zeros((B, I)))
  with raises("GRU step h", "expected shape (hidden_size=4,)", "got (5,)"):
    cfg.step(params, jnp.zeros(H + 1), jnp.zeros(I))


def test_sequence_wrong_shapes():
  cfg = GRUConfig(I, H)
  params = zeros_params(cfg)
  with raises("GRU sequence xs", "expected shape (T, input_size=3)", "got (6, 4)"):
    cfg.sequence(params, jnp.zeros((T, I + 1)))
  with raises("GRU sequence xs", "expected shape (T, input_size=3)", "got (2, 6, 3)"):
    cfg.sequence(params, jnp.zeros((B, T, I)))
  with raises("GRU sequence xs", "expected shape (T, input_size=3)", "got (3,)"):
    cfg.sequence(params, jnp.zeros(I))
  with raises("GRU sequence h0", "expected shape (hidden_size=4,)", "got (2, 4)"):
    cfg.sequence(params, jnp.zeros((T, I)), jnp.zeros((B, H)))
  with raises("GRU sequence length", "expected shape () (a scalar)", "got (1,)"):
    cfg.sequence(params, jnp.zeros((T, I)), None, jnp.array([3]))


def test_step_and_sequence_check_params():
  # A bare cell checks its weights too (before, a wrong one gave JAX's matmul error).
  cfg = GRUConfig(I, H)
  params = zeros_params(cfg)
  wrong = {**params, "w_h": np.zeros((H + 1, 3 * H))}
  with raises("GRU params['w_h']", "expected shape (4, 12)", "got (5, 12)"):
    cfg.step(wrong, jnp.zeros(H), jnp.zeros(I))
  with raises("GRU params['w_h']", "expected shape (4, 12)", "got (5, 12)"):
    cfg.sequence(wrong, jnp.zeros((T, I)))
  with raises("GRU params", "expected keys"):
    cfg.sequence({k: v for k, v in params.items() if k != "b_x"}, jnp.zeros((T, I)))
  # Inside vmap over models each model's weights have the per-model shape, so this still runs,
  # and a read-only mapping (such as Flax's FrozenDict) is accepted like a dict: below and above
  # 64 steps, where the loop's derivative rules take over, and differentiated.
  stacked = jax.tree.map(lambda p: jnp.stack([p, p + 1.0]), params)
  for steps in (T, 70):
    xs = jnp.ones((steps, I))
    run = lambda p, wrap: cfg.sequence(wrap(p), xs)[0]
    for wrap in (types.MappingProxyType, dict):  # the mapping, then the dict it stands for
      ys = jax.jit(jax.vmap(lambda p: run(p, wrap)))(stacked)
      grads = jax.jit(jax.grad(lambda p: jnp.sum(run(p, wrap))))(params)
      if wrap is dict:
        assert_close(got, (ys, grads), steps=steps, terms=gru_terms(I, H, 2))
      got = ys, grads


@pytest.mark.parametrize("length, parts", [
    (7, ("lengths must lie in [0, T=6]", "got values in [7, 7]")),
    (-1, ("lengths must lie in [0, T=6]", "got values in [-1, -1]")),
    (2.0, ("lengths must be signed integers", "got dtype float")),
    (np.uint32(3), ("lengths must be signed integers", "got dtype uint32")),
])
def test_sequence_bad_length(length, parts):
  cfg = GRUConfig(I, H)
  with raises(*parts):
    cfg.sequence(zeros_params(cfg), jnp.zeros((T, I)), None, np.asarray(length))


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.uint8, jnp.float32])
def test_lengths_dtype_refused_under_jit(dtype):
  # The dtype is static, so jit refuses it at trace time; before, uint32 lengths above 2**31 acted
  # as 0 and float lengths were truncated, silently.
  cfg = RNNConfig(GRUConfig(I, H))
  params = zeros_stack(cfg)
  run = jax.jit(lambda lengths: cfg.apply(params, jnp.zeros((2, T, I)), lengths)[0])
  with raises("lengths must be signed integers", f"got dtype {np.dtype(dtype)}"):
    run(jnp.array([3, 2**31 + 5 if dtype == jnp.uint32 else 2], dtype))
  seq = jax.jit(lambda n: cfg.cell.sequence(params[0]["fwd"], jnp.zeros((T, I)), None, n))
  with raises("lengths must be signed integers"):
    seq(jnp.asarray(3, dtype))


def test_check_params():
  cfg = GRUConfig(I, H)
  params = zeros_params(cfg)
  with raises("GRU params", "expected keys ['b_h', 'b_x', 'w_h', 'w_x']", "got ['b_x', 'w_h',"):
    cfg.check_params({k: v for k, v in params.items() if k != "b_h"})
  with raises("GRU params['w_x']", "expected shape (3, 12)", "got (4, 12)"):
    cfg.check_params({**params, "w_x": np.zeros((I + 1, 3 * H))})
  with raises("GRU params['b_h']", "expected shape (12,)", "got (2, 12)"):
    cfg.check_params({**params, "b_h": np.zeros((2, 3 * H))})
  no_bias = GRUConfig(I, H, variant="reset_before", use_bias=False)
  with raises("expected keys ['w_h', 'w_x']", "got ['b_h', 'b_x', 'w_h', 'w_x']"):
    no_bias.check_params(params)


# -- the stack's inputs ---------------------------------------------------------------------------

def test_apply_wrong_shapes():
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  params = zeros_stack(cfg)
  xs = jnp.zeros((B, T, I))
  with raises("RNN xs", "expected shape (B, T, input_size=3)", "got (2, 6, 5)"):
    cfg.apply(params, jnp.zeros((B, T, I + 2)))
  with raises("RNN xs", "expected shape (B, T, input_size=3)", "got (6, 3)"):  # no batch axis
    cfg.apply(params, jnp.zeros((T, I)))
  with raises("RNN lengths", "expected shape (B=2,)", "got (3,)"):
    cfg.apply(params, xs, jnp.array([T, T, T]))
  with raises("RNN lengths", "expected shape (B=2,)", "got ()"):
    cfg.apply(params, xs, jnp.array(T))
  with raises("lengths must lie in [0, T=6]", "got values in [2, 9]"):
    cfg.apply(params, xs, jnp.array([2, 9]))
  with raises("RNN h0", "expected shape (L*D=4, B=2, H=4)", "got (2, 2, 4)"):
    cfg.apply(params, xs, None, jnp.zeros((2, B, H)))


def test_scan_layer_wrong_inputs():
  # The one public loop checks what it is given, as the stack and the cell do (it used to fail
  # inside a matrix product or a broadcast, naming neither the argument nor the expected shape).
  cell = GRUConfig(I, H)
  params, xs = zeros_params(cell), jnp.zeros((T, B, I))
  with raises("scan_layer xs", "expected shape (T, B, input_size=3)", "got (6, 2, 5)"):
    jaxgru.scan_layer(cell, params, jnp.zeros((T, B, I + 2)))
  with raises("scan_layer xs", "expected shape (T, B, input_size=3)", "got (6, 3)"):
    jaxgru.scan_layer(cell, params, jnp.zeros((T, I)))
  with raises("scan_layer h0", "expected shape (B=2, hidden_size=4)", "got (3, 4)"):
    jaxgru.scan_layer(cell, params, xs, h0=jnp.zeros((3, H)))
  with raises("scan_layer lengths", "expected shape (B=2,)", "got (3,)"):
    jaxgru.scan_layer(cell, params, xs, jnp.array([1, 2, 3]))
  with raises("lengths must lie in [0, T=6]", "got values in [2, 9]"):
    jaxgru.scan_layer(cell, params, xs, jnp.array([2, 9]))
  with raises("lengths must be signed integers", "float32"):
    jaxgru.scan_layer(cell, params, xs, jnp.array([2.0, 3.0]))
  with raises("GRU params", "expected keys"):
    jaxgru.scan_layer(cell, {"w_x": params["w_x"]}, xs)


@pytest.mark.parametrize("where", ["scan_layer", "apply", "sequence", "step", "params"])
def test_complex_numbers_are_refused(where):
  # A cast to the GRU's real dtype would silently drop the imaginary part.
  cell = GRUConfig(I, H)
  params = zeros_params(cell)
  z = lambda *shape: jnp.zeros(shape, jnp.complex64)
  with raises("expected real numbers, got dtype complex64"):
    if where == "scan_layer":
      jaxgru.scan_layer(cell, params, z(T, B, I))
    elif where == "apply":
      RNNConfig(cell).apply([{"fwd": params}], z(B, T, I))
    elif where == "sequence":
      cell.sequence(params, jnp.zeros((T, I)), z(H))
    elif where == "step":
      cell.step(params, jnp.zeros(H), z(I))
    else:
      cell.step({**params, "w_h": z(H, 3 * H)}, jnp.zeros(H), jnp.zeros(I))


def test_nested_lists_are_inputs_like_arrays():
  # Nested lists (as NumPy takes them) used to pass the shape checks and then fail with
  # "'list' object has no attribute 'shape'" in scan_layer, RNNConfig.apply and the linen module.
  # They now run as the arrays they spell; the values are checked against the plain loop.
  cell = GRUConfig(I, H)
  rng = np.random.default_rng(0)
  params = {n: jnp.asarray(rng.normal(scale=0.5, size=s).astype(np.float32))
            for n, s in cell.param_shapes().items()}
  xs_BTI = rng.normal(size=(B, T, I)).astype(np.float32)
  h0_BH = rng.normal(size=(B, H)).astype(np.float32)
  want = [plain.sequence(cell, params, jnp.asarray(xs_BTI[b]), jnp.asarray(h0_BH[b]))
          for b in range(B)]
  want_ys = np.stack([w[0] for w in want])  # (B, T, H)
  want_h = np.stack([w[1] for w in want])
  close = lambda got, expected: assert_close(got, expected, steps=T, terms=gru_terms(I, H, B))

  ys, h = jaxgru.scan_layer(cell, params, np.swapaxes(xs_BTI, 0, 1).tolist(), h0=h0_BH.tolist())
  close(np.swapaxes(ys, 0, 1), want_ys)
  close(h, want_h)
  ys, h = RNNConfig(cell).apply([{"fwd": params}], xs_BTI.tolist(), [2, T], [h0_BH.tolist()])
  close(ys[1], want_ys[1])
  close(h[0, 1], want_h[1])
  ys, h = cell.sequence(params, xs_BTI[0].tolist(), h0_BH[0].tolist())
  close(ys, want_ys[0])
  close(cell.step(params, h0_BH[0].tolist(), xs_BTI[0, 0].tolist()), want_ys[0, 0])
  module = jaxgru.linen.GRU(hidden_size=H)
  variables = {"params": {"gru": [{"fwd": params}]}}
  ys, h = module.apply(variables, xs_BTI.tolist(), h0=[h0_BH.tolist()])
  close(ys, want_ys)
  # At 70 steps the CPU differentiates the loop by its custom rule: the gradient of a list
  # input's loss is the plain loop's.
  long_TBI = rng.normal(size=(70, B, I)).astype(np.float32)
  loss = lambda p, xs: jnp.sum(jaxgru.scan_layer(cell, p, xs)[0] ** 2)
  plain_loss = lambda p: sum(jnp.sum(plain.sequence(cell, p, jnp.asarray(long_TBI[:, b]))[0] ** 2)
                             for b in range(B))
  got, want = jax.grad(loss)(params, long_TBI.tolist()), jax.grad(plain_loss)(params)
  assert_close(got, want, steps=70, terms=gru_terms(I, H, B))


def test_linen_module_names_the_input_width_its_params_fix():
  # Flax's own check named the parameter's shapes ("the given initializer is expected to
  # generate shape (5, 12) ..."), not the input.
  module = jaxgru.linen.GRU(hidden_size=H)
  variables = module.init(jax.random.key(0), jnp.zeros((B, T, I)))
  with raises("RNN xs", "expected shape (B, T, input_size=3)", "got (2, 6, 5)"):
    module.apply(variables, jnp.zeros((B, T, I + 2)))
  with raises("linen GRU xs", "expected shape (B, T, input features)", "got (6, 3)"):
    module.apply(variables, jnp.zeros((T, I)))


@pytest.mark.parametrize("xs, parts", [
    ([[[0.0] * I] * T, [[0.0] * I] * (T - 1)], ("RNN xs", "got a ragged nested sequence")),
    ([[[1j] * I] * T] * B, ("RNN xs", "expected real numbers, got dtype complex64")),
    (np.full((B, T, I), "a"), ("RNN xs", "expected numbers, got ndarray of dtype <U1")),
    ("abc", ("RNN xs", "expected shape (B, T, input_size=3)", "got ()")),
])
def test_inputs_that_are_not_arrays_of_reals(xs, parts):
  cfg = RNNConfig(GRUConfig(I, H))
  with raises(*parts):
    cfg.apply(zeros_stack(cfg), xs)


def test_flags_must_be_bools():
  # A string flag used to act as its truth value: use_bias="no" made biases, reverse="no" and
  # hoist_projection="no" turned the option on, time_major="yes" read (B, T, I) as (T, B, I).
  with raises("use_bias must be True or False, got 'no'"):
    GRUConfig(I, H, use_bias="no")
  for name in ("hoist_projection", "custom_vjp", "diagonal_backward"):
    with raises(f"{name} must be True, False or None, got 'no'"):
      jaxgru.ScanOptions(**{name: "no"})
  cell = GRUConfig(I, H)
  with raises("scan_layer reverse must be True or False, got 'no'"):
    jaxgru.scan_layer(cell, zeros_params(cell), jnp.zeros((T, B, I)), reverse="no")
  with raises("scan_layer reverse must be True or False, got 1"):
    cell.sequence(zeros_params(cell), jnp.zeros((T, I)), reverse=1)
  cfg = RNNConfig(cell, num_layers=2, dropout=0.5)
  with raises("RNN time_major must be True or False, got 'yes'"):
    cfg.apply(zeros_stack(cfg), jnp.zeros((B, T, I)), time_major="yes")
  module = jaxgru.linen.GRU(hidden_size=H, num_layers=2, dropout=0.5)
  xs = jnp.zeros((B, T, I))
  variables = module.init(jax.random.key(0), xs)
  with raises("linen GRU deterministic must be True or False, got 'no'"):
    module.apply(variables, xs, deterministic="no", rngs={"dropout": jax.random.key(1)})
  # NumPy's bools are bools.
  GRUConfig(I, H, use_bias=np.bool_(False))


def test_dropout_key_must_be_a_key():
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, dropout=0.5)
  with pytest.raises(TypeError, match=r"RNN dropout_key: expected a PRNG key, such as "
                                      r"jax.random.key\(0\), got int"):
    cfg.apply(zeros_stack(cfg), jnp.zeros((B, T, I)), dropout_key=3)
  # Under jax.vmap, a batch of keys gives one key per call.
  keys = jax.random.split(jax.random.key(0), 2)
  ys = jax.vmap(lambda k: cfg.apply(zeros_stack(cfg), jnp.ones((B, T, I)), dropout_key=k)[0])(keys)
  assert ys.shape == (2, B, T, H)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_params_are_refused(dtype):
  # They used to run as the floats they cast to: weights truncated or made 0/1 without a word.
  cell = GRUConfig(I, H)
  params = {**zeros_params(cell), "w_h": jnp.zeros((H, 3 * H), dtype)}
  with raises("GRU params['w_h']",
              f"expected floating-point numbers, got dtype {jnp.dtype(dtype)}"):
    jaxgru.scan_layer(cell, params, jnp.zeros((T, B, I)))
  # Half-precision weights are floats: they run, promoted as JAX promotes them.
  rng = np.random.default_rng(0)
  params = {n: rng.normal(scale=0.5, size=v.shape).astype(np.float16)
            for n, v in zeros_params(cell).items()}
  xs = jnp.asarray(rng.normal(size=(T, B, I)).astype(np.float32))
  with jax.numpy_dtype_promotion("standard"):
    ys, _ = jaxgru.scan_layer(cell, params, xs)
  want, _ = jaxgru.scan_layer(cell, {n: v.astype(np.float32) for n, v in params.items()}, xs)
  assert_close(ys, want, steps=T, terms=gru_terms(I, H))


@pytest.mark.parametrize("key", [0, 1.5, None, jnp.zeros((2,), jnp.float32)])
def test_init_needs_a_prng_key(key):
  # JAX's own error for these named "key_data" and its attributes, not what init wanted.
  got = type(key).__name__
  with pytest.raises(TypeError, match=rf"GRU init key: expected a PRNG key, such as "
                                      rf"jax.random.key\(0\), got {got}"):
    GRUConfig(I, H).init(key)
  with pytest.raises(TypeError, match=r"RNN init key: expected a PRNG key"):
    RNNConfig(GRUConfig(I, H)).init(key)


def test_init_takes_both_kinds_of_key():
  typed = GRUConfig(I, H).init(jax.random.key(3))
  raw = GRUConfig(I, H).init(jax.random.PRNGKey(3))
  for name in typed:
    np.testing.assert_array_equal(typed[name], raw[name])


def test_options_must_be_scan_options():
  cfg = RNNConfig(GRUConfig(I, H))
  params = zeros_stack(cfg)
  xs = jnp.zeros((B, T, I))
  with pytest.raises(TypeError, match=r"RNN options: expected a jaxgru.ScanOptions .* got dict"):
    cfg.apply(params, xs, options={"unroll": 2})
  with pytest.raises(TypeError, match=r"scan_layer options: .* got tuple"):
    jaxgru.scan_layer(cfg.cell, params[0]["fwd"], jnp.zeros((T, B, I)), options=(2,))


def test_empty_batch_runs_past_the_custom_vjp_threshold():
  """B = 0 at T = 70: empty outputs and states, and zero (not NaN) gradients, with lengths and
  resets, in both directions; no error from splitting zero rows into chunks."""
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  params = cfg.init(jax.random.key(0))
  xs = jnp.zeros((0, 70, I))
  lengths, resets = jnp.zeros((0,), jnp.int32), jnp.zeros((0, 70), bool)
  ys, h_n = cfg.apply(params, xs, lengths, resets=resets)
  assert ys.shape == (0, 70, 2 * H) and h_n.shape == (4, 0, H)
  grads = jax.grad(lambda p: cfg.apply(p, xs, lengths, resets=resets)[0].sum())(params)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))


def test_apply_wrong_params():
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  params = zeros_stack(cfg)
  xs = jnp.zeros((B, T, I))
  with raises("expected a list of 2 layers", "got 1"):
    cfg.apply(params[:1], xs)
  with raises("RNN params[1]", "expected directions ['fwd', 'bwd']", "got ['fwd']"):
    cfg.apply([params[0], {"fwd": params[1]["fwd"]}], xs)
  # Layer 1 reads both directions of layer 0: its input size is 2H, not I.
  wrong = [params[0], {d: zeros_params(GRUConfig(I, H)) for d in ("fwd", "bwd")}]
  with raises("GRU params['w_x']", "expected shape (8, 12)", "got (3, 12)"):
    cfg.apply(wrong, xs)


# -- converters -----------------------------------------------------------------------------------

@pytest.fixture(name="torch_sd")
def _torch_sd():
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  return jaxgru.to_torch(cfg, zeros_stack(cfg))


@pytest.mark.parametrize("key, shape, parts", [
    ("weight_ih_l1", (3 * H, 2 * H + 1), ("weight_ih_l1", "expected shape (12, 8)", "got (12, 9)")),
    ("weight_hh_l0", (3 * H + 3, H), ("weight_hh_l0", "expected shape (12, 4)", "got (15, 4)")),
    ("weight_hh_l1_reverse", (3 * H, H - 1),
     ("weight_hh_l1_reverse", "expected shape (12, 4)", "got (12, 3)")),
    ("bias_hh_l0_reverse", (3 * H + 1,), ("bias_hh_l0_reverse", "expected shape (12,)", "got (13,)")),
    ("bias_ih_l1", (2, 3 * H), ("bias_ih_l1", "expected shape (12,)", "got (2, 12)")),
])
def test_from_torch_wrong_shapes(torch_sd, key, shape, parts):
  with raises(*parts):
    jaxgru.from_torch({**torch_sd, key: np.zeros(shape, np.float32)})


def test_from_torch_wrong_keys(torch_sd):
  missing = {k: v for k, v in torch_sd.items() if k != "bias_hh_l1_reverse"}
  with raises("expected ['bias_hh', 'bias_ih', 'weight_hh', 'weight_ih'] for l1_reverse",
              "got ['bias_ih', 'weight_hh', 'weight_ih']"):
    jaxgru.from_torch(missing)
  with raises("unexpected key 'weight_hr_l0'", "proj_size is not supported"):
    jaxgru.from_torch({**torch_sd, "weight_hr_l0": np.zeros((H, H), np.float32)})
  with raises("empty torch.nn.GRU state dict"):
    jaxgru.from_torch({})


@pytest.mark.parametrize("convert, wrong, message", [
    ("from_torch", None, "from_torch: expected a torch.nn.GRU or its state_dict(), got NoneType"),
    ("from_torch", [np.zeros((12, 3))], "from_torch: expected a torch.nn.GRU or its state_dict(), got list"),
    ("from_keras", None, "from_keras: expected a Keras GRU layer or its get_weights() list, got NoneType"),
    ("from_keras", {"kernel": 1}, "from_keras: expected a Keras GRU layer or its get_weights() list, got dict"),
    ("from_keras", "kernel", "from_keras: expected a Keras GRU layer or its get_weights() list, got str"),
])
def test_converters_name_the_wrong_kind_of_input(convert, wrong, message):
  with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
    getattr(jaxgru, convert)(wrong)


def test_from_flax_params_not_a_dict():
  with raises("Flax GRUCell params: expected a dict under 'params', got int"):
    jaxgru.from_flax({"params": 3})


def test_from_keras_layer_activation_not_a_name():
  class Layer:  # a Keras layer whose config holds a serialized (custom) activation
    def get_weights(self):
      return [np.zeros((I, 3 * H), np.float32), np.zeros((H, 3 * H), np.float32)]

    def get_config(self):
      return {"activation": {"class_name": "MyTanh"}, "recurrent_activation": "sigmoid"}

  with raises("from_keras: the layer's activation is {'class_name': 'MyTanh'}, not a name",
              "pass activation= explicitly"):
    jaxgru.from_keras(Layer())
  assert jaxgru.from_keras(Layer(), activation="tanh")[0].cell.activation == "tanh"


def test_to_torch_unsupported():
  params = zeros_stack(RNNConfig(GRUConfig(I, H), bidirectional=True))
  with raises("reset_after", "got variant='reset_before'"):
    cfg = RNNConfig(GRUConfig(I, H, variant="reset_before", use_bias=False))
    jaxgru.to_torch(cfg, zeros_stack(cfg))
  with raises("concatenates directions", "got merge='sum'"):
    jaxgru.to_torch(RNNConfig(GRUConfig(I, H), bidirectional=True, merge="sum"), params)
  with raises("activation='tanh' and recurrent_activation='sigmoid'", "got 'relu' and 'sigmoid'"):
    jaxgru.to_torch(RNNConfig(GRUConfig(I, H, activation="relu"), bidirectional=True), params)
  with raises("GRU params['w_h']", "expected shape (4, 12)", "got (5, 12)"):
    bad = [{d: {**p, "w_h": np.zeros((H + 1, 3 * H))} for d, p in params[0].items()}]
    jaxgru.to_torch(RNNConfig(GRUConfig(I, H), bidirectional=True), bad)


@pytest.mark.parametrize("name", ["to_torch", "to_keras", "to_flax", "to_flax_nnx"])
def test_to_converters_name_themselves(name):
  # to_flax_nnx said "to_flax takes ..." (and to_equinox "to_eqx.nn.grucell takes ...").
  with raises(f"{name} takes a jaxgru.RNNConfig", "got GRUConfig"):
    getattr(jaxgru, name)(GRUConfig(I, H), zeros_params(GRUConfig(I, H)))


def test_from_converters_refuse_integer_weights():
  # These were refused as 64-bit weights outside x64 mode, with advice to pass dtype='float32'.
  cfg = RNNConfig(GRUConfig(I, H))
  params = [{"fwd": {n: np.ones(s, np.float32) for n, s in cfg.cell.param_shapes().items()}}]
  state_dict = {k: np.asarray(v).astype(np.int64) for k, v in jaxgru.to_torch(cfg, params).items()}
  with raises("from_torch: expected floating-point weights, got int64"):
    jaxgru.from_torch(state_dict)
  flax = {k: {f: np.asarray(v).astype(np.int32) for f, v in d.items()}
          for k, d in jaxgru.to_flax(cfg, params).items()}
  with raises("from_flax: expected floating-point weights, got int32"):
    jaxgru.from_flax(flax)
  # bfloat16 weights are floats (NumPy's own test says they are not).
  flax = {k: {f: np.asarray(v).astype(jnp.bfloat16) for f, v in d.items()}
          for k, d in jaxgru.to_flax(cfg, params).items()}
  got_cfg, got = jaxgru.from_flax(flax)
  assert got_cfg.cell.param_dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got[0]["fwd"]["w_h"], np.float32),
                                params[0]["fwd"]["w_h"])


def test_from_keras_wrong_shapes():
  kernel, recurrent = np.zeros((I, 3 * H), np.float32), np.zeros((H, 3 * H), np.float32)
  with raises("Keras GRU kernel", "expected shape (I, 3H)", "got (3, 11)"):
    jaxgru.from_keras([np.zeros((I, 3 * H - 1)), recurrent])
  with raises("Keras GRU kernel", "expected shape (I, 3H)", "got (12,)"):
    jaxgru.from_keras([np.zeros(3 * H), recurrent])
  with raises("Keras GRU recurrent_kernel", "expected shape (4, 12)", "got (12, 4)"):
    jaxgru.from_keras([kernel, recurrent.T])
  with raises("Keras GRU bias", "expected shape (2, 12)", "or (12,)", "got (3, 12)"):
    jaxgru.from_keras([kernel, recurrent, np.zeros((3, 3 * H))])
  with raises("expected [kernel, recurrent_kernel(, bias)]", "got 1 arrays"):
    jaxgru.from_keras([kernel])
  with raises("unknown activation 'hard-sigmoid'"):
    jaxgru.from_keras([kernel, recurrent], recurrent_activation="hard-sigmoid")


def test_to_keras_wrong_shapes():
  cfg = GRUConfig(I, H)
  with raises("GRU params['b_x']", "expected shape (12,)", "got (13,)"):
    jaxgru.to_keras(RNNConfig(cfg), [{"fwd": {**zeros_params(cfg), "b_x": np.zeros(3 * H + 1)}}])
  with raises("to_keras takes a jaxgru.RNNConfig", "got GRUConfig"):
    jaxgru.to_keras(cfg, zeros_params(cfg))
  with raises("Keras GRU holds one layer in one direction", "num_layers=2"):
    two = RNNConfig(cfg, num_layers=2)
    jaxgru.to_keras(two, zeros_stack(two))


def _linen_params():
  d = lambda i, bias: ({"kernel": np.zeros((i, H), np.float32)} |
                       ({"bias": np.zeros(H, np.float32)} if bias else {}))
  return {"ir": d(I, True), "iz": d(I, True), "in": d(I, True),
          "hr": d(H, False), "hz": d(H, False), "hn": d(H, True)}


@pytest.mark.parametrize("key, field, shape, parts", [
    ("iz", "kernel", (I + 1, H), ("Flax GRUCell iz.kernel", "expected shape (3, 4)", "got (4, 4)")),
    ("in", "kernel", (I, H + 1), ("Flax GRUCell in.kernel", "expected shape (3, 4)", "got (3, 5)")),
    ("hn", "kernel", (H, 2 * H), ("Flax GRUCell hn.kernel", "expected shape (4, 4)", "got (4, 8)")),
    ("hn", "bias", (H + 1,), ("Flax GRUCell hn.bias", "expected shape (4,)", "got (5,)")),
    ("ir", "bias", (1, H), ("Flax GRUCell ir.bias", "expected shape (4,)", "got (1, 4)")),
])
def test_from_flax_linen_wrong_shapes(key, field, shape, parts):
  p = _linen_params()
  p[key] = {**p[key], field: np.zeros(shape, np.float32)}
  with raises(*parts):
    jaxgru.from_flax({"params": p})


def test_from_flax_nnx_wrong_shapes():
  ok = {"dense_i": {"kernel": np.zeros((I, 3 * H)), "bias": np.zeros(3 * H)},
        "dense_h": {"kernel": np.zeros((H, 3 * H))}}
  with raises("Flax nnx GRUCell dense_h.kernel", "expected shape (4, 12)", "got (5, 12)"):
    jaxgru.from_flax({**ok, "dense_h": {"kernel": np.zeros((H + 1, 3 * H))}})
  with raises("Flax nnx GRUCell dense_i.bias", "expected shape (12,)", "got (11,)"):
    jaxgru.from_flax({**ok, "dense_i": {**ok["dense_i"], "bias": np.zeros(3 * H - 1)}})
  with raises("expected keys ['hn', 'hr', 'hz', 'in', 'ir', 'iz'] (linen)",
              "or ['dense_h', 'dense_i'] (nnx)", "got ['dense_i']"):
    jaxgru.from_flax({"dense_i": ok["dense_i"]})


def test_to_flax_unsupported():
  to_flax = lambda cell, params: jaxgru.to_flax(RNNConfig(cell), [{"fwd": params}])
  with raises("Flax GRUCell is reset_after with biases", "variant='reset_before'"):
    cfg = GRUConfig(I, H, variant="reset_before")
    to_flax(cfg, zeros_params(cfg))
  with raises("Flax GRUCell is reset_after with biases", "use_bias=False"):
    cfg = GRUConfig(I, H, use_bias=False)
    to_flax(cfg, zeros_params(cfg))
  with raises("GRU params['w_x']", "expected shape (3, 12)", "got (3, 13)"):
    cfg = GRUConfig(I, H)
    to_flax(cfg, {**zeros_params(cfg), "w_x": np.zeros((I, 3 * H + 1))})
  # What a Flax GRUCell cannot hold is refused, as to_torch refuses it.
  for kwargs, got in (({"activation": "relu"}, "got 'relu' and 'sigmoid'"),
                      ({"recurrent_activation": "hard_sigmoid"}, "got 'tanh' and 'hard_sigmoid'")):
    with raises("Flax GRUCell supports activation='tanh'", got):
      cfg = GRUConfig(I, H, **kwargs)
      to_flax(cfg, zeros_params(cfg))
  with raises("Flax GRUCell holds one layer in one direction", "bidirectional=True"):
    bidi = RNNConfig(GRUConfig(I, H), bidirectional=True)
    jaxgru.to_flax(bidi, zeros_stack(bidi))


def test_from_flax_missing_entries():
  p = _linen_params()
  del p["hn"]["bias"]
  with raises("Flax GRUCell hn: missing entry 'bias'", "got ['kernel']"):
    jaxgru.from_flax({"params": p})
  p = _linen_params()
  p["ir"] = {**p["ir"], "kernel": np.zeros(I * H, np.float32)}
  with raises("Flax GRUCell ir.kernel: expected shape (I, H)", "got (12,)"):
    jaxgru.from_flax(p)
  with raises("Flax nnx GRUCell dense_i: missing entry 'bias'"):
    jaxgru.from_flax({"dense_i": {"kernel": np.zeros((I, 3 * H))},
                      "dense_h": {"kernel": np.zeros((H, 3 * H))}})
  with raises("Flax nnx GRUCell dense_i.kernel: expected shape (I, 3H)", "got (12,)"):
    jaxgru.from_flax({"dense_i": {"kernel": np.zeros(3 * H), "bias": np.zeros(3 * H)},
                      "dense_h": {"kernel": np.zeros((H, 3 * H))}})
  with raises("torch.nn.GRU weight_ih_l0 / weight_hh_l0: expected 2-D"):
    jaxgru.from_torch({"weight_ih_l0": np.zeros(3 * H * I), "weight_hh_l0": np.zeros((3 * H, H))})
