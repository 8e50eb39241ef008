"""The benchmarks run end to end: ``python -m benchmarks.gpu_suite --quick`` on the CPU.

The suite runs every default part (tests, speed grids, many models, long sequences, run.py), and
then the opt-in ones (tuning variants, the parallel method), at tiny sizes
in processes of their own; parts whose peer library (PyTorch, Keras) is missing run without it.
This checks that each part finished and wrote its files, with numbers in them. It also checks the
arithmetic of benchmarks/models.py and the malloc helper's opt-out, which need no JAX, that
benchmarks/parallel.py's trained_imdb part skips, saying why, without a trained run, that
benchmarks/rl_memory.py's records follow from its agents' returns (a tiny run), and that
every entry point meets a bad flag with one line and exit status 2, having written nothing.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  out = tmp_path_factory.mktemp("suite")
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick", f"--out={out}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "summary.json") as f:
    return out, json.load(f), proc.stdout


@pytest.mark.slow
def test_every_part_ran(suite):
  out, summary, stdout = suite
  names = [p["part"] for p in summary["parts"]]
  assert names == ["tests", "speed_f32", "speed_stacks", "speed_bf16", "models",
                   "long_sequence", "run_py"]
  for p in summary["parts"]:
    # run_py times the repository's run.py: a failure there is recorded with its reason.
    if p["part"] == "run_py" and p["status"] == "failed":
      assert p["error"]
      continue
    assert p["status"] == "ok", p
    for name in p["outputs"]:
      assert os.path.getsize(out / name) > 0
  assert (out / "summary.md").read_text().startswith("# GPU suite")
  assert "speed_f32" in stdout


@pytest.mark.slow
def test_opt_in_parts_run_when_named(tmp_path):
  """--parts=tuning,parallel: the parts a default run leaves out, with their numbers."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick",
                         "--parts=tuning,parallel", f"--out={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [(p["part"], p["status"]) for p in summary["parts"]] == [("tuning", "ok"),
                                                                  ("parallel", "ok")]
  tuning = json.loads((tmp_path / "tuning.json").read_text())
  impls = {r["impl"] for r in tuning["records"]}
  assert {"jaxgru", "jaxgru[unroll=1]", "jaxgru[custom_vjp=false]", "product_loop"} <= impls
  assert all(_finite(r["median_ms"]) and r["median_ms"] > 0 for r in tuning["records"])
  figs = summary["parts"][1]["figures"]
  speedups = [v["speedup"] for k, v in figs.items() if k.startswith("forward")]
  assert speedups and all(_finite(x) and x > 0 for x in speedups)
  assert any(k.startswith("converge") for k in figs)


