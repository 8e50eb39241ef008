"""run.py refuses every bad input a user can give in one line, exit status 2, writing nothing.

A table of command lines: bad values, unusable work directories, a run of another task or
precision, damaged run files, settings too large for this machine's memory, a platform that is
not there. Each must end with exit status 2, exactly one line on stderr, no traceback, and the
work directory as it was (or still absent).

Each case runs in a process of its own, forked from one that has imported run.py once (a fresh
interpreter per case would spend most of the table's time importing JAX): the child parses its
own flags, initializes its own JAX backend, and reports its exit status and stderr as a
subprocess would. One tiny addition run, trained once per module, serves the cases that need a
trained work directory.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from forked_run import run_forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
TINY = ["--steps=20", "--bits=3", "--hidden_size=8", "--batch_size=16", "--consolidate_steps=0",
        "--eval_bits=8", "--log_every=10", "--checkpoint_every=10"]

def run_cases(cases, tmp, timeout=600):
  """Runs each ``args`` list of ``cases`` as run.py (forked_run.py; warnings and errors only, as
  this table counts every line); returns ``[(exit_status, stderr), ...]``."""
  return run_forked(cases, tmp, info=False, timeout=timeout)


def run_once(args, timeout=600):
  """run.py in a fresh interpreter, as a user runs it."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                        timeout=timeout, env=env)


