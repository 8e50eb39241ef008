"""Training throughput of run.py as one process and as a multi-process job, on this machine.

  python -m benchmarks.multiprocess --layouts=1x1,1x2,2x1,1x4,2x2

Each layout PxD runs the same addition training (``--steps`` steps of ``--num_models`` models on
batches of ``--batch_size`` problems, no early stop in reach, one evaluation at the end) as P
processes of D CPU devices each (``XLA_FLAGS=--xla_force_host_platform_device_count=D``), joined
through ``jax.distributed`` on localhost (CPU collectives: gloo). The figure is process 0's
training-loop time (compiling excluded) and the examples per second it gives:
``steps * batch_size * num_models / train_seconds``. Writes the JSON and a markdown table beside
it (``.md``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

from benchmarks import _common as common

RUN = os.path.join(common.ROOT, "run.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_layout(processes: int, devices: int, args: list[str], timeout: float) -> dict:
  """One training run as ``processes`` x ``devices``; process 0's summary figures."""
  with tempfile.TemporaryDirectory(prefix="jaxgru-multiprocess-") as tmp:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=common.ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    base = [sys.executable, RUN, *args, f"--workdir={tmp}/run"]
    if processes > 1:
      port = _free_port()
      base += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
    procs = [subprocess.Popen(base + ([f"--process_id={p}"] if processes > 1 else []), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for p in range(processes)]
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    for p, err in zip(procs, errors):
      if p.returncode != 0:
        raise RuntimeError(f"{processes}x{devices}: exit {p.returncode}: {err[-2000:]}")
    with open(f"{tmp}/run/summary.json") as f:
      s = json.load(f)
  return {"processes": processes, "devices_per_process": devices, "steps": s["steps"],
          "train_seconds": s["train_seconds"], "compile_seconds": s["compile_seconds"],
          "wall_seconds": s["wall_seconds"]}


def main() -> None:
  ap = common.argument_parser(prog="multiprocess.py", description=__doc__.split("\n")[0])
  ap.add_argument("--layouts", default="1x1,1x2,2x1,1x4,2x2",
                  help="comma list of PROCESSESxDEVICES")
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--num_models", type=int, default=4)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--timeout", type=float, default=1200)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "multiprocess.json"))
  a = ap.parse_args()
  try:
    layouts = [tuple(int(v) for v in t.split("x")) for t in a.layouts.split(",") if t]
    if not layouts or any(len(t) != 2 or min(t) < 1 for t in layouts):
      raise ValueError
  except ValueError:
    common.usage_exit("multiprocess.py", f"--layouts takes PxD items, got {a.layouts!r}")
  try:
    common.check_positive(steps=a.steps, num_models=a.num_models, batch_size=a.batch_size)
    common.check_writable(a.out)
  except common.UsageError as e:
    common.usage_exit("multiprocess.py", str(e))
  args = [f"--steps={a.steps}", f"--num_models={a.num_models}", f"--batch_size={a.batch_size}",
          "--consolidate_steps=0", "--eval_bits=16", f"--log_every={a.steps}",
          f"--checkpoint_every={a.steps}", "--learning_rate=0.001", "--seed=0"]
  env = common.environment({"run_args": args})
  rows = []
  for processes, devices in layouts:
    r = run_layout(processes, devices, args, a.timeout)
    r["examples_per_second"] = r["steps"] * a.batch_size * a.num_models / r["train_seconds"]
    rows.append(r)
    print(json.dumps(r), flush=True)
  env["load_average_at_end"] = common.load_average()
  common.write_json(a.out, {"environment": env, "results": rows})
  table = common.table(
      ["processes x devices", "steps", "train s", "examples/s", "compile s"],
      [[f"{r['processes']} x {r['devices_per_process']}", r["steps"],
        f"{r['train_seconds']:.2f}", f"{r['examples_per_second']:.0f}",
        f"{r['compile_seconds']:.1f}"] for r in rows])
  common.write_text(os.path.splitext(a.out)[0] + ".md",
                    f"# run.py as 1 and 2 processes (addition, {a.num_models} models, batches of "
                    f"{a.batch_size}, {a.steps} steps)\n\n{common.describe(env)}\n\n{table}")


if __name__ == "__main__":
  main()
