r"""Everything to measure on a GPU machine, in one command of at most 8 minutes.

  PYTHONPATH=. python -m benchmarks.gpu_suite --out=gpu_results         # on the GPU machine
  python -m benchmarks.gpu_suite --quick --out=/tmp/suite              # every part, tiny, CPU

Meant for an NVIDIA GPU machine without network that has JAX (CUDA) >= 0.11, PyTorch with
cuDNN, Flax, optax, orbax, absl, Equinox and matplotlib installed; run it from the repository
root (``PYTHONPATH=.``: no ``pip install`` needed). The parts, each in its own process group
with its own time limit (see the comment above ``parts``), so that a failure or an overrun of
one is recorded and the others still run. At its limit a part is interrupted (SIGINT), then
killed with everything it started a few seconds later; its output so far is kept in its log,
and the summary names the part's last line of output:

* ``tests``: the parity and fast-path tests (tests/test_convert.py, test_fast_path.py; 82 tests,
  test_rnn.py left out for time) on the device. ``pytest -v --tb=line -rfE``: a line per test as
  it finishes, so a run cut short still names every test it ran, and a closing line per
  failure with its reason; all of it goes to ``DIR/tests.txt``, and the summary gives the
  counts and the failures. With pytest-timeout installed, a test over 30 s fails alone;
* ``speed_f32``: benchmarks/speed.py's grid against the peers (PyTorch's cuDNN GRU, Flax, Keras,
  Equinox), float32, on the four plain shapes;
* ``speed_stacks``: the same for 2-layer stacks and bidirectional GRUs, with variable lengths;
* ``speed_bf16``: jaxgru with bfloat16 products against PyTorch under bfloat16 autocast and the
  float32 peers, on two shapes (64x128x32x256, 128x256x128x512);
* ``models``: benchmarks/models.py, N = 64 and 256 addition models in one program, both phases;
* ``long_sequence``: benchmarks/long_sequence.py at T = 100,000 (remat products and full);
* ``run_py``: ``python run.py``'s addition job, timed by benchmarks/addition.py.

Two more parts run only when ``--parts`` names them (a second command, about 6.5 minutes,
``--parts=tuning,parallel``):

* ``tuning``: jaxgru at the GPU defaults against one change each (``unroll`` 1, 2, 4 or 16, the
  input projection inside the loop, JAX's autodiff of the loop, the per-step backward), on the
  four plain shapes and a bidirectional one: what the tuning table's GPU column is set from;
  beside them speed.py's ``product_loop``, the bound of a loop of XLA's products (whether any
  such loop can come near cuDNN at the small shapes);
* ``parallel``: benchmarks/parallel.py's convergence and forward timing (T up to 100,000,
  B = 1 and 16, H = 1, 16 and 64) at the cell's default precision.

And one more, for a third command of its own (at most 8 minutes, ``--parts=fused``):

* ``fused``: benchmarks/fused.py: the fused kernels' tests on the device (tests/test_fused.py's
  comparisons), then ``ScanOptions(method="fused")`` against the sequential loop
  and cuDNN at every grid and stack shape, training step and forward pass, float32 at precision
  highest and default and bfloat16 products; and the loop with XLA's command buffers (CUDA
  graphs) as the cheaper lever (docs/fused.md).

Each part writes its JSON and markdown (and PNG where it has a plot) into ``DIR``; the suite
writes ``DIR/summary.json`` and ``DIR/summary.md`` and prints the summary. A part whose peer
library is missing runs without it and says so; one that needs a missing library is skipped.
``--quick`` runs every part at tiny sizes on the CPU (``JAX_PLATFORMS=cpu``, no CUDA for
PyTorch), for tests/test_benchmarks.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

from absl import flags

from benchmarks import _common

_OUT = flags.DEFINE_string("out", None, "Folder for every result file.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Every part at tiny sizes, on the CPU.")
_PARTS = flags.DEFINE_list("parts", None, "Only these parts (default: all).")
_TOTAL = flags.DEFINE_integer("total_s", 470, "Seconds for the whole suite; a part gets the "
                              "smaller of its own limit and what is left.")

PEERS = ("torch", "flax", "keras", "equinox")
# flax_nnx runs the same cell as flax_linen (measured level with it on the H200); its place in the
# float32 grid goes to jaxgru[precision=default], TensorFloat-32 products as the JAX peers use.
SPEED_PEERS = "flax_linen,keras,torch,equinox"
# The tuning part: jaxgru at its GPU defaults beside one change each (unroll, the input
# projection inside the loop, JAX's autodiff of the loop instead of the custom rule, the
# per-step backward instead of the diagonal one), timed in the same rounds, no peers; and the
# bound of a loop of XLA's products (speed.py's product_loop).
TUNING_VARIANTS = ("jaxgru,jaxgru[unroll=1],jaxgru[unroll=2],jaxgru[unroll=4],"
                   "jaxgru[unroll=16],jaxgru[hoist_projection=false],jaxgru[custom_vjp=false],"
                   "jaxgru[diagonal_backward=false],product_loop")


@dataclasses.dataclass
class Part:
  name: str
  module: Optional[str]        # python -m <module>; None: pytest
  args: list                   # arguments (full run)
  quick_args: list             # arguments (--quick)
  limit_s: int                 # seconds (full run)
  outputs: list                # files it writes into DIR, relative
  needs: tuple = ()            # libraries without which it cannot run
  default: bool = True         # runs without --parts (else only when --parts names it)


# Limits, from the first full run on an NVIDIA H200 (JAX 0.11.2, fresh machine, no compile
# cache; total_s=392 then): tests reached 67 of 94 tests (test_convert, test_fast_path,
# test_rnn) in 90 s, about 1.3 s a test with the start and the first imports of the peers;
# speed_f32 took 79.9 s and speed_stacks 71.3 s at --budget_s=2 --repeats=10 (mostly compiling:
# budget_s=1 saves at most one second per shape and mode, about 8 and 10 s); speed_bf16 did 2 of
# its 3 shapes in 60 s; models compiled 11-12 s per N and phase (the single model too) and did
# the solve phase's N=1,4,16 in 50 s; long_sequence took 20.3 s; run_py got the 19 s left and
# was killed, so its 50 s is untested on a GPU. So: tests 110 s for the 82 tests of
# test_convert + test_fast_path; speed_f32 75, speed_stacks 65; speed_bf16 50 for 2 shapes;
# models 85 for N=64,256 in both phases (6 compiles, about 72 s); long_sequence 30 (two
# configurations, each given up after 14 s); run_py 50. Sum 465 <= the 470 of --total_s.
def parts(out: str) -> list[Part]:
  j = lambda name: os.path.join(out, name)
  stacks = "64x256x64x64:l2,64x256x64x64:bi,64x256x64x64:bi:l2,64x256x64x64:bi:var,64x256x64x64:bi:l2:var"
  speed_common = ["--budget_s=1", "--repeats=7", "--min_repeats=3", "--warmup=2",
                  "--compile_t="]
  speed_quick = ["--budget_s=0.2", "--repeats=3", "--min_repeats=2", "--warmup=1",
                 "--compile_t=", "--memory=false", "--peak_sizes=256", "--plot=true"]
  return [
      Part("tests", None,
           ["tests/test_convert.py", "tests/test_fast_path.py"],
           ["tests/test_rnn.py", "-k", "output_size or h0_defaults"],
           110, ["tests.txt"], ("pytest",)),
      Part("speed_f32", "benchmarks.speed",
           [f"--out={j('speed_f32.json')}", f"--impls=jaxgru,jaxgru[precision=default],{SPEED_PEERS}",
            "--shapes=256x16x2x32,64x128x32x256,16x1024x8x64,128x256x128x512", *speed_common],
           [f"--out={j('speed_f32.json')}", "--shapes=2x4x2x3",
            "--impls=jaxgru,jaxgru[precision=default],torch,keras", *speed_quick],
           75, ["speed_f32.json", "speed_f32.md", "speed_f32.png"]),
      Part("speed_stacks", "benchmarks.speed",
           [f"--out={j('speed_stacks.json')}", f"--shapes={stacks}",
            "--impls=jaxgru,flax_linen,keras,torch,equinox", *speed_common],
           [f"--out={j('speed_stacks.json')}", "--shapes=2x4x2x3:bi:l2:var",
            "--impls=jaxgru,torch", "--modes=forward", *speed_quick],
           65, ["speed_stacks.json", "speed_stacks.md", "speed_stacks.png"]),
      Part("speed_bf16", "benchmarks.speed",
           [f"--out={j('speed_bf16.json')}", "--shapes=64x128x32x256,128x256x128x512",
            "--impls=jaxgru[dtype=bfloat16],jaxgru,torch[dtype=bfloat16],torch,flax_linen",
            *speed_common],
           [f"--out={j('speed_bf16.json')}", "--shapes=2x4x2x3",
            "--impls=jaxgru[dtype=bfloat16],torch[dtype=bfloat16]", "--modes=forward", *speed_quick],
           50, ["speed_bf16.json", "speed_bf16.md", "speed_bf16.png"]),
      Part("models", "benchmarks.models",
           [f"--out={j('models.json')}", "--malloc=on", "--n_list=64,256",
            "--phases=solve,consolidate", "--repeats=10", "--warmup=2",
            "--max_seconds_per_n=2"],
           [f"--out={j('models.json')}", "--malloc=on", "--n_list=2", "--phases=solve",
            "--repeats=3", "--warmup=1"],
           85, ["models.json", "models.md", "models.png"]),
      Part("long_sequence", "benchmarks.long_sequence",
           [f"--out={j('long_sequence.json')}", "--times=100000",
            "--configs=products,full", "--steps=2", "--timeout_s=14"],
           [f"--out={j('long_sequence.json')}", "--times=32", "--configs=products",
            "--steps=1", "--timeout_s=60"],
           30, ["long_sequence.json", "long_sequence.md"]),
      Part("run_py", "benchmarks.addition",
           ["--part=run_py", "--run_py_repeats=1", f"--out_dir={out}"],
           ["--part=run_py", "--run_py_repeats=1", f"--out_dir={out}",
            "--run_py_args=--steps=2,--consolidate_steps=0,--eval_bits=8,--log_every=1,"
            "--checkpoint_every=2"],
           50, ["addition_run_py.json", "addition_run_py.md"], ("orbax",)),
      # Opt-in parts (--parts=tuning,parallel), for a second command on the same machine:
      # what the tuning table's GPU column and the parallel method's default need.
      Part("tuning", "benchmarks.speed",
           [f"--out={j('tuning.json')}", f"--impls={TUNING_VARIANTS}",
            "--shapes=256x16x2x32,64x128x32x256,16x1024x8x64,128x256x128x512,64x256x64x64:bi",
            *speed_common],
           [f"--out={j('tuning.json')}", "--shapes=2x4x2x3", f"--impls={TUNING_VARIANTS}",
            *speed_quick],
           150, ["tuning.json", "tuning.md", "tuning.png"], default=False),
      Part("parallel", "benchmarks.parallel",
           ["--parts=convergence,timing", "--steps=1000,10000,100000", "--batches=1,16",
            "--hiddens=1,16,64", "--conv_hiddens=1,4,16,64,256", "--max_elements=2e8",
            "--repeats=3", "--no-train", f"--out={j('parallel')}"],
           ["--parts=convergence,timing", "--steps=64", "--batches=1", "--hiddens=2",
            "--conv_steps=64", "--conv_hiddens=2", "--repeats=1", "--no-train",
            f"--out={j('parallel')}"],
           240, ["parallel.json", "parallel.md", "parallel.png"], default=False),
      # Opt-in (--parts=fused --total_s=470, a command of its own, at most 8 minutes): the fused
      # kernels checked on the device, then timed against the loop and cuDNN at every grid and
      # stack shape, and the loop with command buffers.
      Part("fused", "benchmarks.fused", [f"--out={out}", "--budget_s=440"],
           [f"--out={out}", "--quick", "--budget_s=400"],
           460, ["fused.json", "fused.md", "fused_kernel.json", "fused_kernel.md",
                 "fused_command_buffers.json", "fused_command_buffers.md"], default=False),
  ]


def _installed(lib: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(lib) is not None


def _child_env(quick: bool) -> dict:
  env = dict(os.environ)
  # Children run from the repository root; keep it importable however Python is started.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_common.ROOT, env.get("PYTHONPATH")) if p)
  env.setdefault("KERAS_BACKEND", "jax")
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  # Output reaches the log as it is written, so a part killed at its limit still shows how far
  # it got (a pipe would otherwise hold back the last few kilobytes).
  env["PYTHONUNBUFFERED"] = "1"
  if quick:
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
  return env


# Seconds between the interrupt (SIGINT) sent to a part at its limit and the kill (SIGKILL):
# pytest then writes its summary, with a line for every failure so far.
GRACE_S = 5.0


def tests_command(args: list) -> list:
  """The tests part's command: a line per test as it finishes (-v), so that a run killed at its
  limit still names every test it ran and how it went; one line per failure (--tb=line) and a
  closing summary with the reason of each failure and error (-rfE)."""
  # -o addopts=: the repository's defaults (two xdist workers, slow tests left out) need
  # pytest-xdist, which a prepared GPU machine may lack; one process is what the device wants.
  cmd = [sys.executable, "-m", "pytest", "-v", "--tb=line", "-rfE", "-p", "no:cacheprovider",
         "-o", "addopts="]
  if _installed("pytest_timeout"):  # optional: one hung test then fails alone
    cmd.append("--timeout=30")
  return [*cmd, *args]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run_limited(cmd: list, limit_s: float, env: dict) -> tuple[str, Optional[int]]:
  """Runs ``cmd`` in a process group of its own; (stdout and stderr, exit code or None if it
  was stopped at ``limit_s``). At the limit (less GRACE_S) the group gets SIGINT, then SIGKILL
  GRACE_S later: the children it started (long_sequence's configurations, run.py) go with it
  instead of holding the device and the output pipe."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", cwd=_common.ROOT, env=env, start_new_session=True)
  grace = min(GRACE_S, limit_s / 4)
  try:
    output, _ = proc.communicate(timeout=limit_s - grace)
    return output, proc.returncode
  except subprocess.TimeoutExpired:
    pass
  _signal_group(proc, signal.SIGINT)
  try:
    output, _ = proc.communicate(timeout=grace)
  except subprocess.TimeoutExpired:
    _signal_group(proc, signal.SIGKILL)
    output, _ = proc.communicate()
  _signal_group(proc, signal.SIGKILL)  # whatever the interrupt left behind
  return output, None


