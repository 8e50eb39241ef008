"""The classifier's configuration, training and evaluation, on :mod:`jaxgru.training`.

Owns :class:`ClassifyConfig` (a data source, the model's :class:`jaxgru.RNNConfig` and the head's
and optimizer's settings; no cell setting is restated here), the jitted step over N models,
scoring, and :func:`train_and_evaluate`. ``num_models`` models (seeds) train at once in one
compiled step (``jax.vmap``, each with its own init and dropout masks, all on the same batches);
with ``ensemble`` their averaged probabilities are the prediction. The synthetic task and IMDB
differ only in their data source. Shapes: N models, B examples, T steps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from jaxgru import training
from jaxgru.cell import INITIALIZERS, GRUConfig
from jaxgru.rnn import RNNConfig
from jaxgru.tasks import common
from jaxgru.tasks.classify import imdb as _imdb
from jaxgru.tasks.classify.input_pipeline import (SOURCES, Data, ImdbData, Split, SyntheticData,
                                                  TrainBatches, eval_batches, eval_sample)
from jaxgru.tasks.classify.models import Classifier, loss_and_metrics
from jaxgru.training import parallel

DataSource = Union[SyntheticData, ImdbData]


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  """Everything a classification run needs; ``run.py`` fills it from flags.

  The defaults are the IMDB settings chosen by measurement (see the README): an ensemble of
  three bidirectional GRUs over words and hashed word pairs, two epochs, which reached a test
  accuracy of 0.902 on the full 24,998-review test split in under 6 minutes of wall time on a
  2-core CPU. :func:`synthetic_defaults` gives the ``"classify"`` task's.

  Attributes:
    data: where the examples come from (:class:`SyntheticData`, :class:`ImdbData`).
    rnn: the GRU stack; its input size is the embedding size for word ids, the data's
      ``num_features`` for feature vectors. ``rnn.dropout`` is between layers.
    pooling, embed_dropout, dropout, bigram_buckets: the :class:`Classifier`'s.
    bucket: batches are padded to a multiple of this many steps.
    eval_every: steps between held-out evaluations during training (0: none), on
      ``eval_subset`` test examples.
  """

  data: DataSource = ImdbData()
  rnn: RNNConfig = RNNConfig(GRUConfig(input_size=64, hidden_size=64), bidirectional=True)
  pooling: str = "mean_max"
  embed_dropout: float = 0.2
  dropout: float = 0.3
  bigram_buckets: int = 32768
  initializer: str = INITIALIZERS[0]
  bucket: int = 64
  # Optimization.
  batch_size: int = 64
  epochs: int = 2
  optimizer: str = "adamw"
  learning_rates: tuple[float, ...] = (3e-3,)
  schedule: str = "cosine"
  warmup_steps: int = 100
  clip_norm: float = 1.0
  weight_decay: float = 1e-4
  seed: int = 0
  num_models: int = 3             # trained at once (vmap), seeds seed, seed + 1, ...
  ensemble: bool = True           # predict with the models' averaged probabilities
  # Bookkeeping.
  eval_batch_size: int = 256
  eval_every: int = 0
  eval_subset: int = 1000
  log_every: int = 50
  checkpoint_every: int = 500

  def __post_init__(self):
    if isinstance(self.learning_rates, list):  # taken as the tuple it spells
      object.__setattr__(self, "learning_rates", tuple(self.learning_rates))
    if not isinstance(self.data, tuple(SOURCES.values())):
      raise ValueError(f"data must be one of {[s.__name__ for s in SOURCES.values()]}, got "
                       f"{type(self.data).__name__}")
    for name in ("bucket", "batch_size", "epochs", "num_models", "eval_batch_size", "log_every",
                 "checkpoint_every", "eval_subset"):
      value = getattr(self, name)
      if not (training.is_integer(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("seed", "eval_every"):
      value = getattr(self, name)
      if not (training.is_integer(value) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    training.check_learning_rates(self.learning_rates)
    training.check_seeds(self.seed, self.num_models)
    if self.initializer not in INITIALIZERS:
      raise ValueError(f"initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
    features = self.data.num_features
    if features is not None and self.rnn.input_size != features:
      raise ValueError(f"the GRU must read the data's {features} features per step, not "
                       f"input_size={self.rnn.input_size}")
    self.model()  # validates the model settings
    self.optimizer_config()

  @property
  def task(self) -> str:
    return self.data.task

  def memory_needs(self) -> list[tuple[str, float, str]]:
    """Rough peak memory of each part of a run, ``(setting, bytes, what)``, for
    :func:`jaxgru.tasks.common.check_fits`, before any data is read or anything allocated.

    The embedding and bigram tables 4 times over (value, gradient, two Adam moments) per model;
    the encoded reviews (int32 ids, up to 25,000 per split, or ``subset``); a training batch's
    backward pass (about 8 numbers per hidden unit, step, example, layer, direction and model,
    twice); the evaluation batch.
    """
    size = np.dtype(self.rnn.cell.state_dtype).itemsize
    n, hidden, layers = self.num_models, self.rnn.hidden_size, self.rnn.num_layers
    dirs = self.rnn.num_directions
    vocab = self.data.vocab_size or 0
    embed = self.rnn.input_size
    d = ClassifyConfig()
    needs = [("vocab_size", n * vocab * embed * size * 4, "the embedding table"),
             ("bigram_buckets", n * self.bigram_buckets * embed * size * 4,
              "the word-pair table")]
    steps = getattr(self.data, "max_length", None) or getattr(self.data, "seq_length", 1)
    examples = (getattr(self.data, "train_size", 0) + getattr(self.data, "test_size", 0)
                or 2 * (self.data.subset or 25000))
    per_step = (4 if vocab else 4 * embed)
    step_name = "max_length" if vocab else "seq_length"
    needs.append((step_name, examples * steps * per_step, "the encoded examples"))
    params = n * layers * dirs * 3 * hidden * (embed + hidden + 2) * size * 4
    act = n * self.batch_size * steps * layers * dirs * hidden * 8 * size * 2
    act += n * self.batch_size * steps * embed * size * 4
    needs.append((common.largest_factor(
        {step_name: (steps, 512), "batch_size": (self.batch_size, d.batch_size),
         "hidden_size": (hidden, d.rnn.hidden_size), "num_layers": (layers, 1),
         "num_models": (n, d.num_models)}), params + act, "a training step"))
    return needs

  def model(self) -> Classifier:
    return Classifier(rnn=self.rnn, vocab_size=self.data.vocab_size, pooling=self.pooling,
                      embed_dropout=self.embed_dropout, dropout=self.dropout,
                      bigram_buckets=self.bigram_buckets)

  def optimizer_config(self, total_steps: int = 1000) -> training.OptimizerConfig:
    return training.OptimizerConfig(
        name=self.optimizer, schedule=self.schedule, warmup_steps=self.warmup_steps,
        total_steps=total_steps, clip_norm=self.clip_norm, weight_decay=self.weight_decay)

  def to_json(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    data = {"source": self.data.task, **dataclasses.asdict(self.data)}
    return {**d, "data": data, "rnn": common.rnn_to_json(self.rnn),
            "learning_rates": list(self.learning_rates)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ClassifyConfig":
    if "rnn" not in d or "data" not in d:
      raise common.older_layout("classify config", "rnn")
    d, data = dict(d), dict(d["data"])
    source = SOURCES[data.pop("source")]
    return cls(**{**d, "data": source(**data), "rnn": common.rnn_from_json(d["rnn"]),
                  "learning_rates": tuple(d["learning_rates"])})

  def resumable_changes(self) -> tuple[str, ...]:
    """Settings a resumed run may change (dotted names, as :func:`training.check_resume` reads
    them): where the same data lie (the source's; IMDB's vocabulary is checked instead), how often
    to log, save and evaluate, whether to predict with the ensemble, and the products' precision
    (no shape changes with it; runs saved before it existed do not record it)."""
    return tuple(f"data.{k}" for k in self.data.resumable) + (
        "log_every", "checkpoint_every", "eval_every", "eval_subset", "eval_batch_size", "ensemble",
        "rnn.cell.precision")


# The entries of the metrics records the progress line shows.
SHOWN_METRICS = ("train_loss", "train_accuracy", "eval_accuracy")


def synthetic_defaults(**overrides) -> ClassifyConfig:
  """The ``"classify"`` task's defaults, chosen by measurement (>= 99% in a few seconds)."""
  data = overrides.pop("data", SyntheticData())
  settings = dict(
      data=data, rnn=RNNConfig(GRUConfig(input_size=data.num_features, hidden_size=32)),
      pooling="last", embed_dropout=0.0, dropout=0.0, bigram_buckets=0, num_models=1,
      ensemble=False, batch_size=64, epochs=4, optimizer="adam", learning_rates=(1e-2,),
      schedule="cosine", warmup_steps=0, log_every=25, checkpoint_every=1000,
      eval_batch_size=1000)
  settings.update(overrides)
  return ClassifyConfig(**settings)


