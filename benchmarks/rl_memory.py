"""How long a memory the RL task's agents learn: gymnax's MemoryChain-bsuite, length by length.

MemoryChain-bsuite with ``memory_length=N``: an episode lasts N + 1 steps; its first observation
carries a context bit (+-1, zero afterwards), and the last step pays +1 when the action equals
the context and -1 otherwise (nothing before; a guess scores 0 on average). The agent has to
carry the bit through N steps of its GRU state.

For each N of ``--lengths``, N agents are trained as ``python run.py --task=rl
--env=MemoryChain-bsuite --env_params=memory_length=N --rollout_steps=N+1`` would train them
(:func:`jaxgru.tasks.rl.train_and_evaluate`, every other setting at the task's defaults: 128
environments per agent, 2M environment steps per agent, the default CartPole run's budget).
``rollout_steps = N + 1``: the update backpropagates only inside a rollout segment, and since
every episode has N + 1 steps and all environments start together, each segment is then exactly
one episode of every environment (checked on two rollouts before training). An agent SOLVES the
length when its mean greedy return (``--eval_episodes`` episodes) is at least
``--threshold`` (0.9: 95% right); the length is solved when at least ceil(7/8 of the agents) do
(the CartPole target's proportion) and the training took at most ``--budget_s`` (15 minutes).

Each length's record is written (JSON, markdown table, plot) as soon as it finishes; with
``--append`` the lengths of an earlier ``--out`` JSON are kept (a length run again replaces its
record), so a sweep can go on in later invocations.

  python -m benchmarks.rl_memory --lengths=4,8,16,32,64,128 --out benchmarks/results/rl_memory_cpu
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import _common as common

ENV = "MemoryChain-bsuite"
SOLVED_PROPORTION = 7 / 8


def required_agents(num_models: int) -> int:
  """Agents that must solve a length for it to count as solved: ceil(7/8 of them)."""
  return math.ceil(SOLVED_PROPORTION * num_models - 1e-9)


def judge(returns: list[float], train_seconds: float, threshold: float, budget_s: float) -> dict:
  """Which agents solved a length, and whether the length is solved within the budget."""
  solved = [r >= threshold for r in returns]
  need = required_agents(len(returns))
  within = train_seconds <= budget_s
  return {"agents_solved": solved, "num_solved": sum(solved), "required": need,
          "within_budget": within, "solved": sum(solved) >= need and within}


def config_for(length: int, **settings):
  """The RL config of ``run.py --task=rl --env=MemoryChain-bsuite
  --env_params=memory_length=<length> --rollout_steps=<length + 1>`` with ``settings`` (fields of
  :class:`jaxgru.tasks.rl.RLConfig`) replaced; ValueError for settings it refuses."""
  from jaxgru.tasks import rl  # pylint: disable=import-outside-toplevel
  env = rl.EnvConfig(ENV, None, (("memory_length", length),))
  return dataclasses.replace(rl.RLConfig(), env=env, rollout_steps=length + 1, **settings)


def segments_are_episodes(cfg, rollouts: int = 2) -> bool:
  """True when, over ``rollouts`` consecutive rollouts of a fresh agent, every segment's first
  step starts an episode in every environment, its last step ends one, and no other step
  does either: each segment is exactly one episode."""
  import jax  # pylint: disable=import-outside-toplevel

  from jaxgru.tasks import rl  # pylint: disable=import-outside-toplevel
  s = rl.train.init_state(cfg, cfg.seed, cfg.learning_rates[0])
  env, h = s.env, s.h_LEH
  ok = True
  for i in range(rollouts):
    env, h, traj = jax.jit(lambda e, h, k: rl.rollout(cfg, s.train.params, e, h, k, s.obs_stats)
                           )(env, h, jax.random.PRNGKey(i))
    starts, dones = np.asarray(traj.starts), np.asarray(traj.dones)
    ok &= bool(starts[0].all() and dones[-1].all() and not starts[1:].any()
                and not dones[:-1].any())
  return ok


def train_length(cfg, workdir: str, threshold: float, budget_s: float,
                 command: str) -> dict:
  """Trains ``cfg.num_models`` agents on ``cfg``'s MemoryChain; the length's record."""
  from jaxgru.tasks import rl  # pylint: disable=import-outside-toplevel
  length = cfg.rollout_steps - 1
  aligned = segments_are_episodes(cfg)
  load_start = common.load_average()
  summary = rl.train_and_evaluate(cfg, workdir, log=lambda m: print(f"  N={length}: {m}",
                                                                   flush=True))
  curve = rl.train.read_curve(workdir)
  returns = summary["eval_returns"]
  return {
      "memory_length": length,
      "rollout_steps": cfg.rollout_steps,
      "segments_are_episodes": aligned,
      "eval_returns": returns,
      "mean_return": float(np.mean(returns)),
      **judge(returns, summary["train_seconds"], threshold, budget_s),
      "train_seconds": summary["train_seconds"],
      "compile_seconds": summary["compile_seconds"],
      "env_steps": summary["env_steps"],
      "iterations": summary["iterations"],
      "env_steps_per_second": summary["env_steps_per_second"],
      "last_training_returns": curve[-1]["episode_return_per_agent"] if curve else None,
      "learning_curve": [[r["env_steps"], r["episode_return_per_agent"]] for r in curve],
      "load_average_at_start": load_start,
      "load_average_at_end": common.load_average(),
      "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "command": command,
      "revision": common.git_revision(),
  }


def markdown(record: dict) -> str:
  a, runs = record["args"], record["lengths"]
  rows = [[r["memory_length"], f"{r['num_solved']} of {len(r['eval_returns'])}",
           "**yes**" if r["solved"] else "no" + ("" if r["within_budget"] else " (over budget)"),
           ", ".join(f"{v:.2f}" for v in r["eval_returns"]), f"{r['mean_return']:.2f}",
           f"{r['train_seconds']:.0f}", f"{r['env_steps_per_second']:,.0f}",
           f"{fmt_load(r['load_average_at_start'])} / {fmt_load(r['load_average_at_end'])}"]
          for r in runs]
  solved = [r["memory_length"] for r in runs if r["solved"]]
  cfg = record["config"]
  return (f"# MemoryChain-bsuite: the longest memory the RL task's agents learn\n\n"
          f"{cfg['num_models']} GRU agents (H={cfg['rnn']['cell']['hidden_size']}) per length, "
          f"{cfg['num_envs']} environments x (N + 1) steps per rollout, {cfg['env_steps']:,} "
          f"environment steps per agent, everything else at the RL task's defaults. An agent "
          f"solves a length when its mean greedy return over {cfg['eval_episodes']} episodes is "
          f">= {a['threshold']}; a length is solved when >= "
          f"{required_agents(cfg['num_models'])} of {cfg['num_models']} agents do, in at most "
          f"{a['budget_s']:.0f} s of training. Commands: "
          + "; ".join(sorted({f"`{r['command']}`" for r in runs}))
          + f".\n\n{common.describe(record['environment'])}\n\n"
          + common.table(["N", "agents solved", "length solved", "greedy returns",
                          "mean", "training s", "env steps/s (all agents)",
                          "load avg 1-min start / end"], rows)
          + f"\nLongest solved length: {max(solved) if solved else 'none'}.\n")


def fmt_load(values) -> str:
  return "?" if not values else f"{values[0]:.1f}"


def plot(record: dict, path: str) -> bool:
  plt = common.pyplot()
  if plt is None:
    return False
  runs = record["lengths"]
  n = np.array([r["memory_length"] for r in runs], float)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
  for r in runs:
    x = np.full(len(r["eval_returns"]), r["memory_length"], float)
    ax1.scatter(x, r["eval_returns"], s=14, alpha=0.6, color="tab:blue")
  ax1.plot(n, [r["mean_return"] for r in runs], "o-", color="tab:blue", label="mean of agents")
  ax1.axhline(record["args"]["threshold"], ls="--", color="gray", lw=1, label="solved (0.9)")
  ax1.set_ylabel("greedy return (chance: 0)")
  ax1.set_ylim(-1.05, 1.05)
  ax1.legend(fontsize=8, loc="lower left")
  agents = len(runs[0]["eval_returns"]) if runs else 0
  ax2.plot(n, [r["num_solved"] for r in runs], "s-", color="tab:green")
  ax2.axhline(required_agents(agents), ls="--", color="gray", lw=1,
              label=f"length solved ({required_agents(agents)} of {agents})")
  ax2.set_ylabel("agents that solve it")
  ax2.set_ylim(-0.3, agents + 0.3)
  ax2.legend(fontsize=8, loc="lower left")
  ax2.set_yticks(range(agents + 1))
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(int(v)) for v in n], rotation=90, fontsize=8)  # 48, 56, 64 are close
    ax.minorticks_off()
    ax.set_xlabel("memory length N")
    ax.grid(alpha=0.3)
  fig.suptitle(f"MemoryChain-bsuite, {agents} GRU agents per length, "
               f"{record['config']['env_steps']:,} env steps each", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def main(argv=None):
  ap = common.argument_parser(prog="rl_memory.py", description=__doc__.split("\n")[0])
  ap.add_argument("--lengths", default="4,8,16,32,64,128",
                  help="memory lengths N, a comma list, run in this order")
  ap.add_argument("--num_models", type=int, default=None, help="agents per length (default 8)")
  ap.add_argument("--env_steps", type=int, default=None, help="per agent (default: the task's)")
  ap.add_argument("--num_envs", type=int, default=128)
  ap.add_argument("--eval_episodes", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threshold", type=float, default=0.9,
                  help="the mean greedy return at which an agent solves a length")
  ap.add_argument("--budget_s", type=float, default=900.0,
                  help="training seconds a solved length may take")
  ap.add_argument("--stop_after_failure", action="store_true",
                  help="skip the remaining lengths once one is not solved")
  ap.add_argument("--append", action="store_true",
                  help="keep the lengths of an earlier --out JSON (a length run again is replaced)")
  ap.add_argument("--workdir", default=None,
                  help="where the runs go, one folder per length (default: a temporary folder, "
                       "removed at the end)")
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "rl_memory_cpu"))
  ap.add_argument("--plot", default=os.path.join(common.ROOT, "docs", "rl_memory.png"))
  ap.add_argument("--nomallopt", dest="mallopt", action="store_false",
                  help="leave glibc's malloc thresholds as they are (run.py raises them)")
  args = ap.parse_args(argv)
  command = " ".join(["python -m benchmarks.rl_memory", *(sys.argv[1:] if argv is None else argv)])
  try:
    lengths = common.ints([v for v in args.lengths.split(",") if v.strip()], "lengths")
    if not lengths:
      raise common.UsageError("--lengths needs at least one memory length")
    common.check_positive(lengths=lengths, num_envs=args.num_envs,
                          **{n: getattr(args, n) for n in ("num_models", "env_steps",
                                                           "eval_episodes")
                             if getattr(args, n) is not None})
    if args.seed < 0:
      raise common.UsageError(f"--seed must be >= 0, got {args.seed}")
    if not -1 <= args.threshold <= 1:
      raise common.UsageError(f"--threshold must be in [-1, 1] (returns are), got "
                              f"{args.threshold}")
    if not args.budget_s > 0:
      raise common.UsageError(f"--budget_s must be positive, got {args.budget_s}")
    common.check_writable(args.out + ".json")
    common.check_writable(args.plot, "--plot")
    earlier = []
    if args.append and os.path.exists(args.out + ".json"):
      try:
        with open(args.out + ".json") as f:
          earlier = json.load(f)["lengths"]
      except (OSError, ValueError, KeyError) as e:
        raise common.UsageError(f"--append: cannot read {args.out}.json ({e})") from None
  except common.UsageError as e:
    ap.error(str(e))

  from jaxgru.training import malloc  # pylint: disable=import-outside-toplevel
  tuned = malloc.tune_malloc(enable=args.mallopt)  # before JAX allocates anything

  from jaxgru.tasks import rl  # pylint: disable=import-outside-toplevel
  sizes = {n: getattr(args, n) for n in ("num_models", "env_steps", "eval_episodes")
           if getattr(args, n) is not None}
  try:
    configs = {n: config_for(n, num_envs=args.num_envs, seed=args.seed, **sizes) for n in lengths}
  except ValueError as e:
    ap.error(str(e))
  base = configs[lengths[0]]
  env = common.environment({"malloc": tuned})
  env["versions"]["gymnax"] = common.version_of("gymnax")
  root = args.workdir or tempfile.mkdtemp(prefix="rl_memory-")
  records = {r["memory_length"]: r for r in earlier}
  record = None
  try:
    for n in lengths:
      workdir = os.path.join(root, f"memory_length_{n}")
      shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
      print(f"memory_length={n}: training {base.num_models} agents", flush=True)
      r = train_length(configs[n], workdir, args.threshold, args.budget_s, command)
      records[n] = r
      print(f"memory_length={n}: {r['num_solved']} of {len(r['eval_returns'])} agents solve it "
            f"(returns {', '.join(f'{v:.2f}' for v in r['eval_returns'])}); training "
            f"{r['train_seconds']:.0f} s; {'SOLVED' if r['solved'] else 'not solved'}",
            flush=True)
      env["load_average_at_end"] = common.load_average()
      record = {"benchmark": "rl_memory", "args": vars(args),
                "config": dict(base.to_json(), env=None, rollout_steps="memory_length + 1"),
                "environment": env,
                "lengths": [records[k] for k in sorted(records)]}
      common.write_json(args.out + ".json", record)
      common.write_text(args.out + ".md", markdown(record))
      plot(record, args.plot)
      if args.stop_after_failure and not r["solved"]:
        print(f"memory_length={n} is not solved: the longer lengths are skipped", flush=True)
        break
  finally:
    if args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  if record is not None:
    print(markdown(record))


if __name__ == "__main__":
  main()
