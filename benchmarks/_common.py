"""Helpers the benchmarks share: the machine and revision, timing medians, writing results.

Nothing here imports JAX at module level, so an entry point can set process-wide things (the
malloc thresholds of :mod:`jaxgru.training.malloc`, environment variables) before JAX starts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "keras", "torch", "equinox",
             "numpy")


# -- the machine and the revision ------------------------------------------------------------------


def version_of(library: str) -> Optional[str]:
  try:
    return importlib.metadata.version(library)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions(libraries: Iterable[str] = LIBRARIES) -> dict:
  out = {lib: version_of(lib) for lib in libraries}
  try:
    import jaxgru  # pylint: disable=import-outside-toplevel
    out["jaxgru"] = version_of("jaxgru") or jaxgru.__version__
  except ImportError:
    out["jaxgru"] = None
  out["python"] = platform.python_version()
  return out


def git_revision() -> dict:
  """{"revision": full hash, "dirty": local changes to tracked files} of the repository."""
  try:
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    return {"revision": rev, "dirty": bool(dirty)}
  except (OSError, subprocess.CalledProcessError):
    return {"revision": None, "dirty": None}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def load_average() -> list:
  try:
    return list(os.getloadavg())
  except OSError:
    return []


ENV_KEYS = ("XLA_FLAGS", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "KERAS_BACKEND", "JAX_PLATFORMS",
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
            "JAXGRU_NO_MALLOPT")


def environment(extra: Optional[dict] = None) -> dict:
  """The device JAX sees, the CPU, library versions, revision, load, date and command."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  env = {
      "platform": dev.platform, "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
      "load_average_at_start": load_average(), "versions": versions(), "git": git_revision(),
      "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
  }
  env.update(extra or {})
  return env


def describe(env: dict) -> str:
  """One markdown paragraph naming the machine, versions and revision of ``environment()``."""
  v, git = env.get("versions", {}), env.get("git", {})
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "keras", "torch", "equinox")
                   if v.get(k))
  return (f"{env.get('device_kind')} ({env.get('platform')}); {env.get('cpu', '')}, "
          f"{env.get('cpu_count')} logical CPUs; {libs}; jaxgru {v.get('jaxgru')} at "
          f"{(git.get('revision') or '?')[:10]}{' (with local changes)' if git.get('dirty') else ''}"
          f"; {env.get('date', '')}. Load average (1, 5, 15 min) "
          f"{fmt_load(env.get('load_average_at_start'))} at the start"
          + (f", {fmt_load(env.get('load_average_at_end'))} at the end"
             if env.get("load_average_at_end") else "") + ".")


def fmt_load(values) -> str:
  return "?" if not values else " / ".join(f"{x:.2f}" for x in values)


# -- memory ----------------------------------------------------------------------------------------


def status_kb(field: str) -> int:
  """A field of /proc/self/status (VmRSS, VmHWM, ...) in KiB; KeyError or OSError elsewhere."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def reset_peak_rss() -> None:
  """Resets the peak RSS (VmHWM) to the current RSS (Linux); OSError elsewhere."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def cpu_seconds() -> float:
  """CPU seconds of this process, all threads (user + system)."""
  import resource  # pylint: disable=import-outside-toplevel
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