def run_part(part: Part, out: str, quick: bool, limit_s: float) -> dict:
  """Runs one part in its own process; returns its summary record (never raises)."""
  rec = {"part": part.name, "limit_s": round(limit_s, 1)}
  missing = [lib for lib in part.needs if not _installed(lib)]
  if missing:
    return {**rec, "status": "skipped", "reason": f"needs {', '.join(missing)}"}
  if limit_s < 5:
    return {**rec, "status": "skipped", "reason": "no time left in the suite's budget"}
  args = part.quick_args if quick else part.args
  if part.module is None:
    cmd = tests_command(args)
  else:
    cmd = [sys.executable, "-m", part.module, *args]
  rec["command"] = " ".join(cmd)
  log_path = os.path.join(out, f"{part.name}.log" if part.module else "tests.txt")
  t0 = time.perf_counter()
  env = _child_env(quick)
  if part.module is None and not quick:
    # tests/conftest.py compiles the tests' programs with LLVM's optimizations off, to save
    # time on a CPU; on the device they compile as users' programs do (XLA's default, 3), as in
    # the suite's first runs.
    flags = env.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
      env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=3".strip()
  try:
    output, code = run_limited(cmd, limit_s, env)
  except OSError as e:
    output, code = f"could not start: {e}\n", -1
  rec["seconds"] = round(time.perf_counter() - t0, 1)
  if code is None:
    rec["status"] = "failed"
    rec["error"] = f"over its limit of {limit_s:.0f} s; last output: {_last_line(output)}"
  else:
    rec["status"] = "ok" if code == 0 else "failed"
    if code != 0:
      rec["error"] = f"exit {code}: " + _last_line(output)
  _common.write_text(log_path, output)
  rec["log"] = os.path.basename(log_path)
  rec["outputs"] = [f for f in part.outputs if os.path.exists(os.path.join(out, f))]
  try:
    rec["figures"] = headline(part.name, out, output)
  except Exception as e:  # pylint: disable=broad-except  # a summary must not stop the suite
    rec["figures"] = {"error": f"{type(e).__name__}: {e}"}
  return rec


