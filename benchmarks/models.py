r"""Many models in one program: the addition train step for N models at once against N single steps.

  python -m benchmarks.models --out=benchmarks/results/models_cpu.json
  python -m benchmarks.models --n_list=1,4 --repeats=5 --malloc=on --out=/tmp/models.json  # quick

For every phase of the addition task's training (``solve``: 8-bit problems, batch 64;
``consolidate``: 64-bit problems, batch 128, half with long carry chains; hidden size 16 in both)
and every N of ``--n_list`` it compiles the task's ``make_train_step`` for ``num_models=N`` (one
program, ``jax.vmap`` over the models) and the same step for one model, then times them
interleaved, round by round, in the same process: a round is one call of each. It reports

* the cost ratio: time of the N-model step / (N x time of the 1-model step), medians over the
  rounds (below 1: one program for N models is cheaper than N programs, one after another);
* models x steps per second: N / time of the N-model step.

``--malloc`` picks glibc's malloc settings: ``on`` raises the mmap and trim thresholds first
(:mod:`jaxgru.training.malloc`), ``off`` leaves them as they are (``JAXGRU_NO_MALLOPT=1``), ``both``
runs each in its own process (the setting has to precede JAX's allocations); with one setting
the measurement runs in this process, after setting it. XLA:CPU takes
temporaries above the mmap threshold fresh from the kernel at every call, and at large N those
page faults cost more than the arithmetic.

Writes the JSON (``--out``), and beside it a markdown table (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
import numpy as np

from benchmarks import _common
from jaxgru.training import malloc as _malloc

PHASES = {
    # phase -> (bits, batch size, fraction of problems with long carry chains, optimizer)
    "solve": {"bits": 8, "batch_size": 64, "mixed": 0.0, "optimizer": "default"},
    "consolidate": {"bits": 64, "batch_size": 128, "mixed": 0.5, "optimizer": "consolidate"},
}
HIDDEN = 16

_N_LIST = flags.DEFINE_list("n_list", "1,4,16,64,256,1024", "Numbers of models N.")
_PHASES = flags.DEFINE_list("phases", "solve,consolidate", "Phases: solve and/or consolidate.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed rounds per N (one call of each step).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed rounds per N.")
_MAX_SECONDS = flags.DEFINE_float(
    "max_seconds_per_n", 60.0, "Fewer rounds (not fewer than 3) for an N that would take longer.")
_MALLOC = flags.DEFINE_enum("malloc", "both", ("both", "on", "off"),
                            "glibc malloc thresholds raised (on), as they are (off), or each in "
                            "its own process (both).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Seconds before a child process is given up.")
_OUT = flags.DEFINE_string("out", None, "JSON file to write; .md and .png go beside it.")
_PLOT = flags.DEFINE_bool("plot", True, "Write the PNG plot (needs matplotlib).")
_CHILD = flags.DEFINE_enum("child", None, ("on", "off"),
                           "Internal: measure in this process with malloc tuning on/off.")


def cost_ratio(n_model_ms: float, single_ms: float, n: int) -> float:
  """Time of the N-model step over N times the 1-model step's."""
  return n_model_ms / (n * single_ms)


def model_steps_per_s(n_model_ms: float, n: int) -> float:
  return n / (n_model_ms / 1e3)


def make_record(phase: str, n: int, n_times_ms, single_times_ms, **extra) -> dict:
  """One N's figures from its rounds' times (ms): medians, ratio, throughputs."""
  n_med, one_med = float(np.median(n_times_ms)), float(np.median(single_times_ms))
  rec = {"phase": phase, "num_models": n, **PHASES[phase], "hidden": HIDDEN,
         "n_model_step": _common.summary(n_times_ms),
         "single_step": _common.summary(single_times_ms),
         "n_model_ms": n_med, "single_ms": one_med,
         "cost_ratio": cost_ratio(n_med, one_med, n),
         "model_steps_per_s": model_steps_per_s(n_med, n),
         "single_model_steps_per_s": model_steps_per_s(one_med, 1)}
  rec.update(extra)
  return rec