@pytest.mark.slow
def test_fused_part_runs_when_named(tmp_path):
  """--parts=fused: the fused kernel (interpreted on the CPU) beside the loop at every precision,
  and the loop again with the command-buffer flags, in a table per mode."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--quick",
                         "--parts=fused", f"--out={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [(p["part"], p["status"]) for p in summary["parts"]] == [("fused", "ok")]
  result = json.loads((tmp_path / "fused.json").read_text())
  assert [r["status"] for r in result["runs"]] == ["ok", "ok"]
  assert {(r["mode"], r["precision"]) for r in result["rows"]} == {
      (m, p) for m in ("train", "forward")
      for p in ("float32 highest", "float32 default", "bfloat16")}
  for r in result["rows"]:
    for key in ("loop_ms", "fused_ms", "loop_command_buffers_ms", "fused_over_loop"):
      assert _finite(r[key]) and r[key] > 0, (key, r)
  assert "| loop ms | fused ms |" in (tmp_path / "fused.md").read_text()


@pytest.mark.slow
def test_speed_parts_hold_numbers(suite):
  out, summary, _ = suite
  for name in ("speed_f32", "speed_stacks", "speed_bf16"):
    with open(out / f"{name}.json") as f:
      result = json.load(f)
    jaxgru = [r for r in result["records"] if r["impl"].startswith("jaxgru")]
    assert jaxgru, name
    for r in result["records"]:
      assert _finite(r["median_ms"]) and r["median_ms"] > 0
    assert (out / f"{name}.md").exists() and (out / f"{name}.png").exists()
  with open(out / "speed_stacks.json") as f:
    shapes = {r["shape"] for r in json.load(f)["records"]}
  assert shapes == {"2x4x2x3:bi:l2:var"}
  missing = set(summary["missing_peers"])
  with open(out / "speed_f32.json") as f:
    impls = {r["impl"] for r in json.load(f)["records"]}
  if "torch" in missing:
    assert "torch" not in impls


@pytest.mark.slow
def test_models_and_long_sequence_hold_numbers(suite):
  out, _, _ = suite
  with open(out / "models.json") as f:
    models = json.load(f)
  (rec,) = models["records"]
  assert rec["num_models"] == 2 and rec["phase"] == "solve"
  assert _finite(rec["cost_ratio"]) and rec["cost_ratio"] > 0
  assert _finite(rec["model_steps_per_s"]) and rec["model_steps_per_s"] > 0
  with open(out / "long_sequence.json") as f:
    (long_rec,) = json.load(f)["records"]
  assert _finite(long_rec["step_s"]) and long_rec["peak_rss_bytes"] > 0


@pytest.mark.slow
def test_rl_memory_records_agree_with_their_returns(tmp_path):
  """benchmarks/rl_memory.py at a tiny size (2 agents, one iteration at N=2 and at N=3): each
  segment is one episode, every greedy return is a mean of +-1 outcomes, and the solved flags
  follow from the returns, the threshold and the 7-of-8 rule; --append keeps an earlier length."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
  out = tmp_path / "m"
  common = ["-m", "benchmarks.rl_memory", "--num_models=2", "--env_steps=512",
            "--eval_episodes=8", f"--out={out}", f"--plot={tmp_path / 'm.png'}"]
  for lengths in (["--lengths=2"], ["--lengths=3", "--append", "--threshold=-1"]):
    proc = subprocess.run([sys.executable, *common, *lengths], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.with_suffix(".json").read_text())
  runs = record["lengths"]
  assert [r["memory_length"] for r in runs] == [2, 3]
  for r, threshold in zip(runs, (0.9, -1.0)):
    returns = np.asarray(r["eval_returns"])
    assert r["segments_are_episodes"] and r["rollout_steps"] == r["memory_length"] + 1
    assert r["env_steps"] == 128 * r["rollout_steps"]  # one iteration of 128 environments
    assert len(returns) == 2 and np.all(np.abs(returns) <= 1)
    np.testing.assert_allclose(returns * 8 % 2, 0, atol=1e-5)  # (right - wrong) / 8 episodes
    assert r["agents_solved"] == [bool(v >= threshold) for v in returns]
    assert r["required"] == 2
    assert r["solved"] == (all(r["agents_solved"]) and r["train_seconds"] <= 900)
  assert runs[1]["solved"]  # every return is >= -1
  assert "| 3 | 2 of 2 | **yes** |" in out.with_suffix(".md").read_text()
  assert (tmp_path / "m.png").stat().st_size > 0


def test_rl_memory_solved_rule():
  from benchmarks import rl_memory  # pylint: disable=import-outside-toplevel
  assert [rl_memory.required_agents(n) for n in (1, 2, 4, 8, 16, 9)] == [1, 2, 4, 7, 14, 8]
  judged = rl_memory.judge([1.0, 0.9, 0.89, 1.0, 1.0, 1.0, 1.0, 1.0], 100.0, 0.9, 900.0)
  assert judged["num_solved"] == 7 and judged["solved"] and judged["agents_solved"][2] is False
  assert not rl_memory.judge([1.0] * 6 + [0.5] * 2, 100.0, 0.9, 900.0)["solved"]
  over = rl_memory.judge([1.0] * 8, 901.0, 0.9, 900.0)
  assert over["num_solved"] == 8 and not over["within_budget"] and not over["solved"]