def _last_line(text: str) -> str:
  lines = [l for l in (text or "").strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else ""


# pytest -v: "tests/test_x.py::test_y[a-b] PASSED   [ 12%]"; -rfE: "FAILED tests/...::... - why".
_TEST_LINE = re.compile(r"^(\S+\.py::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+\.py::\S.*?)(?: - (.*))?$", re.M)
_MAX_FAILURES_SHOWN = 40


def tests_figures(output: str) -> dict:
  """Counts of the tests run (from pytest -v's lines, so also for a run cut short), whether
  pytest finished, and each failure or error with its reason where pytest gave one."""
  counts = {}
  bad = {}  # test id -> reason
  for test, status in _TEST_LINE.findall(output):
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "xfailed", "XPASS": "xpassed"}[status]
    counts[key] = counts.get(key, 0) + 1
    if status in ("FAILED", "ERROR"):
      bad.setdefault(test, "")
  for status, test, reason in _SUMMARY_LINE.findall(output):
    bad[test] = (reason or "").strip()[:200]
  interrupted = "KeyboardInterrupt" in output
  finished = not interrupted and re.search(r"^=+ .* in [\d.]+s.* =+$", output, re.M) is not None
  figs = {**counts, "finished": finished}
  if not finished:  # the test that was running when the part was stopped: named, no status
    started = [l.strip() for l in output.splitlines()
               if re.match(r"^\S+\.py::\S", l) and not _TEST_LINE.match(l)]
    if started:
      figs["stopped_in"] = started[-1]
  if bad:
    items = [f"{t}: {r}" if r else t for t, r in bad.items()]
    figs["failures"] = items[:_MAX_FAILURES_SHOWN]
    if len(items) > _MAX_FAILURES_SHOWN:
      figs["failures"].append(f"... and {len(items) - _MAX_FAILURES_SHOWN} more (see tests.txt)")
  return figs


