"""Tests for jaxgru.rnn: RNNConfig.apply against per-layer, per-sequence plain loops by hand
(tests/reference.py: ``lax.scan`` over ``GRUConfig.step``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgru import GRUConfig, RNNConfig
import reference as plain
import tolerance

I, H, T, B = 3, 4, 7, 4


def randn(*shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# The configurations most tests share, so that each jitted function compiles once per module.
BIDI = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
SUM = RNNConfig(GRUConfig(I, H, variant="reset_before"), num_layers=2, bidirectional=True, merge="sum")
ONE = RNNConfig(GRUConfig(I, H), dropout=0.5)  # a single layer: dropout (between layers) never applies


def random_stack(cfg, seed=0):
  """Random parameters for every cell, biases included (the Keras initializer zeroes them)."""
  rng = np.random.default_rng(seed)
  return [{d: {n: jnp.asarray(rng.normal(scale=0.5, size=s).astype(np.float32))
               for n, s in cfg.layer_cell(l).param_shapes().items()}
           for d in cfg.directions}
          for l in range(cfg.num_layers)]


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg, params, xs, lengths=None, h0=None, dropout_key=None):
  return cfg.apply(params, xs, lengths, h0, dropout_key=dropout_key)


@functools.partial(jax.jit, static_argnums=0)
def forward(cell, params, xs, h0):
  """ONE sequence read forwards by the plain loop: the only JAX computation of the references."""
  return plain.sequence(cell, params, xs, h0)


def backward(cell, params, xs, h0):
  """The backward direction by hand: reverse the time axis, run forwards, reverse the outputs."""
  ys, h_last = forward(cell, params, xs[::-1], h0)
  return np.asarray(ys)[::-1], h_last


def by_hand(cfg, params, xs, h0, lengths=None):
  """The stack, one example, layer and direction at a time, each sequence trimmed to its length.

  Returns outputs zero-padded to T, and the final states in (L*D, B, H) order. The glue is NumPy,
  so that the only JAX computations are the per-sequence ``forward`` calls.
  """
  xs, h0 = np.asarray(xs), np.asarray(h0)
  directions = (forward, backward)[: cfg.num_directions]
  all_ys, all_h = [], []
  for b in range(xs.shape[0]):
    steps = xs.shape[1] if lengths is None else int(lengths[b])
    inputs, finals = xs[b, :steps], []
    for l, layer in enumerate(params):
      cell = cfg.layer_cell(l)
      outs = []
      for i, run in enumerate(directions):
        ys, h_last = run(cell, layer[cfg.directions[i]], inputs,
                         h0[l * cfg.num_directions + i, b])
        outs.append(np.asarray(ys))
        finals.append(np.asarray(h_last))
      if len(outs) == 1:
        inputs = outs[0]
      elif cfg.merge == "concat":
        inputs = np.concatenate(outs, axis=-1)
      else:
        inputs = outs[0] + outs[1]
    pad = np.zeros((xs.shape[1] - steps, cfg.output_size), inputs.dtype)
    all_ys.append(np.concatenate([inputs, pad]))
    all_h.append(np.stack(finals))
  return np.stack(all_ys), np.stack(all_h, axis=1)


def assert_close(actual, expected):
  """A stack's values against another computation of them, to float32 rounding
  (tests/tolerance.py): at most two layers of T steps, the second one's input 2H wide."""
  tolerance.assert_close(actual, expected, steps=2 * T, terms=tolerance.gru_terms(2 * H, H, B))


# -- stacks and directions ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [BIDI, SUM], ids=["concat", "sum"])
def test_stack_equals_composed_sequences(cfg):
  params = random_stack(cfg)
  xs = randn(B, T, I, seed=1)
  h0 = randn(4, B, H, seed=2)  # every cell its own h0
  ys, h_last = apply(cfg, params, xs, None, h0)
  assert ys.shape == (B, T, cfg.output_size)
  assert h_last.shape == (4, B, H)
  ys_ref, h_ref = by_hand(cfg, params, xs, h0)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