def test_models_ratio_arithmetic():
  from benchmarks import models  # pylint: disable=import-outside-toplevel
  rec = models.make_record("consolidate", 4, [8.0, 10.0, 12.0], [2.0, 5.0, 3.0])
  assert rec["n_model_ms"] == 10.0 and rec["single_ms"] == 3.0
  assert rec["cost_ratio"] == pytest.approx(10.0 / (4 * 3.0))
  assert rec["model_steps_per_s"] == pytest.approx(400.0)
  assert rec["single_model_steps_per_s"] == pytest.approx(1000.0 / 3.0)
  assert rec["bits"] == 64 and rec["batch_size"] == 128
  assert models.cost_ratio(64.0, 1.0, 64) == 1.0


def test_malloc_opt_out(monkeypatch):
  from jaxgru.training import malloc as _malloc  # pylint: disable=import-outside-toplevel
  assert not _malloc.tune_malloc(enable=False)["applied"]
  monkeypatch.setenv(_malloc.ENV_OPT_OUT, "1")
  done = _malloc.tune_malloc()
  assert not done["applied"] and _malloc.ENV_OPT_OUT in done["reason"]


def test_malloc_applies_on_glibc():
  code = ("import platform; from jaxgru import _tuning; "
          "from jaxgru.training import malloc as _malloc; "
          "h = _tuning.heap_reused(); d = _malloc.tune_malloc(); "
          "print(d['applied'], platform.libc_ver()[0] == 'glibc', h, _tuning.heap_reused())")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAXGRU_NO_MALLOPT", "MALLOC_MMAP_THRESHOLD_")}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out[0] == out[1]  # applied exactly where the C library is glibc
  assert out[2] == "False" and out[3] == out[0]  # ...and the CPU defaults follow it


def test_parallel_trained_imdb_skips_without_its_flags(tmp_path, capsys):
  # Without --imdb_workdir/--imdb_data the part says why in one line and the run finishes.
  from benchmarks import parallel  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "par")
  parallel.main(["--parts=trained_imdb", f"--out={out}"])
  with open(out + ".json") as f:
    skipped = json.load(f)["trained_imdb"]["skipped"]
  assert "--imdb_workdir" in skipped and "--imdb_data" in skipped
  assert f"trained_imdb {skipped}\n" in capsys.readouterr().out
  assert f"## A trained IMDB model: {skipped}" in open(out + ".md").read()
  parallel.main(["--parts=trained_imdb", f"--out={out}", f"--imdb_workdir={tmp_path}",
                 f"--imdb_data={tmp_path}/none.tar.gz"])
  with open(out + ".json") as f:
    assert "no finished checkpoint" in json.load(f)["trained_imdb"]["skipped"]


