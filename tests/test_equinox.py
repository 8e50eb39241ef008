"""Tests for jaxgru.equinox: live parity with ``eqx.nn.GRUCell`` both ways, and the module."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jaxgru  # noqa: E402
import reference as plain  # noqa: E402
from tolerance import assert_close, gru_terms  # noqa: E402
from jaxgru.equinox import GRU, from_equinox, to_equinox  # noqa: E402

I, H, T, B = 3, 4, 6, 3
ATOL = 1e-6  # float32
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def randn(*shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def randomize(tree, seed=0):
  """Every leaf replaced by normal noise (every bias non-zero, b_h's z and r blocks included)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.5, size=np.shape(x)).astype(np.float32))
                for x in leaves])


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@jax.jit
def run_eqx_cell(cell, xs_BTI, h0_BH):
  """Equinox's own cell in a lax.scan over time (as its docs show), vmapped over the batch."""
  def one(xs_TI, h_H):
    h_last, ys = jax.lax.scan(lambda h, x: (cell(x, h),) * 2, h_H, xs_TI)
    return ys, h_last
  return jax.vmap(one)(xs_BTI, h0_BH)


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


# -- eqx.nn.GRUCell -------------------------------------------------------------------------------

@pytest.mark.parametrize("use_bias", [True, False])
def test_from_equinox_live(use_bias):
  cell = eqx.nn.GRUCell(I, H, use_bias=use_bias, key=jax.random.key(0))  # non-zero biases
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  ys_eqx, h_eqx = run_eqx_cell(cell, xs, h0)
  cfg, params = from_equinox(cell)
  assert cfg == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, use_bias=use_bias,
                                                  param_dtype=jnp.float32))
  ys, h_last = jax.jit(cfg.apply)(params, xs, None, h0[None])
  assert max_err(ys, ys_eqx) <= ATOL and max_err(h_last[0], h_eqx) <= ATOL
  # Exact round trip: Equinox -> jaxgru -> Equinox gives the same arrays.
  back = to_equinox(cfg, params)
  assert (back.input_size, back.hidden_size, back.use_bias) == (I, H, use_bias)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(cell)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("use_bias", [True, False])
def test_to_equinox_live(use_bias):
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, use_bias=use_bias))
  params = randomize(cfg.init(jax.random.key(0)))
  xs, h0 = randn(B, T, I), randn(B, H, seed=2)
  ys, h_last = jax.jit(cfg.apply)(params, xs, None, h0[None])
  cell = to_equinox(cfg, params)
  assert isinstance(cell, eqx.nn.GRUCell)
  ys_eqx, h_eqx = run_eqx_cell(cell, xs, h0)
  assert max_err(ys, ys_eqx) <= ATOL and max_err(h_last[0], h_eqx) <= ATOL
  # And back: the same function; the z and r recurrent biases come back folded into b_x.
  cfg2, params2 = from_equinox(cell)
  assert cfg2 == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, use_bias=use_bias,
                                                   param_dtype=jnp.float32))
  p, p2 = params[0]["fwd"], params2[0]["fwd"]
  for n in ("w_x", "w_h"):
    np.testing.assert_array_equal(p2[n], p[n])
  if use_bias:
    np.testing.assert_array_equal(p2["b_h"][2 * H:], p["b_h"][2 * H:])
    np.testing.assert_array_equal(p2["b_h"][: 2 * H], 0.0)
    np.testing.assert_allclose(p2["b_x"], p["b_x"] + p["b_h"].at[2 * H:].set(0.0), atol=0)
  # With the z and r recurrent biases zero the round trip is exact array for array.
  if use_bias:
    params[0]["fwd"]["b_h"] = params[0]["fwd"]["b_h"].at[: 2 * H].set(0.0)
  _, params3 = from_equinox(to_equinox(cfg, params))
  for n, v in params[0]["fwd"].items():
    np.testing.assert_array_equal(params3[0]["fwd"][n], v)


