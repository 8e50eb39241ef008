"""The addition task: encoding, generated problems, training, many models, sharding."""

import functools
import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as plain
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, RNNConfig, ScanOptions
from jaxgru.tasks import addition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 255, 256, 2**64 - 1, 2**64, "big"])
def test_bits_round_trip(n):
  if n == "big":
    n = random.Random(0).getrandbits(5000) | 1 << 4999
  width = max(n.bit_length(), 1) + 3
  bits = addition.to_bits(n, width)
  assert bits.shape == (width,)
  assert addition.from_bits(bits) == n
  # Least significant bit first, as Python's own arithmetic says.
  assert [int(b) for b in bits] == [(n >> i) & 1 for i in range(width)]


def test_encode_matches_python_sum():
  rng = random.Random(1)
  for _ in range(20):
    a, b = rng.getrandbits(rng.randint(1, 3000)), rng.getrandbits(rng.randint(1, 3000))
    x, y = addition.encode(a, b)
    assert x.shape == (len(y), 2)
    assert addition.from_bits(x[:, 0]) == a and addition.from_bits(x[:, 1]) == b
    assert addition.from_bits(y) == a + b


def test_to_bits_rejects_bad_input():
  with pytest.raises(ValueError, match="non-negative integer"):
    addition.to_bits(-1, 4)
  with pytest.raises(ValueError, match="needs 5 bits"):
    addition.to_bits(16, 4)


def test_random_problems_have_python_sums():
  x, y = addition.random_batch(jax.random.PRNGKey(3), 64, 12)
  x, y = np.asarray(x), np.asarray(y)
  assert x.shape == (64, 13, 2) and y.shape == (64, 13)
  assert (x[:, -1] == 0).all()  # room for the final carry
  for i in range(64):
    a, b = addition.from_bits(x[i, :, 0]), addition.from_bits(x[i, :, 1])
    assert a < 2**12 and b < 2**12
    assert addition.from_bits(y[i]) == a + b
  # Different keys give different problems; the same key the same ones.
  x2, _ = addition.random_batch(jax.random.PRNGKey(3), 64, 12)
  x3, _ = addition.random_batch(jax.random.PRNGKey(4), 64, 12)
  np.testing.assert_array_equal(x, x2)
  assert not np.array_equal(x, x3)


def _longest_carry_chain(a_bits, b_bits):
  """Longest run of positions an incoming carry propagates through (a XOR b = 1), by a loop."""
  best = run = 0
  for a, b in zip(a_bits, b_bits):
    run = run + 1 if a != b else 0
    best = max(best, run)
  return best


def test_mixed_batches_have_python_sums_and_long_carry_chains():
  batch, bits = 200, 64
  x, y = addition.random_batch(jax.random.PRNGKey(5), batch, bits, mixed=0.5)
  x, y = np.asarray(x), np.asarray(y)
  for i in range(batch):
    a, b = addition.from_bits(x[i, :, 0]), addition.from_bits(x[i, :, 1])
    assert addition.from_bits(y[i]) == a + b
  chains = [_longest_carry_chain(x[i, :, 0], x[i, :, 1]) for i in range(batch)]
  uniform, mixed = np.array(chains[:batch // 2]), np.array(chains[batch // 2:])
  # Uniform bits: the longest chain grows like log2(bits) (mean about 5.4 at 64 bits, >= 20 with
  # probability about 3e-5); the mixed half draws the propagate probability q ~ U(0, 1), and
  # about 11% of its problems have a chain of 20 or more.
  assert uniform.max() < 20 and 3 < uniform.mean() < 8
  assert (mixed >= 20).sum() >= 5 and mixed.mean() > uniform.mean() + 2
  # mixed=0 is the uniform batch itself; the fraction must be in [0, 1].
  x0, _ = addition.random_batch(jax.random.PRNGKey(5), batch, bits, mixed=0.0)
  xu, _ = addition.random_batch(jax.random.PRNGKey(5), batch, bits)
  np.testing.assert_array_equal(x0, xu)
  with pytest.raises(ValueError, match="fraction"):
    addition.random_batch(jax.random.PRNGKey(5), batch, bits, mixed=1.5)


def _small_cfg(hidden_size=8, **kw):
  base = dict(rnn=RNNConfig(GRUConfig(2, hidden_size)), bits=3, batch_size=32, steps=20, eval_bits=(8,), eval_size=64,
              long_eval_size=64, log_every=5, checkpoint_every=10, consolidate_steps=10,
              consolidate_bits=6)
  base.update(kw)
  return addition.AdditionConfig(**base)


def test_one_step_changes_every_parameter():
  cfg = _small_cfg(num_models=2)
  state = addition.init_states(cfg)
  new, metrics = addition.make_train_step(cfg)(jax.tree.map(jnp.copy, state))
  assert np.asarray(metrics["loss"]).shape == (2,)
  for path, old_leaf, new_leaf in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                      jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
    changed = np.abs(np.asarray(new_leaf) - np.asarray(old_leaf)).max(axis=tuple(
        range(1, np.ndim(old_leaf))))
    assert (changed > 0).all(), f"{jax.tree_util.keystr(path[0])} did not change"
  np.testing.assert_array_equal(np.asarray(new.step), [1, 1])


def test_evaluate_against_python_reference():
  """The chunked evaluation (time and problem chunks) equals a per-problem Python check."""
  cfg = _small_cfg(num_models=2, hidden_size=4)
  params = addition.init_states(cfg).params
  model = cfg.model()
  evaluate = addition.make_evaluate(cfg, bits=20, size=30, batch_chunk=7, time_chunk=6)
  got = evaluate(params)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), addition.EVAL_SALT + 20)
  x, y = addition.random_batch(key, 30, 20)
  np.testing.assert_array_equal(x, addition.eval_batch(cfg.seed, 20, 30)[0])
  for m in range(2):
    p = jax.tree.map(lambda l: l[m], params)
    logits, _ = jax.jit(model.logits)(p, x)
    want = np.mean([np.array_equal(np.asarray(logits[i]) > 0, np.asarray(y[i]) > 0)
                    for i in range(30)])
    assert got[m] == pytest.approx(want)


