r"""Memory and time of training on very long sequences, with and without rematerialization.

  python -m benchmarks.long_sequence --out=benchmarks/results/long_sequence_cpu.json

Each configuration runs in its own process, so that its peak memory is its own: the process
builds one jitted training step (a GRU layer, the mean square of its outputs, an Adam update),
compiles it, then resets its peak resident set size (Linux /proc/self/clear_refs) and runs
``--steps`` steps. On a GPU or TPU the device's peak_bytes_in_use is reported as well. Every
record holds the peak RSS during the steps, the RSS before them, the median step time, the
compile time and XLA's planned temporary memory of the step.

The configurations are jaxgru's remat levels (``none``, ``products``, ``full``; see
jaxgru.ScanOptions) and JAX's autodiff of the loop, with and without ``jax.checkpoint`` per
chunk, at every T of ``--times`` (B=8, H=64, I=8 by default).
"""

from __future__ import annotations

import os
import time

from absl import flags
import numpy as np

from benchmarks import _common

_TIMES = flags.DEFINE_list("times", "10000,100000", "Sequence lengths T.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size B.")
_HIDDEN = flags.DEFINE_integer("hidden", 64, "Hidden size H.")
_INPUT = flags.DEFINE_integer("input", 8, "Input size I.")
_CONFIGS = flags.DEFINE_list(
    "configs", "none,products,full,autodiff,autodiff_checkpoint",
    "jaxgru remat levels (none, products, full), or autodiff (custom_vjp=False, no remat) and "
    "autodiff_checkpoint (custom_vjp=False, jax.checkpoint per chunk).")
_CHUNK = flags.DEFINE_integer("chunk", 0, "Steps per chunk; 0 means about sqrt(T).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed training steps per configuration.")
_LIMIT_GB = flags.DEFINE_float("limit_gb", 2.0, "The memory budget the report checks against.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "Seconds before a configuration is given up.")
_OUT = flags.DEFINE_string("out", None, "JSON file to write; a .md table goes beside it.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one configuration, print JSON.")


def options_for(config: str, steps: int, chunk: int):
  import jaxgru
  chunk = chunk or max(1, int(round(np.sqrt(steps))))
  if config in ("none", "products", "full"):
    return jaxgru.ScanOptions(remat=config, chunk=steps if config == "none" else chunk)
  if config == "autodiff":
    return jaxgru.ScanOptions(custom_vjp=False, remat="none", chunk=steps)
  if config == "autodiff_checkpoint":
    return jaxgru.ScanOptions(custom_vjp=False, remat="full", chunk=chunk)
  raise ValueError(f"unknown configuration {config!r}")


def run_child(spec: str) -> dict:
  """One configuration, in this process: ``config:T:B:I:H:chunk:steps``."""
  config, steps, batch, inputs, hidden, chunk, repeats = spec.split(":")
  steps, batch, inputs, hidden, chunk, repeats = map(
      int, (steps, batch, inputs, hidden, chunk, repeats))
  import jax
  import jax.numpy as jnp
  import optax
  import jaxgru

  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(inputs, hidden))
  options = options_for(config, steps, chunk)
  params = cfg.init(jax.random.key(0))
  opt = optax.adam(1e-3)
  state = opt.init(params)
  xs = jax.random.normal(jax.random.key(1), (batch, steps, inputs), jnp.float32)

  def train_step(p, s, x):
    def loss(q):
      ys, _ = cfg.apply(q, x, options=options)
      return jnp.mean(jnp.square(ys))
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, xs).compile()
  compile_s = time.perf_counter() - t0
  mem = step.memory_analysis()
  dev = jax.devices()[0]
  _common.reset_peak_rss()  # the peak RSS from here on is the training steps'
  rss_before = _common.status_kb("VmRSS") * 1024
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, state, value = step(params, state, xs)
    value = float(value)
    times.append(time.perf_counter() - t0)
    if not np.isfinite(value):
      raise FloatingPointError(f"loss {value}")
  stats = dev.memory_stats() or {}
  return {
      "config": config, "time": steps, "batch": batch, "input": inputs, "hidden": hidden,
      "chunk": options.chunk, "remat": options.remat, "custom_vjp": options.custom_vjp,
      "steps_timed": repeats, "step_s": float(np.median(times)), "step_s_all": times,
      "compile_s": compile_s, "rss_before_bytes": rss_before,
      "peak_rss_bytes": _common.status_kb("VmHWM") * 1024,
      "xla_temp_bytes": int(mem.temp_size_in_bytes),
      "device_peak_bytes": stats.get("peak_bytes_in_use"), "platform": dev.platform,
      "device_kind": dev.device_kind, "loss": value,
  }


