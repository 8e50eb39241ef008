"""The markdown table and the plot of a benchmarks/speed.py JSON file.

  python -m benchmarks.speed_report benchmarks/results/cpu.json   # rewrites cpu.md, cpu.png
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks import _common
from benchmarks.speed_impls import BOUNDS

MODES = {"train": "Training step (forward, backward, Adam update)", "forward": "Forward pass"}
TARGET_RATIO = 0.67
TARGET_PEAK_SHAPE = "64x128x32x256"
TARGET_PEAK_PERCENT = 45.0
TARGET_COMPILE_S = 2.0


def _table(headers, rows) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _ms(v) -> str:
  return "-" if v is None else (f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _by(records, mode):
  shapes = list(dict.fromkeys(r["shape"] for r in records if r["mode"] == mode))
  impls = list(dict.fromkeys(r["impl"] for r in records if r["mode"] == mode))
  cell = {(r["shape"], r["impl"]): r for r in records if r["mode"] == mode}
  return shapes, impls, cell


def markdown(result: dict) -> str:
  env = result["environment"]
  v = env["versions"]
  peak = result.get("matmul_peak", {}).get("gflops")
  git = env.get("git", {})
  out = [f"# GRU speed on {env['device_kind']} ({env['platform']})\n"]
  out.append(
      f"{env.get('cpu', '')}, {env.get('cpu_count')} logical CPUs; jax {v.get('jax')}, "
      f"flax {v.get('flax')}, keras {v.get('keras')}, torch {v.get('torch')}, "
      f"equinox {v.get('equinox')}; jaxgru {v.get('jaxgru')} at "
      f"{(git.get('revision') or '?')[:10]}{' (with local changes)' if git.get('dirty') else ''}"
      f"; {env.get('date', '')}. Load average (1, 5, 15 min) "
      f"{_load(env.get('load_average_at_start'))} at the start, "
      f"{_load(env.get('load_average_at_end'))} at the end. "
      f"float32 matrix-product peak measured in the same run: "
      f"{'?' if peak is None else f'{peak:.0f}'} GFLOP/s.\n")
  out.append(
      "Median milliseconds over interleaved runs (warm-up excluded); B x T x I x H, then `:bi` "
      "both directions (outputs concatenated), `:l2` a 2-layer stack, `:var` variable lengths "
      "(T/2 to T; PyTorch PackedSequence, Flax seq_lengths, Keras mask, jaxgru lengths). Peers are "
      "the GRU libraries (flax_linen: `nn.RNN(nn.GRUCell)`, flax_nnx, keras: `keras.layers.GRU`"
      " on JAX, torch: `torch.nn.GRU`, equinox: `eqx.nn.GRUCell` in `lax.scan` under `vmap`); "
      "jax_scan is a plain fused-gate `lax.scan` written by hand, shown for reference; "
      "product_loop is not a GRU but the bound of a GRU with XLA's products one step "
      "after another: per layer and direction one input product and a loop of only "
      "`tanh(h_t @ W)` (a training step adds the backward loop's and the gradients' products), "
      "each part run alone, one after another; \"jaxgru vs product_loop\" is "
      "jaxgru's time over their sum. "
      "\"vs peer\" is jaxgru's time over the fastest peer's; \"% peak\" is jaxgru's model FLOP "
      "rate (2BT(I+H)3H per forward pass, 3x that per training step) over the matmul peak.\n")
  for mode, title in MODES.items():
    shapes, impls, cell = _by(result["records"], mode)
    if not shapes:
      continue
    bounds = [i for i in impls if i in BOUNDS]
    rows = []
    for s in shapes:
      recs = [cell.get((s, i)) for i in impls]
      best = min((r["median_ms"] for r in recs if r and r["impl"] not in BOUNDS), default=None)
      row = [s]
      for r in recs:
        text = _ms(r and r["median_ms"])
        row.append(f"**{text}**" if r and r["median_ms"] == best else text)
      j = cell.get((s, "jaxgru"))
      row.append("-" if not j or j["ratio_to_fastest_peer"] is None else
                 f"{j['ratio_to_fastest_peer']:.2f} ({j['fastest_peer']})")
      for b in bounds:
        bound = cell.get((s, b))
        row.append("-" if not j or not bound else f"{j['median_ms'] / bound['median_ms']:.2f}")
      row.append("-" if not j else f"{j['percent_of_peak']:.0f}%")
      rows.append(row)
    out.append(f"## {title}, ms\n")
    out.append(_table(["shape"] + impls + ["jaxgru vs peer"]
                      + [f"jaxgru vs {b}" for b in bounds] + ["jaxgru % peak"], rows))
  out.append("## Compile time, s (train / forward)\n")
  shapes, impls, _ = _by(result["records"], "train")
  if not shapes:
    shapes, impls, _ = _by(result["records"], "forward")
  comp = {(r["shape"], r["impl"], r["mode"]): r["compile_s"] for r in result["records"]}
  rows = []
  for s in shapes:
    row = [s]
    for i in impls:
      t, f = comp.get((s, i, "train")), comp.get((s, i, "forward"))
      row.append("-" if t is None and f is None else
                 f"{'-' if t is None else f'{t:.2f}'} / {'-' if f is None else f'{f:.2f}'}")
    rows.append(row)
  out.append(_table(["shape"] + impls, rows))
  if result.get("compile_vs_time"):
    out.append("jaxgru's training-step compile time against T: " + ", ".join(
        f"T={c['time']}: {c['compile_s']:.2f} s" for c in result["compile_vs_time"]) + ".\n")
  if any(r.get("peak_memory_bytes") is not None or r.get("planned_bytes") is not None
         for r in result["records"]):
    sources = sorted({r.get("memory_source") for r in result["records"]
                      if r.get("memory_source")})
    out.append("## Memory of one call, MB: measured / XLA's plan\n")
    out.append(
        "Measured: " + ("; ".join(sources) or "-") + " (0 when the call fit in memory the "
        "process already held). XLA's plan: arguments + outputs + temporaries of the compiled "
        "call, JAX implementations only.\n")
    for mode, title in MODES.items():
      shapes_m, impls_m, cell = _by(result["records"], mode)
      if not shapes_m:
        continue
      rows = []
      for s_ in shapes_m:
        row = [s_]
        for i in impls_m:
          r = cell.get((s_, i))
          row.append("-" if r is None else
                     f"{_mb(r.get('peak_memory_bytes'))} / {_mb(r.get('planned_bytes'))}")
        rows.append(row)
      out.append(f"{title}:\n")
      out.append(_table(["shape"] + impls_m, rows))
  out.append(targets(result))
  if result.get("skipped"):
    out.append("Skipped: " + "; ".join(
        f"{s['impl']} at {s['shape']} ({s['reason']})" for s in result["skipped"]) + "\n")
  return "\n".join(out)


def _load(values) -> str:
  return "?" if not values else " / ".join(f"{x:.2f}" for x in values)


def _mb(v) -> str:
  return "-" if v is None else f"{max(v, 0) / 2**20:.0f}"


def targets(result: dict) -> str:
  """Whether jaxgru met the targets of the benchmark issue, from this run."""
  lines = ["## Targets\n"]
  recs = [r for r in result["records"] if r["impl"] == "jaxgru"]
  for mode, what in (("train", "training step"), ("forward", "forward pass")):
    rs = [r for r in recs if r["mode"] == mode and r["ratio_to_fastest_peer"] is not None]
    if rs:
      worst = max(rs, key=lambda r: r["ratio_to_fastest_peer"])
      ok = worst["ratio_to_fastest_peer"] <= TARGET_RATIO
      lines.append(f"- {what} at most {TARGET_RATIO}x the fastest peer at every shape: "
                   f"{'met' if ok else 'NOT met'} (worst {worst['ratio_to_fastest_peer']:.2f}x "
                   f"at {worst['shape']}).")
  for r in recs:
    if r["shape"] == TARGET_PEAK_SHAPE and r["mode"] == "train":
      ok = r["percent_of_peak"] >= TARGET_PEAK_PERCENT
      lines.append(f"- training step at {TARGET_PEAK_SHAPE} at least {TARGET_PEAK_PERCENT:.0f}% "
                   f"of the matmul peak: {'met' if ok else 'NOT met'} "
                   f"({r['percent_of_peak']:.1f}%).")
  comp = [r["compile_s"] for r in recs if r["compile_s"] is not None]
  vs_t = [c["compile_s"] for c in result.get("compile_vs_time", [])]
  if comp:
    ok = max(comp + vs_t) <= TARGET_COMPILE_S
    lines.append(f"- compile time at most {TARGET_COMPILE_S:.0f} s at every shape: "
                 f"{'met' if ok else 'NOT met'} (largest {max(comp + vs_t):.2f} s)" +
                 (f"; against T: {', '.join(f'{c:.2f}' for c in vs_t)} s." if vs_t else "."))
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
  """Writes a PNG bar chart; returns a line saying what it did."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib is not installed: no plot"
  modes = [m for m in MODES if any(r["mode"] == m for r in result["records"])]
  fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    shapes, impls, cell = _by(result["records"], mode)
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
      xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
      ys = [cell[(s, impl)]["median_ms"] if (s, impl) in cell else 0 for s in shapes]
      ax.bar(xs, ys, width, label=impl, edgecolor="black" if impl == "jaxgru" else None,
             linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, fontsize=8)
    ax.set_xlabel("B x T x I x H")
    ax.set_ylabel("median ms (log)")
    ax.set_title(MODES[mode])
    ax.grid(axis="y", which="both", alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  env = result["environment"]
  fig.suptitle(f"GRU speed on {env['device_kind']} ({env['platform']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return f"wrote {path}"


def main(argv):
  if len(argv) != 2:
    _common.usage_exit("speed_report.py", "give one argument, a speed.py RESULT.json")
  try:
    with open(argv[1]) as f:
      result = json.load(f)
  except OSError as e:
    _common.usage_exit("speed_report.py", f"{argv[1]}: {e.strerror}")
  except ValueError as e:
    _common.usage_exit("speed_report.py", f"{argv[1]}: not JSON ({e})")
  if not (isinstance(result, dict) and isinstance(result.get("records"), list)
          and isinstance(result.get("environment"), dict)):
    _common.usage_exit("speed_report.py", f"{argv[1]}: not a speed.py result (records and "
                       "environment)")
  base = os.path.splitext(argv[1])[0]
  with open(base + ".md", "w") as f:
    f.write(markdown(result))
  print(f"wrote {base}.md")
  print(plot(result, base + ".png"))


if __name__ == "__main__":
  main(sys.argv)
