"""Parity with PyTorch nn.GRU and Keras 3 GRU through the converters, from committed fixtures.

The fixtures are outputs of the real frameworks (tests/fixtures/make_fixtures.py); the tests
import neither torch nor keras. The tests at the end are past the custom VJP's threshold (T = 70),
with variable lengths: values and gradients from PyTorch's and Keras's fixtures, and from Flax,
which runs here.
"""

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest

import jaxgru
from tolerance import assert_close, gru_terms

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PARITY_ATOL = 1e-5  # float32

TORCH_FIXTURES = ("torch_gru_2layer_bidirectional", "torch_gru_nobias")
KERAS_FIXTURES = ("keras_gru_reset_after", "keras_gru_reset_before",
                  "keras_gru_relu_hard_sigmoid", "keras_gru_gelu_hard_sigmoid_reset_before")
KERAS_WEIGHTS = ("kernel", "recurrent_kernel", "bias")
LONG_FIXTURES = ("torch_gru_2layer_bidirectional_70steps", "keras_gru_reset_after_70steps",
                 "keras_gru_reset_before_70steps")


def load(name):
  with np.load(os.path.join(FIXTURES, f"{name}.npz")) as f:
    return dict(f)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg, params, xs, h0):
  return cfg.apply(params, xs, None, h0)


@functools.partial(jax.jit, static_argnums=0)
def batched_sequence(cell, params, xs, h0):
  return jax.vmap(cell.sequence, in_axes=(None, 0, 0))(params, xs, h0)


def torch_state_dict(fixture):
  return {k: v for k, v in fixture.items() if k.startswith(("weight_", "bias_"))}


def keras_weights(fixture):
  return [fixture[k] for k in KERAS_WEIGHTS if k in fixture]


def keras_config(fixture):
  return jaxgru.from_keras(keras_weights(fixture), activation=str(fixture["activation"]),
                           recurrent_activation=str(fixture["recurrent_activation"]))


# -- PyTorch --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_from_torch_reproduces_torch(name):
  f = load(name)
  cfg, params = jaxgru.from_torch(torch_state_dict(f))
  assert cfg.input_size == f["x"].shape[-1] and cfg.hidden_size == f["h_n"].shape[-1]
  assert cfg.num_layers * cfg.num_directions == f["h_n"].shape[0]
  ys, h_n = apply(cfg, params, f["x"], f["h0"])
  assert ys.shape == f["y"].shape and h_n.shape == f["h_n"].shape
  assert max_err(ys, f["y"]) <= PARITY_ATOL
  assert max_err(h_n, f["h_n"]) <= PARITY_ATOL


def test_torch_fixture_settings():
  cfg, _ = jaxgru.from_torch(torch_state_dict(load("torch_gru_2layer_bidirectional")))
  assert (cfg.num_layers, cfg.bidirectional, cfg.cell.use_bias) == (2, True, True)
  assert (cfg.input_size, cfg.hidden_size, cfg.merge) == (5, 7, "concat")
  cfg, _ = jaxgru.from_torch(torch_state_dict(load("torch_gru_nobias")))
  assert (cfg.num_layers, cfg.bidirectional, cfg.cell.use_bias) == (1, False, False)


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_to_torch_round_trips(name):
  state_dict = torch_state_dict(load(name))
  cfg, params = jaxgru.from_torch(state_dict)
  back = jaxgru.to_torch(cfg, params)
  assert set(back) == set(state_dict)
  for k, v in state_dict.items():
    assert back[k].dtype == v.dtype
    np.testing.assert_array_equal(back[k], v, err_msg=k)


class FakeTorchGRU:
  """What from_torch reads of a torch.nn.GRU: its state_dict() (torch is not installed here)."""

  def __init__(self, state_dict):
    self._state_dict = state_dict

  def state_dict(self):
    return self._state_dict


def test_from_torch_takes_the_module_itself():
  f = load("torch_gru_2layer_bidirectional")
  cfg, params = jaxgru.from_torch(FakeTorchGRU(torch_state_dict(f)))
  assert cfg == jaxgru.from_torch(torch_state_dict(f))[0]
  ys, h_n = apply(cfg, params, f["x"], f["h0"])
  assert max_err(ys, f["y"]) <= PARITY_ATOL and max_err(h_n, f["h_n"]) <= PARITY_ATOL