def test_product_loop_runs_the_parts_of_a_bound():
  """benchmarks/speed.py's product_loop. Its forward mode ends with the last direction's loop of
  tanh(h @ W) from 0.5, as a Python loop makes it (reversed here); its training step ends with
  the first layer's weight gradients X^T G and H^T G."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import speed_impls  # pylint: disable=import-outside-toplevel
  shape = speed_impls.Shape.parse("3x5x2x4:bi:l2")
  runner = speed_impls.build("product_loop", shape, ("train", "forward"))
  assert set(runner.run) == {"train", "forward"} and not runner.peer
  out = np.asarray(runner.run["forward"]())
  # The keys as _product_loop draws them: x, w_x, w_h per layer and direction (the last is layer
  # 2's reverse direction); the backward pass's states and G from the next seed's keys.
  keys = jax.random.split(jax.random.key(0), 3 * shape.layers * shape.directions)
  w_h = np.asarray(jax.random.normal(keys[-1], (4, 12))) / 2.0
  s, want = np.full((3, 4), 0.5), np.zeros((5, 3, 4))
  for t in reversed(range(5)):
    s = np.tanh(s @ w_h)[:, :4]
    want[t] = s
  assert_close(out, want, steps=5, terms=4)  # 5 steps of a 4-term product
  more = jax.random.split(jax.random.key(1), 3 * shape.layers * shape.directions)
  x = np.asarray(jax.random.normal(keys[0], (15, 2)), np.float64)
  states = np.asarray(jax.random.normal(more[0], (15, 4)), np.float64)
  g = np.asarray(jax.random.normal(more[1], (15, 12)), np.float64)
  dw_x, dw_h = runner.run["train"]()
  assert_close((dw_x, dw_h), (x.T @ g, states.T @ g), steps=1, terms=15)  # sums of 15 products


def test_speed_report_sets_jaxgru_against_the_bound_apart_from_the_peers():
  from benchmarks import speed_report  # pylint: disable=import-outside-toplevel
  def rec(impl, ms, peer):
    return {"impl": impl, "shape": "8x16x4x8:bi", "mode": "forward", "median_ms": ms,
            "peer": peer, "ratio_to_fastest_peer": ms / 30.0, "fastest_peer": "equinox",
            "percent_of_peak": 1.0, "compile_s": None}
  result = {"environment": {"versions": {}, "device_kind": "cpu", "platform": "cpu"},
            "records": [rec("jaxgru", 24.0, False), rec("equinox", 30.0, True),
                        rec("product_loop", 20.0, False)]}
  text = speed_report.markdown(result)
  row = [line for line in text.splitlines() if line.startswith("| 8x16x4x8:bi |")][0]
  # the fastest GRU is in bold, not the bound; jaxgru over the bound is 24 / 20
  assert row.split(" | ")[1:4] == ["**24.0**", "30.0", "20.0"]
  assert "| 0.80 (equinox) | 1.20 |" in row


# (module, arguments with {o} for a fresh folder, what the one line says): every entry point of
# benchmarks/ meets a mistake in its flags with "<program>: error: ..." and exit status 2, before
# it measures or writes anything. "/proc/jaxgru_x" is a folder that cannot be made.
BAD_FLAGS = [
    ("speed", ["--shapes=2x4x2x3", "--budget_s=-1", "--out={o}/a.json"], "--budget_s"),
    ("speed", ["--shapes=2x4x2x3", "--out=/proc/jaxgru_x/a.json"], "cannot make the folder"),
    ("speed", ["--shapes=2x4x2x3", "--out={o}"], "is a folder"),
    ("speed", ["--repeats=abc"], "--repeats=abc"),
    ("speed_report", ["{o}/none.json"], "No such file"),
    ("models", ["--n_list=a", "--out={o}/m.json"], "--n_list takes integers"),
    ("long_sequence", ["--configs=zzz", "--out={o}/l.json"], "unknown --configs"),
    ("recurrent_product", ["--hidden=-1"], "--hidden must be positive"),
    ("parallel", ["--parts=zz", "--out={o}/p"], "--parts"),
    ("parallel", ["--steps=0", "--out={o}/p"], "--steps must be positive"),
    ("resets", ["--p_done=2", "--out={o}/r"], "--p_done"),
    ("gpu_suite", [], "--out"),
    ("rl_memory", ["--lengths=4,0", "--out={o}/m", "--plot={o}/m.png"],
     "--lengths must be positive"),
    ("rl_memory", ["--lengths=4", "--threshold=2", "--out={o}/m", "--plot={o}/m.png"],
     "--threshold"),
    ("gpu_suite", ["--parts=zz", "--out={o}/g"], "unknown parts"),
    ("fused", ["--modes=zz", "--out={o}/f"], "unknown mode"),
    ("fused", ["--shapes=2x4", "--out={o}/f"], "--shapes"),
    ("addition", ["--part=zz", "--out_dir={o}"], "--part=zz"),
    ("addition_consolidation", ["--variants=bogus", "--out_dir={o}"], "bad variant"),
    ("activations", ["--tasks=addition", "--seeds=0", "--out={o}/a"], "--seeds must be positive"),
]


def test_benchmarks_meet_bad_flags_with_one_line_and_status_2(tmp_path):
  import concurrent.futures  # pylint: disable=import-outside-toplevel

  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def run(i):
    module, args, _ = BAD_FLAGS[i]
    out = tmp_path / str(i)
    out.mkdir()
    args = [a.replace("{o}", str(out)) for a in args]
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc, sorted(os.listdir(out))

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(run, range(len(BAD_FLAGS))))
  for (module, args, message), (proc, written) in zip(BAD_FLAGS, results):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (module, args, proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, (module, args, proc.stderr[-2000:])
    assert lines[0].startswith(f"{module}.py: error: "), (module, lines[0])
    assert message in lines[0], (module, message, lines[0])
    assert written == [], (module, args, written)
