"""Tests for jaxgru.nnx, and live parity with Flax's own ``nnx.GRUCell`` through the converters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jaxgru  # noqa: E402
import reference as plain  # noqa: E402
from jaxgru.convert import to_flax_nnx  # noqa: E402
from jaxgru.linen import GRU as LinenGRU  # noqa: E402
from jaxgru.nnx import GRU  # noqa: E402

I, H, T, B = 3, 4, 6, 3
ATOL = 1e-6  # float32


def randn(*shape, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32))


def randomize(tree, seed=0):
  """Every leaf replaced by normal noise (Flax and Keras initialize biases to zero)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.5, size=np.shape(x)).astype(np.float32))
                for x in leaves])


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def reference_stack(cfg, params, xs_BTI, lengths_B, h0):
  """The stack written out with the plain per-example loop of tests/reference.py (vmapped)."""
  nd = cfg.num_directions
  layer_in, finals = xs_BTI, []
  for l, layer in enumerate(params):
    cell, outs = cfg.layer_cell(l), []
    for i, d in enumerate(cfg.directions):
      run = lambda p, x, h, n, d=d, cell=cell: plain.sequence(cell, p, x, h, n, reverse=d == "bwd")
      ys, hs = jax.vmap(run, in_axes=(None, 0, 0, 0))(layer[d], layer_in, h0[l * nd + i],
                                                         lengths_B)
      outs.append(ys)
      finals.append(hs)
    layer_in = outs[0] if nd == 1 else (
        jnp.concatenate(outs, -1) if cfg.merge == "concat" else outs[0] + outs[1])
  return layer_in, jnp.stack(finals)


def test_module_layout_and_values():
  model = GRU(I, H, num_layers=2, bidirectional=True, initializer="pytorch", rngs=nnx.Rngs(0))
  cfg = model.config
  assert cfg == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H), num_layers=2, bidirectional=True)
  params = model.stack_params()
  cfg.check_params(params)  # the layout of RNNConfig.init
  state = nnx.state(model, nnx.Param)
  assert isinstance(state["gru"][1]["bwd"]["w_h"], nnx.Param)
  bound = 1.0 / np.sqrt(H)  # the "pytorch" initializer reached the parameters
  assert all(0 < float(jnp.max(jnp.abs(p))) <= bound for p in jax.tree.leaves(params))
  params = randomize(params)
  model.load_params(params)
  xs, lengths, h0 = randn(B, T, I), jnp.array([T, 2, 0]), randn(4, B, H, seed=2)
  ys, h_last = model(xs, lengths, h0)
  ys_ref, h_ref = jax.jit(reference_stack, static_argnums=0)(cfg, params, xs, lengths, h0)
  assert max_err(ys, ys_ref) <= ATOL and max_err(h_last, h_ref) <= ATOL
  np.testing.assert_array_equal(ys[2], 0.0)  # length 0: no output
  np.testing.assert_array_equal(h_last[:, 2], h0[:, 2])  # and the state untouched


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_parity_with_linen_module(merge):
  model = GRU(I, H, num_layers=2, bidirectional=True, merge=merge, rngs=nnx.Rngs(0))
  params = randomize(model.stack_params(), seed=3)
  model.load_params(params)
  linen = LinenGRU(hidden_size=H, num_layers=2, bidirectional=True, merge=merge)
  assert linen.config(I) == model.config
  variables = {"params": {"gru": params}}
  xs, lengths, h0 = randn(B, T, I), jnp.array([T, 2, 5]), randn(4, B, H, seed=2)
  ys_linen, h_linen = jax.jit(linen.apply)(variables, xs, lengths, h0)
  ys, h_last = nnx.jit(lambda m, *a: m(*a))(model, xs, lengths, h0)
  assert max_err(ys, ys_linen) <= ATOL and max_err(h_last, h_linen) <= ATOL
  # And back: linen's parameters build an nnx module that computes the same.
  linen_vars = linen.init(jax.random.key(7), xs)
  back = GRU.from_params(linen.config(I), linen_vars["params"]["gru"])
  ys_back, _ = back(xs, lengths)
  ys_linen2, _ = linen.apply(linen_vars, xs, lengths)
  assert max_err(ys_back, ys_linen2) <= ATOL
  for a, b in zip(jax.tree.leaves(back.stack_params()), jax.tree.leaves(linen_vars)):
    np.testing.assert_array_equal(a, b)


# -- parity with flax.nnx.GRUCell through the converters ------------------------------------------

def _run_nnx_cell(cell, xs_BTI, h0_BH):
  """Flax's own cell over time with nnx.RNN."""
  rnn = nnx.RNN(cell)
  return nnx.jit(lambda r, x, h: r(x, initial_carry=h))(rnn, xs_BTI, h0_BH)