def test_from_torch_module_with_real_torch():
  torch = pytest.importorskip("torch")  # where torch is installed (not in CI's test env)
  torch.manual_seed(0)
  gru = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True)
  x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype(np.float32)
  cfg, params = jaxgru.from_torch(gru)
  want, _ = gru(torch.from_numpy(x))
  assert max_err(cfg.apply(params, x)[0], want.detach().numpy()) <= PARITY_ATOL


@pytest.mark.parametrize("convert, weights", [
    ("from_torch", lambda: torch_state_dict(load("torch_gru_nobias"))),
    ("from_keras", lambda: keras_weights(load("keras_gru_reset_after"))),
    ("from_flax", lambda: jaxgru.to_flax(*keras_config(load("keras_gru_reset_after")))),
])
def test_float64_weights_need_x64_or_a_dtype(convert, weights):
  """JAX would silently make float64 weights float32; the converters say so instead."""
  convert = getattr(jaxgru, convert)
  weights64 = jax.tree.map(lambda a: np.asarray(a, np.float64), weights())
  with pytest.raises(ValueError, match="float64 and JAX's x64 mode is off; pass dtype="):
    convert(weights64)
  cfg, params = convert(weights64, dtype="float32")
  want_cfg, want = convert(weights())
  assert cfg == want_cfg
  for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
  with jax.enable_x64(True):
    cfg, params = convert(weights64)
    assert cfg.cell.state_dtype == np.float64
    assert all(p.dtype == np.float64 for p in jax.tree.leaves(params))


# -- Keras ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_from_keras_reproduces_keras(name):
  f = load(name)
  rnn, stack = keras_config(f)
  assert (rnn.num_layers, rnn.bidirectional) == (1, False)  # one return kind: a one-layer stack
  cfg, params = rnn.cell, stack[0]["fwd"]
  assert cfg.variant == ("reset_after" if f["reset_after"] else "reset_before")
  ys, h_n = batched_sequence(cfg, params, f["x"], f["h0"])
  assert ys.shape == f["y"].shape and h_n.shape == f["h_n"].shape
  assert max_err(ys, f["y"]) <= PARITY_ATOL
  assert max_err(h_n, f["h_n"]) <= PARITY_ATOL


class FakeKerasGRU:
  """What from_keras reads of a Keras GRU layer: get_weights() and get_config()."""

  def __init__(self, fixture):
    self._fixture = fixture

  def get_weights(self):
    return keras_weights(self._fixture)

  def get_config(self):
    return {"units": self._fixture["h_n"].shape[-1], "activation": str(self._fixture["activation"]),
            "recurrent_activation": str(self._fixture["recurrent_activation"])}


@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_from_keras_takes_the_layer_and_its_activations(name):
  f = load(name)
  rnn, stack = jaxgru.from_keras(FakeKerasGRU(f))
  assert rnn == keras_config(f)[0]  # the activations come from the layer's config
  ys, h_n = batched_sequence(rnn.cell, stack[0]["fwd"], f["x"], f["h0"])
  assert max_err(ys, f["y"]) <= PARITY_ATOL and max_err(h_n, f["h_n"]) <= PARITY_ATOL
  # An activation given explicitly wins over the layer's.
  assert jaxgru.from_keras(FakeKerasGRU(f), activation="relu")[0].cell.activation == "relu"


def test_from_keras_layer_with_real_keras():
  os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported: no TensorFlow needed
  keras = pytest.importorskip("keras")  # where keras is installed (not in CI's test env)
  layer = keras.layers.GRU(4, recurrent_activation="hard_sigmoid", return_sequences=True)
  x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype(np.float32)
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    want = np.asarray(layer(x))  # Keras's own JAX code, outside this suite's strict settings
  cfg, params = jaxgru.from_keras(layer)
  assert cfg.cell.recurrent_activation == "hard_sigmoid"
  assert max_err(cfg.apply(params, x)[0], want) <= PARITY_ATOL


@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_to_keras_round_trips(name):
  f = load(name)
  weights = keras_weights(f)
  cfg, params = keras_config(f)
  back = jaxgru.to_keras(cfg, params)
  assert len(back) == len(weights)
  for b, w in zip(back, weights):
    assert b.dtype == w.dtype
    np.testing.assert_array_equal(b, w)


def test_fixtures_are_small():
  for name in TORCH_FIXTURES + KERAS_FIXTURES + LONG_FIXTURES:
    assert os.path.getsize(os.path.join(FIXTURES, f"{name}.npz")) < 100_000, name