def test_output_size():
  assert RNNConfig(GRUConfig(I, H)).output_size == H
  assert RNNConfig(GRUConfig(I, H), bidirectional=True).output_size == 2 * H
  assert RNNConfig(GRUConfig(I, H), bidirectional=True, merge="sum").output_size == H
  # Layers after the first read the previous layer's output.
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  assert cfg.layer_cell(0) == GRUConfig(I, H) and cfg.layer_cell(1) == GRUConfig(2 * H, H)


def test_h0_defaults_to_zeros():
  cfg = BIDI
  params = random_stack(cfg)
  xs = randn(B, T, I)
  ys, h_last = apply(cfg, params, xs)
  ys0, h_last0 = apply(cfg, params, xs, None, jnp.zeros((4, B, H)))
  np.testing.assert_array_equal(ys, ys0)
  np.testing.assert_array_equal(h_last, h_last0)


def test_h0_layout_is_layer_major_forward_first():
  # Moving one cell's h0 changes exactly the final states that depend on it: cell k = l * D + d.
  cfg = BIDI
  params = random_stack(cfg)
  xs = randn(B, T, I)
  h0 = jnp.zeros((4, B, H))
  _, base = apply(cfg, params, xs, None, h0)
  _, moved = apply(cfg, params, xs, None, h0.at[1, 2].set(1.0))  # layer 0, backward, example 2
  changed = np.abs(np.asarray(moved - base)).max(axis=-1) > 1e-6  # (L*D, B)
  # Layer 0 forward is independent of the layer 0 backward cell; everything else downstream of it
  # is affected, and only for example 2.
  assert changed.tolist() == [[False, False, False, False], [False, False, True, False],
                              [False, False, True, False], [False, False, True, False]]


# -- variable lengths -----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [BIDI, RNNConfig(GRUConfig(I, H, variant="reset_before"), bidirectional=True, merge="sum")],
                         ids=["concat", "sum"])
def test_lengths_equal_each_sequence_alone(cfg):
  params = random_stack(cfg)
  # Garbage past each sequence's end: it must reach neither the outputs nor the states.
  xs = randn(B, T, I, seed=1) * 10.0
  lengths = jnp.array([T, 3, 1, 0])
  h0 = randn(cfg.num_layers * 2, B, H, seed=2)
  ys, h_last = apply(cfg, params, xs, lengths, h0)
  ys_ref, h_ref = by_hand(cfg, params, xs, h0, lengths)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)
  for b, n in enumerate(lengths.tolist()):
    np.testing.assert_array_equal(ys[b, n:], 0.0)
  # A length-0 sequence keeps its initial states.
  np.testing.assert_array_equal(h_last[:, 3], h0[:, 3])


def test_full_lengths_equal_no_lengths():
  cfg = BIDI
  params = random_stack(cfg)
  xs = randn(B, T, I)
  ys, h_last = apply(cfg, params, xs, jnp.full((B,), T), jnp.zeros((4, B, H)))
  ys_ref, h_ref = apply(cfg, params, xs)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


def test_lengths_h_last_is_state_at_last_valid_step():
  cfg = ONE  # one forward layer: the outputs are the states
  params = random_stack(cfg)
  xs = randn(B, T, I)
  lengths = jnp.array([T, 5, 2, 1])
  ys_full, _ = apply(cfg, params, xs)
  _, h_last = apply(cfg, params, xs, lengths)
  for b, n in enumerate(lengths.tolist()):
    assert_close(h_last[0, b], ys_full[b, n - 1])


def test_lengths_as_a_list():
  cfg = ONE
  params = random_stack(cfg)
  xs = randn(B, T, I)
  ys, h_last = cfg.apply(params, xs, [T, 3, 1, 0])
  ys_ref, h_ref = apply(cfg, params, xs, jnp.array([T, 3, 1, 0]))
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


