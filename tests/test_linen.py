"""Tests for jaxgru.linen, and live parity with Flax's own GRU cells (linen and nnx)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgru
from jaxgru.linen import GRU

I, H, T, B = 3, 4, 6, 3
PARITY_ATOL = 1e-5  # float32


def randn(*shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def randomize(tree, seed=0):
  """Every leaf replaced by normal noise: Flax initializes biases to zero, which hides mistakes."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.5, size=x.shape).astype(np.float32))
                for x in leaves])


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.partial(jax.jit, static_argnums=0)
def batched_sequence(cell, params, xs, h0):
  return jax.vmap(cell.sequence, in_axes=(None, 0, 0))(params, xs, h0)


# -- the jaxgru module ----------------------------------------------------------------------------

def test_module_equals_rnnconfig_apply():
  layer = GRU(hidden_size=H, num_layers=2, bidirectional=True, initializer="pytorch")
  xs, lengths = randn(B, T, I), jnp.array([T, 2, 0])
  h0 = randn(4, B, H, seed=2)
  variables = jax.jit(layer.init)(jax.random.key(0), xs)
  params = variables["params"]["gru"]
  cfg = layer.config(I)
  assert cfg == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H), num_layers=2, bidirectional=True)
  cfg.check_params(params)
  ys, h_last = jax.jit(layer.apply)(variables, xs, lengths, h0)
  ys_ref, h_ref = jax.jit(cfg.apply)(params, xs, lengths, h0)
  np.testing.assert_array_equal(ys, ys_ref)
  np.testing.assert_array_equal(h_last, h_ref)
  bound = 1.0 / np.sqrt(H)  # the "pytorch" initializer reached the module's parameters
  assert all(float(jnp.max(jnp.abs(p))) <= bound for p in jax.tree.leaves(params))


def test_module_dropout():
  layer = GRU(hidden_size=H, num_layers=2, dropout=0.5)
  xs = randn(B, T, I)
  variables = jax.jit(layer.init)(jax.random.key(0), xs)
  apply = jax.jit(layer.apply, static_argnames="deterministic")
  eval_ys, _ = apply(variables, xs)  # deterministic=True by default: no dropout, no rng needed
  rngs = {"dropout": jax.random.key(1)}
  train_ys, _ = apply(variables, xs, deterministic=False, rngs=rngs)
  again, _ = apply(variables, xs, deterministic=False, rngs=rngs)
  assert max_err(train_ys, eval_ys) > 1e-3
  np.testing.assert_array_equal(train_ys, again)


# -- parity with flax.linen.GRUCell ---------------------------------------------------------------

def _linen_rnn():
  return nn.RNN(nn.GRUCell(features=H))


def test_from_flax_linen():
  rnn = _linen_rnn()
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  variables = randomize(rnn.init(jax.random.key(0), xs))
  ys_flax = jax.jit(rnn.apply)(variables, xs, initial_carry=h0)
  rnn_cfg, stack = jaxgru.from_flax(variables["params"]["cell"])
  assert rnn_cfg == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, param_dtype=jnp.float32))
  cfg, params = rnn_cfg.cell, stack[0]["fwd"]
  ys, _ = batched_sequence(cfg, params, xs, h0)
  assert max_err(ys, ys_flax) <= PARITY_ATOL
  # The {"params": ...} wrapper of a GRUCell's own variables is accepted as well.
  cell_vars = {"params": variables["params"]["cell"]}
  _, stack2 = jaxgru.from_flax(cell_vars)
  params2 = stack2[0]["fwd"]
  for k in params:
    np.testing.assert_array_equal(params[k], params2[k])


def test_to_flax_linen():
  cfg = jaxgru.GRUConfig(I, H)
  params = randomize(cfg.init(jax.random.key(0)))  # every bias non-zero, b_h's z and r included
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  ys, _ = batched_sequence(cfg, params, xs, h0)
  rnn = _linen_rnn()
  flax_params = jaxgru.to_flax(jaxgru.RNNConfig(cfg), [{"fwd": params}])
  ys_flax = jax.jit(rnn.apply)({"params": {"cell": flax_params}}, xs, initial_carry=h0)
  assert max_err(ys, ys_flax) <= PARITY_ATOL
  # And back: the recurrent z and r biases come back folded into the input biases.
  rnn2, stack2 = jaxgru.from_flax(flax_params)
  cfg2, params2 = rnn2.cell, stack2[0]["fwd"]
  assert cfg2 == dataclasses.replace(cfg, param_dtype=jnp.float32)
  ys2, _ = batched_sequence(cfg2, params2, xs, h0)
  assert max_err(ys2, ys) <= PARITY_ATOL


# -- parity with flax.nnx.GRUCell -----------------------------------------------------------------

def test_from_flax_nnx():
  cell = nnx.GRUCell(I, H, rngs=nnx.Rngs(0))
  nnx.update(cell, randomize(nnx.state(cell, nnx.Param)))
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)

  @jax.jit
  def run_nnx(graphdef, state, xs, h):
    cell = nnx.merge(graphdef, state)
    ys = []
    for t in range(T):
      h, y = cell(h, xs[:, t])
      ys.append(y)
    return jnp.stack(ys, axis=1)

  ys_nnx = run_nnx(*nnx.split(cell), xs, h0)
  state = nnx.to_pure_dict(nnx.state(cell, nnx.Param))
  rnn_cfg, stack = jaxgru.from_flax(state)
  cfg, params = rnn_cfg.cell, stack[0]["fwd"]
  assert cfg == jaxgru.GRUConfig(I, H, param_dtype=jnp.float32)
  np.testing.assert_array_equal(params["b_h"], 0.0)  # nnx has no recurrent bias
  ys, _ = batched_sequence(cfg, params, xs, h0)
  assert max_err(ys, ys_nnx) <= PARITY_ATOL