def _load(out, name) -> Optional[dict]:
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def headline(name: str, out: str, output: str) -> dict:
  """The few numbers of a part that the summary shows."""
  if name == "tests":
    return tests_figures(output)
  if name.startswith("speed") or name == "tuning":
    res = _load(out, f"{name}.json")
    if not res:
      return {}
    figs = {}
    for r in res["records"]:
      if r["impl"].startswith("jaxgru"):
        key = f"{r['impl']} {r['mode']} {r['shape']}"
        figs[key] = {"median_ms": round(r["median_ms"], 4),
                     "vs_fastest_peer": None if r["ratio_to_fastest_peer"] is None
                     else round(r["ratio_to_fastest_peer"], 3),
                     "fastest_peer": r["fastest_peer"]}
    figs["skipped"] = sorted({s["impl"] for s in res.get("skipped", [])})
    return figs
  if name == "models":
    res = _load(out, "models.json")
    return {} if not res else {
        f"{r['phase']} N={r['num_models']} malloc {r['malloc']}":
            {"cost_ratio": round(r["cost_ratio"], 3),
             "model_steps_per_s": round(r["model_steps_per_s"], 1)} for r in res["records"]}
  if name == "long_sequence":
    res = _load(out, "long_sequence.json")
    return {} if not res else {
        f"T={r['time']} {r['config']}": r.get("error") or {
            "step_s": round(r["step_s"], 3), "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20),
            "device_peak_mb": None if r.get("device_peak_bytes") is None
            else round(r["device_peak_bytes"] / 2**20)} for r in res["records"]}
  if name == "parallel":
    res = _load(out, "parallel.json")
    if not res:
      return {}
    figs = {f"converge H={r['hidden']} x{r['scale']:g} {r['method']}":
            {"iterations": r["iterations"], "fell_back": r["fell_back"]}
            for r in res.get("convergence", [])}
    figs.update({f"forward T={r['steps']} B={r['batch']} H={r['hidden']}":
                 {"speedup": round(r["speedup_forward"], 2), "iterations": r["iterations"],
                  "fell_back": r["fell_back"]}
                 for r in res.get("timing", []) if "speedup_forward" in r})
    return figs
  if name == "fused":
    res = _load(out, "fused.json")
    return {} if not res else {
        f"{r['mode']} {r['shape']} {r['precision']}":
            {k: None if r[k] is None else round(r[k], 3)
             for k in ("fused_over_loop", "fused_over_cudnn", "loop_over_cudnn",
                       "command_buffers_over_cudnn")} for r in res["rows"]}
  if name == "run_py":
    res = _load(out, "addition_run_py.json")
    if not res:
      return {}
    runs = res["run_py"]
    return {k: _common.median([r[k] for r in runs])
            for k in ("compile_seconds", "seconds_to_solve", "train_seconds", "process_seconds")}
  return {}