def markdown(result: dict) -> str:
  limit = result["limit_gb"]
  rows = ["| T | configuration | chunk | peak RSS, MB | RSS before the steps, MB | "
          "XLA temporaries, MB | step, s | compile, s | within the budget |",
          "|---|---|---|---|---|---|---|---|---|"]
  for r in result["records"]:
    if "error" in r:
      rows.append(f"| {r['time']} | {r['config']} | - | - | - | - | - | - | "
                  f"no: {r['error']} |")
      continue
    peak = r["peak_rss_bytes"] / 2**20
    rows.append(
        f"| {r['time']} | {r['config']} | {r['chunk']} | {peak:.0f} | "
        f"{r['rss_before_bytes'] / 2**20:.0f} | {r['xla_temp_bytes'] / 2**20:.0f} | "
        f"{r['step_s']:.2f} | {r['compile_s']:.2f} | "
        f"{'yes' if peak <= limit * 1024 else 'no'} |")
  env = result["environment"]
  head = (f"# Training on long sequences: memory and time\n\n"
          f"{env['device_kind']} ({env['platform']}), load average "
          f"{' / '.join(f'{x:.2f}' for x in env['load_average_at_start'])} at the start. "
          f"One GRU layer, B={result['batch']}, I={result['input']}, H={result['hidden']}; a "
          f"training step is forward, backward and an Adam update on the mean square of the "
          f"outputs. Each configuration runs in its own process; peak RSS is the whole "
          f"process's during {result['steps']} training steps (Python, JAX and the compiled step "
          f"included). Budget: {limit:g} GB.\n\n"
          "Configurations: `none`, `products`, `full` are jaxgru's custom VJP with "
          "`ScanOptions(remat=...)`: every step's residuals kept; every step's state kept and "
          "the products recomputed per chunk as one matrix product; only each chunk's first "
          "state kept and the chunk rerun. `autodiff` is JAX's autodiff of the same loop, "
          "`autodiff_checkpoint` the same with `jax.checkpoint` per chunk.\n\n")
  return head + "\n".join(rows) + "\n"


CONFIGS = ("none", "products", "full", "autodiff", "autodiff_checkpoint")


def _check_flags() -> list[int]:
  """The sequence lengths; a UsageError for a bad flag, before anything runs."""
  times = _common.ints(_TIMES.value, "times")
  if not times or not _CONFIGS.value:
    raise _common.UsageError("--times and --configs each need at least one value")
  unknown = [c for c in _CONFIGS.value if c not in CONFIGS]
  if unknown:
    raise _common.UsageError(f"unknown --configs {unknown}; expected some of {', '.join(CONFIGS)}")
  _common.check_positive(times=times, batch=_BATCH.value, hidden=_HIDDEN.value,
                         input=_INPUT.value, steps=_STEPS.value, timeout_s=_TIMEOUT.value)
  if _CHUNK.value < 0 or not _LIMIT_GB.value > 0:
    raise _common.UsageError(f"--chunk must be >= 0 and --limit_gb > 0, got {_CHUNK.value} and "
                             f"{_LIMIT_GB.value}")
  if _OUT.value:
    _common.check_writable(_OUT.value)
  return times


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  if _CHILD.value:
    _common.print_child_result(run_child(_CHILD.value))
    return
  times = _check_flags()
  result = {"environment": _common.environment(),
            "batch": _BATCH.value, "input": _INPUT.value, "hidden": _HIDDEN.value,
            "steps": _STEPS.value, "limit_gb": _LIMIT_GB.value, "records": []}
  for steps in times:
    for config in _CONFIGS.value:
      spec = ":".join(str(v) for v in (config, steps, _BATCH.value, _INPUT.value,
                                       _HIDDEN.value, _CHUNK.value, _STEPS.value))
      rec, error = _common.run_module("benchmarks.long_sequence", [f"--child={spec}"],
                                      _TIMEOUT.value)
      if error:
        rec = {"config": config, "time": steps, "error": error}
      result["records"].append(rec)
      if _OUT.value:  # what is done so far survives a run cut short
        _common.write_json(_OUT.value, result)
      if "error" in rec:
        print(f"T={steps} {config}: {rec['error']}", flush=True)
      else:
        print(f"T={steps} {config:20s} chunk {rec['chunk']:6d}  peak RSS "
              f"{rec['peak_rss_bytes'] / 2**20:7.0f} MB (before {rec['rss_before_bytes'] / 2**20:.0f}"
              f" MB)  XLA temp {rec['xla_temp_bytes'] / 2**20:7.0f} MB  step {rec['step_s']:.2f} s"
              f"  compile {rec['compile_s']:.2f} s", flush=True)
  result["environment"]["load_average_at_end"] = _common.load_average()
  if _OUT.value:
    _common.write_json(_OUT.value, result)
    _common.write_text(os.path.splitext(_OUT.value)[0] + ".md", markdown(result))
    print(f"wrote {_OUT.value}")
  else:
    print(markdown(result))


if __name__ == "__main__":
  _common.absl_main(main, "long_sequence.py")
