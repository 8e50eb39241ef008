"""run.py end to end, as a user runs it: bad input, --mode=add, resume after a kill, and whether
a finished run is shown or trained on."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from forked_run import run_forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
TINY = ["--hidden_size=8", "--bits=4", "--batch_size=32", "--eval_bits=16", "--log_every=10",
        "--checkpoint_every=10", "--consolidate_steps=20", "--consolidate_bits=8"]


def _run(args, timeout=300, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, **kw)


BAD_INPUT = [
    (["--hidden_size=-3"], "hidden_size must be a positive integer, got -3"),
    (["--bits=0"], "bits must be a positive integer, got 0"),
    (["--steps=0"], "steps must be a positive integer, got 0"),
    (["--optimizer=adamax"], "value should be one of"),
    (["--activation=swoosh"], "--activation=swoosh: value should be one of"),
    (["--recurrent_activation=nope"], "--recurrent_activation=nope: value should be one of"),
    (["--learning_rate=-0.1"], "learning_rates must be positive finite numbers"),
    (["--learning_rate=fast"], "--learning_rate must be a comma list of floats"),
    (["--eval_bits=16,x"], "--eval_bits must be a comma list"),
    (["--consolidate_mixed=1.5"], "consolidate_mixed must be a fraction in [0, 1], got 1.5"),
    (["--no_such_flag=1"], "Unknown command line flag"),
    (["--mode=add", "--a=1", "--b=2", "--workdir={tmp}/empty"], "needs a trained model"),
    (["--mode=add", "--a=-5", "--b=2", "--workdir={tmp}/empty"], "--a must be a non-negative"),
    (["--mode=add", "--a=1.5", "--b=2", "--workdir={tmp}/empty"], "--a must be a non-negative"),
    (["--mode=add", "--a=12", "--workdir={tmp}/empty"], "needs --b=INT"),
]


@pytest.fixture(scope="module")
def bad_input_outcomes(tmp_path_factory):
  """Every case of BAD_INPUT, each with a folder of its own as {tmp}: index -> (status, stderr)."""
  base = str(tmp_path_factory.mktemp("bad_input"))
  prepared = []
  for i, (args, _) in enumerate(BAD_INPUT):
    tmp = os.path.join(base, f"case{i}")
    os.makedirs(tmp)
    prepared.append([a.format(tmp=tmp) for a in args])
  return dict(enumerate(run_forked(prepared, base)))


@pytest.mark.parametrize("index", range(len(BAD_INPUT)),
                         ids=[f"args{i}-{m}" for i, (_, m) in enumerate(BAD_INPUT)])
def test_bad_input_exits_2_with_one_line(bad_input_outcomes, index):
  message = BAD_INPUT[index][1]
  returncode, stderr = bad_input_outcomes[index]
  assert returncode == 2, (returncode, stderr)
  assert message in stderr
  assert "Traceback" not in stderr
  errors = [l for l in stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1, stderr


def _final_params(workdir):
  sys.path.insert(0, ROOT)
  from jaxgru.tasks import addition
  _, state, steps = addition.load_trained(workdir)
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(state.params)], steps, int(state.step[0])


RUN_ARGS = TINY + ["--bits=3", "--steps=300", "--num_models=2", "--learning_rate=0.03,0.02",
                   "--log_every=20", "--checkpoint_every=20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One uninterrupted tiny run of run.py: 2 models learning 3-bit addition."""
  work = str(tmp_path_factory.mktemp("run") / "ref")
  proc = _run(RUN_ARGS + [f"--workdir={work}"])
  assert proc.returncode == 0, proc.stderr
  return work