# -- Past the custom VJP's threshold: values and gradients, with lengths ---------------------------
# The fixtures above are 6 steps long, where the CPU differentiates the loop with JAX's own
# autodiff; from 64 steps on it takes the custom VJP (ScanOptions: custom_vjp_steps). The
# *_70steps fixtures hold PyTorch's and Keras's own values and gradients at T = 70 with variable
# lengths; Flax runs here itself. Every gradient is compared.

LONG_T, LONG_B, LONG_I, LONG_H = 70, 4, 5, 7
LONG_LENGTHS = [70, 64, 33, 1]
# Up to two layers (torch's fixture) of 70 steps, the second one's input 2H wide.
GRAD_TOL = dict(steps=2 * LONG_T, terms=gru_terms(2 * LONG_H, LONG_H, LONG_B))


def _long_inputs(seed, num_cells, width):
  """Inputs, initial states and cotangents (zero past each length) for a T = 70 batch."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(LONG_B, LONG_T, LONG_I)).astype(np.float32)
  h0 = rng.normal(size=(num_cells, LONG_B, LONG_H)).astype(np.float32)
  valid = np.arange(LONG_T)[None, :, None] < np.array(LONG_LENGTHS)[:, None, None]
  gy = (rng.normal(size=(LONG_B, LONG_T, width)) * valid).astype(np.float32)
  gh = rng.normal(size=(num_cells, LONG_B, LONG_H)).astype(np.float32)
  return x, h0, gy, gh


def _jaxgru_value_and_grads(cfg, params, x, h0, gy, gh):
  """(ys, h_n) and the gradients of sum(ys * gy) + sum(h_n * gh) w.r.t. (params, x, h0), through
  jaxgru's default options, which at T = 70 on every backend differentiate with the custom VJP."""
  assert jaxgru.ScanOptions().resolved(LONG_T, LONG_B, LONG_H).custom_vjp
  lengths = np.array(LONG_LENGTHS, np.int32)

  def loss(params, x, h0):
    ys, h_n = cfg.apply(params, x, lengths, h0)
    return jax.numpy.sum(ys * gy) + jax.numpy.sum(h_n * gh), (ys, h_n)

  (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, x, h0)
  return outs, grads


def _check_long_fixture(f, cfg, params, g_weights, h0, h_n_keep=lambda a: a):
  """jaxgru (default options: the custom VJP at T = 70) against a *_70steps fixture: outputs
  within each length, final states, and the gradients of x, h0 and, through ``g_weights``
  (jaxgru's weight gradients -> the framework's layout), of every weight."""
  (ys, h_n), (g_params, g_x, g_h0) = _jaxgru_value_and_grads(
      cfg, params, f["x"], h0, f["gy"], f["gh"].reshape(h0.shape))
  valid = np.arange(LONG_T)[None, :, None] < f["lengths"][:, None, None]
  assert max_err(np.where(valid, ys, 0), np.where(valid, f["y"], 0)) <= PARITY_ATOL
  assert max_err(h_n_keep(h_n), f["h_n"]) <= PARITY_ATOL
  assert_close(g_x, f["grad_x"], **GRAD_TOL)
  assert_close(h_n_keep(g_h0), f["grad_h0"], **GRAD_TOL)
  for name, got in g_weights(g_params).items():
    assert_close(got, f[f"grad_{name}"], err_msg=name, **GRAD_TOL)
  return ys


def test_from_torch_at_70_steps_values_and_gradients_with_lengths():
  """nn.GRU(num_layers=2, bidirectional=True) over a packed batch (torch's outputs are zero past
  each length, as jaxgru's)."""
  f = load("torch_gru_2layer_bidirectional_70steps")
  assert list(f["lengths"]) == LONG_LENGTHS and f["x"].shape == (LONG_B, LONG_T, LONG_I)
  cfg, params = jaxgru.from_torch(torch_state_dict(f))
  assert (cfg.num_layers, cfg.bidirectional) == (2, True)
  # Weight gradients mapped back through the converter (to_torch only reorders and transposes).
  g_weights = lambda g: jaxgru.to_torch(cfg, g)
  assert set(g_weights(params)) == {k[len("grad_"):] for k in f if k.startswith("grad_")} - {
      "x", "h0"}
  ys = _check_long_fixture(f, cfg, params, g_weights, f["h0"])
  assert max_err(ys, f["y"]) <= PARITY_ATOL  # the zeros past each length too


