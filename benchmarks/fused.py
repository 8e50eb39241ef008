r"""The fused method against the sequential loop and cuDNN; XLA's command buffers for the loop.

  PYTHONPATH=. python -m benchmarks.fused --out=DIR            # a GPU (gpu_suite --parts=fused)
  PYTHONPATH=. python -m benchmarks.fused --quick --out=DIR    # tiny shapes, CPU (interpret mode)

First (``--check``, the default off ``--quick``) tests/test_fused.py's comparisons with the
sequential loop run on the device, the kernels compiled for it: timings of kernels that do not
compile, or compute something else, would mean nothing, so where the check fails the fused
variants are left out of the timing and the summary says why. Then two runs of
benchmarks/speed.py, each a process of its own (XLA reads ``XLA_FLAGS`` once, when its backend
starts), at every shape of speed.py's grid (the four plain shapes and the five 64x256x64x64
stacks), training step and forward pass:

* ``kernel``: jaxgru's sequential loop and ``method=fused``, each in float32 at
  ``precision="highest"`` (no TensorFloat-32) and ``"default"`` (TensorFloat-32 on a GPU), and
  with bfloat16 products; PyTorch's ``nn.GRU`` (cuDNN on a GPU) in float32 and under bfloat16
  autocast. All in one process, interleaved round by round.
* ``command_buffers``: the sequential loop at the same three precisions with XLA's command
  buffers (CUDA graphs) extended to while loops and conditionals (``--cmdbuf_flags``), the
  cheaper lever: the loop's kernels launched from a recorded graph instead of one by one.
  PyTorch again, as the same process's reference.

Writes ``DIR/fused_kernel.{json,md}``, ``DIR/fused_command_buffers.{json,md}`` (speed.py's own
reports) and ``DIR/fused.{json,md}``: per mode, shape and precision, the milliseconds of the
loop, the fused kernel and the loop with command buffers, and each one's time over cuDNN's in its
own process (float32 against float32 cuDNN, bfloat16 against bfloat16 autocast), with
fused/loop in the same process. A run cut short keeps what speed.py wrote so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from benchmarks import _common
from benchmarks import speed_impls

_OUT = flags.DEFINE_string("out", None, "Folder for the result files.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes on the CPU (the kernel interpreted).")
_SHAPES = flags.DEFINE_list("shapes", None, "Shapes (speed.py's syntax); default: its grid.")
_MODES = flags.DEFINE_list("modes", ["train", "forward"], "train and/or forward.")
_BUDGET = flags.DEFINE_integer("budget_s", 440, "Seconds for everything; the check gets at most "
                               "120, the kernel run 2/3 of the rest.")
_CHECK = flags.DEFINE_bool("check", None, "Run tests/test_fused.py's comparisons on the device "
                           "first (default: on, off with --quick).")
# The check: the comparisons with the sequential loop and the plain loop, on the device.
CHECK_TESTS = "matches or stack or bfloat16 or vmap or forward_mode"
_CMDBUF = flags.DEFINE_string(
    "cmdbuf_flags",
    "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "XLA_FLAGS of the command-buffer run: XLA's default command types plus while loops and "
    "conditionals, and graphs of any size.")

GRID = ("256x16x2x32,64x128x32x256,16x1024x8x64,128x256x128x512,64x256x64x64:l2,"
        "64x256x64x64:bi,64x256x64x64:bi:l2,64x256x64x64:bi:var,64x256x64x64:bi:l2:var")
QUICK_SHAPES = "2x4x2x3,2x4x2x3:bi:l2:var"
# (label, jaxgru options inside the brackets, the PyTorch it is compared with)
PRECISIONS = (("float32 highest", "", "torch"),
              ("float32 default", "precision=default", "torch"),
              ("bfloat16", "dtype=bfloat16", "torch[dtype=bfloat16]"))
TORCH = ("torch", "torch[dtype=bfloat16]")


def _impl(options: str, fused: bool, sep: str = ",") -> str:
  """The variant's name as speed.py records it (``sep=","``) or takes it in ``--impls`` (";")."""
  opts = sep.join(o for o in (options, "method=fused" if fused else "") if o)
  return f"jaxgru[{opts}]" if opts else "jaxgru"