def test_pytorch_to_equinox():
  """Equinox issue 1003: PyTorch's GRU weights onto eqx.nn.GRUCell, checked against outputs
  recorded from torch (tests/fixtures, made by make_fixtures.py)."""
  with np.load(os.path.join(FIXTURES, "torch_gru_nobias.npz")) as f:
    f = dict(f)
  cfg, params = jaxgru.from_torch({k: v for k, v in f.items() if k.startswith("weight_")})
  cell = to_equinox(cfg, params)
  ys, h_last = run_eqx_cell(cell, jnp.asarray(f["x"]), jnp.asarray(f["h0"][0]))
  assert max_err(ys, f["y"]) <= ATOL and max_err(h_last, f["h_n"][0]) <= ATOL
  # With biases: layer 0's forward cell of the bidirectional fixture; torch recorded its final
  # state as h_n[0].
  with np.load(os.path.join(FIXTURES, "torch_gru_2layer_bidirectional.npz")) as f:
    f = dict(f)
  sd = {k: f[k] for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")}
  cell = to_equinox(*jaxgru.from_torch(sd))
  _, h_last = run_eqx_cell(cell, jnp.asarray(f["x"]), jnp.asarray(f["h0"][0]))
  assert max_err(h_last, f["h_n"][0]) <= ATOL
  # The whole stack as the Equinox module.
  model = GRU.from_params(*jaxgru.from_torch({k: v for k, v in f.items()
                                              if k.startswith(("weight_", "bias_"))}))
  ys, h_n = model.batched(jnp.asarray(f["x"]), h0=jnp.asarray(f["h0"]))
  assert max_err(ys, f["y"]) <= 1e-5 and max_err(h_n, f["h_n"]) <= 1e-5


def test_equinox_refusals():
  cell = jaxgru.GRUConfig(I, H)
  c = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, variant="reset_before"))
  with pytest.raises(ValueError, match="reset_after"):
    to_equinox(c, c.init(jax.random.key(0)))
  c = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H, recurrent_activation="hard_sigmoid"))
  with pytest.raises(ValueError, match="tanh"):
    to_equinox(c, c.init(jax.random.key(0)))
  for c in (jaxgru.RNNConfig(cell, num_layers=2), jaxgru.RNNConfig(cell, bidirectional=True)):
    with pytest.raises(ValueError, match="one layer in one direction"):
      to_equinox(c, c.init(jax.random.key(0)))
  with pytest.raises(ValueError, match=r"to_equinox takes a jaxgru.RNNConfig .*got GRUConfig"):
    to_equinox(cell, [{"fwd": cell.init(jax.random.key(0))}])
  with pytest.raises(ValueError, match="eqx.nn.GRUCell"):
    from_equinox(eqx.nn.LSTMCell(I, H, key=jax.random.key(0)))


# -- the module -----------------------------------------------------------------------------------

def test_module_params_and_values():
  key = jax.random.key(3)
  model = GRU(I, H, num_layers=2, bidirectional=True, initializer="pytorch", key=key)
  cfg = model.config
  assert cfg == jaxgru.RNNConfig(jaxgru.GRUConfig(I, H), num_layers=2, bidirectional=True)
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(cfg.init(key, "pytorch"))):
    np.testing.assert_array_equal(a, b)
  # The pytree's array leaves are exactly the stack params.
  leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
  assert len(leaves) == len(jax.tree.leaves(model.params))
  params = randomize(model.params, seed=5)
  model = GRU.from_params(cfg, params)
  xs, lengths, h0 = randn(B, T, I), jnp.array([T, 2, 0]), randn(4, B, H, seed=2)
  ys, h_last = eqx.filter_jit(lambda m, *a: m.batched(*a))(model, xs, lengths, h0)
  ys_ref, h_ref = jax.jit(reference_stack, static_argnums=0)(cfg, params, xs, lengths, h0)
  assert max_err(ys, ys_ref) <= ATOL and max_err(h_last, h_ref) <= ATOL
  np.testing.assert_array_equal(ys, jax.jit(cfg.apply)(params, xs, lengths, h0)[0])
  # Per example, and vmapped: the same results.
  ys1, h1 = eqx.filter_jit(lambda m, x, n, h: m(x, n, h))(model, xs[1], lengths[1], h0[:, 1])
  assert max_err(ys1, ys_ref[1]) <= ATOL and max_err(h1, h_ref[:, 1]) <= ATOL
  ys_v, h_v = jax.jit(jax.vmap(model, in_axes=(0, 0, 1)))(xs, lengths, h0)
  assert max_err(ys_v, ys_ref) <= ATOL
  assert max_err(jnp.swapaxes(h_v, 0, 1), h_ref) <= ATOL


def test_module_grads_equal_rnnconfig_apply():
  model = GRU(I, H, num_layers=2, bidirectional=True, merge="sum", key=jax.random.key(0))
  model = GRU.from_params(model.config, randomize(model.params, seed=6))
  cfg = model.config
  xs, lengths, h0 = randn(B, T, I), jnp.array([T, 1, 4]), randn(4, B, H, seed=2)

  def loss_of(run):
    ys, h = run
    return jnp.sum(ys ** 2) + jnp.sum(jnp.sin(h))

  grads = eqx.filter_jit(eqx.filter_grad(lambda m: loss_of(m.batched(xs, lengths, h0))))(model)
  ref = jax.jit(jax.grad(lambda p: loss_of(cfg.apply(p, xs, lengths, h0))))(model.params)
  for g, r in zip(jax.tree.leaves(grads.params), jax.tree.leaves(ref)):
    assert max_err(g, r) <= ATOL
    assert float(jnp.max(jnp.abs(r))) > 0
  # Through the per-example call under vmap: the same gradients.
  def loss_vmapped(m):
    ys, h = jax.vmap(m, in_axes=(0, 0, 1))(xs, lengths, h0)
    return loss_of((ys, h))
  grads_v = eqx.filter_jit(eqx.filter_grad(loss_vmapped))(model)
  for g, r in zip(jax.tree.leaves(grads_v.params), jax.tree.leaves(ref)):
    assert max_err(g, r) <= ATOL