def snapshot(path):
  """Every file and folder under ``path`` with its size and modification time (None if absent)."""
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    st = os.stat(path)
    return {"": (st.st_size, st.st_mtime_ns)}
  out = {}
  for root, dirs, files in os.walk(path):
    for n in dirs + files:
      p = os.path.join(root, n)
      st = os.lstat(p)
      out[os.path.relpath(p, path)] = (st.st_size if n in files else 0, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny trained addition run (20 steps, checkpoints at 10 and 20)."""
  work = str(tmp_path_factory.mktemp("cli") / "add")
  proc = run_once(TINY + [f"--workdir={work}"])
  assert proc.returncode == 0, proc.stderr
  return work


def _copy(trained, dst, edit=None):
  shutil.copytree(trained, dst)
  if edit:
    edit(dst)
  return dst


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _as_task(task):
  def edit(d):
    meta = json.load(open(os.path.join(d, "config.json")))
    meta["task"] = task
    _write(os.path.join(d, "config.json"), json.dumps(meta))
  return edit


def _config_damage(kind):
  def edit(d):
    path = os.path.join(d, "config.json")
    if kind == "missing":
      os.remove(path)
    elif kind == "truncated":
      _write(path, open(path).read()[:40])
    elif kind == "empty":
      _write(path, "")
    elif kind == "not a record":
      _write(path, "[1, 2]")
  return edit


def _precision(dtype):
  def edit(d):
    meta = json.load(open(os.path.join(d, "config.json")))
    meta["config"]["rnn"]["cell"]["param_dtype"] = dtype
    _write(os.path.join(d, "config.json"), json.dumps(meta))
  return edit


def _all_damaged(d):
  ckpts = os.path.join(d, "checkpoints")
  for step in os.listdir(ckpts):
    for root, _, files in os.walk(os.path.join(ckpts, step, "state")):
      for n in files:
        p = os.path.join(root, n)
        with open(p, "r+b") as f:
          f.truncate(os.path.getsize(p) // 2)


# (name, args with {w} for the work directory, how to make that directory, message expected)
# The work directory maker: None (absent), "file" (an existing file), or a function of (trained,
# path) that makes a copy of the trained run and damages it.
CASES = [
    ("workdir is a file", ["--workdir={w}"], "file", "is not a directory"),
    ("workdir cannot be created", ["--workdir=/proc/jaxgru_x"], None, "cannot be created"),
    ("workdir under a file", ["--workdir={w}/sub"], "file", "cannot be created"),
    ("add on a classify run", ["--mode=add", "--a=1", "--b=2", "--workdir={w}"],
     lambda t, w: _copy(t, w, _as_task("classify")), "not one of ('addition',)"),
    ("eval on a classify run", ["--mode=eval", "--workdir={w}"],
     lambda t, w: _copy(t, w, _as_task("classify")),
     "not one of ('addition',)"),
    ("add on an imdb run", ["--mode=add", "--a=1", "--b=2", "--workdir={w}"],
     lambda t, w: _copy(t, w, _as_task("imdb")),
     "not one of"),
    ("predict on an addition run", ["--mode=predict", "--text=good", "--workdir={w}"],
     lambda t, w: _copy(t, w), "not one of ('classify', 'imdb')"),
    ("resume without config.json", TINY + ["--workdir={w}"], "config:missing", "no config.json"),
    ("resume, truncated config.json", TINY + ["--workdir={w}"], "config:truncated", "damaged"),
    ("resume, empty config.json", TINY + ["--workdir={w}"], "config:empty", "damaged"),
    ("resume, config.json not a record", TINY + ["--workdir={w}"], "config:not a record",
     "not a run's record"),
    ("add without config.json", ["--mode=add", "--a=1", "--b=2", "--workdir={w}"],
     "config:missing", "no config.json"),
    ("add, truncated config.json", ["--mode=add", "--a=1", "--b=2", "--workdir={w}"],
     "config:truncated", "damaged"),
    ("eval, truncated config.json", ["--mode=eval", "--workdir={w}"], "config:truncated",
     "damaged"),
    ("platform gpu", ["--platform=gpu", "--workdir={w}"], None, "--platform=gpu"),
    ("matmul precision unknown", ["--matmul_precision=fast", "--workdir={w}"], None,
     "matmul_precision"),
    ("coordinator without num_processes", ["--coordinator_address=localhost:1",
                                           "--workdir={w}"], None, "needs --num_processes"),
    ("process_id without coordinator", ["--process_id=1", "--workdir={w}"], None,
     "--process_id joins a multi-host job"),
    ("num_processes without coordinator", ["--num_processes=2", "--process_id=0",
                                           "--workdir={w}"], None,
     "--num_processes and --process_id join"),
    ("process_id out of range", ["--coordinator_address=localhost:1", "--num_processes=2",
                                 "--process_id=2", "--workdir={w}"], None, "--process_id"),
    ("seed overflows the PRNG", ["--seed=9223372036854775807", "--num_models=2",
                                 "--workdir={w}"], None, "seed + num_models - 1"),
    ("seed 2**32", ["--seed=4294967296", "--workdir={w}"], None, "seed + num_models - 1"),
    ("seed + models past 2**32", ["--seed=4294967295", "--num_models=2", "--workdir={w}"], None,
     "seed + num_models - 1"),
    ("negative seed", ["--seed=-1", "--workdir={w}"], None, "seed"),
    ("learning rate inf", ["--learning_rate=1e400", "--workdir={w}"], None, "finite"),
    ("learning rate nan", ["--learning_rate=nan", "--workdir={w}"], None, "finite"),
    ("learning rate list with inf", ["--learning_rate=0.1,inf", "--workdir={w}"], None, "finite"),
    ("clip_norm inf", ["--clip_norm=inf", "--workdir={w}"], None, "clip_norm"),
    ("clip_norm nan", ["--clip_norm=nan", "--workdir={w}"], None, "clip_norm"),
    ("weight_decay inf", ["--weight_decay=inf", "--workdir={w}"], None, "weight_decay"),
    ("consolidate_mixed nan", ["--consolidate_mixed=nan", "--workdir={w}"], None,
     "consolidate_mixed"),
    ("eval_bits empty", ["--eval_bits=", "--workdir={w}"], None, "eval_bits"),
    ("learning_rate empty", ["--learning_rate=", "--workdir={w}"], None, "learning_rates"),
    ("add, Arabic-Indic digits", ["--mode=add", "--a=١٢٣", "--b=1", "--workdir={w}"],
     lambda t, w: _copy(t, w), "ASCII"),
    ("add, fullwidth digits", ["--mode=add", "--a=1", "--b=１２３", "--workdir={w}"],
     lambda t, w: _copy(t, w), "ASCII"),
    ("integer flag, Arabic-Indic digits", ["--steps=١٢٣", "--workdir={w}"], None, "ASCII"),
    ("float flag, fullwidth digits", ["--clip_norm=１", "--workdir={w}"], None, "ASCII"),
    ("list flag, fullwidth digits", ["--eval_bits=１６", "--workdir={w}"], None, "ASCII"),
    ("integer flag, 5000 digits", ["--steps=" + "9" * 5000, "--workdir={w}"], None, "steps"),
    ("steps past the int32 step counter", ["--steps=2147483648", "--workdir={w}"], None,
     "2**31"),
    ("bits too large", ["--bits=1000000", "--workdir={w}"], None, "--bits"),
    ("batch_size too large", ["--batch_size=1000000000", "--workdir={w}"], None, "--batch_size"),
    ("hidden_size too large", ["--hidden_size=100000", "--workdir={w}"], None, "--hidden_size"),
    ("num_models too large", ["--num_models=100000", "--workdir={w}"], None, "--num_models"),
    ("eval_bits too large", ["--eval_bits=100000000", "--workdir={w}"], None, "--eval_bits"),
    ("eval mode, eval_bits too large", ["--mode=eval", "--eval_bits=100000000",
                                        "--workdir={w}"], lambda t, w: _copy(t, w),
     "--eval_bits"),
    ("imdb vocab_size too large", ["--task=imdb", "--data_path={w}/none",
                                   "--vocab_size=10000000000", "--workdir={w}"], None,
     "--vocab_size"),
    ("imdb max_length too large", ["--task=imdb", "--data_path={w}/none",
                                   "--max_length=1000000000", "--workdir={w}"], None,
     "--max_length"),
    ("imdb bigram_buckets too large", ["--task=imdb", "--data_path={w}/none",
                                       "--bigram_buckets=2147483648", "--workdir={w}"], None,
     "bigram_buckets"),
    ("resume in float64", TINY + ["--dtype=float64", "--workdir={w}"], lambda t, w: _copy(t, w),
     "param_dtype"),
    ("resume in bfloat16", TINY + ["--dtype=bfloat16", "--workdir={w}"],
     lambda t, w: _copy(t, w), "dtype"),
    ("add in float64", ["--mode=add", "--a=1", "--b=2", "--dtype=float64", "--workdir={w}"],
     lambda t, w: _copy(t, w), "--dtype=float32"),
    ("eval a float64 run in float32", ["--mode=eval", "--workdir={w}"],
     lambda t, w: _copy(t, w, _precision("float64")), "--dtype=float64"),
    ("resume with another hidden size", TINY + ["--hidden_size=16", "--workdir={w}"],
     lambda t, w: _copy(t, w), "hidden_size=8 there, 16 now"),
    ("extra argument", ["stray", "--workdir={w}"], None, "unexpected arguments"),
    ("empty workdir", ["--workdir= "], None, "--workdir is empty"),
    ("add, only damaged checkpoints", ["--mode=add", "--a=1", "--b=2", "--workdir={w}"],
     lambda t, w: _copy(t, w, _all_damaged), "checkpoint(s) are damaged"),
    ("eval, only damaged checkpoints", ["--mode=eval", "--workdir={w}"],
     lambda t, w: _copy(t, w, _all_damaged), "checkpoint(s) are damaged"),
    ("resume, only damaged checkpoints", TINY + ["--steps=30", "--workdir={w}"],
     lambda t, w: _copy(t, w, _all_damaged), "checkpoint(s) are damaged"),
]


@pytest.fixture(scope="module")
def outcomes(trained, tmp_path_factory):
  """Every case of the table, run once: name -> (exit status, stderr, before, after)."""
  base = str(tmp_path_factory.mktemp("cases"))
  prepared, before = [], {}
  for i, (name, args, make, _) in enumerate(CASES):
    work = os.path.join(base, f"case{i}")
    if make == "file":
      _write(work, "not a folder\n")
    elif isinstance(make, str) and make.startswith("config:"):
      _copy(trained, work, _config_damage(make.split(":", 1)[1]))
    elif make is not None:
      make(trained, work)
    before[name] = snapshot(work)
    prepared.append([a.replace("{w}", work) for a in args])
  results = run_cases(prepared, base)
  out = {}
  for i, ((name, _, _, _), (code, err)) in enumerate(zip(CASES, results)):
    out[name] = (code, err, before[name], snapshot(os.path.join(base, f"case{i}")))
  return out


@pytest.mark.parametrize("name,args,make,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(outcomes, name, args, make, message):
  code, err, before, after = outcomes[name]
  lines = err.strip().splitlines()
  assert code == 2, (code, err[-2000:])
  assert "Traceback" not in err, err[-2000:]
  assert len(lines) == 1, err[-2000:]
  assert message in lines[0], lines[0]
  assert after == before, "the work directory changed"


def test_table_mishandled_count(outcomes):
  """Every case of the table handled (the count is what the report quotes)."""
  bad = []
  for name, _, _, message in CASES:
    code, err, before, after = outcomes[name]
    lines = err.strip().splitlines()
    if code != 2 or "Traceback" in err or len(lines) != 1 or message not in lines[0] \
        or after != before:
      bad.append(name)
  print(f"{len(CASES)} bad inputs tried, {len(bad)} mishandled: {bad}")
  assert not bad
