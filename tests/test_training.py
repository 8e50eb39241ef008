"""The training library: the loop's divergence check, resume checks, the writing process."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxgru import training


def test_fit_stops_on_nan_and_keeps_last_good_checkpoint(tmp_path):
  """A non-finite loss raises Diverged naming the step; no checkpoint of the bad state."""
  state = training.init_state({"w": jnp.ones((2,))}, training.make_optimizer(training.OptimizerConfig()),
                           0.1, seed=0)

  def step(s):
    loss = jnp.where(s.step == 6, jnp.nan, 1.0)
    return s._replace(step=s.step + 1), {"loss": loss}

  ckpt = training.Checkpointer(str(tmp_path))
  with pytest.raises(training.Diverged, match="step 7"):
    training.fit(state, step, total_steps=20, log_every=4, checkpoint_every=4, checkpointer=ckpt,
              writer=None, progress=None)
  assert ckpt.latest_step() == 4
  restored, _ = ckpt.restore(state)
  assert int(restored.step) == 4
  ckpt.close()


def test_check_resume(tmp_path):
  work = str(tmp_path)
  record = {"task": "addition", "config": {"hidden_size": 8, "steps": 10, "rates": (0.1, 0.2)}}
  # Without checkpoints any work directory will do; config.json alone does not count.
  training.write_json_atomic(os.path.join(work, "config.json"), record)
  training.check_resume(work, {"task": "imdb", "config": {}})
  os.makedirs(os.path.join(work, "checkpoints", "20"))
  training.check_resume(work, record)  # the same settings (a tuple stored as a JSON list)
  longer = {"task": "addition", "config": {**record["config"], "steps": 99}}
  training.check_resume(work, longer, may_differ=("steps",))
  with pytest.raises(training.ConfigMismatch, match=r"steps=10 there, 99 now"):
    training.check_resume(work, longer)
  wider = {"task": "addition", "config": {**record["config"], "hidden_size": 9, "extra": 1}}
  with pytest.raises(training.ConfigMismatch,
                     match=r"extra=None there, 1 now, hidden_size=8 there, 9 now;"):
    training.check_resume(work, wider, may_differ=("steps",))
  with pytest.raises(training.ConfigMismatch, match=r"a 'addition' run, not 'imdb'"):
    training.check_resume(work, {"task": "imdb", "config": record["config"]})


def test_only_process_0_writes(tmp_path, monkeypatch):
  # In a multi-host job every process runs run.py; the others must not write the run's files.
  for index, written in ((1, False), (0, True)):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    path, lines = str(tmp_path / f"s{index}.json"), str(tmp_path / f"m{index}.jsonl")
    training.write_json_atomic(path, {"a": 1})
    training.MetricsWriter(lines).write({"step": 1})
    assert os.path.exists(path) == written and os.path.exists(lines) == written
  assert json.load(open(path)) == {"a": 1}


def test_check_resume_names_a_nested_setting(tmp_path):
  work = str(tmp_path)
  record = {"task": "a", "config": {"rnn": {"cell": {"hidden_size": 8}}, "steps": 1}}
  training.write_json_atomic(os.path.join(work, "config.json"), record)
  os.makedirs(os.path.join(work, "checkpoints", "1"))
  with pytest.raises(training.ConfigMismatch, match=r"rnn.cell.hidden_size=8 there, 16 now"):
    training.check_resume(work, {"task": "a", "config": {"rnn": {"cell": {"hidden_size": 16}},
                                                         "steps": 1}})


def test_fit_shows_the_metrics_the_task_names():
  state = training.init_state({"w": jnp.ones((2,))},
                              training.make_optimizer(training.OptimizerConfig()), 0.1, seed=0)
  step = lambda s: (s._replace(step=s.step + 1), {"loss": jnp.float32(2.0), "other": 1.0})
  lines = []
  training.fit(state, step, total_steps=4, log_every=2, checkpoint_every=4, checkpointer=None,
               writer=None, progress=training.Progress(4, lines.append, stream=open(os.devnull, "w")),
               shown=("train_other", "train_loss"))
  assert lines == ["step 2/4: train_other=1 train_loss=2", "step 4/4: train_other=1 train_loss=2"]
