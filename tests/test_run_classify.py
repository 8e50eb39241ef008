"""run.py for --task=classify|imdb and --mode=predict, as a user runs it."""

import json
import os
import re
import subprocess
import sys

import pytest

from test_imdb import make_archive, make_layout
from forked_run import run_forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
TINY = ["--vocab_size=30", "--max_length=12", "--embed_size=8", "--hidden_size=8",
        "--batch_size=4", "--epochs=10", "--learning_rate=0.05", "--warmup_steps=0",
        "--log_every=2", "--checkpoint_every=100"]


def _run(args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def _bad_data(tmp_path, kind):
  """A path to data that is wrong in one way."""
  root = str(tmp_path / "data")
  if kind == "missing":
    return str(tmp_path / "nowhere.tar.gz")
  if kind == "no_layout":
    os.makedirs(os.path.join(root, "reviews"))
    return root
  layout = make_layout(root)
  if kind == "empty_review":
    open(os.path.join(layout, "train", "neg", "77_1.txt"), "w").close()
    return layout
  if kind == "not_utf8":
    open(os.path.join(layout, "train", "pos", "77_8.txt"), "wb").write(b"na\xefve")
    return layout
  archive = make_archive(root, str(tmp_path / "aclImdb_v1.tar.gz"))
  data = open(archive, "rb").read()
  if kind == "truncated":
    open(archive, "wb").write(data[: len(data) * 2 // 3])
  elif kind == "corrupt":
    middle = len(data) // 2
    open(archive, "wb").write(data[:middle] + bytes(16) + data[middle + 16:])
  return archive


BAD_DATA = [
    ("missing", "no such file or directory"),
    ("no_layout", "not the IMDB layout"),
    ("empty_review", "77_1.txt: empty review file"),
    ("not_utf8", "77_8.txt: not valid UTF-8"),
    ("truncated", "corrupt or truncated archive"),
    ("corrupt", "corrupt or truncated archive"),
]

USAGE_ERRORS = [
    (["--task=imdb"], "--task=imdb needs --data_path=PATH"),
    (["--mode=predict", "--text=", "--workdir={tmp}"], "needs a non-empty --text"),
    (["--mode=predict", "--text=   ", "--workdir={tmp}"], "needs a non-empty --text"),
    (["--mode=predict", "--text=Great.", "--workdir={tmp}/none"], "needs a trained IMDB model"),
    (["--task=imdb", "--vocab_size=2", "--data_path=x"], "vocab_size must be at least 3"),
    (["--task=imdb", "--dropout=1", "--data_path=x"], "dropout must lie in [0, 1), got 1.0"),
    (["--task=imdb", "--subset=-1", "--data_path=x"], "subset must be >= 0, got -1"),
    (["--task=classify", "--steps=5"], "trains for --epochs, not --steps"),
    (["--task=classify", "--mode=add"], "--mode=add is for --task=addition"),
    (["--task=classify", "--data_path=x"], "--data_path is for --task=imdb"),
    (["--task=classify", "--text=hi"], "--text is for --mode=predict"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  """Every case of BAD_DATA and USAGE_ERRORS, each with a folder of its own, run as run.py in
  processes forked from one that imported it once (forked_run.run_forked), in the repository's
  root: {("data"|"usage", index): (exit status, stderr)}."""
  base = tmp_path_factory.mktemp("cases")
  keys, prepared = [], []
  for i, (kind, _) in enumerate(BAD_DATA):
    tmp = base / f"data{i}"
    tmp.mkdir()
    keys.append(("data", i))
    prepared.append(["--task=imdb", f"--data_path={_bad_data(tmp, kind)}", f"--workdir={tmp}/run"])
  for i, (args, _) in enumerate(USAGE_ERRORS):
    tmp = base / f"usage{i}"
    tmp.mkdir()
    keys.append(("usage", i))
    prepared.append([a.format(tmp=tmp) for a in args])
  return dict(zip(keys, run_forked(prepared, str(base), cwd=ROOT)))


def _check_one_line_exit_2(returncode, stderr, message):
  assert returncode == 2, (returncode, stderr)
  assert message in stderr and "Traceback" not in stderr
  assert len([l for l in stderr.splitlines() if "error" in l.lower()]) == 1, stderr


@pytest.mark.parametrize("index", range(len(BAD_DATA)), ids=[k for k, _ in BAD_DATA])
def test_bad_data_exits_2_with_one_line(outcomes, index):
  _check_one_line_exit_2(*outcomes["data", index], BAD_DATA[index][1])


@pytest.mark.parametrize("index", range(len(USAGE_ERRORS)),
                         ids=[f"args{i}-{m}" for i, (_, m) in enumerate(USAGE_ERRORS)])
def test_usage_errors_exit_2_with_one_line(outcomes, index):
  _check_one_line_exit_2(*outcomes["usage", index], USAGE_ERRORS[index][1])


@pytest.mark.slow
def test_imdb_train_then_predict(tmp_path):
  root = str(tmp_path / "data")
  make_layout(root)
  archive = make_archive(root, str(tmp_path / "aclImdb_v1.tar.gz"))
  workdir = str(tmp_path / "run")
  proc = _run(["--task=imdb", f"--data_path={archive}", f"--workdir={workdir}", *TINY])
  assert proc.returncode == 0, proc.stderr
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["test_size"] == 9 and summary["flags"]["data_path"] == archive
  assert summary["flags"]["vocab_size"] == 30 and "train_seconds" in summary
  assert f"test accuracy {summary['test_accuracy']:.4f}" in proc.stdout

  probs = []
  for text in ("Wonderful and great, I loved it!", "Boring, awful; I hated it."):
    proc = _run(["--mode=predict", f"--workdir={workdir}", f"--text={text}"])
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"[01]\.\d{6}", proc.stdout.strip()), proc.stdout
    probs.append(float(proc.stdout))
  assert probs[0] > 0.5 > probs[1]

  # Asking a trained IMDB run for --text with no words at all is a usage error too.
  proc = _run(["--mode=predict", f"--workdir={workdir}", "--text=..."])
  assert proc.returncode == 2 and "no words to classify" in proc.stderr, proc.stderr

  # Training on into that run with another vocabulary size is a usage error, found before the
  # data are read; the stored run is left as it was (before: orbax's traceback, config.json
  # overwritten).
  config = open(os.path.join(workdir, "config.json")).read()
  proc = _run(["--task=imdb", f"--data_path={archive}", f"--workdir={workdir}", *TINY,
               "--vocab_size=40"])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "vocab_size=30 there, 40 now" in proc.stderr, proc.stderr
  assert open(os.path.join(workdir, "config.json")).read() == config
  # Other data under the same settings: its vocabulary differs (a new word frequent enough to
  # enter the 30 kept), found once the data are read; still one line, and the run is kept.
  other = str(tmp_path / "other")
  make_layout(other)
  with open(os.path.join(other, "aclImdb", "train", "pos", "99_9.txt"), "w") as f:
    f.write("zebra " * 50)
  proc = _run(["--task=imdb", f"--data_path={other}", f"--workdir={workdir}", *TINY])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert "trained with another vocabulary" in proc.stderr, proc.stderr
  assert open(os.path.join(workdir, "config.json")).read() == config


@pytest.mark.slow
def test_classify_and_random_labels(tmp_path):
  proc = _run(["--task=classify", f"--workdir={tmp_path}/a"])
  assert proc.returncode == 0, proc.stderr
  summary = json.load(open(os.path.join(tmp_path, "a", "summary.json")))
  assert summary["test_accuracy"] >= 0.99 and summary["flags"]["task"] == "classify"
  proc = _run(["--task=classify", "--random_labels", f"--workdir={tmp_path}/b"])
  assert proc.returncode == 0, proc.stderr
  summary = json.load(open(os.path.join(tmp_path, "b", "summary.json")))
  assert abs(summary["test_accuracy"] - 0.5) < 0.05