@pytest.mark.slow
def test_tiny_run_solves_3_bit_addition_and_adds(trained):
  summary = json.load(open(os.path.join(trained, "summary.json")))
  for key in ("task", "steps", "steps_to_solve", "wall_seconds", "compile_seconds",
              "num_models", "solved_fraction", "length_generalization", "config"):
    assert key in summary
  assert summary["solved_fraction"] == 1.0, summary
  assert summary["steps"] > 40  # long enough for the kill test below to stop it part-way
  lines = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
  assert [l["step"] for l in lines][:2] == [20, 40]
  # Every 3-bit sum, by each solved model, against Python's.
  sys.path.insert(0, ROOT)
  from jaxgru.tasks import addition
  cfg, state, steps = addition.load_trained(trained)
  import jax
  pairs = [(a, b) for a in range(8) for b in range(8)]
  x = np.stack([addition.encode(a, b, bits=3)[0] for a, b in pairs])
  for m in range(2):
    params = jax.tree.map(lambda p: p[m], state.params)
    logits, _ = jax.jit(cfg.model().logits)(params, x)
    sums = [addition.from_bits(np.asarray(l) > 0) for l in logits]
    assert sums == [a + b for a, b in pairs]
  proc = _run(["--mode=add", f"--workdir={trained}", "--a=6", "--b=7"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "model   = 13" in proc.stdout and "correct" in proc.stdout


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, trained):
  work = str(tmp_path / "killed")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, RUN, *RUN_ARGS, f"--workdir={work}"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(work, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None:
    if os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert p.poll() is None, "the run ended before it could be killed"
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(work, "summary.json"))

  proc = _run(RUN_ARGS + [f"--workdir={work}"])
  assert proc.returncode == 0, proc.stderr
  assert "resumed from the checkpoint at step" in proc.stderr
  got, got_steps, got_step = _final_params(work)
  want, want_steps, want_step = _final_params(trained)
  assert got_step == want_step and got_steps == want_steps
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)  # bitwise on the CPU


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  work = str(tmp_path / "term")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, RUN, *TINY, "--steps=100000", "--learning_rate=1e-5",
                        f"--workdir={work}"], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(work, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.exists(metrics):
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 130, err
  assert "checkpoint saved" in err and "Traceback" not in err
  sys.path.insert(0, ROOT)
  from jaxgru.tasks import addition
  _, state, _ = addition.load_trained(work)
  assert int(state.step[0]) >= 10


@pytest.mark.slow
def test_resume_with_other_settings_exits_2_and_keeps_the_run(trained):
  config_path = os.path.join(trained, "config.json")
  before = open(config_path).read()
  # Same run, another hidden size: the checkpoint cannot hold it. Before, orbax's shape error
  # came as a traceback after config.json had been overwritten with the new settings.
  proc = _run(RUN_ARGS + ["--hidden_size=16", f"--workdir={trained}"], timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1, proc.stderr
  assert "hidden_size=8 there, 16 now" in errors[0]
  assert open(config_path).read() == before


# == Show a finished run, or train on: decided by the settings and steps, not by the typed flags ==

SHOW_ARGS = ["--bits=3", "--hidden_size=8", "--batch_size=32", "--eval_bits=8",
             "--consolidate_steps=0", "--learning_rate=1e-5", "--log_every=5",
             "--checkpoint_every=5"]  # never solved (the rate is too small): every step is taken
# The same settings with defaults typed out too (and --steps first): the same command.
TYPED = ["--task=addition", "--mode=train", "--seed=0", "--num_models=1", "--optimizer=adam",
         "--schedule=constant", "--warmup_steps=0", "--clip_norm=1.0", "--weight_decay=0.0001",
         "--variant=reset_after", "--activation=tanh", "--recurrent_activation=sigmoid",
         "--num_layers=1", "--dtype=float32", "--matmul_precision=highest"]
N = 10


def _spellings(steps, work):
  """The two spellings of one command: the settings as typed for the run, and the same with the
  defaults typed out as well, in another order."""
  return ([*SHOW_ARGS, f"--steps={steps}", f"--workdir={work}"],
          [f"--steps={steps}", *TYPED, *reversed(SHOW_ARGS), f"--workdir={work}"])


def _snapshot(work):
  """What training changes: the run's files and its checkpoint steps."""
  files = {n: open(os.path.join(work, n), "rb").read()
           for n in ("summary.json", "metrics.jsonl", "config.json")}
  sys.path.insert(0, ROOT)
  from jaxgru import training
  return files, training.intact_steps(work)


def _parallel(arg_lists):
  """run.py with each argument list, two at a time (one per core)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, RUN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for args in arg_lists]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    results.append((p.returncode, out, err))
  return results


@pytest.mark.slow
def test_a_finished_run_is_shown_or_trained_on_by_its_settings_and_steps(tmp_path):
  work = str(tmp_path / "run")
  first = _run(_spellings(N, work)[0])
  assert first.returncode == 0, first.stderr[-3000:]
  done = _snapshot(work)
  assert done[1][-1] == N and json.load(open(os.path.join(work, "summary.json")))["steps"] == N
  copies = [str(tmp_path / f"copy{i}") for i in range(2)]
  for c in copies:
    shutil.copytree(work, c)

  # (a) The same settings and step count, typed either way: shown, not trained.
  for code, out, err in _parallel(_spellings(N, work)):
    assert code == 0, err[-3000:]
    assert "a finished run with these settings" in err and "showing it" in err, err[-3000:]
    assert "resumed" not in err and f"step 5/{N}" not in err, err[-3000:]
    assert "model   =" in out and "a + b   =" in out
  assert _snapshot(work) == done  # no step taken, no file rewritten

  # (b) More steps, typed either way: both train on from step N to 2N, to the same result.
  results = _parallel([_spellings(2 * N, copies[0])[0], _spellings(2 * N, copies[1])[1]])
  for (code, out, err), c in zip(results, copies):
    assert code == 0, err[-3000:]
    assert f"resumed from the checkpoint at step {N} " in err and "showing it" not in err, \
        err[-3000:]
    assert [json.loads(l)["step"] for l in open(os.path.join(c, "metrics.jsonl"))] == \
        [5, 10, 15, 20]
  (a, a_solved, a_step), (b, b_solved, b_step) = (_final_params(c) for c in copies)
  assert a_step == b_step == 2 * N and a_solved == b_solved
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  first_params = _final_params(work)[0]
  assert any(not np.array_equal(x, y) for x, y in zip(a, first_params)), "no step was taken"
  sa, sb = (json.load(open(os.path.join(c, "summary.json"))) for c in copies)
  for key in ("steps", "steps_to_solve", "solved_fraction", "length_generalization", "config"):
    assert sa[key] == sb[key], key
  assert sa["steps"] == 2 * N and sa["resumed_from_step"] == N

  # (c) Asked again for 2N steps, the run is shown as it is. (d) --steps alone asks for the
  # default settings (8 bits, 16 units, ...), which are not this run's: one line, exit 2, the run
  # left as it was.
  done = _snapshot(copies[1])
  again, alone = _parallel([_spellings(2 * N, copies[0])[1],
                            ["--task=addition", f"--steps={2 * N}", f"--workdir={copies[1]}"]])
  assert again[0] == 0 and "showing it" in again[2], again[2][-3000:]
  assert alone[0] == 2 and "Traceback" not in alone[2], alone[2][-3000:]
  errors = [l for l in alone[2].splitlines() if "error" in l]
  assert len(errors) == 1 and "other settings" in errors[0] and "bits=3 there, 8 now" in errors[0]
  assert _snapshot(copies[1]) == done


# == The console: one progress line on a terminal, a log line per interval otherwise ===============

CONSOLE_ARGS = SHOW_ARGS + ["--steps=20"]  # 4 intervals of 5 steps, never solved: all are taken


def _on_terminal(args, timeout=300):
  """Starts run.py with a pseudo-terminal as its stdin, stdout and stderr, as a user's shell
  does, and a thread that reads all it writes; returns the process and a function that waits
  for it and returns what it wrote."""
  import pty
  import threading
  master, slave = pty.openpty()
  env = dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="200")
  p = subprocess.Popen([sys.executable, RUN, *args], stdin=slave, stdout=slave, stderr=slave,
                       env=env, close_fds=True)
  os.close(slave)
  chunks = []

  def read():
    while True:
      try:
        data = os.read(master, 1 << 16)
      except OSError:  # EIO: the process has exited and closed the terminal
        return
      if not data:
        return
      chunks.append(data)
  reader = threading.Thread(target=read, daemon=True)
  reader.start()

  def wait():
    p.wait(timeout=timeout)
    reader.join(timeout=30)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")
  return p, wait


def _screen(text):
  """The lines a terminal shows after ``text``: each \\n-line as its \\r-segments written one
  over another (a carriage return goes back to the line's start; what follows overwrites)."""
  lines = []
  for line in text.split("\n"):
    cells = []
    for segment in line.split("\r"):
      cells[:len(segment)] = segment
    lines.append("".join(cells).rstrip())
  return [l for l in lines if l]


@pytest.mark.slow
def test_a_terminal_shows_one_progress_line_and_a_pipe_a_line_per_interval(tmp_path):
  """On a terminal: one line redrawn at each of the 4 intervals, ending with the steps taken and
  the loss, then the summary. With --verbosity=1 on a terminal, or with stderr a pipe: a log line
  per interval. metrics.jsonl has every interval either way."""
  works = [str(tmp_path / n) for n in ("tty", "verbose", "pipe")]
  tty, read_tty = _on_terminal(CONSOLE_ARGS + [f"--workdir={works[0]}"])
  verbose, read_verbose = _on_terminal(CONSOLE_ARGS + [f"--workdir={works[1]}", "--verbosity=1"])
  pipe = _run(CONSOLE_ARGS + [f"--workdir={works[2]}"])
  out_tty, out_verbose = read_tty(), read_verbose()
  assert tty.returncode == verbose.returncode == pipe.returncode == 0, (out_tty, pipe.stderr)
  intervals = [f"step {s}/20: train_loss=" for s in (5, 10, 15, 20)]

  screen = _screen(out_tty)
  progress = [l for l in screen if l.startswith("step ")]
  assert len(progress) == 1, screen
  assert re.match(r"step 20/20: 20 steps in \d+s( \(\d+ steps/s\))?  train_loss=\d", progress[0])
  assert out_tty.count("\rstep ") >= 4  # redrawn in place at each interval
  assert not any(l.startswith(tuple(intervals)) for l in screen)
  assert "not solved in 20 steps" in out_tty and "steps_to_solve=None" in out_tty  # the summary

  for lines in (_screen(out_verbose), pipe.stderr.splitlines()):
    shown = [l for l in lines if "step " in l and "/20: train_loss=" in l]
    assert len(shown) == 4 and all(i in l for i, l in zip(intervals, shown)), lines
  for work in works:
    with open(os.path.join(work, "metrics.jsonl")) as f:
      assert [json.loads(l)["step"] for l in f] == [5, 10, 15, 20]