def load_data(cfg: ClassifyConfig, log: Callable[[str], None] = logging.info) -> Data:
  """The train and test splits of ``cfg.data``."""
  return cfg.data.load(cfg.seed, log)


def init_states(cfg: ClassifyConfig, total_steps: int) -> training.TrainState:
  """N fresh model states stacked on a leading axis: model i has seed ``seed + i``."""
  model = cfg.model()
  return training.init_states(lambda key: model.init(key, cfg.initializer),
                            training.make_optimizer(cfg.optimizer_config(total_steps)),
                            cfg.num_models, cfg.seed, cfg.learning_rates)


def make_train_step(cfg: ClassifyConfig, total_steps: int,
                    mesh: Optional[jax.sharding.Mesh] = None):
  """Jitted ``(state (N, ...), inputs, lengths_B, labels_B) -> (state, metrics (N,))``;
  ``inputs`` is ``ids_BT`` or ``x_BTI``.

  Every model sees the same batch; each draws its own dropout masks from its own key. One
  compilation per padded batch length. With a ``mesh`` the batch is split over its devices
  unless the models are (:func:`parallel.batch_mesh`); the state's placement is the caller's.
  """
  model = cfg.model()
  opt = training.make_optimizer(cfg.optimizer_config(total_steps))
  mesh = parallel.batch_mesh(cfg.num_models, mesh)

  def one_model(state, inputs, lengths_B, labels_B):
    inputs, lengths_B, labels_B = parallel.shard_batch((inputs, lengths_B, labels_B), mesh)

    def loss_fn(params, key, step):
      del step
      return loss_and_metrics(model, params, inputs, lengths_B, labels_B, dropout_key=key)
    return training.make_train_step(loss_fn, opt)(state)

  return jax.jit(jax.vmap(one_model, in_axes=(0, None, None, None)), donate_argnums=0)