def test_from_flax_nnx_cell_into_module():
  cell = nnx.GRUCell(I, H, rngs=nnx.Rngs(0))
  nnx.update(cell, randomize(nnx.state(cell, nnx.Param)))
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  ys_flax = _run_nnx_cell(cell, xs, h0)
  cfg, params = jaxgru.from_flax(nnx.to_pure_dict(nnx.state(cell, nnx.Param)))
  model = GRU.from_params(cfg, params)
  ys, h_last = model(xs, h0=h0[None])
  err = max_err(ys, ys_flax)
  assert err <= ATOL, err
  assert max_err(h_last[0], ys_flax[:, -1]) <= ATOL


def test_to_flax_nnx_cell():
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H))
  params = randomize(cfg.init(jax.random.key(0)))
  b_h = np.asarray(params[0]["fwd"]["b_h"]).copy()
  b_h[2 * H:] = 0.0  # nnx.GRUCell has no b_hn; the z and r recurrent biases stay non-zero
  params[0]["fwd"]["b_h"] = jnp.asarray(b_h)
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  ys, _ = cfg.apply(params, xs, h0=h0[None])
  out = to_flax_nnx(cfg, params)
  cell = nnx.GRUCell(I, H, rngs=nnx.Rngs(1))
  state = nnx.state(cell, nnx.Param)
  assert jax.tree.map(jnp.shape, nnx.to_pure_dict(state)) == jax.tree.map(np.shape, out)
  nnx.replace_by_pure_dict(state, out)
  nnx.update(cell, state)
  ys_flax = _run_nnx_cell(cell, xs, h0)
  err = max_err(ys, ys_flax)
  assert err <= ATOL, err
  # Back through from_flax: the same function, with the z and r recurrent biases folded.
  cfg2, params2 = jaxgru.from_flax(nnx.to_pure_dict(nnx.state(cell, nnx.Param)))
  assert cfg2 == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, param_dtype=jnp.float32))
  np.testing.assert_array_equal(params2[0]["fwd"]["w_x"], params[0]["fwd"]["w_x"])
  np.testing.assert_array_equal(params2[0]["fwd"]["w_h"], params[0]["fwd"]["w_h"])
  np.testing.assert_array_equal(params2[0]["fwd"]["b_h"], 0.0)
  ys2, _ = cfg2.apply(params2, xs, h0=h0[None])
  assert max_err(ys2, ys) <= ATOL
  # And from_flax then to_flax_nnx gives back nnx's arrays exactly.
  again = to_flax_nnx(cfg2, params2)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(out)):
    np.testing.assert_array_equal(a, b)


def test_to_flax_nnx_refusals():
  cell = jaxgru.GRUConfig(I, H)
  cfg = jaxgru.RNNConfig(cell)
  params = randomize(cfg.init(jax.random.key(0)))  # b_hn non-zero
  with pytest.raises(ValueError, match="no recurrent candidate bias"):
    to_flax_nnx(cfg, params)
  for other in (jaxgru.GRUConfig(I, H, variant="reset_before"),
                jaxgru.GRUConfig(I, H, use_bias=False)):
    c = jaxgru.RNNConfig(other)
    with pytest.raises(ValueError, match="reset_after with biases"):
      to_flax_nnx(c, c.init(jax.random.key(0)))
  c = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, activation="relu"))
  with pytest.raises(ValueError, match="tanh"):
    to_flax_nnx(c, c.init(jax.random.key(0)))
  for c in (jaxgru.RNNConfig(cell, num_layers=2), jaxgru.RNNConfig(cell, bidirectional=True)):
    with pytest.raises(ValueError, match="one layer in one direction"):
      to_flax_nnx(c, c.init(jax.random.key(0)))
  with pytest.raises(ValueError, match="RNNConfig"):
    to_flax_nnx(cell, [{"fwd": cell.init(jax.random.key(0))}])


# -- dropout, the NNX way -------------------------------------------------------------------------

