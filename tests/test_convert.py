"""Parity with PyTorch nn.GRU and Keras 3 GRU through the converters, from committed fixtures.

The fixtures are outputs of the real frameworks (tests/fixtures/make_fixtures.py); these tests
import neither torch nor keras.
"""

import functools
import os

import jax
import numpy as np
import pytest

import jaxgru

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
PARITY_ATOL = 1e-5  # float32

TORCH_FIXTURES = ("torch_gru_2layer_bidirectional", "torch_gru_nobias")
KERAS_FIXTURES = ("keras_gru_reset_after", "keras_gru_reset_before",
                  "keras_gru_relu_hard_sigmoid", "keras_gru_gelu_hard_sigmoid_reset_before")
KERAS_WEIGHTS = ("kernel", "recurrent_kernel", "bias")


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
  for name in TORCH_FIXTURES + KERAS_FIXTURES:
    assert os.path.getsize(os.path.join(FIXTURES, f"{name}.npz")) < 100_000, name