def _step(phase: str, n: int):
  """(compiled step, initial state, compile seconds) of the addition step for ``n`` models."""
  import jax  # pylint: disable=import-outside-toplevel
  from jaxgru.tasks import addition
  spec = PHASES[phase]
  cfg = addition.AdditionConfig(num_models=n)  # the task's defaults: hidden 16, the shapes above
  hidden = cfg.rnn.cell.hidden_size
  if hidden != HIDDEN:
    raise ValueError(f"the addition task's default hidden size is now {hidden}, not {HIDDEN}")
  optimizer = (addition.consolidate_optimizer_config(cfg) if spec["optimizer"] == "consolidate"
               else None)
  step = addition.make_train_step(cfg, bits=spec["bits"], optimizer=optimizer,
                                  mixed=spec["mixed"], batch_size=spec["batch_size"])
  state = addition.init_states(cfg)
  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(step(state))  # the first call compiles
  return step, state, time.perf_counter() - t0


def measure(phases, n_list, repeats, warmup, max_seconds, log=print) -> list[dict]:
  """Every phase and N in this process; one record each."""
  import jax  # pylint: disable=import-outside-toplevel
  records = []
  for phase in phases:
    single, single_state, single_compile_s = _step(phase, 1)
    holder = {"single": single_state}

    def run_single():
      holder["single"], metrics = single(holder["single"])
      return metrics

    for n in n_list:
      step, state, compile_s = _step(phase, n)
      holder["n"] = state

      def run_n(step=step):
        holder["n"], metrics = step(holder["n"])
        return metrics

      for _ in range(warmup):
        jax.block_until_ready(run_n())
        jax.block_until_ready(run_single())
      t0 = time.perf_counter()
      jax.block_until_ready(run_n())
      jax.block_until_ready(run_single())
      per_round = time.perf_counter() - t0
      rounds = int(np.clip(max_seconds / max(per_round, 1e-9), 3, repeats))
      n_times, one_times = [], []
      for r in range(rounds):
        # Alternate which runs first, so that neither always follows the other.
        pair = ((run_n, n_times), (run_single, one_times))
        for fn, out in (pair if r % 2 == 0 else pair[::-1]):
          out.extend(_common.time_calls(fn, jax.block_until_ready, 1, warmup=0))
      rec = make_record(phase, n, n_times, one_times, compile_s=compile_s,
                        single_compile_s=single_compile_s)
      records.append(rec)
      log(f"  {phase:11s} N={n:5d}  {rec['n_model_ms']:9.3f} ms  single {rec['single_ms']:7.3f} "
          f"ms  ratio {rec['cost_ratio']:6.3f}  {rec['model_steps_per_s']:10.0f} model-steps/s "
          f"(n={rounds}, compile {compile_s:.2f} s)")
      del step, state
      holder.pop("n", None)
  return records


def markdown(result: dict) -> str:
  env = result["environment"]
  out = [f"# Many models in one program: the addition train step ({env.get('platform')})\n",
         _common.describe(env) + "\n",
         "Cost ratio: time of the N-model step (one program, `jax.vmap` over the models) over N "
         "times the time of the 1-model step, both measured interleaved in the same process; "
         "below 1, one program is cheaper than N single steps. Models x steps per second: N over "
         f"the N-model step's time. Hidden size {HIDDEN}. Medians. `malloc on`: glibc's mmap "
         "and trim thresholds raised (`jaxgru/training/malloc.py`).\n"]
  for phase, spec in PHASES.items():
    recs = [r for r in result["records"] if r["phase"] == phase]
    if not recs:
      continue
    rows = [[r["num_models"], r["malloc"], _common.fmt_ms(r["n_model_ms"]),
             _common.fmt_ms(r["single_ms"]), f"{r['cost_ratio']:.3f}",
             f"{r['model_steps_per_s']:.0f}", r["n_model_step"]["repeats"]]
            for r in sorted(recs, key=lambda r: (r["num_models"], r["malloc"]))]
    out.append(f"## {phase}: {spec['bits']} bits, batch {spec['batch_size']}\n")
    out.append(_common.table(["N", "malloc", "N-model step, ms", "1-model step, ms",
                              "cost ratio", "models x steps / s", "rounds"], rows))
  for err in result.get("errors", []):
    out.append(f"Failed: malloc {err['malloc']}: {err['error']}\n")
  return "\n".join(out)


