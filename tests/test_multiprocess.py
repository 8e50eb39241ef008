"""run.py as a real multi-process JAX job on this machine: 2 processes x 2 CPU devices talking
through JAX's CPU collectives (gloo) on localhost, against 1 process x 4 devices.

* The same addition run gives the same steps to solve, evaluation and final parameters either
  way; the classifier (its batch split over the devices, so its gradients are summed across
  processes) gives the same figures and parameters equal to float32 rounding.
* A run saved by the two-process job is evaluated and used from one process and from two.
* One process killed: the other exits with one line within the heartbeat timeout; the job run
  again resumes, and ends where the uninterrupted run ended.
* A wrong --process_id, a second process 0, a coordinator that never answers: one line, exit 2.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
# A tiny addition run that solves 3-bit addition in a few hundred steps; 4 models, so that they
# split over 4 devices (each trains whole models on whole batches).
ADDITION = ["--hidden_size=8", "--bits=3", "--batch_size=32", "--eval_bits=16", "--log_every=10",
            "--checkpoint_every=50", "--consolidate_steps=20", "--consolidate_bits=8",
            "--steps=150", "--num_models=4", "--seed=3"]
# One classifier: its batch is split over the 4 devices.
CLASSIFY = ["--task=classify", "--train_size=1024", "--epochs=2",
            "--hidden_size=16", "--num_models=1", "--log_every=8", "--checkpoint_every=16"]
TIMEOUT = 600
# Seconds without a heartbeat before a process counts as dead: well under the 2 minutes the kill
# test allows, and long enough that a process starved by a loaded 2-core machine (compiling,
# with other jobs running) is not taken for dead.
HEARTBEAT = 30

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _start(args, log_path, devices=2):
  """run.py with ``args``, its stdout and stderr to files (no pipe can fill and block it)."""
  out, err = open(f"{log_path}.out", "w"), open(f"{log_path}.err", "w")
  return subprocess.Popen([sys.executable, RUN, *args], stdout=out, stderr=err, env=_env(devices),
                          cwd=ROOT)


def _outcome(proc, log_path, timeout=TIMEOUT):
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return code, open(f"{log_path}.out").read(), open(f"{log_path}.err").read()


def _job(args, workdir, name, processes=2, devices=2, extra=()):
  """Runs ``args`` as ``processes`` processes of ``devices`` CPU devices each (one process alone
  is not a job); returns [(status, stdout, stderr)] by process id."""
  base = [*args, f"--workdir={workdir}", *extra]
  if processes == 1:
    log = os.path.join(os.path.dirname(workdir), f"{name}.0")
    return [_outcome(_start(base, log, devices), log)]
  port = _free_port()
  procs, logs = [], []
  for pid in range(processes):
    logs.append(os.path.join(os.path.dirname(workdir), f"{name}.{pid}"))
    procs.append(_start([*base, f"--coordinator_address=localhost:{port}",
                         f"--num_processes={processes}", f"--process_id={pid}"], logs[-1],
                        devices))
  return [_outcome(p, log) for p, log in zip(procs, logs)]


def _ok(outcomes):
  for pid, (code, _, err) in enumerate(outcomes):
    assert code == 0, f"process {pid} exited {code}:\n{err[-3000:]}"


def _leaves(workdir, load):
  """The final parameters of the run in ``workdir`` (restored in this one-device process)."""
  sys.path.insert(0, ROOT)
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(load(workdir))]


def _addition_params(workdir):
  from jaxgru.tasks import addition
  return _leaves(workdir, lambda w: addition.load_trained(w)[1].params)


def _classify_params(workdir):
  from jaxgru.tasks import classify
  return _leaves(workdir, lambda w: classify.load_trained(w)[2])


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _metric_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def addition_runs(tmp_path_factory):
  """The addition run as 1 process x 4 devices and as 2 processes x 2 devices."""
  base = tmp_path_factory.mktemp("addition")
  one, two = str(base / "one"), str(base / "two")
  single, job = _job(ADDITION, one, "one", 1, 4), _job(ADDITION, two, "two")
  _ok(single)
  _ok(job)
  return one, two, single, job


def test_two_processes_train_addition_as_one_process_does(addition_runs):
  one, two, single, job = addition_runs
  a, b = _summary(one), _summary(two)
  assert any(s is not None for s in a["steps_to_solve"]), a["steps_to_solve"]
  for key in ("steps", "steps_to_solve", "length_generalization",
              "length_generalization_per_model"):
    assert a[key] == b[key], key
  # Each device trains whole models on whole batches (parallel.batch_mesh): nothing is summed
  # across devices, so both jobs compute the same numbers in the same order, bit for bit.
  for x, y in zip(_addition_params(one), _addition_params(two)):
    np.testing.assert_array_equal(x, y)
  # Written once, by process 0: one record per logged step; process 1 prints and logs nothing
  # but the line saying it joined.
  steps = _metric_steps(two)
  assert steps == sorted(set(steps)) and steps == _metric_steps(one)
  assert job[1][1] == ""
  assert "step 10/150" in job[0][2] and "step 10/150" not in job[1][2]
  assert "process 1 of 2; 4 devices in all" in job[1][2]
  info = [l for l in job[1][2].splitlines() if l[:1] == "I"]
  assert len(info) == 1, info
  # A multi-host checkpoint: one folder per step, the array data written by both processes.
  step_dirs = sorted(os.listdir(os.path.join(two, "checkpoints")))
  state = os.path.join(two, "checkpoints", step_dirs[-1], "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state))


def test_a_run_saved_by_two_processes_is_used_by_one_and_by_two(addition_runs, tmp_path):
  one, two, _, _ = addition_runs
  alone = _job(["--mode=eval"], two, "eval1", 1, 1)
  pair = _job(["--mode=eval"], two, "eval2")
  _ok(alone)
  _ok(pair)
  reference = _job(["--mode=eval"], one, "eval_one", 1, 1)
  assert alone[0][1] == pair[0][1] == reference[0][1] != ""
  assert pair[1][1] == ""  # process 1 prints nothing
  added = _job(["--mode=add", "--a=6", "--b=7"], two, "add2")
  assert [code for code, _, _ in added] == [0, 0] or [code for code, _, _ in added] == [1, 1]
  assert "a + b   = 13" in added[0][1] and added[1][1] == ""


def test_two_processes_train_the_classifier_as_one_process_does(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _ok(_job(CLASSIFY, one, "one", 1, 4))
  _ok(_job(CLASSIFY, two, "two"))
  a, b = _summary(one), _summary(two)
  assert a["steps"] == b["steps"]
  # The batch is split over the 4 devices and the gradient summed across them: in one process by
  # XLA, across two by gloo, which may add the 4 partial sums in another order. Each step's
  # gradient may then differ by float32 rounding (a few ulps), which Adam carries through the
  # steps: allow 4 ulps of the parameters' scale per step (measured: 6e-8 after 32 steps, at a
  # scale of 0.65), and a test accuracy one example apart at most.
  assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / a["test_size"] + 1e-12
  for x, y in zip(_classify_params(one), _classify_params(two)):
    scale = max(1.0, float(np.abs(x).max()))
    np.testing.assert_allclose(x, y, rtol=0, atol=a["steps"] * 4 * np.finfo(np.float32).eps * scale)


def _wait_for(predicate, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.5)
  raise AssertionError(f"timed out waiting for {what}")


def test_one_process_killed_the_other_stops_with_one_line_and_the_job_resumes(
    addition_runs, tmp_path):
  _, two, _, _ = addition_runs
  work = str(tmp_path / "work")
  port = _free_port()
  args = [*ADDITION, f"--workdir={work}", f"--coordinator_address=localhost:{port}",
          "--num_processes=2", f"--heartbeat_timeout={HEARTBEAT}"]
  logs = [str(tmp_path / f"killed.{pid}") for pid in (0, 1)]
  procs = [_start([*args, f"--process_id={pid}"], logs[pid]) for pid in (0, 1)]
  ckpt = os.path.join(work, "checkpoints", "50", "commit_success.txt")
  _wait_for(lambda: os.path.exists(ckpt) or procs[0].poll() is not None, 400, "checkpoint 50")
  assert procs[0].poll() is None, open(f"{logs[0]}.err").read()[-2000:]
  procs[1].send_signal(signal.SIGKILL)  # its worker dies with it (PR_SET_PDEATHSIG)
  killed = time.time()
  code, _, err = _outcome(procs[0], logs[0], timeout=120)
  waited = time.time() - killed
  procs[1].wait()
  assert code == 1, err[-3000:]
  errors = [l for l in err.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and "another process of the multi-host job stopped" in errors[0], err
  assert "Traceback" not in err and "Check failure" not in err
  assert waited < 120
  # Run again: it resumes from the last checkpoint and ends where the uninterrupted job ended.
  again = _job(ADDITION, work, "again", extra=[f"--heartbeat_timeout={HEARTBEAT}"])
  _ok(again)
  assert "resumed from the checkpoint at step" in again[0][2]
  for key in ("steps", "steps_to_solve", "length_generalization_per_model"):
    assert _summary(work)[key] == _summary(two)[key], key
  for x, y in zip(_addition_params(work), _addition_params(two)):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint(tmp_path):
  work = str(tmp_path / "work")
  port = _free_port()
  args = [*ADDITION, f"--workdir={work}", f"--coordinator_address=localhost:{port}",
          "--num_processes=2", "--checkpoint_every=1000"]
  logs = [str(tmp_path / f"term.{pid}") for pid in (0, 1)]
  procs = [_start([*args, f"--process_id={pid}"], logs[pid]) for pid in (0, 1)]
  metrics = os.path.join(work, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) or procs[0].poll() is not None, 400, "a metrics line")
  assert procs[0].poll() is None, open(f"{logs[0]}.err").read()[-2000:]
  procs[1].send_signal(signal.SIGTERM)  # to process 1 only; its supervisor passes it on
  (code0, _, err0), (code1, _, err1) = [_outcome(p, log, 300) for p, log in zip(procs, logs)]
  assert (code0, code1) == (130, 130), (err0[-2000:], err1[-2000:])
  assert "stopped by another process's signal at step" in err0
  assert "stopped by signal 15 at step" in err1
  # Both stopped at the same step and saved it together: one checkpoint, at that step.
  step = int(err0.split("signal at step ")[1].split(";")[0])
  assert f"at step {step};" in err1
  assert os.listdir(os.path.join(work, "checkpoints")) == [str(step)]


def _one_error_line(err):
  lines = [l for l in err.splitlines() if "error" in l.lower()]
  assert len(lines) == 1 and "Traceback" not in err and "Check failure" not in err, err
  return lines[0]


def test_a_process_id_out_of_range_exits_2(tmp_path):
  port = _free_port()
  (code, _, err), = _job(["--steps=5", f"--coordinator_address=localhost:{port}",
                          "--num_processes=2", "--process_id=2"], str(tmp_path / "w"), "oor", 1)
  assert code == 2 and "--process_id must lie in [0, --num_processes)" in _one_error_line(err)


def test_a_second_process_0_exits_2_and_leaves_the_first_alone(tmp_path):
  port = _free_port()
  args = ["--steps=5", f"--coordinator_address=localhost:{port}", "--num_processes=2",
          "--process_id=0", "--initialization_timeout=60"]
  first = _start([*args, f"--workdir={tmp_path / 'a'}"], str(tmp_path / "first"))
  try:
    # The first one's coordination service is up once it listens on the port.
    def listening():
      with socket.socket() as s:
        return s.connect_ex(("localhost", port)) == 0
    _wait_for(listening, 120, "process 0's coordination service")
    second = _job(args, str(tmp_path / "b"), "second", 1)
    code, _, err = second[0]
    assert code == 2 and f"port {port} is in use" in _one_error_line(err)
    assert first.poll() is None  # still waiting for its process 1
  finally:
    first.kill()
    first.wait()


def test_a_coordinator_that_never_answers_exits_2_within_the_timeout(tmp_path):
  port = _free_port()  # nobody listens there
  start = time.time()
  (code, _, err), = _job(["--steps=5", f"--coordinator_address=localhost:{port}",
                          "--num_processes=2", "--process_id=1", "--initialization_timeout=5"],
                         str(tmp_path / "w"), "absent", 1)
  elapsed = time.time() - start
  line = _one_error_line(err)
  assert code == 2 and "no coordinator answered" in line and "5s" in line
  # 5 s of waiting, plus starting Python and JAX twice (the supervisor and its worker) on a
  # loaded machine.
  assert elapsed < 5 + 90, elapsed


RL = ["--task=rl", "--num_models=4", "--num_envs=8", "--rollout_steps=32", "--env_steps=4096",
      "--hidden_size=16", "--log_every=4", "--checkpoint_every=8", "--seed=3",
      "--eval_episodes=16"]


def test_two_processes_train_rl_agents_as_one_process_does(tmp_path):
  """The RL task (4 agents, one per device) as 1 process x 4 devices and 2 x 2: the same
  evaluation returns and the same final parameters, bit for bit (no sum crosses devices); the
  run the job saved plays again from one process (--mode=eval)."""
  pytest.importorskip("gymnax")
  from jaxgru.tasks import rl
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _ok(_job(RL, one, "one", 1, 4))
  _ok(_job(RL, two, "two"))
  a, b = _summary(one), _summary(two)
  assert len(a["eval_returns"]) == 4 and a["eval_returns"] == b["eval_returns"]
  assert a["env_steps"] == b["env_steps"] == 4096
  params = lambda w: rl.load_trained(w)[1].train.params
  for x, y in zip(_leaves(one, params), _leaves(two, params), strict=True):
    np.testing.assert_array_equal(x, y)
  log = str(tmp_path / "eval")
  code, out, err = _outcome(_start(["--task=rl", "--mode=eval", f"--workdir={two}",
                                    "--eval_episodes=16"], log, devices=1), log)
  assert code == 0, err[-3000:]
  played = [float(line.split("mean return ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("agent ")]
  assert played == [round(r, 1) for r in b["eval_returns"]], (played, b["eval_returns"])


def test_two_processes_train_imdb_with_subset_and_predict(tmp_path):
  """IMDB (a tiny archive, --subset) with one model per device, as 1 process x 4 devices and as
  2 x 2: the same test accuracy and parameters bit for bit; --mode=predict on the job's run gives
  the one-process run's probability, from one process and as a 2-process job."""
  from test_imdb import make_archive, make_layout
  make_layout(str(tmp_path / "data"))
  archive = make_archive(str(tmp_path / "data"), str(tmp_path / "aclImdb_v1.tar.gz"))
  args = ["--task=imdb", f"--data_path={archive}", "--subset=6", "--num_models=4",
          "--vocab_size=30", "--max_length=12", "--embed_size=8", "--hidden_size=8",
          "--batch_size=4", "--epochs=3", "--learning_rate=0.05", "--warmup_steps=0",
          "--log_every=2", "--checkpoint_every=100"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _ok(_job(args, one, "one", 1, 4))
  _ok(_job(args, two, "two"))
  a, b = _summary(one), _summary(two)
  assert a["test_accuracy"] == b["test_accuracy"]
  for x, y in zip(_classify_params(one), _classify_params(two), strict=True):
    np.testing.assert_array_equal(x, y)
  text = "--text=Wonderful and great, I loved it!"
  (code, want, err), = _job(["--mode=predict", text], one, "predict_one", 1, 1)
  assert code == 0 and re.fullmatch(r"[01]\.\d{6}\n", want), (want, err[-2000:])
  (code, alone, err), = _job(["--mode=predict", text], two, "predict_alone", 1, 1)
  assert code == 0 and alone == want, (alone, want, err[-2000:])
  job = _job(["--mode=predict", text], two, "predict_job")
  _ok(job)
  assert job[0][1] == want, (job[0][1], want)  # process 0 prints; process 1 prints nothing
  assert job[1][1] == "", job[1][1]