def kernel_impls() -> list[str]:
  impls = []
  for _, options, _ in PRECISIONS:
    impls += [_impl(options, False, ";"), _impl(options, True, ";")]
  return impls + list(TORCH)


def command_buffer_impls() -> list[str]:
  return [_impl(options, False, ";") for _, options, _ in PRECISIONS] + list(TORCH)


def speed_args(out_json: str, impls: list, shapes: str, modes: list, quick: bool) -> list:
  common = (["--budget_s=0.2", "--repeats=3", "--min_repeats=2", "--warmup=1",
             "--peak_sizes=256"] if quick else
            ["--budget_s=1", "--repeats=7", "--min_repeats=3", "--warmup=2"])
  return [f"--out={out_json}", f"--impls={','.join(impls)}", f"--shapes={shapes}",
          f"--modes={','.join(modes)}", "--compile_t=", "--memory=false", "--plot=false",
          *common]


def _run(args: list, env: dict, limit_s: float, module: str = "benchmarks.speed") -> dict:
  """``python -m module args`` in a process of its own; what it did (status, seconds, last
  line)."""
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", module, *args]
  try:
    proc = subprocess.run(cmd, cwd=_common.ROOT, env=env, capture_output=True, text=True,
                          timeout=max(limit_s, 1))
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    tail = ((proc.stdout if proc.returncode == 0 else proc.stderr) or "").strip().splitlines()[-1:]
  except subprocess.TimeoutExpired as e:
    status, tail = f"stopped at {limit_s:.0f} s", (e.stdout or b"").decode(errors="replace")
    tail = tail.strip().splitlines()[-1:]
  return {"command": " ".join(cmd), "status": status,
          "seconds": round(time.perf_counter() - t0, 1), "last_line": (tail or [""])[0][:300]}


def _records(path: str) -> list:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)["records"]


def compare(kernel: list, cmdbuf: list) -> list[dict]:
  """One row per mode, shape and precision: each jaxgru variant's median and its ratio to the
  PyTorch it is compared with, in its own process."""
  at = lambda recs, mode, shape, impl: next(
      (r["median_ms"] for r in recs if (r["mode"], r["shape"], r["impl"]) == (mode, shape, impl)),
      None)
  ratio = lambda a, b: None if a is None or b is None else a / b
  rows = []
  keys = list(dict.fromkeys((r["mode"], r["shape"]) for r in kernel + cmdbuf))
  for mode, shape in keys:
    for label, options, torch in PRECISIONS:
      loop = at(kernel, mode, shape, _impl(options, False))
      fused = at(kernel, mode, shape, _impl(options, True))
      graphs = at(cmdbuf, mode, shape, _impl(options, False))
      cudnn, cudnn_graphs = at(kernel, mode, shape, torch), at(cmdbuf, mode, shape, torch)
      rows.append({"mode": mode, "shape": shape, "precision": label,
                   "loop_ms": loop, "fused_ms": fused, "loop_command_buffers_ms": graphs,
                   "cudnn_ms": cudnn, "fused_over_loop": ratio(fused, loop),
                   "loop_over_cudnn": ratio(loop, cudnn), "fused_over_cudnn": ratio(fused, cudnn),
                   "command_buffers_over_cudnn": ratio(graphs, cudnn_graphs)})
  return rows


