r"""Times GRU training steps and forward passes: jaxgru against the other GRU libraries.

  python -m benchmarks.speed --out=benchmarks/results/cpu.json
  python -m benchmarks.speed --shapes=64x256x64x64:bi --impls=jaxgru,torch   # a quick subset

For every shape (B, T, I, H) of the grid and every mode (``train``: forward, backward and an Adam
update; ``forward``: the outputs alone), all implementations are built and compiled first
(compile time measured on its own), warmed up, then timed in the same process, interleaved
round by round (in a fresh random order each round) so that a change in the machine's load hits
them all alike. A record holds the
median and spread of the repeated runs, the ratio to the fastest peer library, the model
FLOP rate and its share of the float32 matrix-product peak measured in the same run, and the
peak memory of one call (the process's peak RSS above its level before the call on the CPU, read
from /proc/self/status after resetting it; the device's memory statistics or XLA's buffer
assignment on GPU/TPU).

Runs unchanged on whatever device JAX sees (CPU, GPU or TPU); PyTorch uses CUDA (cuDNN) when it
sees a GPU. Writes a JSON file (``--out``) and, beside it, a markdown table (``.md``) and a plot
(``.png``, when matplotlib is installed); ``python -m benchmarks.speed_report X.json`` remakes both
from the JSON. Run from the repository root (``benchmarks`` is a package).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras

from absl import flags
import numpy as np

from benchmarks import _common
from jaxgru.training import malloc as _malloc
from benchmarks import speed_impls
from benchmarks import speed_report

DEFAULT_SHAPES = ("256x16x2x32,64x128x32x256,16x1024x8x64,128x256x128x512,"
                  # the stacks users run: 2 layers; both directions, 1 and 2 layers; the same
                  # with variable lengths
                  "64x256x64x64:l2,64x256x64x64:bi,64x256x64x64:bi:l2,64x256x64x64:bi:var,"
                  "64x256x64x64:bi:l2:var")
DEFAULT_IMPLS = "jaxgru,flax_linen,flax_nnx,keras,torch,equinox,jax_scan"

_SHAPES = flags.DEFINE_list(
    "shapes", DEFAULT_SHAPES,
    "Shapes to time: BxTxIxH, then optionally :l<layers> (a stack), :bi (both directions, "
    "outputs concatenated), :var (variable lengths from T/2 to T); e.g. 64x256x64x64:bi:l2:var. "
    "Pick a few for a quick run.")
_IMPLS = flags.DEFINE_list(
    "impls", DEFAULT_IMPLS,
    "Implementations: jaxgru, flax_linen, flax_nnx, keras, torch, equinox, jax_scan, "
    "product_loop; jaxgru "
    "variants as jaxgru[key=value;...] with the keys of jaxgru.ScanOptions and dtype, vmap, "
    "precision, heap (heap=False: the CPU defaults for fresh pages even under --mallopt) "
    "(use ';' between keys inside brackets, as ',' separates implementations); "
    "torch[dtype=bfloat16] runs PyTorch under bfloat16 autocast. flax_nnx and jax_scan run the "
    "plain shapes (one layer, one direction, full lengths) only. product_loop is not a GRU but "
    "a bound: per layer and direction the input product and a loop of only tanh(h_t @ W) (and "
    "for a training step the backward loop's and the gradients' products), each run alone, one "
    "after another.")
_MODES = flags.DEFINE_list("modes", "train,forward", "Modes: train and/or forward.")
_REPEATS = flags.DEFINE_integer("repeats", 25, "Timed runs per implementation, at most.")
_MIN_REPEATS = flags.DEFINE_integer("min_repeats", 5, "Timed runs per implementation, at least.")
_BUDGET = flags.DEFINE_float(
    "budget_s", 25.0,
    "Seconds of timed runs per shape and mode, all implementations together; fewer repeats "
    "(not fewer than --min_repeats) for shapes that would take longer.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs per implementation before timing.")
_OUT = flags.DEFINE_string("out", None, "JSON file to write; .md and .png go beside it.")
_PLOT = flags.DEFINE_bool("plot", True, "Write the PNG plot (needs matplotlib).")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure the peak memory of one call.")
_COMPILE_T = flags.DEFINE_list(
    "compile_t", "128,1024,8192",
    "Sequence lengths at which to time jaxgru's train-step compilation at the second shape's "
    "B, I, H, to show it does not grow with T; empty to skip.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and data.")
_PEAK_SIZES = flags.DEFINE_list(
    "peak_sizes", "1024,2048,4096", "Square matrix sizes of the float32 matmul peak measurement.")
_MALLOPT = _common.define_mallopt_flag(False)
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0,
    "torch.set_num_threads on the CPU; 0 means the number of cores. (On a machine loaded by "
    "other processes, PyTorch's spinning OpenMP threads can slow it a hundredfold: run with "
    "OMP_WAIT_POLICY=PASSIVE there.)")


# -- memory ----------------------------------------------------------------------------------------


def peak_memory(runner: speed_impls.Runner, mode: str) -> tuple[int | None, str]:
  """The memory one call of ``mode`` needs above what the process held before it."""
  import jax
  platform_ = jax.devices()[0].platform
  if runner.library == "torch" and "cuda" in runner.device:
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.sync(runner.run[mode]())
    return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
  if platform_ == "cpu" or runner.library == "torch":
    try:
      _common.reset_peak_rss()
      before = _common.status_kb("VmRSS")
      runner.sync(runner.run[mode]())
      return (_common.status_kb("VmHWM") - before) * 1024, "peak RSS above the RSS before the call"
    except OSError:
      return None, "unavailable"
  stats = jax.devices()[0].memory_stats() or {}
  before = stats.get("bytes_in_use")
  runner.sync(runner.run[mode]())
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  planned = runner.planned_bytes.get(mode)
  if peak is not None and before is not None and peak - before > 0:
    return peak - before, "device peak_bytes_in_use above bytes_in_use before the call"
  return planned, "XLA buffer assignment (arguments + outputs + temporaries)"


# -- timing ----------------------------------------------------------------------------------------


def time_shape(shape, runners, mode, peak_gflops, log) -> list[dict]:
  """Times every runner at one shape and mode, interleaved; returns one record per runner."""
  for r in runners:
    for _ in range(_WARMUP.value):
      r.sync(r.run[mode]())
  # One more untimed round gives the cost of a round, hence the number of repeats.
  t0 = time.perf_counter()
  for r in runners:
    r.sync(r.run[mode]())
  per_round = time.perf_counter() - t0
  repeats = int(np.clip(_BUDGET.value / max(per_round, 1e-9), _MIN_REPEATS.value,
                        _REPEATS.value))
  times = {r.name: [] for r in runners}
  cpu = {r.name: [] for r in runners}
  # A fresh random order each round: a call runs after each of the others equally often. (A
  # fixed or rotated order makes each one always follow the same one, and a call that follows
  # one with a large temporary buffer was measured 10-15% slower on the CPU: the memory that
  # call freed goes back to the kernel and is faulted in again.)
  rng = np.random.default_rng(_SEED.value)
  for _ in range(repeats):
    for r in (runners[j] for j in rng.permutation(len(runners))):
      c0, t0 = _common.cpu_seconds(), time.perf_counter()
      r.sync(r.run[mode]())
      times[r.name].append((time.perf_counter() - t0) * 1e3)
      cpu[r.name].append((_common.cpu_seconds() - c0) * 1e3)
  records = []
  for r in runners:
    t = np.asarray(times[r.name])
    median = float(np.median(t))
    gflops = shape.flops(mode) / (median / 1e3) / 1e9
    records.append({
        "impl": r.name, "library": r.library, "version": r.version, "peer": r.peer,
        "shape": str(shape), "batch": shape.batch, "time": shape.time, "input": shape.input,
        "hidden": shape.hidden, "mode": mode, "repeats": len(t),
        "median_ms": median, "min_ms": float(t.min()),
        "q25_ms": float(np.percentile(t, 25)), "q75_ms": float(np.percentile(t, 75)),
        "times_ms": [round(v, 4) for v in t.tolist()],
        "cpu_ms": float(np.median(cpu[r.name])),
        "compile_s": r.compile_s.get(mode), "flops": shape.flops(mode),
        "gflops_per_s": gflops, "percent_of_peak": 100.0 * gflops / peak_gflops,
        "planned_bytes": r.planned_bytes.get(mode), "device": r.device, "note": r.note,
    })
  peers = [rec for rec in records if rec["peer"]]
  fastest = min(peers, key=lambda rec: rec["median_ms"]) if peers else None
  for rec in records:
    rec["fastest_peer"] = fastest["impl"] if fastest else None
    rec["ratio_to_fastest_peer"] = rec["median_ms"] / fastest["median_ms"] if fastest else None
  for rec in records:
    ratio = rec["ratio_to_fastest_peer"]
    ratio = "" if ratio is None else f"x{ratio:.2f} of fastest peer  "
    compiled = "-" if rec["compile_s"] is None else f"{rec['compile_s']:.2f} s"
    log(f"  {mode:7s} {rec['impl']:28s} {rec['median_ms']:10.3f} ms  (n={rec['repeats']}, "
        f"IQR {rec['q25_ms']:.3f}-{rec['q75_ms']:.3f}, cpu {rec['cpu_ms']:.1f})  {ratio}"
        f"{rec['percent_of_peak']:5.1f}% of peak  compile {compiled}")
  return records


def compile_vs_t(shape, steps_list, log) -> list[dict]:
  """jaxgru's train-step compile time at several T (same B, I, H)."""
  out = []
  for steps in steps_list:
    s = speed_impls.Shape(shape.batch, steps, shape.input, shape.hidden)
    r = speed_impls.build("jaxgru", s, ("train",), _SEED.value)
    out.append({"shape": str(s), "time": steps, "compile_s": r.compile_s["train"]})
    log(f"  compile of jaxgru's train step at {s}: {r.compile_s['train']:.2f} s")
    del r
  return out