def make_predict(model: Classifier):
  """Jitted ``(params (N, ...), inputs, lengths_B) -> probabilities_NB``."""
  @jax.jit
  def predict(params, inputs, lengths_B):
    logits_NB = jax.vmap(model.logits, in_axes=(0, None, None))(params, inputs, lengths_B)
    return jax.nn.sigmoid(logits_NB)
  return predict


def _scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Accuracy and mean cross-entropy along the last axis of ``probs`` (..., N_examples)."""
  positive = labels > 0
  p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
  loss = -np.where(positive, np.log(p), np.log1p(-p)).mean(axis=-1)
  return ((probs > 0.5) == positive).mean(axis=-1), loss


def evaluate(predict_fn, params, split: Split, batch_size: int, bucket: int
             ) -> dict[str, np.ndarray]:
  """Scores of the N models on every example of ``split``.

  Returns:
    ``accuracy`` and ``loss`` (N,) of every model, and ``ensemble_accuracy`` and
    ``ensemble_loss`` () of their averaged probabilities.
  """
  num = jax.tree.leaves(params)[0].shape[0]
  probs_NB = np.zeros((num, len(split)), np.float32)
  for index, inputs, lengths_B in eval_batches(split, batch_size, bucket):
    probs_NB[:, index] = parallel.fetch(predict_fn(params, inputs, lengths_B))[:, : index.size]
  accuracy, loss = _scores(probs_NB, split.labels[None, :])
  ens_accuracy, ens_loss = _scores(probs_NB.mean(axis=0), split.labels)
  return {"accuracy": accuracy, "loss": loss, "ensemble_accuracy": ens_accuracy,
          "ensemble_loss": ens_loss}


def _cpu_seconds() -> float:
  """CPU time of this process so far, all threads: on a shared machine, a load-independent
  measure of the work done (wall time depends on what else runs)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def train_and_evaluate(cfg: ClassifyConfig, workdir: str, log=logging.info,
                       progress: Optional[training.Progress] = None,
                       flags: Optional[dict[str, Any]] = None,
                       data: Optional[Data] = None) -> dict[str, Any]:
  """Trains ``cfg.num_models`` classifiers (resuming from ``workdir``), evaluates on the whole
  test split, and writes ``workdir/summary.json``.

  Also writes ``config.json``, ``metrics.jsonl`` and orbax checkpoints whose extra data holds
  the vocabulary, so that :func:`predict` encodes text with the ids the model was trained on.

  Args:
    cfg: the run's configuration.
    workdir: output folder.
    log: where the run's messages go.
    progress: shows the log intervals (by default a :class:`training.Progress` over ``log``: a
      line redrawn on stderr when it is a terminal, else a log line per interval).
    flags: recorded as they are in the summary (``run.py`` passes its flags).
    data: preloaded data (benchmarks share one load across runs); loaded from ``cfg`` if None.

  Returns:
    The summary dict.

  Raises:
    imdb.DataError: unusable input data.
    training.ConfigMismatch: ``workdir`` holds checkpoints of a run with other settings (beyond
      :meth:`ClassifyConfig.resumable_changes`).
    training.Diverged: the loss became NaN or infinite.
  """
  record = {"task": cfg.task, "config": cfg.to_json()}
  training.check_resume(workdir, record, cfg.resumable_changes())  # before the data: fail fast
  wall_start = time.time()
  load_start = os.getloadavg()[0]
  t0 = time.time()
  if data is None:
    data = load_data(cfg, log)
  data_seconds = time.time() - t0
  if len(data.train) < cfg.batch_size:
    raise _imdb.DataError(f"{len(data.train)} training examples are fewer than one batch "
                          f"(batch_size={cfg.batch_size})")
  os.makedirs(workdir, exist_ok=True)  # only now: bad data leaves no half-made run behind
  batches = TrainBatches(data.train, cfg.batch_size, cfg.bucket, cfg.seed)
  total_steps = cfg.epochs * batches.steps_per_epoch
  if warning := cfg.optimizer_config(total_steps).warmup_warning():
    log(warning)

  ckpt = training.Checkpointer(workdir)
  mesh = parallel.make_mesh()
  state = parallel.shard_models(init_states(cfg, total_steps), mesh)
  resumed_from = None
  writer = training.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  if ckpt.latest_step() is not None:
    state, extra, resumed_from = ckpt.restore_intact(state, log)
    if data.vocab is not None and extra and tuple(extra.get("vocab", ())) != data.vocab:
      raise _imdb.DataError(f"the checkpoint in {ckpt.directory} was trained with another "
                            "vocabulary (different data or --vocab_size); use a new --workdir")
    log(f"resumed from the checkpoint at step {resumed_from} in {ckpt.directory}")
  writer.cut_after(resumed_from or 0)  # the steps after it are taken (and logged) again
  # After the checks above (a refused resume leaves the stored run as it was), and before the
  # first checkpoint of a new run (a checkpoint always has its config beside it).
  training.write_json_atomic(os.path.join(workdir, "config.json"), record)

  model = cfg.model()
  train_step = make_train_step(cfg, total_steps, mesh)
  predict_fn = make_predict(model)
  held_out = eval_sample(data.test, cfg.eval_subset, cfg.seed)

  def evaluate_during(state, step):
    if not cfg.eval_every or (step % cfg.eval_every and step != total_steps):
      return {}, False
    m = evaluate(predict_fn, state.params, held_out, cfg.eval_batch_size, cfg.bucket)
    return {"eval_accuracy": float(m["accuracy"].mean()), "eval_loss": float(m["loss"].mean()),
            "eval_accuracy_per_model": m["accuracy"].tolist(),
            "eval_accuracy_ensemble": float(m["ensemble_accuracy"])}, False

  extra = {"vocab": list(data.vocab)} if data.vocab is not None else {}
  with progress or training.Progress(log) as intervals:
    result = training.fit(
        state, train_step, total_steps=total_steps, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, checkpointer=ckpt, writer=writer,
        progress=intervals, evaluate=evaluate_during, batch_fn=batches,
        checkpoint_extra=lambda: extra, shown=SHOWN_METRICS)
  ckpt.close()

  t0 = time.time()
  test = evaluate(predict_fn, result.state.params, data.test, cfg.eval_batch_size, cfg.bucket)
  eval_seconds = time.time() - t0
  # One model, or an ensemble (the models' averaged probabilities), or the models' mean score.
  key = "ensemble_" if cfg.ensemble or cfg.num_models == 1 else ""
  summary = {
      "task": cfg.task,
      "test_accuracy": float(np.mean(test[key + "accuracy"])),
      "test_loss": float(np.mean(test[key + "loss"])),
      "test_accuracy_per_model": test["accuracy"].tolist(),
      "test_accuracy_ensemble": float(test["ensemble_accuracy"]),
      "test_size": len(data.test),
      "train_size": len(data.train),
      "steps": result.steps,
      "epochs": cfg.epochs,
      "steps_per_epoch": batches.steps_per_epoch,
      "train_seconds": result.train_seconds,
      "data_seconds": data_seconds,
      "eval_seconds": eval_seconds,
      "wall_seconds": time.time() - wall_start,
      "cpu_seconds": _cpu_seconds(),
      "resumed_from_step": resumed_from,
      "load_average": {"start": load_start, "end": os.getloadavg()[0],
                       "cpu_count": os.cpu_count()},
      "data": data.info,
      "devices": [str(d) for d in jax.devices()],
      "config": cfg.to_json(),
      "flags": flags,
  }
  training.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"test accuracy {summary['test_accuracy']:.4f} on {len(data.test)} examples; "
      f"train {result.train_seconds:.1f}s, wall {summary['wall_seconds']:.1f}s")
  return summary