def markdown(result: dict) -> str:
  fmt = lambda v: "-" if v is None else f"{v:.3g}"
  out = ["# The fused kernel and command buffers against the loop and cuDNN\n",
         f"{result['device']}; jax {result['versions'].get('jax')}, torch "
         f"{result['versions'].get('torch')}; revision "
         f"{(result['git'].get('revision') or '?')[:10]}"
         f"; {result['date']}. Median milliseconds (benchmarks/speed.py); ratios are each time "
         "over PyTorch's (cuDNN's on a GPU) in the same process, float32 against float32 and "
         "bfloat16 products against bfloat16 autocast; fused/loop in the same process. "
         f"Command buffers: `XLA_FLAGS={result['cmdbuf_flags']}`.\n"]
  for run in result["runs"]:
    out.append(f"- {run['name']}: {run['status']}, {run['seconds']} s. {run['last_line']}")
  out.append("")
  headers = ["shape", "precision", "loop ms", "fused ms", "loop+graphs ms", "cuDNN ms",
             "fused/loop", "loop/cuDNN", "fused/cuDNN", "graphs/cuDNN"]
  for mode in ("train", "forward"):
    rows = [r for r in result["rows"] if r["mode"] == mode]
    if not rows:
      continue
    out.append(f"## {'Training step' if mode == 'train' else 'Forward pass'}\n")
    out.append(_common.table(headers, [
        [r["shape"], r["precision"], fmt(r["loop_ms"]), fmt(r["fused_ms"]),
         fmt(r["loop_command_buffers_ms"]), fmt(r["cudnn_ms"]), fmt(r["fused_over_loop"]),
         fmt(r["loop_over_cudnn"]), fmt(r["fused_over_cudnn"]),
         fmt(r["command_buffers_over_cudnn"])] for r in rows]))
  return "\n".join(out)


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  out = os.path.abspath(_OUT.value)
  quick = _QUICK.value
  for m in _MODES.value:
    if m not in ("train", "forward"):
      raise _common.UsageError(f"unknown mode {m!r}; expected train and/or forward")
  _common.check_positive(budget_s=_BUDGET.value)
  shapes = ",".join(_SHAPES.value) if _SHAPES.value else (QUICK_SHAPES if quick else GRID)
  for shape in shapes.split(","):
    try:
      speed_impls.Shape.parse(shape)
    except ValueError as e:
      raise _common.UsageError(f"--shapes: {e}") from None
  _common.check_writable(out, "--out", folder=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_common.ROOT, env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  if quick:
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  kernel_json = os.path.join(out, "fused_kernel.json")
  cmdbuf_json = os.path.join(out, "fused_command_buffers.json")
  t0 = time.perf_counter()
  runs = []
  impls = kernel_impls()
  if _CHECK.value if _CHECK.value is not None else not quick:
    check = _run(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/test_fused.py", "-k",
                  CHECK_TESTS], env, min(120, _BUDGET.value / 4), module="pytest")
    runs.append({"name": "check", **check})
    if check["status"] != "ok":  # the kernels' timings would mean nothing
      impls = [i for i in impls if "method=fused" not in i]
  runs.append({"name": "kernel", **_run(
      speed_args(kernel_json, impls, shapes, _MODES.value, quick), env,
      (_BUDGET.value - (time.perf_counter() - t0)) * 2 / 3)})
  graphs_env = dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {_CMDBUF.value}".strip())
  runs.append({"name": "command_buffers", **_run(
      speed_args(cmdbuf_json, command_buffer_impls(), shapes, _MODES.value, quick), graphs_env,
      _BUDGET.value - (time.perf_counter() - t0))})
  versions = _common.versions(("jax", "jaxlib", "torch"))
  result = {"device": "CPU (quick)" if quick else _gpu_name(), "versions": versions,
            "git": _common.git_revision(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cmdbuf_flags": _CMDBUF.value, "runs": runs,
            "rows": compare(_records(kernel_json), _records(cmdbuf_json))}
  _common.write_json(os.path.join(out, "fused.json"), result)
  text = markdown(result)
  _common.write_text(os.path.join(out, "fused.md"), text)
  print(text, flush=True)
  if not result["rows"]:
    sys.exit(1)


def _gpu_name() -> str:
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=20, check=True)
    return proc.stdout.strip().replace("\n", "; ") or "unknown GPU"
  except (OSError, subprocess.SubprocessError):
    return "no nvidia-smi (no NVIDIA GPU?)"


if __name__ == "__main__":
  _common.absl_main(main, "fused.py")
