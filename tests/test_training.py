"""The training library: the loop's divergence check, resume checks, the writing process."""

import io
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
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
  training.check_resume(work, {"task": "imdb", "config": {}})  # no commit marker: no checkpoint
  open(os.path.join(work, "checkpoints", "20", "commit_success.txt"), "w").close()
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
  open(os.path.join(work, "checkpoints", "1", "commit_success.txt"), "w").close()
  with pytest.raises(training.ConfigMismatch, match=r"rnn.cell.hidden_size=8 there, 16 now"):
    training.check_resume(work, {"task": "a", "config": {"rnn": {"cell": {"hidden_size": 16}},
                                                         "steps": 1}})


def test_fit_shows_the_metrics_the_task_names():
  state = training.init_state({"w": jnp.ones((2,))},
                              training.make_optimizer(training.OptimizerConfig()), 0.1, seed=0)
  step = lambda s: (s._replace(step=s.step + 1), {"loss": jnp.float32(2.0), "other": 1.0})
  lines = []
  training.fit(state, step, total_steps=4, log_every=2, checkpoint_every=4, checkpointer=None,
               writer=None, progress=training.Progress(lines.append, stream=open(os.devnull, "w")),
               shown=("train_other", "train_loss"))
  assert lines == ["step 2/4: train_other=1 train_loss=2", "step 4/4: train_other=1 train_loss=2"]


def test_fit_checkpoints_each_multiple_passed_whatever_log_every(tmp_path):
  """log_every=7, checkpoint_every=10: saves at 14 (10 passed), 21 (20), 35 (30), ..., and the
  end; before, only steps that were multiples of both were saved."""
  state = training.init_state({"w": jnp.ones((2,))},
                              training.make_optimizer(training.OptimizerConfig()), 0.1, seed=0)
  step = lambda s: (s._replace(step=s.step + 1), {"loss": jnp.float32(1.0)})
  saved = []

  class Recorder:
    def save(self, n, state, extra=None):
      saved.append(n)
  training.fit(state, step, total_steps=60, log_every=7, checkpoint_every=10,
               checkpointer=Recorder(), writer=None, progress=None)
  assert saved == [14, 21, 35, 42, 56, 60]


def test_metrics_cut_after_drops_later_and_torn_lines(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps({"step": s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
  assert training.MetricsWriter(path).cut_after(20) == 2
  assert [json.loads(l)["step"] for l in open(path)] == [10, 20]


def test_configs_refuse_non_finite_numbers_and_wrapping_seeds():
  for bad in (dict(clip_norm=float("inf")), dict(clip_norm=float("nan")),
              dict(weight_decay=float("inf"))):
    with pytest.raises(ValueError, match="finite"):
      training.OptimizerConfig(**bad)
  with pytest.raises(ValueError, match="finite"):
    training.check_learning_rates((0.1, float("inf")))
  training.check_seeds(2**32 - 2, 2)
  with pytest.raises(ValueError, match="2\\*\\*32"):
    training.check_seeds(2**32 - 1, 2)


def test_configs_refuse_what_is_not_a_number():
  # A string (as read from a file by hand) used to fail inside a comparison with
  # "'>=' not supported between instances of 'str' and 'int'".
  for name in ("clip_norm", "weight_decay", "warmup_steps", "momentum", "final_fraction"):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got '0.1'"):
      training.OptimizerConfig(**{name: "0.1"})
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got True"):
      training.OptimizerConfig(**{name: True})
  for bad in (0, -3, 2.5, 5.0, "10", True):
    with pytest.raises(ValueError, match=r"total_steps must be a positive integer"):
      training.OptimizerConfig(total_steps=bad)
  with pytest.raises(ValueError, match=r"learning_rates must be positive finite numbers"):
    training.check_learning_rates(("0.1",))
  with pytest.raises(ValueError, match=r"learning_rates must be positive finite numbers"):
    training.check_learning_rates(0.1)  # one rate, not a sequence of them
  # NumPy numbers are numbers.
  training.check_learning_rates((np.float32(0.1), np.float64(0.2)))
  training.OptimizerConfig(clip_norm=np.float32(1.0), total_steps=np.int64(5))


@pytest.mark.parametrize("schedule", training.SCHEDULES)
def test_warmup_warning_exactly_when_the_peak_is_never_reached(schedule):
  for warmup, total in ((0, 5), (4, 5), (5, 5), (9, 5)):
    cfg = training.OptimizerConfig(schedule=schedule, warmup_steps=warmup, total_steps=total)
    peak = max(float(training.lr_shape(cfg)(step)) for step in range(total))
    warning = cfg.warmup_warning()
    assert (warning is not None) == (peak < 1.0), (warmup, total, peak)
    if warning:
      assert f"({warmup} steps)" in warning and f"({total} steps)" in warning


class _Terminal(io.StringIO):
  """A stream that says it is a terminal (80 columns), recording what is written."""

  def isatty(self):
    return True

  def fileno(self):
    raise OSError("no file")


def _screen(text):
  """The terminal's lines after ``text``: each \\n-line as its last \\r-segment over the earlier
  ones (a carriage return moves back and the next characters overwrite)."""
  lines = []
  for line in text.split("\n"):
    cells = []
    for segment in line.split("\r"):
      cells[:len(segment)] = segment
    lines.append("".join(cells).rstrip())
  return lines


def test_progress_on_a_terminal_is_one_line_across_phases(monkeypatch):
  """Two fits (a task's two phases) and a message between them: on a terminal, one redrawn line
  that ends with the steps taken and the last metrics; the message above it; through ``log``
  nothing but the message. Without a terminal: one log line per interval, as before."""
  monkeypatch.setenv("COLUMNS", "80")
  state = training.init_state({"w": jnp.ones((2,))},
                              training.make_optimizer(training.OptimizerConfig()), 0.1, seed=0)
  step = lambda s: (s._replace(step=s.step + 1), {"loss": s.step.astype(jnp.float32)})
  for bar in (True, False):
    stream, logged = _Terminal(), []

    def log(text):  # as absl does: a whole line on the same stream
      logged.append(text)
      stream.write(text + "\n")
    with training.Progress(log, stream, bar=None if bar else False) as progress:
      state1 = training.fit(state, step, total_steps=6, log_every=2, checkpoint_every=100,
                            checkpointer=None, writer=None, progress=progress).state
      progress.message("phase two")
      training.fit(state1, step, total_steps=10, log_every=2, checkpoint_every=100,
                   checkpointer=None, writer=None, progress=progress)
    screen = [l for l in _screen(stream.getvalue()) if l]
    if bar:
      assert logged == ["phase two"]
      assert len(screen) == 2 and screen[0] == "phase two", screen
      assert re.fullmatch(r"step 10/10: 10 steps in \d+s( \(\d+ steps/s\))?  train_loss=8.5",
                          screen[1]), screen
      assert stream.getvalue().count("\r") >= 5  # redrawn at each of the 5 intervals
      assert all(len(l) < 80 for l in stream.getvalue().replace("\r", "\n").split("\n"))
    else:
      want = [f"step {s}/{t}: train_loss={s - 1.5:.4g}" for s, t in
              ((2, 6), (4, 6), (6, 6))] + ["phase two"] + [
              f"step {s}/10: train_loss={s - 1.5:.4g}" for s in (8, 10)]
      assert logged == want and screen == want