@pytest.mark.parametrize("name", ["keras_gru_reset_after_70steps",
                                  "keras_gru_reset_before_70steps"])
def test_from_keras_at_70_steps_values_and_gradients_with_a_mask(name):
  """keras.layers.GRU with a mask of each sequence's first `length` steps, both variants (Keras
  repeats the last output past a sequence's end, where the fixture's cotangent is zero)."""
  f = load(name)
  assert list(f["lengths"]) == LONG_LENGTHS and f["x"].shape == (LONG_B, LONG_T, LONG_I)
  cfg, params = keras_config(f)
  assert cfg.cell.variant == ("reset_after" if f["reset_after"] else "reset_before")
  g_weights = lambda g: dict(zip(KERAS_WEIGHTS, jaxgru.to_keras(cfg, g)))
  _check_long_fixture(f, cfg, params, g_weights, f["h0"][None], h_n_keep=lambda a: a[0])


def test_from_flax_bidirectional_at_70_steps_values_and_gradients_with_lengths():
  pytest.importorskip("flax")
  import flax.linen as nn
  lengths = np.array(LONG_LENGTHS, np.int32)
  x, h0, gy, gh = _long_inputs(1, 2, 2 * LONG_H)
  layer = nn.Bidirectional(nn.RNN(nn.GRUCell(LONG_H), return_carry=True),
                           nn.RNN(nn.GRUCell(LONG_H), return_carry=True, reverse=True,
                                  keep_order=True), return_carry=True)
  variables = layer.init(jax.random.key(0), x, seq_lengths=lengths)
  # Random biases too (Flax starts them at zero), so every bias gradient is exercised.
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  flax_params = jax.tree.unflatten(tree, [0.4 * jax.random.normal(k, l.shape, l.dtype)
                                          for k, l in zip(keys, leaves)])

  def flax_loss(p, x, h0):
    (h_f, h_b), ys = layer.apply({"params": p}, x, seq_lengths=lengths,
                                 initial_carry=(h0[0], h0[1]))
    h_n = jax.numpy.stack([h_f, h_b])
    # Flax leaves its outputs past a length as they come; gy is zero there.
    return jax.numpy.sum(ys * gy) + jax.numpy.sum(h_n * gh), (ys, h_n)

  (_, (want_ys, want_h_n)), (gf, gf_x, gf_h0) = jax.jit(
      jax.value_and_grad(flax_loss, argnums=(0, 1, 2), has_aux=True))(flax_params, x, h0)

  cfg, fwd = jaxgru.from_flax(flax_params["forward_rnn"]["cell"])
  _, bwd = jaxgru.from_flax(flax_params["backward_rnn"]["cell"])
  cfg = dataclasses.replace(cfg, bidirectional=True)
  params = [{"fwd": fwd[0]["fwd"], "bwd": bwd[0]["fwd"]}]
  (ys, h_n), (g_params, g_x, g_h0) = _jaxgru_value_and_grads(cfg, params, x, h0, gy, gh)
  valid = gy != 0
  assert max_err(np.where(valid, ys, 0), np.where(valid, want_ys, 0)) <= PARITY_ATOL
  assert max_err(h_n, want_h_n) <= PARITY_ATOL
  assert_close(g_x, gf_x, **GRAD_TOL)
  assert_close(g_h0, gf_h0, **GRAD_TOL)
  # Flax's gradients through the converter: its cell has no recurrent z and r biases, so ours,
  # which enter where the input biases do, equal those of the input biases.
  for d, name in (("fwd", "forward_rnn"), ("bwd", "backward_rnn")):
    _, mapped = jaxgru.from_flax(gf[name]["cell"])
    want, got = mapped[0]["fwd"], g_params[0][d]
    for k in ("w_x", "w_h", "b_x"):
      assert_close(got[k], want[k], err_msg=f"{d} {k}", **GRAD_TOL)
    h = LONG_H
    assert_close(got["b_h"][2 * h:], want["b_h"][2 * h:], err_msg=f"{d} b_h n",
                 **GRAD_TOL)
    assert_close(got["b_h"][:2 * h], got["b_x"][:2 * h], err_msg=f"{d} b_h zr",
                 **GRAD_TOL)