def test_lengths_above_t_under_jit_act_as_t():
  # Traced lengths cannot be checked; as documented, a length above T then behaves as T.
  cfg = BIDI
  params = random_stack(cfg)
  xs, h0 = randn(B, T, I), jnp.zeros((4, B, H))
  ys, h_last = apply(cfg, params, xs, jnp.array([T + 5, 3, 1, 0]), h0)
  ys_ref, h_ref = apply(cfg, params, xs, jnp.array([T, 3, 1, 0]), h0)
  assert_close(ys, ys_ref)
  assert_close(h_last, h_ref)


# -- dropout --------------------------------------------------------------------------------------

def _pass_through_top_layer(cfg, params):
  """Makes the last layer copy its input to its output, so the dropped outputs can be seen.

  With linear activation, w_h = 0, z pinned to hard_sigmoid(-100) = 0 and w_x's candidate block
  the identity, the last layer computes h' = x exactly.
  """
  top = params[-1]["fwd"]
  eye = jnp.eye(cfg.output_size, H)
  top = {"w_x": jnp.concatenate([jnp.zeros((cfg.output_size, 2 * H)), eye], axis=1),
         "w_h": jnp.zeros_like(top["w_h"]),
         "b_x": jnp.concatenate([jnp.full((H,), -100.0), jnp.zeros((2 * H,))]),
         "b_h": jnp.zeros_like(top["b_h"])}
  return params[:-1] + [{"fwd": top}]


def test_dropout():
  p = 0.5
  cfg = RNNConfig(GRUConfig(I, H, activation="linear", recurrent_activation="hard_sigmoid"), num_layers=2, dropout=p)
  params = _pass_through_top_layer(cfg, random_stack(cfg))
  xs = randn(8, T, I)
  # The first layer's outputs, without dropout.
  below, _ = apply(RNNConfig(GRUConfig(I, H, activation="linear", recurrent_activation="hard_sigmoid")),
                   params[:1], xs)

  # No key: no dropout, whatever the rate.
  ys, _ = apply(cfg, params, xs)
  assert_close(ys, below)

  # With a key: every output is either dropped (0) or kept and scaled by 1 / (1 - p).
  ys, _ = apply(cfg, params, xs, dropout_key=jax.random.key(0))
  ys, below = np.asarray(ys), np.asarray(below)
  dropped = ys == 0.0
  assert 0.3 < dropped.mean() < 0.7, dropped.mean()
  assert_close(ys[~dropped], below[~dropped] / (1.0 - p))

  # Deterministic given the key; another key drops other units.
  again, _ = apply(cfg, params, xs, dropout_key=jax.random.key(0))
  np.testing.assert_array_equal(again, ys)
  other, _ = apply(cfg, params, xs, dropout_key=jax.random.key(1))
  assert not np.array_equal(other == 0.0, dropped)


def test_no_dropout_after_the_last_layer():
  cfg = ONE
  params = random_stack(cfg)
  xs = randn(B, T, I)
  ys, h_last = apply(cfg, params, xs, dropout_key=jax.random.key(0))
  ys_ref, h_ref = apply(cfg, params, xs)
  np.testing.assert_array_equal(ys, ys_ref)
  np.testing.assert_array_equal(h_last, h_ref)


# -- compilation ----------------------------------------------------------------------------------

def test_second_call_does_not_recompile():
  @functools.partial(jax.jit, static_argnums=0)
  def run(cfg, params, xs, lengths):
    return cfg.apply(params, xs, lengths)

  cfg = BIDI
  run(cfg, random_stack(cfg, 0), randn(B, T, I, seed=1), jnp.array([T, 3, 1, 0]))
  run(RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True), random_stack(cfg, 1),
      randn(B, T, I, seed=2), jnp.array([1, 2, 3, 4]))
  assert run._cache_size() == 1