def test_module_dropout():
  model = GRU(I, H, num_layers=3, dropout=0.5, key=jax.random.key(0))
  cfg, params = model.config, model.params
  xs, key = randn(B, T, I), jax.random.key(1)
  with pytest.raises(ValueError, match="needs a key"):
    model.batched(xs)
  # The module calls are jitted (op by op, each cost seconds of tiny compiles), each in a
  # program of its own, apart from the reference it is compared to.
  batched = eqx.filter_jit(lambda m, x, k: m.batched(x, key=k))
  batched_no_key = eqx.filter_jit(lambda m, x: m.batched(x))
  train, _ = batched(model, xs, key)
  np.testing.assert_array_equal(
      train, jax.jit(lambda p, x, k: cfg.apply(p, x, dropout_key=k))(params, xs, key)[0])
  eval_ref, _ = jax.jit(cfg.apply)(params, xs)
  assert max_err(train, eval_ref) > 1e-3
  inference = eqx.nn.inference_mode(model)
  assert inference.inference is True
  np.testing.assert_array_equal(batched(inference, xs, key)[0], eval_ref)
  np.testing.assert_array_equal(batched_no_key(inference, xs)[0], eval_ref)
  # Per example: the key is the batch-of-one's.
  np.testing.assert_array_equal(eqx.filter_jit(lambda m, x, k: m(x, key=k))(model, xs[0], key)[0],
                                batched(model, xs[:1], key)[0][0])
  # No dropout layer to apply: no key needed.
  one = GRU(I, H, dropout=0.5, key=jax.random.key(0))
  np.testing.assert_array_equal(batched_no_key(one, xs)[0],
                                jax.jit(one.config.apply)(one.params, xs)[0])


def test_from_params_checks():
  other = jaxgru.RNNConfig(jaxgru.GRUConfig(I + 1, H))
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H))
  with pytest.raises(ValueError, match="GRU params"):
    GRU.from_params(cfg, other.init(jax.random.key(0)))
  with pytest.raises(ValueError, match="RNNConfig"):
    GRU.from_params(cfg.cell, [])


def test_per_example_call_names_per_example_shapes():
  """The per-example call refuses a batch (or a wrong width) in its own terms, (T, I), not in
  those of the batch of one it makes; jax.vmap of it still runs a batch."""
  model = GRU(I, H, num_layers=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"equinox GRU xs: expected shape \(T, input_size=3\), "
                                       r"one sequence .*got \(2, 5, 3\)"):
    model(jnp.zeros((2, 5, I)))
  with pytest.raises(ValueError, match=r"equinox GRU xs: .*got \(5, 4\)"):
    model(jnp.zeros((5, I + 1)))
  with pytest.raises(ValueError, match=r"equinox GRU h0: expected shape \(L\*D=2, H=4\)"):
    model(jnp.zeros((5, I)), h0=jnp.zeros((2, 1, H)))
  with pytest.raises(ValueError, match=r"equinox GRU length: expected shape \(\), one integer"):
    model(jnp.zeros((5, I)), length=jnp.array([3]))
  with pytest.raises(ValueError, match=r"equinox GRU resets: expected shape \(T=5,\)"):
    model(jnp.zeros((5, I)), resets=jnp.zeros((4,), bool))
  xs = jax.random.normal(jax.random.key(1), (2, 5, I))
  ys, _ = jax.vmap(model)(xs, jnp.array([5, 2]))
  want, _ = model.batched(xs, jnp.array([5, 2]))
  assert_close(ys, want, steps=2 * 5, terms=gru_terms(2 * H, H, 2))  # at most 2 layers
  with pytest.raises(ValueError, match=r"inference must be True or False, got 'yes'"):
    GRU(I, H, num_layers=2, dropout=0.5, inference="yes", key=jax.random.key(0))(xs[0])
  # Nested lists are inputs as the arrays they spell (they used to fail on ``xs_TI[None]``).
  ys, _ = model(np.asarray(xs[0]).tolist(), 5, np.zeros((2, H)).tolist())
  assert_close(ys, want[0], steps=2 * 5, terms=gru_terms(2 * H, H, 2))
