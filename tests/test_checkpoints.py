"""Damaged checkpoints, and a run killed during consolidation that resumes bit for bit.

The library: a latest checkpoint that fails to restore (a truncated file, an emptied file, a
step directory without orbax's commit marker, an empty step directory) is reported in one line
and the newest intact one is used; when none restores, CheckpointError names the directory.
Leftovers of a killed save are ignored and removed by the next save. run.py: the same for a
resume and for --mode=add, and a kill during consolidation (log_every unlike checkpoint_every)
followed by a resume gives exactly the parameters of an uninterrupted run. Two SIGTERMs 20 ms
apart, while compiling, during a save or as the run exits, end it with one line and status 130,
leave no half-written save, and the resume again ends with exactly the uninterrupted run's state.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgru import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")


def _files(path):
  return [os.path.join(r, n) for r, _, fs in os.walk(path) for n in fs]


def _truncate(step_dir):
  for p in _files(os.path.join(step_dir, "state")):
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
      f.truncate(size // 2)


def _empty(step_dir):
  for p in _files(os.path.join(step_dir, "state")):
    open(p, "w").close()


def _unmark(step_dir):
  os.remove(os.path.join(step_dir, training.checkpoints.COMMIT_MARKER))


def _hollow(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = {"truncated files": _truncate, "emptied files": _empty,
          "no commit marker": _unmark, "empty step directory": _hollow}


def _state(value):
  return training.init_state({"w": jnp.full((3,), value, jnp.float32)},
                             training.make_optimizer(training.OptimizerConfig()), 0.1, seed=0)


def _saved(work):
  ckpt = training.Checkpointer(work)
  ckpt.save(10, _state(1.0)._replace(step=jnp.int32(10)), {"n": 10})
  ckpt.save(20, _state(2.0)._replace(step=jnp.int32(20)), {"n": 20})
  ckpt.close()
  return os.path.join(work, "checkpoints")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, damage):
  ckpts = _saved(str(tmp_path))
  DAMAGE[damage](os.path.join(ckpts, "20"))
  for read_only in (True, False):
    lines = []
    ckpt = training.Checkpointer(str(tmp_path), read_only=read_only)
    state, extra, step = ckpt.restore_intact(_state(0.0), lines.append)
    ckpt.close()
    assert step == 10 and extra == {"n": 10}
    np.testing.assert_array_equal(state.params["w"], np.ones(3, np.float32))
    # Unmarked and empty step directories are not checkpoints: nothing to report.
    assert len(lines) == (1 if damage in ("truncated files", "emptied files") else 0), lines
    assert all("\n" not in l and "checkpoint 20" in l for l in lines)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_only_damaged_checkpoints_is_one_error_naming_the_folder(tmp_path, damage):
  ckpts = _saved(str(tmp_path))
  for step in ("10", "20"):
    DAMAGE[damage](os.path.join(ckpts, step))
  ckpt = training.Checkpointer(str(tmp_path), read_only=True)
  with pytest.raises(training.CheckpointError, match=ckpts):
    ckpt.restore_intact(_state(0.0), lambda line: None)
  ckpt.close()


def test_leftovers_are_ignored_and_removed_by_the_next_save(tmp_path):
  ckpts = _saved(str(tmp_path))
  os.makedirs(os.path.join(ckpts, "30.orbax-checkpoint-tmp-1234", "state"))
  os.makedirs(os.path.join(ckpts, "40"))  # a step directory without the commit marker
  assert training.intact_steps(str(tmp_path)) == [10, 20]
  ckpt = training.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.latest_step() == 20
  ckpt.close()
  assert sorted(os.listdir(ckpts)) == ["10", "20", "30.orbax-checkpoint-tmp-1234", "40"]
  ckpt = training.Checkpointer(str(tmp_path))
  ckpt.save(30, _state(3.0)._replace(step=jnp.int32(30)))
  ckpt.close()
  assert sorted(os.listdir(ckpts)) == ["20", "30"]


# == run.py: kill during consolidation, resume, compare bitwise ===================================

ARGS = ["--bits=3", "--hidden_size=8", "--batch_size=32", "--steps=300", "--eval_bits=8",
        "--log_every=7", "--checkpoint_every=10", "--consolidate_steps=150",
        "--consolidate_bits=12", "--consolidate_batch_size=32"]


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True, env=env,
                        timeout=600, **kw)


def _params(work):
  from jaxgru.tasks import addition
  _, state, steps = addition.load_trained(work)
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(state.params)], steps, int(state.step[0])


@pytest.mark.slow
def test_kill_during_consolidation_then_resume_equals_an_uninterrupted_run(tmp_path):
  ref, work = str(tmp_path / "ref"), str(tmp_path / "killed")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  log_path = str(tmp_path / "killed.log")
  with open(log_path, "w") as log:
    p = subprocess.Popen([sys.executable, RUN, *ARGS, f"--workdir={work}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=log)
  # The reference runs meanwhile (two cores: one each).
  ref_proc = subprocess.Popen([sys.executable, RUN, *ARGS, f"--workdir={ref}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline, killed_at = time.time() + 300, None
  while time.time() < deadline and p.poll() is None:
    text = open(log_path).read()
    if "consolidating" in text:
      end = int(text.split("solved by step ")[1].split(";")[0])
      later = [s for s in training.intact_steps(work) if s > end]
      if later:
        p.send_signal(signal.SIGKILL)
        killed_at = later[-1]
        break
    time.sleep(0.02)
  p.wait()
  _, ref_err = ref_proc.communicate(timeout=600)
  assert ref_proc.returncode == 0, ref_err[-3000:]
  solve_end = json.load(open(os.path.join(ref, "summary.json")))["steps_to_solve"]
  assert killed_at is not None, "the run ended before consolidation could be interrupted"
  assert not os.path.exists(os.path.join(work, "summary.json"))
  # What a kill can leave: a half-written save; both are ignored and then removed.
  ckpts = os.path.join(work, "checkpoints")
  os.makedirs(os.path.join(ckpts, f"{killed_at + 10}.orbax-checkpoint-tmp-99"))
  os.makedirs(os.path.join(ckpts, str(killed_at + 20)))

  resumed = _run(ARGS + [f"--workdir={work}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from the checkpoint at step {killed_at}" in resumed.stderr
  assert "Traceback" not in resumed.stderr
  got, got_solved, got_step = _params(work)
  want, want_solved, want_step = _params(ref)
  assert (got_step, got_solved) == (want_step, want_solved)
  assert got_step > solve_end
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)  # bitwise on the CPU
  steps = [json.loads(l)["step"] for l in open(os.path.join(work, "metrics.jsonl"))]
  assert steps == sorted(set(steps)), "a step was logged twice"
  assert steps == [json.loads(l)["step"] for l in open(os.path.join(ref, "metrics.jsonl"))]
  assert not any("tmp" in n for n in os.listdir(ckpts))

  # A damaged latest checkpoint: --mode=add reports it in one line and uses the one before.
  latest = training.intact_steps(work)[-1]
  _truncate(os.path.join(ckpts, str(latest)))
  added = _run(["--mode=add", "--a=5", "--b=2", f"--workdir={work}"])
  assert added.returncode in (0, 1), added.stderr[-3000:]
  assert "model   =" in added.stdout and "Traceback" not in added.stderr
  warned = [l for l in added.stderr.splitlines() if f"checkpoint {latest} " in l]
  assert len(warned) == 1 and "damaged" in warned[0], added.stderr[-3000:]
  # And when every checkpoint is damaged: one line naming the folder, exit 2.
  for step in training.intact_steps(work):
    _truncate(os.path.join(ckpts, str(step)))
  added = _run(["--mode=add", "--a=5", "--b=2", f"--workdir={work}"])
  errors = [l for l in added.stderr.splitlines() if "error" in l]
  assert added.returncode == 2 and "Traceback" not in added.stderr, added.stderr[-3000:]
  assert len(errors) == 1 and ckpts in errors[0], added.stderr[-3000:]


# == run.py: two SIGTERMs 20 ms apart, while compiling, saving or exiting =========================

# Tiny and never solved (the rate is too small), so every run takes all its steps; a checkpoint
# every step keeps a save going much of the time.
TERM_ARGS = ["--bits=3", "--hidden_size=8", "--batch_size=32", "--steps=30", "--eval_bits=8",
             "--log_every=1", "--checkpoint_every=1", "--consolidate_steps=0",
             "--learning_rate=1e-5"]


def _state_leaves(work):
  from jaxgru.tasks import addition
  _, state, _ = addition.load_trained(work)
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(state)], int(np.asarray(state.step).reshape(-1)[0])


def _leftovers(work):
  ckpts = os.path.join(work, "checkpoints")
  return sorted(n for n in os.listdir(ckpts) if ".orbax-checkpoint-tmp" in n) \
      if os.path.isdir(ckpts) else []


def _double_term(work, log_path, moment, timeout=240):
  """Starts run.py in ``work`` and sends it SIGTERM twice, 20 ms apart, at ``moment``:
  ``"compiling"`` (1 s after config.json is written, before the first step), ``"saving"`` (as
  soon as orbax's temporary directory of a new checkpoint appears), ``"training"`` (30 ms after a
  new checkpoint is finished) or ``"exiting"`` (the first as ``"training"``, the second once the
  run has printed that it stops, or 20 ms after the first if that is later). Returns (exit
  status, stderr, the newest intact step when the first signal went)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  before = set(training.intact_steps(work))
  config = os.path.join(work, "config.json")
  config_time = os.path.getmtime(config) if os.path.exists(config) else None
  with open(log_path, "w") as log:
    p = subprocess.Popen([sys.executable, RUN, *TERM_ARGS, f"--workdir={work}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=log)
  deadline, ready = time.time() + timeout, False
  while time.time() < deadline and p.poll() is None and not ready:
    if moment == "compiling":
      ready = os.path.exists(config) and os.path.getmtime(config) != config_time
      if ready:
        time.sleep(1.0)
    elif moment == "saving":
      ready = bool(_leftovers(work))
    else:  # training, exiting
      ready = bool(set(training.intact_steps(work)) - before)
      if ready:
        time.sleep(0.03)
    if not ready:
      time.sleep(0.002)
  assert p.poll() is None, f"the run ended before the signals ({moment})"
  at = (training.intact_steps(work) or [None])[-1]
  p.send_signal(signal.SIGTERM)
  time.sleep(0.02)
  while moment == "exiting" and p.poll() is None and "run.py:" not in open(log_path).read():
    time.sleep(0.001)  # the second one once the run has said it stops: during its exit
  if p.poll() is None:
    p.send_signal(signal.SIGTERM)
  p.wait(timeout=120)
  return p.returncode, open(log_path).read(), at


@pytest.mark.slow
def test_two_sigterms_while_compiling_saving_or_exiting_then_resume_equals_one_run(tmp_path):
  ref, work = str(tmp_path / "ref"), str(tmp_path / "term")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ref_proc = subprocess.Popen([sys.executable, RUN, *TERM_ARGS, f"--workdir={ref}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for i, moment in enumerate(("compiling", "saving", "exiting")):
    code, err, at = _double_term(work, str(tmp_path / f"term{i}.log"), moment)
    # One line and status 130: no traceback (a second signal used to break into the interpreter's
    # exit) and no crash (a signal during compiling used to end in SIGSEGV at the exit).
    assert code == 130, (moment, code, err[-3000:])
    assert "Traceback" not in err and "Fatal Python error" not in err, (moment, err[-3000:])
    assert "Exception ignored" not in err, (moment, err[-3000:])
    ours = [l for l in err.splitlines() if l.startswith("run.py:")]
    assert len(ours) == 1 and ("checkpoint saved" in ours[0] or "interrupted" in ours[0]), \
        (moment, err[-3000:])
    # Saves are never cut short: nothing half-written is left for the resume to trip on.
    assert _leftovers(work) == [], moment
    assert not os.path.exists(os.path.join(work, "summary.json"))
    if moment == "saving":  # the save under way was finished, not cut short
      assert (training.intact_steps(work) or [0])[-1] > (at or 0), (at, os.listdir(work))
  last = training.intact_steps(work)[-1]
  resumed = _run(TERM_ARGS + [f"--workdir={work}"])
  _, ref_err = ref_proc.communicate(timeout=600)
  assert ref_proc.returncode == 0, ref_err[-3000:]
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Traceback" not in resumed.stderr
  assert f"resumed from the checkpoint at step {last}" in resumed.stderr
  (got, got_step), (want, want_step) = _state_leaves(work), _state_leaves(ref)
  assert got_step == want_step == 30
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)  # params, optimizer state, rates: bitwise on the CPU
  summary, ref_summary = (json.load(open(os.path.join(w, "summary.json"))) for w in (work, ref))
  assert summary["steps"] == ref_summary["steps"] == 30
  assert summary["length_generalization"] == ref_summary["length_generalization"]
  steps = [json.loads(l)["step"] for l in open(os.path.join(work, "metrics.jsonl"))]
  assert steps == list(range(1, 31)), "a step was logged twice or not at all"


def _signal_inside_a_gc_callback(handler):
  """Runs a garbage collection whose callback raises SIGUSR1, so that ``handler`` runs inside
  the callback (as a SIGTERM during compiling can land in JAX's); returns the KeyboardInterrupt
  that escaped from the collection or the second after it, or None."""
  import gc
  fired = []

  def callback(phase, info):
    del info
    if phase == "start" and not fired:
      fired.append(True)
      signal.raise_signal(signal.SIGUSR1)
      fired.append(len(fired))  # instructions for the handler to run at, inside the callback

  old = signal.signal(signal.SIGUSR1, handler)
  gc.callbacks.append(callback)
  try:
    try:
      gc.collect()
      for _ in range(100):  # a signal sent again from another thread arrives meanwhile
        time.sleep(0.01)
    except KeyboardInterrupt as e:
      return e
    return None
  finally:
    gc.callbacks.remove(callback)
    signal.signal(signal.SIGUSR1, old)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the naive one
def test_a_signal_handled_inside_a_gc_callback_is_not_dropped():
  """Python prints and drops an exception raised inside a garbage-collector callback, so a
  handler that stops the run by raising there would lose the signal: run.py then trained to the
  end after a SIGTERM during compiling (exit 0). raise_where_it_propagates sends the signal
  again until the handler runs outside the callback, where KeyboardInterrupt propagates; the
  training loop's second-signal handler does the same."""
  from jaxgru.training import metrics

  def naive(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  assert _signal_inside_a_gc_callback(naive) is None  # dropped: what the fix is for

  frames = []

  def handler(signum, frame):
    frames.append(frame.f_code.co_name)
    metrics.raise_where_it_propagates(signum, frame, KeyboardInterrupt(f"signal {signum}"))
  assert isinstance(_signal_inside_a_gc_callback(handler), KeyboardInterrupt)
  assert frames[0] == "callback" and frames[-1] != "callback", frames

  stop = metrics.StopSignals()
  stop.signum = signal.SIGTERM  # a first signal already taken: the second gives up at once
  assert isinstance(_signal_inside_a_gc_callback(stop._handle), KeyboardInterrupt)


def test_a_signal_put_off_during_a_save_is_delivered_once_after_it():
  """A handler that runs while a checkpoint is written (run.py's, outside the training loop)
  puts the signal off; it is raised again, once, when the save is done, and not lost."""
  import signal
  from jaxgru.training import checkpoints
  seen = []

  def handler(signum, frame):
    del frame
    if checkpoints.saving():
      seen.append("put off")
      checkpoints.defer_signal(signum)
    else:
      seen.append("delivered")

  old = signal.signal(signal.SIGUSR1, handler)
  try:
    with checkpoints._DeferSignals():
      signal.raise_signal(signal.SIGUSR1)
      signal.raise_signal(signal.SIGUSR1)
      assert seen == ["put off", "put off"]
    assert seen == ["put off", "put off", "delivered"]
  finally:
    signal.signal(signal.SIGUSR1, old)