# -- timing ----------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int,
               warmup: int = 1) -> list[float]:
  """Milliseconds of ``repeats`` calls of ``fn`` (each synced), after ``warmup`` untimed ones."""
  for _ in range(warmup):
    sync(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    sync(fn())
    out.append((time.perf_counter() - t0) * 1e3)
  return out


def summary(times_ms: Sequence[float]) -> dict:
  """Median, quartiles, min and count of a list of milliseconds."""
  t = np.asarray(times_ms, dtype=np.float64)
  return {"median_ms": float(np.median(t)), "min_ms": float(t.min()),
          "q25_ms": float(np.percentile(t, 25)), "q75_ms": float(np.percentile(t, 75)),
          "repeats": int(t.size), "times_ms": [round(v, 4) for v in t.tolist()]}


def median(xs) -> Optional[float]:
  """The median of the values that are not None; None when there are none."""
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def matmul_peak(sizes=(1024, 2048, 4096), repeats: int = 5) -> dict:
  """The float32 matrix-product rate of the JAX device: the best median over a few sizes."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rates = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    t = time_calls(lambda f=f, a=a, b=b: f(a, b), jax.block_until_ready, repeats)
    rates[str(n)] = 2.0 * n ** 3 / (float(np.median(t)) / 1e3) / 1e9
  return {"gflops": max(rates.values()), "by_size_gflops": rates}


# -- writing results -------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def fmt_ms(v) -> str:
  return "-" if v is None else (f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def write_json(path: str, data: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=1, default=str)


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def pyplot():
  """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return plt


def child_result(proc_stdout: str) -> Optional[dict]:
  """The last ``RESULT {json}`` line a child process printed, or None."""
  lines = [l for l in proc_stdout.splitlines() if l.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT "):]) if lines else None


def print_child_result(record: dict) -> None:
  print("RESULT " + json.dumps(record, default=str), flush=True)


def run_module(module: str, args: Sequence[str], timeout_s: float,
               env: Optional[dict] = None) -> tuple[Optional[dict], Optional[str]]:
  """Runs ``python -m <module> <args>`` from the repository root; (its RESULT, error or None)."""
  cmd = [sys.executable, "-m", module, *args]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                          env=env)
  except subprocess.TimeoutExpired:
    return None, f"over {timeout_s:g} s"
  rec = child_result(proc.stdout)
  if proc.returncode == 0 and rec is not None:
    return rec, None
  tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
  return None, tail[0][:300]


# -- the entry points' usage errors ---------------------------------------------------------------
#
# A mistake in an entry point's flags is reported as one line, "<program>: error: <what>", on
# stderr, with exit status 2, before anything is measured or written: no traceback, and no run
# that ends in a failure to write its results.


class UsageError(Exception):
  """A mistake in an entry point's flags or arguments (one line, exit status 2)."""


def usage_exit(program: str, message: str) -> None:
  print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def absl_main(main: Callable[[list], Any], program: str) -> None:
  """``absl.app.run(main)``, with a flag that does not parse (absl's own checks: an enum's
  values, a required flag, an integer), a positional argument (no entry point takes one) and a
  :class:`UsageError` or ``absl.app.UsageError`` that ``main`` raises reported by
  :func:`usage_exit`, not by absl's multi-line usage text."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      usage_exit(program, str(e))

  def run(argv):
    try:
      if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
      return main(argv)
    except (UsageError, app.UsageError) as e:
      usage_exit(program, str(e))

  app.run(run, flags_parser=parse)


def argument_parser(**kwargs):
  """An ``argparse.ArgumentParser`` whose errors are one line (:func:`usage_exit`)."""
  import argparse  # pylint: disable=import-outside-toplevel

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      usage_exit(self.prog, message)

  return Parser(**kwargs)


def check_positive(**values) -> None:
  """UsageError unless every value (a number or a list of numbers) is >= 1."""
  for name, value in values.items():
    for v in (value if isinstance(value, (list, tuple)) else [value]):
      if v is None or v < 1:
        raise UsageError(f"--{name} must be positive, got {v}")


def check_writable(path: str, flag: str = "--out", folder: bool = False) -> None:
  """UsageError unless results can be written at ``path``: a file (a folder with ``folder``)
  whose folder exists or can be made, and is writable. The folder is made here."""
  where = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
  if not folder and os.path.isdir(path):
    raise UsageError(f"{flag}={path} is a folder; give a file name")
  try:
    os.makedirs(where, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{flag}={path}: cannot make the folder {where} ({e.strerror})") from None
  if not os.access(where, os.W_OK | os.X_OK):
    raise UsageError(f"{flag}={path}: the folder {where} is not writable")


def ints(values: Sequence[str], flag: str) -> list[int]:
  """The integers of a list flag's values; UsageError for anything else."""
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--{flag} takes integers, got {','.join(values)!r}") from None


# -- flags shared by the entry points --------------------------------------------------------------


def define_mallopt_flag(default: bool):
  """``--mallopt``: whether the entry point raises glibc's malloc thresholds at start."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  return flags.DEFINE_bool(
      "mallopt", default,
      "Raise glibc's malloc thresholds at start (jaxgru/training/malloc.py: XLA:CPU's temporaries "
      "stay in the heap instead of being mapped and faulted in at every call). "
      "JAXGRU_NO_MALLOPT=1 in the environment turns it off too.")