def test_evaluation_chunks_of_problems_follow_the_number_of_models():
  """Chunks of problems keep a step's (models, problems, 3H) gate array near 1.5 MiB, in equal
  chunks; the result does not depend on them."""
  from jaxgru.tasks.addition.train import _eval_batch_chunk
  assert _eval_batch_chunk(1000, 64, 16) == 125  # 8 chunks of at most 128
  assert _eval_batch_chunk(512, 64, 16) == 128
  assert _eval_batch_chunk(1000, 1, 16) == 1000  # one model: one chunk
  assert _eval_batch_chunk(1000, 4096, 16) == 2  # at least one problem: 500 chunks of 2
  cfg = _small_cfg(num_models=2, hidden_size=4)
  params = addition.init_states(cfg).params
  chunked = addition.make_evaluate(cfg, bits=20, size=30, batch_chunk=7, time_chunk=6)(params)
  np.testing.assert_array_equal(addition.make_evaluate(cfg, bits=20, size=30)(params), chunked)


def test_loss_and_gradient_at_70_steps_equal_the_plain_loop():
  """Past the custom VJP's threshold (64 steps on the CPU): on 69-bit problems (T = 70) the
  task's loss and its gradient through jaxgru's loop equal those of the same model whose stack
  runs the plain loop of tests/reference.py, from the same parameters."""
  bits, batch, hidden = 69, 16, 12
  rnn = RNNConfig(GRUConfig(input_size=2, hidden_size=hidden), num_layers=2)
  assert ScanOptions().resolved(bits + 1, batch, hidden).custom_vjp  # the path under test
  model, reference = addition.AdditionModel(rnn), addition.AdditionModel(plain.plain_rnn(rnn))
  params = model.init(jax.random.PRNGKey(0), "pytorch")  # larger weights than keras's: h moves
  x, y = addition.random_batch(jax.random.PRNGKey(1), batch, bits, mixed=0.5)

  def loss_and_grad(m):
    loss = lambda p: addition.loss_and_metrics(m, p, x, y)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, metrics), grads = loss_and_grad(model)
  (want_loss, want_metrics), want_grads = loss_and_grad(reference)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  assert float(metrics["bit_accuracy"]) == float(want_metrics["bit_accuracy"])
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                        jax.tree.leaves(want_grads)):
    assert np.abs(np.asarray(w)).max() > 0, jax.tree_util.keystr(path)
    # Two layers of T steps (the first one's error enters the second).
    assert_close(g, w, steps=2 * (bits + 1), terms=gru_terms(hidden, hidden, batch),
                 err_msg=jax.tree_util.keystr(path))


def test_models_are_grouped_evenly():
  from jaxgru.tasks.addition.train import _group_size  # pylint: disable=import-outside-toplevel
  # (models, most per group) -> models per group
  cases = {(1, 126): 1, (64, 126): 64, (126, 126): 126, (128, 126): 64, (256, 126): 64,
           (1024, 126): 64, (100, 63): 50, (3, 2): 1, (12, 5): 4,
           (997, 126): 125, (127, 126): 64}  # 997 and 127: prime, so the last group is smaller
  assert {k: _group_size(*k) for k in cases} == cases


@pytest.mark.parametrize("grouped", [False, True])
def test_many_models_equal_separate_runs(grouped, monkeypatch):
  """All models vmapped at once, or (grouped) two at a time, then the one left over."""
  steps = 5
  many = _small_cfg(num_models=3, seed=10, learning_rates=(0.01, 0.03))
  if grouped:
    from jaxgru.tasks.addition import train as addition_train
    monkeypatch.setattr(addition_train, "_group_size", lambda n, most: 2)
  state = addition.init_states(many)
  step = addition.make_train_step(many)
  for _ in range(steps):
    state, _ = step(state)
  for i, separate in enumerate(_separate_runs(steps, many.learning_rates)):
    for a, b in zip(separate, jax.tree.leaves(state.params), strict=True):
      np.testing.assert_allclose(a, np.asarray(b)[i], rtol=1e-5, atol=1e-6)