def _arguments():
  """(shapes, implementation specs, modes) from the flags; ValueError for a bad one."""
  shapes = [speed_impls.Shape.parse(s) for s in _SHAPES.value]
  specs = [s.replace(";", ",") for s in _IMPLS.value]
  for spec in specs:
    try:
      name, options = speed_impls.parse_impl(spec)
    except ValueError as e:
      raise ValueError(f"{e} (separate a variant's options with ';')") from None
    if name not in speed_impls.IMPLS:
      raise ValueError(f"unknown implementation {name!r}; known: {sorted(speed_impls.IMPLS)}")
    if name == "jaxgru":
      import jaxgru  # pylint: disable=import-outside-toplevel
      try:
        jaxgru.ScanOptions(**{k: v for k, v in options.items()
                              if k not in ("dtype", "vmap", "precision", "heap")})
        if "precision" in options:
          jaxgru.GRUConfig(1, 1, precision=options["precision"])
      except (TypeError, ValueError) as e:
        raise ValueError(f"{spec}: {e}") from None
  modes = tuple(_MODES.value)
  for m in modes:
    if m not in ("train", "forward"):
      raise ValueError(f"unknown mode {m!r}; expected train and/or forward")
  if not shapes or not specs or not modes:
    raise ValueError("--shapes, --impls and --modes each need at least one value")
  _common.check_positive(repeats=_REPEATS.value, min_repeats=_MIN_REPEATS.value,
                         peak_sizes=_common.ints(_PEAK_SIZES.value, "peak_sizes"),
                         compile_t=_common.ints(_COMPILE_T.value, "compile_t"))
  if _MIN_REPEATS.value > _REPEATS.value:
    raise ValueError(f"--min_repeats={_MIN_REPEATS.value} is more than --repeats={_REPEATS.value}")
  if not _BUDGET.value >= 0 or not _WARMUP.value >= 0 or _TORCH_THREADS.value < 0:
    raise ValueError("--budget_s, --warmup and --torch_threads must be >= 0, got "
                     f"{_BUDGET.value}, {_WARMUP.value}, {_TORCH_THREADS.value}")
  if _OUT.value:
    _common.check_writable(_OUT.value)
  return shapes, specs, modes


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  import jax
  log = lambda msg: print(msg, flush=True)
  try:
    shapes, specs, modes = _arguments()
  except ValueError as e:
    raise _common.UsageError(str(e)) from None

  malloc = _malloc.tune_malloc(enable=_MALLOPT.value)
  result = {"environment": _common.environment({"malloc": malloc}), "records": [],
            "skipped": [], "memory": []}
  log(f"device: {result['environment']['device_kind']} ({result['environment']['platform']}), "
      f"load average {result['environment']['load_average_at_start']}")
  peak = _common.matmul_peak(tuple(int(n) for n in _PEAK_SIZES.value))
  log(f"float32 matmul peak: {peak['gflops']:.0f} GFLOP/s {peak['by_size_gflops']}")
  t_start = time.perf_counter()
  for shape in shapes:
    log(f"shape {shape} (B x T x I x H)")
    runners = []
    for spec in specs:
      try:
        runners.append(speed_impls.build(spec, shape, modes, _SEED.value,
                                         torch_threads=_TORCH_THREADS.value))
      except speed_impls.Unavailable as e:
        result["skipped"].append({"impl": spec, "shape": str(shape), "reason": str(e)})
        log(f"  skipped {spec}: {e}")
    for mode in modes:
      active = [r for r in runners if mode in r.run]
      records = time_shape(shape, active, mode, peak["gflops"], log)
      if _MEMORY.value:
        for rec, r in zip(records, active):
          rec["peak_memory_bytes"], rec["memory_source"] = peak_memory(r, mode)
      result["records"].extend(records)
    del runners
    if _OUT.value:  # what is done so far survives a run cut short
      _common.write_json(_OUT.value, result)
  peak_end = _common.matmul_peak(tuple(int(n) for n in _PEAK_SIZES.value))
  result["matmul_peak"] = {"start": peak, "end": peak_end,
                           "gflops": max(peak["gflops"], peak_end["gflops"])}
  # Percentages against the higher of the two peaks, the stricter reading.
  for rec in result["records"]:
    rec["percent_of_peak"] = 100.0 * rec["gflops_per_s"] / result["matmul_peak"]["gflops"]
  if _COMPILE_T.value and len(shapes) > 1 and any(s.startswith("jaxgru") for s in specs):
    result["compile_vs_time"] = compile_vs_t(shapes[1], [int(t) for t in _COMPILE_T.value], log)
  result["environment"]["load_average_at_end"] = list(os.getloadavg())
  result["environment"]["wall_s"] = time.perf_counter() - t_start
  log(f"float32 matmul peak at the end: {peak_end['gflops']:.0f} GFLOP/s; "
      f"load average {result['environment']['load_average_at_end']}")
  del jax

  if _OUT.value:
    out = _OUT.value
    _common.write_json(out, result)
    base = os.path.splitext(out)[0]
    _common.write_text(base + ".md", speed_report.markdown(result))
    log(f"wrote {out} and {base}.md")
    if _PLOT.value:
      note = speed_report.plot(result, base + ".png")
      log(note)
  else:
    print(speed_report.markdown(result))


if __name__ == "__main__":
  _common.absl_main(main, "speed.py")