def plot(result: dict, path: str) -> str:
  plt = _common.pyplot()
  if plt is None:
    return "matplotlib is not installed: no plot"
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for phase in PHASES:
    for malloc in ("off", "on"):
      recs = sorted((r for r in result["records"] if r["phase"] == phase
                     and r["malloc"] == malloc), key=lambda r: r["num_models"])
      if not recs:
        continue
      ns = [r["num_models"] for r in recs]
      style = "-o" if malloc == "on" else "--s"
      label = f"{phase}, malloc {malloc}"
      axes[0].plot(ns, [r["cost_ratio"] for r in recs], style, label=label)
      axes[1].plot(ns, [r["model_steps_per_s"] for r in recs], style, label=label)
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set_ylabel("N-model step / (N x 1-model step)")
  axes[1].set_ylabel("models x steps per second")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N models")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  env = result["environment"]
  fig.suptitle(f"Addition train step for N models on {env.get('device_kind')}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return f"wrote {path}"


def _arguments():
  """(N list, phases) from the flags; a UsageError for a bad flag (before anything runs)."""
  n_list = _common.ints(_N_LIST.value, "n_list")
  if not n_list or min(n_list) < 1:
    raise _common.UsageError(f"--n_list needs positive integers, got {_N_LIST.value}")
  if not _PHASES.value:
    raise _common.UsageError(f"--phases needs at least one of {', '.join(PHASES)}")
  for p in _PHASES.value:
    if p not in PHASES:
      raise _common.UsageError(f"unknown phase {p!r}; expected {', '.join(PHASES)}")
  _common.check_positive(repeats=_REPEATS.value, timeout_s=_TIMEOUT.value)
  if _WARMUP.value < 0 or not _MAX_SECONDS.value > 0:
    raise _common.UsageError(f"--warmup must be >= 0 and --max_seconds_per_n > 0, got "
                             f"{_WARMUP.value} and {_MAX_SECONDS.value}")
  if _OUT.value and not _CHILD.value:
    _common.check_writable(_OUT.value)
  return n_list, list(_PHASES.value)


def _child_args(n_list, phases):
  return [f"--n_list={','.join(map(str, n_list))}", f"--phases={','.join(phases)}",
          f"--repeats={_REPEATS.value}", f"--warmup={_WARMUP.value}",
          f"--max_seconds_per_n={_MAX_SECONDS.value}"]


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  n_list, phases = _arguments()
  settings = ("off", "on") if _MALLOC.value == "both" else (_MALLOC.value,)
  if _CHILD.value or len(settings) == 1:  # one setting: measured in this process
    setting = _CHILD.value or settings[0]
    malloc = _malloc.tune_malloc(enable=setting == "on")  # before JAX allocates anything
  if _CHILD.value:
    records = measure(phases, n_list, _REPEATS.value, _WARMUP.value, _MAX_SECONDS.value,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    for r in records:
      r["malloc"] = _CHILD.value
      r["malloc_applied"] = malloc
    _common.print_child_result({"records": records, "malloc": malloc})
    return
  result = {"environment": _common.environment(), "records": [], "errors": [],
            "settings": {"n_list": n_list, "phases": phases, "repeats": _REPEATS.value,
                         "malloc": list(settings)}}
  for setting in settings if len(settings) > 1 else ():
    env = dict(os.environ)
    env.pop(_malloc.ENV_OPT_OUT, None)
    if setting == "off":
      env[_malloc.ENV_OPT_OUT] = "1"
    print(f"malloc {setting}:", flush=True)
    rec, error = _common.run_module("benchmarks.models", [f"--child={setting}",
                                                          *_child_args(n_list, phases)],
                                    _TIMEOUT.value, env=env)
    if error:
      result["errors"].append({"malloc": setting, "error": error})
      print(f"  failed: {error}", flush=True)
      continue
    result["records"].extend(rec["records"])
    for r in rec["records"]:
      print(f"  {r['phase']:11s} N={r['num_models']:5d}  ratio {r['cost_ratio']:6.3f}  "
            f"{r['model_steps_per_s']:10.0f} model-steps/s", flush=True)
  if len(settings) == 1:
    print(f"malloc {setting} ({malloc['reason']}), in this process:", flush=True)
    records = measure(phases, n_list, _REPEATS.value, _WARMUP.value, _MAX_SECONDS.value,
                      log=lambda m: print(m, flush=True))
    for r in records:
      r["malloc"], r["malloc_applied"] = setting, malloc
    result["records"].extend(records)
  result["environment"]["load_average_at_end"] = _common.load_average()
  if _OUT.value:
    base = os.path.splitext(_OUT.value)[0]
    _common.write_json(_OUT.value, result)
    _common.write_text(base + ".md", markdown(result))
    print(f"wrote {_OUT.value} and {base}.md", flush=True)
    if _PLOT.value:
      print(plot(result, base + ".png"), flush=True)
  else:
    print(markdown(result))
  if not result["records"]:
    sys.exit(1)


if __name__ == "__main__":
  _common.absl_main(main, "models.py")