def test_dropout_train_and_eval():
  model = GRU(I, H, num_layers=3, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  params = model.stack_params()
  cfg = model.config
  xs = randn(B, T, I)
  call = nnx.jit(lambda m, x: m(x))
  train_apply = jax.jit(lambda p, x, k: cfg.apply(p, x, dropout_key=k))
  eval_apply = jax.jit(lambda p, x: cfg.apply(p, x))
  assert model.deterministic is False  # NNX modules start in training mode
  stream = nnx.clone(model.rngs)  # the stream the next call draws its key from
  key1 = stream()
  key2 = stream()
  train1, _ = call(model, xs)
  train2, _ = call(model, xs)  # the stream advanced: a new mask
  np.testing.assert_array_equal(train1, train_apply(params, xs, key1)[0])
  np.testing.assert_array_equal(train2, train_apply(params, xs, key2)[0])
  eval_ref, _ = eval_apply(params, xs)
  assert max_err(train1, eval_ref) > 1e-3 and max_err(train1, train2) > 1e-3
  model.eval()
  assert model.deterministic is True
  np.testing.assert_array_equal(call(model, xs)[0], eval_ref)
  np.testing.assert_array_equal(call(model, xs)[0], eval_ref)
  # Overrides at call time, and nnx.view.
  # (The module calls jitted too: op by op, each cost seconds of tiny compiles.)
  key = jax.random.key(5)
  call_train = nnx.jit(lambda m, x, r: m(x, deterministic=False, rngs=r))
  np.testing.assert_array_equal(call_train(model, xs, key)[0],
                                train_apply(params, xs, key)[0])
  np.testing.assert_array_equal(call_train(model, xs, nnx.Rngs(dropout=5))[0],
                                train_apply(params, xs, nnx.Rngs(dropout=5).dropout())[0])
  model.train()
  assert model.deterministic is False
  view = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(call(view, xs)[0], eval_ref)


def test_dropout_only_where_it_applies():
  for kwargs in ({"num_layers": 1, "dropout": 0.5}, {"num_layers": 2, "dropout": 0.0}):
    model = GRU(I, H, rngs=nnx.Rngs(0), **kwargs)  # no "dropout" stream needed
    assert model.rngs is None
    xs = randn(B, T, I)
    np.testing.assert_array_equal(model(xs)[0], model.config.apply(model.stack_params(), xs)[0])
  with pytest.raises(ValueError, match="needs rngs"):
    cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H), num_layers=2, dropout=0.5)
    GRU.from_params(cfg, cfg.init(jax.random.key(0)))


# -- gradients ------------------------------------------------------------------------------------

def test_grads_equal_rnnconfig_apply():
  model = GRU(I, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
  model.load_params(randomize(model.stack_params(), seed=4))
  cfg, params = model.config, model.stack_params()
  xs, lengths, h0 = randn(B, T, I), jnp.array([T, 1, 4]), randn(4, B, H, seed=2)

  def loss_model(m):
    ys, h = m(xs, lengths, h0)
    return jnp.sum(ys ** 2) + jnp.sum(jnp.sin(h))

  def loss_params(p):
    ys, h = cfg.apply(p, xs, lengths, h0)
    return jnp.sum(ys ** 2) + jnp.sum(jnp.sin(h))

  grads = nnx.jit(nnx.grad(loss_model))(model)
  ref = jax.jit(jax.grad(loss_params))(params)
  got = nnx.to_pure_dict(grads)["gru"]
  for l in range(cfg.num_layers):
    for d in cfg.directions:
      for name, g in ref[l][d].items():
        assert max_err(got[l][d][name], g) <= ATOL, (l, d, name)
        assert float(jnp.max(jnp.abs(g))) > 0
  # nnx.split + jax.grad gives the same.
  graphdef, state = nnx.split(model)
  grads2 = jax.jit(jax.grad(lambda s: loss_model(nnx.merge(graphdef, s))))(state)
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)


def test_load_params_checks():
  model = GRU(I, H, rngs=nnx.Rngs(0))
  other = jaxgru.RNNConfig(jaxgru.GRUConfig(I + 1, H))
  with pytest.raises(ValueError, match="GRU params"):
    model.load_params(other.init(jax.random.key(0)))
  with pytest.raises(ValueError, match="RNNConfig"):
    GRU.from_params(other.cell, [])


def test_rngs_refusals():
  # An int for rngs failed with "'int' object has no attribute 'params'", and an nnx.Rngs
  # without a dropout (or default) stream with Flax's KeyError from inside the constructor.
  with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs, such as nnx.Rngs\(0\), got int"):
    GRU(I, H, rngs=0)
  with pytest.raises(ValueError, match=r"dropout=0.5 draws its masks from rngs' 'dropout' "
                                       r"stream, which this nnx.Rngs lacks"):
    GRU(I, H, num_layers=2, dropout=0.5, rngs=nnx.Rngs(params=0))
  # Without dropout no stream but params is needed; with a dropout stream the masks apply.
  GRU(I, H, num_layers=2, rngs=nnx.Rngs(params=0))
  model = GRU(I, H, num_layers=2, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  xs = randn(B, T, I)
  train, _ = model(xs)
  evaluate, _ = model(xs, deterministic=True)
  assert float(jnp.max(jnp.abs(train - evaluate))) > 1e-3
  # A string would act as its truth value ("no" turning dropout off).
  with pytest.raises(ValueError, match=r"deterministic must be True or False, got 'no'"):
    model(xs, deterministic="no")