def test_many_models_past_the_custom_vjp_threshold_equal_separate_steps():
  """T = 70: one model's step takes the custom rule, two models' (vmapped, ScanOptions(models=2))
  JAX's autodiff of the loop; each model's new parameters and loss equal its own step's."""
  cfg = _small_cfg(num_models=2, seed=3, bits=69, batch_size=16, learning_rates=(0.01, 0.03))
  assert ScanOptions().resolved(70, 16, 8).custom_vjp
  assert not ScanOptions(models=2).resolved(70, 16, 8).custom_vjp
  steps = 3  # after the first, Adam's updates depend on the gradients' values, not only signs
  step, state, got = addition.make_train_step(cfg), addition.init_states(cfg), []
  for _ in range(steps):
    state, metrics = step(state)
    got.append(metrics)
  # Seed and learning rate live in the state: one compiled single-model step serves both.
  step1 = addition.make_train_step(_small_cfg(num_models=1, bits=69, batch_size=16))
  for i in range(2):
    one = _small_cfg(num_models=1, seed=3 + i, bits=69, batch_size=16,
                     learning_rates=(cfg.learning_rates[i],))
    s1 = addition.init_states(one)
    for t in range(steps):
      s1, m1 = step1(s1)
      for name in ("loss", "grad_norm"):
        assert float(got[t][name][i]) == pytest.approx(float(m1[name][0]), rel=1e-5), (name, t)
    # Adam divides each gradient by its own size, so a near-zero one's rounding (the two loops
    # add in another order) can move its update: atol is 1e-3 of one update (lr >= 0.01).
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(state.params), strict=True):
      np.testing.assert_allclose(np.asarray(b)[i], np.asarray(a)[0], rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _separate_runs(steps, learning_rates):
  """Models 0, 1, 2 of test_many_models_equal_separate_runs, each trained alone (one model per
  step, never grouped), computed once for both of its parametrizations: their parameter leaves."""
  # Seed and learning rate live in the state, so one compiled single-model step serves all.
  step1 = addition.make_train_step(_small_cfg(num_models=1))
  out = []
  for i in range(3):
    one = _small_cfg(num_models=1, seed=10 + i, learning_rates=(learning_rates[i % 2],))
    s1 = addition.init_states(one)
    for _ in range(steps):
      s1, _ = step1(s1)
    out.append([np.asarray(a)[0] for a in jax.tree.leaves(s1.params)])
  return out


_SHARDED_SCRIPT = r"""
import sys, jax, numpy as np
sys.path.insert(0, {root!r})
from jaxgru import GRUConfig, RNNConfig
from jaxgru.training import parallel
from jaxgru.tasks import addition
mesh = parallel.make_mesh()
out = {{}}
for n in (1, 4):  # 1 model: the batch is split; 4 models: the model axis is split
  cfg = addition.AdditionConfig(rnn=RNNConfig(GRUConfig(2, 8)), bits=4, batch_size=32, num_models=n,
                                learning_rates=(0.03,))
  state = parallel.shard_models(addition.init_states(cfg), mesh)
  step = addition.make_train_step(cfg, mesh)
  for _ in range(3):
    state, metrics = step(state)
  for i, leaf in enumerate(jax.tree.leaves(state.params)):
    out[f"n{{n}}_{{i}}"] = np.asarray(leaf)
  out[f"n{{n}}_loss"] = np.asarray(metrics["loss"])
np.savez({out!r}, **out)
print(len(jax.devices()))
"""


@pytest.mark.slow
def test_four_device_sharded_step_equals_one_device(tmp_path):
  results = {}
  for devices in (1, 4):
    out = str(tmp_path / f"d{devices}.npz")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT.format(root=ROOT, out=out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(devices)
    results[devices] = np.load(out)
  assert len(results[1].files) > 4
  for k in results[1].files:
    np.testing.assert_allclose(results[4][k], results[1][k], rtol=1e-4, atol=1e-5)


def test_config_round_trips_through_json_and_validates():
  cfg = _small_cfg(num_models=2, learning_rates=(0.01, 0.02))
  assert addition.AdditionConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
  with pytest.raises(ValueError, match="consolidate_mixed must be a fraction in"):
    _small_cfg(consolidate_mixed=1.5)
  with pytest.raises(ValueError, match="mixed_carries must be a fraction in \\[0, 1\\], got '0.5'"):
    _small_cfg(mixed_carries="0.5")
  with pytest.raises(ValueError, match="consolidate_lr_scale must be a positive finite number"):
    _small_cfg(consolidate_lr_scale=float("inf"))
  # Lists are the tuples they spell: the config stays hashable and equal to the tuple one.
  listed = _small_cfg(num_models=2, learning_rates=[0.01, 0.02], eval_bits=list(cfg.eval_bits))
  assert listed == cfg and hash(listed) == hash(cfg)
  with pytest.raises(ValueError, match="reads 2 bits per step"):
    addition.AdditionConfig(rnn=RNNConfig(GRUConfig(3, 8)))
  with pytest.raises(ValueError, match="older layout"):
    addition.AdditionConfig.from_json({"hidden_size": 8})