def markdown(summary: dict) -> str:
  env = summary["environment"]
  out = [f"# GPU suite{' (quick, CPU)' if summary['quick'] else ''}\n",
         f"{env['device']}; jax {env['versions'].get('jax')}, torch "
         f"{env['versions'].get('torch')}; revision {(env['git'].get('revision') or '?')[:10]}"
         f"{' (with local changes)' if env['git'].get('dirty') else ''}; {env['date']}; "
         f"{summary['seconds']:.0f} s in all.\n"]
  if summary["missing_peers"]:
    out.append(f"Peer libraries not installed (left out of the speed parts): "
               f"{', '.join(summary['missing_peers'])}.\n")
  rows = [[p["part"], p["status"], p.get("seconds", "-"),
           (p.get("error") or p.get("reason", "")).replace("|", "\\|"),  # a cell of the table
           ", ".join(p.get("outputs", []))] for p in summary["parts"]]
  out.append(_common.table(["part", "status", "seconds", "note", "files"], rows))
  for p in summary["parts"]:
    figs = p.get("figures")
    if figs:
      out.append(f"## {p['part']}\n\n```\n{json.dumps(figs, indent=1)}\n```\n")
  return "\n".join(out)


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  out = os.path.abspath(_OUT.value)
  quick = _QUICK.value
  selected = parts(out)
  if _PARTS.value:
    unknown = set(_PARTS.value) - {p.name for p in selected}
    if unknown:
      raise _common.UsageError(f"unknown parts {sorted(unknown)}; known: "
                               f"{[p.name for p in selected]}")
    selected = [p for p in selected if p.name in _PARTS.value]
  else:
    selected = [p for p in selected if p.default]
  _common.check_positive(total_s=_TOTAL.value)
  _common.check_writable(out, "--out", folder=True)
  # The device, without starting JAX in this process (a child owns the GPU while it runs).
  device = "CPU (quick)" if quick else _gpu_name()
  missing = [lib for lib in PEERS if not _installed(lib)]
  summary = {"quick": quick, "parts": [], "missing_peers": missing,
             "environment": {"device": device, "versions": _common.versions(),
                             "git": _common.git_revision(),
                             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "command": " ".join(sys.argv),
                             "load_average_at_start": _common.load_average()}}
  print(f"gpu_suite: {device}; writing to {out}", flush=True)
  if missing:
    print(f"  peers not installed, left out: {', '.join(missing)}", flush=True)
  t_start = time.perf_counter()
  for part in selected:
    left = _TOTAL.value - (time.perf_counter() - t_start)
    limit = min(part.limit_s * (2 if quick else 1), left)
    rec = run_part(part, out, quick, limit)
    summary["parts"].append(rec)
    print(f"  {rec['part']:14s} {rec['status']:8s} {rec.get('seconds', 0):6.1f} s  "
          f"{rec.get('error') or rec.get('reason', '')}", flush=True)
  summary["seconds"] = time.perf_counter() - t_start
  _common.write_json(os.path.join(out, "summary.json"), summary)
  text = markdown(summary)
  _common.write_text(os.path.join(out, "summary.md"), text)
  print(text, flush=True)


def _gpu_name() -> str:
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20, check=True)
    return proc.stdout.strip().replace("\n", "; ") or "unknown GPU"
  except (OSError, subprocess.SubprocessError):
    return "no nvidia-smi (no NVIDIA GPU?)"


if __name__ == "__main__":
  _common.absl_main(main, "gpu_suite.py")
