"""The sequence classifier: masking, pooling, batching, synthetic and tiny-IMDB training, predict."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as plain
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, RNNConfig, ScanOptions
from jaxgru.tasks import classify
from jaxgru.tasks.classify import imdb
from test_imdb import make_archive, make_layout

E, H, V, K = 6, 5, 40, 16


def _model(pooling="mean_max", bidirectional=True, num_layers=2, vocab_size=V):
  rnn = RNNConfig(GRUConfig(E, H), num_layers=num_layers, bidirectional=bidirectional)
  return classify.Classifier(rnn, vocab_size=vocab_size, pooling=pooling, embed_dropout=0.1,
                             dropout=0.1, bigram_buckets=K)


def _init(model, seed):
  """Fresh params with a random (not zero) bigram table, so that the pairs matter."""
  params = model.init(jax.random.PRNGKey(seed))
  params["bigram"] = jax.random.normal(jax.random.PRNGKey(seed + 100), (K, E), jnp.float32)
  return params


def _reference_bigrams(ids):
  """Fibonacci hashing of (previous id, id) in Python integers, top log2(K) bits of 32."""
  prev = [0] + list(ids[:-1])
  return [(((p * 0x9E3779B1 + w) % 2**32) * 0x85EBCA77 % 2**32) >> (32 - 4)
          for p, w in zip(prev, ids)]


@functools.partial(jax.jit, static_argnums=0)
def _step(cell, p, h, x):
  """GRUConfig.step, compiled once per cell rather than run op by op at every step."""
  return cell.step(p, h, x)


def _reference_pooled(model, params, ids, length):
  """The pooled vector of ONE review, from its valid steps alone: a Python loop over time per
  direction, numpy pooling, no padding anywhere."""
  valid = [int(i) for i in ids[:length]]
  x = (np.asarray(params["embed"])[valid]
       + np.asarray(params["bigram"])[_reference_bigrams(valid)])
  finals = []
  for l in range(model.rnn.num_layers):
    cell = model.rnn.layer_cell(l)
    outs = []
    for d in model.rnn.directions:
      p, h = params["gru"][l][d], np.zeros(H, np.float32)
      steps = range(length - 1, -1, -1) if d == "bwd" else range(length)
      ys = np.zeros((length, H), np.float32)
      for t in steps:
        h = np.asarray(_step(cell, p, jnp.asarray(h), jnp.asarray(x[t])))
        ys[t] = h
      outs.append(ys)
      finals.append(h)
    x = np.concatenate(outs, axis=-1)
  parts = {"last": [np.concatenate(finals[-model.rnn.num_directions:])],
           "mean": [x.mean(axis=0)], "max": [x.max(axis=0)],
           "mean_max": [x.mean(axis=0), x.max(axis=0)]}[model.pooling]
  return np.concatenate(parts)


@pytest.mark.parametrize("pooling", classify.POOLINGS)
def test_pooled_matches_an_unpadded_python_loop(pooling):
  model = _model(pooling)
  params = _init(model, 0)
  rng = np.random.default_rng(0)
  lengths = np.array([7, 3, 1], np.int32)
  ids = rng.integers(2, V, (3, 9)).astype(np.int32)
  ids[np.arange(9)[None, :] >= lengths[:, None]] = imdb.PAD_ID
  got = np.asarray(jax.jit(model.pooled)(params, jnp.asarray(ids), jnp.asarray(lengths)))
  assert got.shape == (3, model.pooled_size)
  for b in range(3):
    assert_close(got[b], _reference_pooled(model, params, ids[b], lengths[b]), steps=2 * 9,
                 terms=gru_terms(2 * H, H))


@pytest.mark.parametrize("pooling", classify.POOLINGS)
def test_padding_never_changes_a_prediction(pooling):
  """The same review padded to two lengths (with different junk after it) gives one probability."""
  model = _model(pooling)
  params = _init(model, 1)
  cfg_vocab = ("<pad>", "<oov>") + tuple(f"w{i}" for i in range(V - 2))
  review = ["w3", "w7", "w1", "nope", "w30"]
  short, n1 = imdb.encode([review], cfg_vocab, 8)
  long, n2 = imdb.encode([review], cfg_vocab, 64)
  long[0, 5:] = 9  # even non-padding ids past the length must not matter
  logits = jax.jit(model.logits)
  p_short = jax.nn.sigmoid(logits(params, jnp.asarray(short), jnp.asarray(n1)))
  p_long = jax.nn.sigmoid(logits(params, jnp.asarray(long), jnp.asarray(n2)))
  assert_close(p_short, p_long, steps=2 * 8, terms=gru_terms(2 * H, H))  # 2 layers, <= 8 steps


def test_dropout_only_with_a_key_and_empty_sequences_are_finite():
  model = _model()
  params = model.init(jax.random.PRNGKey(2))
  ids = jnp.asarray(np.arange(2, 14, dtype=np.int32).reshape(2, 6))
  lengths = jnp.asarray([6, 0], jnp.int32)
  logits = jax.jit(model.logits)
  a = logits(params, ids, lengths)
  np.testing.assert_array_equal(a, logits(params, ids, lengths))
  b = logits(params, ids, lengths, dropout_key=jax.random.PRNGKey(3))
  assert not np.allclose(a, b)
  assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()


@pytest.mark.parametrize("pooling", ["last", "mean_max"])
def test_loss_and_gradient_at_70_steps_with_lengths_equal_the_plain_loop(pooling):
  """Past the custom VJP's threshold (64 steps on the CPU): reviews padded to 70 steps, of
  lengths 70 down to 0, through the bidirectional two-layer classifier with its dropout on; the
  loss and its gradient (embeddings and bigrams included) through jaxgru's loop equal those of
  the same classifier whose stack runs the plain loop of tests/reference.py. "last" pools the
  final states, "mean_max" the outputs."""
  steps, lengths = 70, jnp.array([70, 66, 33, 1, 0], jnp.int32)
  model = _model(pooling)
  assert ScanOptions().resolved(steps, len(lengths), H).custom_vjp  # the path under test
  reference = dataclasses.replace(model, rnn=plain.plain_rnn(model.rnn))
  params = _init(model, 3)
  ids = jax.random.randint(jax.random.PRNGKey(4), (len(lengths), steps), 1, V, jnp.int32)
  ids = jnp.where(jnp.arange(steps)[None, :] < lengths[:, None], ids, 0)  # padding past lengths
  labels = jnp.array([1, 0, 1, 1, 0], jnp.int32)

  def loss_and_grad(m):
    loss = lambda p: classify.loss_and_metrics(m, p, ids, lengths, labels,
                                               dropout_key=jax.random.PRNGKey(5))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, _), grads = loss_and_grad(model)
  (want_loss, _), want_grads = loss_and_grad(reference)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  for path, g, w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                        jax.tree.leaves(want_grads)):
    assert np.abs(np.asarray(w)).max() > 0, jax.tree_util.keystr(path)
    # Two layers of T steps, the second one's input 2H wide.
    assert_close(g, w, steps=2 * steps, terms=gru_terms(2 * H, H, len(lengths)),
                 err_msg=jax.tree_util.keystr(path))


def test_synthetic_data_labels_follow_the_rule_with_a_gap():
  x, y = classify.synthetic_data(0, 500)
  assert x.shape == (500, 10, 8) and x.dtype == np.float32 and y.dtype == np.int32
  s = x[:, :, 0].sum(axis=1, dtype=np.float64) - x[:, :, 1].sum(axis=1, dtype=np.float64)
  np.testing.assert_array_equal(y, (s > 0).astype(np.int32))
  assert np.abs(s).min() >= 1.0 and 0.4 < y.mean() < 0.6
  x2, _ = classify.synthetic_data(0, 500)
  np.testing.assert_array_equal(x, x2)
  _, yr = classify.synthetic_data(0, 2000, random_labels=True)
  assert 0.45 < yr.mean() < 0.55


def _split(n=40, steps=30, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, steps + 1, n).astype(np.int32)
  ids = np.zeros((n, steps), np.int32)
  for i, l in enumerate(lengths):
    ids[i, :l] = rng.integers(2, V, l)
  return classify.Split(ids, lengths, rng.integers(0, 2, n).astype(np.int32))


def test_train_batches_are_bucketed_deterministic_and_cover_each_epoch():
  split = _split()
  batches = classify.TrainBatches(split, batch_size=8, bucket=8, seed=3, window=2)
  assert batches.steps_per_epoch == 5
  seen = []
  for s in range(5):
    ids, lengths, labels = batches(s)
    assert ids.shape[0] == 8 and ids.shape[1] % 8 == 0 or ids.shape[1] == 30
    assert ids.shape[1] >= lengths.max() and ids.shape[1] - lengths.max() < 8
    rows = [int(np.flatnonzero((split.inputs[:, :ids.shape[1]] == r).all(1)
                               & (split.lengths == n))[0]) for r, n in zip(ids, lengths)]
    np.testing.assert_array_equal(split.labels[rows], labels)
    seen += rows
  assert len(set(seen)) == 40  # one epoch = every example once
  again = classify.TrainBatches(split, batch_size=8, bucket=8, seed=3, window=2)
  for s in (7, 2, 11):  # any order, as after a resume
    for a, b in zip(batches(s), again(s)):
      np.testing.assert_array_equal(a, b)


def test_eval_batches_cover_every_example_once():
  split = _split(n=23)
  seen = []
  for index, ids, lengths in classify.eval_batches(split, 10, bucket=4):
    assert ids.shape[0] == 10 and lengths.shape == (10,)
    assert (lengths[index.size:] == 0).all()
    np.testing.assert_array_equal(lengths[: index.size], split.lengths[index])
    seen += index.tolist()
  assert sorted(seen) == list(range(23))


def test_train_step_changes_every_parameter_and_compiles_once_per_length():
  cfg = classify.ClassifyConfig(data=classify.ImdbData(data_path="unused", vocab_size=V),
                                rnn=RNNConfig(GRUConfig(E, H), num_layers=2, bidirectional=True),
                                batch_size=8, num_models=2, warmup_steps=0)
  state = classify.init_states(cfg, total_steps=10)
  before = jax.tree.map(np.asarray, state.params)
  step = classify.make_train_step(cfg, total_steps=10)
  split = _split()
  batches = classify.TrainBatches(split, 8, bucket=32, seed=0)
  state, metrics = step(state, *batches(0))
  assert metrics["loss"].shape == (2,) and np.isfinite(np.asarray(metrics["loss"])).all()
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(before),
                        jax.tree.leaves(before), jax.tree.leaves(state.params)):
    assert np.abs(np.asarray(b) - a).reshape(2, -1).max(axis=1).min() > 0, path[0]
  compiled = step._cache_size()
  state, _ = step(state, *batches(1))  # same padded length: no new compilation
  assert step._cache_size() == compiled


def test_synthetic_task_reaches_99_percent(tmp_path):
  # Accuracy only: the time it takes is measured by benchmarks, not asserted on a shared machine.
  summary = classify.train_and_evaluate(classify.synthetic_defaults(), str(tmp_path),
                                        log=lambda m: None)
  assert summary["test_accuracy"] >= 0.99, summary
  assert summary["test_size"] == 2000


def test_random_labels_stay_at_chance(tmp_path):
  cfg = classify.synthetic_defaults(data=classify.SyntheticData(random_labels=True))
  summary = classify.train_and_evaluate(cfg, str(tmp_path), log=lambda m: None)
  assert abs(summary["test_accuracy"] - 0.5) < 0.05, summary


TINY_IMDB = dict(rnn=RNNConfig(GRUConfig(8, 8), bidirectional=True), batch_size=4, epochs=10, bucket=4, warmup_steps=0, log_every=2, checkpoint_every=4,
                 learning_rates=(0.05,), eval_batch_size=8)


@pytest.mark.slow
def test_tiny_imdb_trains_saves_its_vocabulary_and_predicts(tmp_path):
  root = str(tmp_path / "data")
  make_layout(root)
  path = make_archive(root, str(tmp_path / "aclImdb_v1.tar.gz"))
  cfg = classify.ClassifyConfig(data=classify.ImdbData(path, vocab_size=30, max_length=12),
                                **TINY_IMDB)
  workdir = str(tmp_path / "run")
  summary = classify.train_and_evaluate(cfg, workdir, log=lambda m: None, flags={"x": 1})
  assert summary["test_size"] == 9 and summary["train_size"] == 8
  assert summary["test_accuracy"] >= 8 / 9, summary  # the words give the labels away
  on_disk = json.load(open(os.path.join(workdir, "summary.json")))
  for key in ("test_accuracy", "train_seconds", "wall_seconds", "config", "flags"):
    assert key in on_disk
  assert on_disk["flags"] == {"x": 1}

  _, model, params, vocab = classify.load_trained(workdir)
  texts = imdb.load_reviews(path)["train"].texts
  assert vocab == imdb.build_vocab([imdb.tokenize(t) for t in texts], cfg.data.vocab_size)
  probs = classify.predict(workdir, ["Wonderful, great film. Loved it!", "Awful and boring."])
  assert probs.shape == (2,) and probs[0] > 0.5 > probs[1]
  # The same review padded to different lengths: one probability.
  assert jax.tree.leaves(params)[0].shape[0] == 3  # the default: an ensemble of three
  ids, n = imdb.encode_texts(["Great film"], vocab, 40)
  each = [float(jax.nn.sigmoid(model.logits(jax.tree.map(lambda x: x[i], params),
                                             jnp.asarray(ids), jnp.asarray(n)))[0])
          for i in range(3)]
  np.testing.assert_allclose(classify.predict(workdir, ["Great film"])[0], np.mean(each),
                             rtol=1e-6)
  with pytest.raises(imdb.DataError, match="no words"):
    classify.predict(workdir, ["..."])

  evaluated = classify.evaluate_trained(workdir)
  assert evaluated["size"] == 9
  np.testing.assert_allclose(evaluated["accuracy"], summary["test_accuracy"])


def test_one_classifier_fed_by_either_source_and_configs_round_trip():
  """The data source alone decides the input kind; a config survives config.json."""
  import dataclasses
  synthetic, text = classify.synthetic_defaults(), classify.ClassifyConfig(data=classify.ImdbData("x"))
  assert synthetic.model().vocab_size is None and synthetic.task == "classify"
  assert text.model().vocab_size == text.data.vocab_size and text.task == "imdb"
  for cfg in (synthetic, text):
    assert classify.ClassifyConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
  with pytest.raises(ValueError, match="8 features per step"):
    dataclasses.replace(synthetic, rnn=RNNConfig(GRUConfig(5, 4)))
  for name in ("seed", "eval_every"):  # a string failed inside a comparison
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 0, got '1'"):
      dataclasses.replace(synthetic, **{name: "1"})
  listed = dataclasses.replace(synthetic, learning_rates=list(synthetic.learning_rates))
  assert listed == synthetic and hash(listed) == hash(synthetic)
  with pytest.raises(ValueError, match="vocab_size must be at least 3"):
    classify.ImdbData("x", vocab_size=2)
  with pytest.raises(ValueError, match="older layout"):
    classify.ClassifyConfig.from_json({"task": "imdb", "vocab_size": 30})
  with pytest.raises(ValueError, match="prediction from text needs an IMDB run"):
    classify.SyntheticData().encode_texts(["hi"], ())
