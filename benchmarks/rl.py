"""Recurrent PPO with the recurrent layer swapped: jaxgru against the hand-written loops.

The RL task's PPO (jaxgru/tasks/rl: rollout, GAE, epochs of clipped updates) on its default
environment (CartPole-v1 observing cart position and pole angle), N agents vmapped in one
program, the same seeds for every implementation of the core:

* ``jaxgru``: the task's agent: :meth:`jaxgru.GRUConfig.step` in the rollout,
  :meth:`jaxgru.RNNConfig.apply` with ``resets=`` (and ``reset_state=`` zeros) in the update;
* ``flax``: what purejaxrl's users write (its ``ScannedRNN``): ``flax.linen.GRUCell`` inside
  ``nn.scan`` with ``jnp.where(done, zeros, carry)`` before each step, in both passes;
* ``equinox``: ``equinox.nn.GRUCell`` vmapped over environments in a ``lax.scan`` with the same
  ``where``.

Measured, in one process: the whole training (every iteration timed, the implementations taking
turns iteration by iteration so that drifting load hits them alike) as environment steps per
second of all agents together; the update alone (the epochs of minibatch steps on one rollout,
interleaved rounds); and each agent's final return (greedy, ``--eval_episodes`` episodes).

  python -m benchmarks.rl --out benchmarks/results/rl_cpu
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from benchmarks import _common as common

IMPLEMENTATIONS = ("jaxgru", "flax", "equinox")


def agents(base):
  """The task's agent and the same agent with each hand-written core, by name."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxgru.tasks.rl.models import ActorCritic  # pylint: disable=import-outside-toplevel

  hidden = base.rnn.hidden_size

  @dataclasses.dataclass(frozen=True)
  class FlaxAgent(ActorCritic):
    """purejaxrl's ScannedRNN as the core."""

    def _module(self):
      import flax.linen as nn  # pylint: disable=import-outside-toplevel

      class ScannedRNN(nn.Module):
        @functools.partial(nn.scan, variable_broadcast="params", in_axes=0, out_axes=0,
                           split_rngs={"params": False})
        @nn.compact
        def __call__(self, carry, x):
          ins, resets = x
          carry = jnp.where(resets[:, None], jnp.zeros_like(carry), carry)
          carry, y = nn.GRUCell(features=hidden)(carry, ins)
          return carry, y
      return ScannedRNN()

    def init_core(self, key):
      d = self.rnn.input_size
      return self._module().init(key, jnp.zeros((2, hidden)),
                                 (jnp.zeros((1, 2, d)), jnp.zeros((1, 2), bool)))

    def core_step(self, core, h_LEH, x_ED, starts_E):
      h, ys = self._module().apply(core, h_LEH[0], (x_ED[None], starts_E[None]))
      return h[None], ys[0]

    def core_sequence(self, core, h0_LEH, x_TED, starts_TE):
      return self._module().apply(core, h0_LEH[0], (x_TED, starts_TE))[1]

  @dataclasses.dataclass(frozen=True)
  class EquinoxAgent(ActorCritic):
    """equinox.nn.GRUCell, vmapped over environments, in a lax.scan with the where reset."""

    def init_core(self, key):
      import equinox as eqx  # pylint: disable=import-outside-toplevel
      return eqx.nn.GRUCell(self.rnn.input_size, hidden, key=key)

    def _one(self, cell, h, x, starts):
      h = jnp.where(starts[:, None], jnp.zeros_like(h), h)
      return jax.vmap(cell)(x, h)

    def core_step(self, core, h_LEH, x_ED, starts_E):
      h = self._one(core, h_LEH[0], x_ED, starts_E)
      return h[None], h

    def core_sequence(self, core, h0_LEH, x_TED, starts_TE):
      def body(h, inp):
        h = self._one(core, h, *inp)
        return h, h
      return jax.lax.scan(body, h0_LEH[0], (x_TED, starts_TE))[1]

  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ActorCritic)}
  return {"jaxgru": base, "flax": FlaxAgent(**fields), "equinox": EquinoxAgent(**fields)}


def main(argv=None):
  ap = common.argument_parser(prog="rl.py", description=__doc__.split("\n")[0])
  ap.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  ap.add_argument("--num_models", type=int, default=2)
  ap.add_argument("--env_steps", type=int, default=1_048_576, help="per agent")
  ap.add_argument("--num_envs", type=int, default=None)
  ap.add_argument("--rollout_steps", type=int, default=None)
  ap.add_argument("--hidden", type=int, default=None)
  ap.add_argument("--eval_episodes", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=10, help="rounds of the update-alone timing")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "rl_cpu"))
  ap.add_argument("--mallopt", action="store_true",
                  help="raise glibc's malloc thresholds first, as run.py does")
  args = ap.parse_args(argv)
  names = [n.strip() for n in args.implementations.split(",") if n.strip()]
  bad = [n for n in names if n not in IMPLEMENTATIONS]
  if bad or not names:
    ap.error(f"--implementations takes names from {','.join(IMPLEMENTATIONS)}, got "
             f"{args.implementations!r}")
  try:
    common.check_positive(**{n: getattr(args, n) for n in
                             ("num_models", "env_steps", "eval_episodes", "repeats")})
    common.check_positive(**{n: getattr(args, n) for n in ("num_envs", "rollout_steps", "hidden")
                             if getattr(args, n) is not None})
    common.check_writable(args.out + ".json")
  except common.UsageError as e:
    ap.error(str(e))

  from jaxgru.training import malloc  # pylint: disable=import-outside-toplevel
  tuned = malloc.tune_malloc(enable=args.mallopt)  # before JAX allocates anything
  import jax  # pylint: disable=import-outside-toplevel

  from jaxgru.tasks import rl  # pylint: disable=import-outside-toplevel
  env = common.environment({"malloc": tuned})
  env["versions"]["gymnax"] = common.version_of("gymnax")
  base = rl.RLConfig()
  sizes = {k: v for k, v in (("num_envs", args.num_envs), ("rollout_steps", args.rollout_steps))
           if v is not None}
  rnn = base.rnn
  if args.hidden is not None:
    rnn = dataclasses.replace(rnn, cell=dataclasses.replace(rnn.cell, hidden_size=args.hidden))
  try:
    cfg = dataclasses.replace(base, num_models=args.num_models, env_steps=args.env_steps,
                              eval_episodes=args.eval_episodes, seed=args.seed, rnn=rnn, **sizes)
  except ValueError as e:
    ap.error(str(e))
  every = agents(cfg.agent())
  steps_fn, states, updates, update_args = {}, {}, {}, {}
  compile_s = {}
  for name in names:
    agent = every[name]
    t0 = time.time()
    states[name] = rl.init_states(cfg, agent)
    steps_fn[name] = rl.make_iteration(cfg, agent).lower(states[name]).compile()
    # The update alone, on the first rollout of the initial agents (the same for every round).
    s = states[name]
    key = jax.random.PRNGKey(args.seed)

    def prepare(s, agent=agent):
      env, h, traj = rl.rollout(cfg, s.train.params, s.env, s.h_LEH, key, s.obs_stats, agent)
      _, _, last = agent.step(s.train.params, h, rl.train.normalize(cfg, s.obs_stats, env.obs_EO),
                              env.starts_E)
      adv, targets = rl.gae(cfg, traj, last)
      return s.train, s.h_LEH, traj, adv, targets

    update_args[name] = jax.jit(jax.vmap(prepare))(s)
    updates[name] = jax.jit(jax.vmap(
        lambda tr, h, traj, adv, tg, agent=agent: rl.train.update(cfg, tr, h, traj, adv, tg, key,
                                                                  agent)[0]))
    jax.block_until_ready(updates[name](*update_args[name]))
    compile_s[name] = time.time() - t0

  update_ms = {name: [] for name in names}
  for r in range(args.repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      update_ms[name] += common.time_calls(lambda n=name: updates[n](*update_args[n]),
                                           jax.block_until_ready, 1, warmup=0)

  train_s = {name: 0.0 for name in names}
  curve = {name: [] for name in names}
  for it in range(cfg.iterations):
    for name in (names if it % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      states[name], metrics = steps_fn[name](states[name])
      jax.block_until_ready(states[name])
      train_s[name] += time.perf_counter() - t0
      if (it + 1) % 20 == 0 or it + 1 == cfg.iterations:
        n, total = (np.asarray(metrics["episodes"]), np.asarray(metrics["return_sum"]))
        curve[name].append([(it + 1) * cfg.steps_per_iteration,
                            [float(t / max(c, 1)) for t, c in zip(total, n)]])
    if (it + 1) % 20 == 0:
      print(f"iteration {it + 1}/{cfg.iterations}: " + ", ".join(
          f"{n} {curve[n][-1][1]}" for n in names), flush=True)
  env["load_average_at_end"] = common.load_average()

  results = {}
  for name in names:
    returns = rl.make_evaluate(cfg, agent=every[name])(states[name]).mean(axis=1)
    total = cfg.iterations * cfg.steps_per_iteration * cfg.num_models
    results[name] = {
        "env_steps_per_second": total / train_s[name],
        "train_seconds": train_s[name],
        "update": common.summary(update_ms[name]),
        "eval_returns": [float(r) for r in returns],
        "compile_seconds": compile_s[name],
        "training_returns": curve[name],
    }
  ref = results.get("jaxgru")
  ratios = {name: {"train_time_jaxgru_over": ref["train_seconds"] / r["train_seconds"],
                   "update_jaxgru_over": ref["update"]["median_ms"] / r["update"]["median_ms"]}
            for name, r in results.items() if ref is not None and name != "jaxgru"}
  record = {"benchmark": "rl", "args": vars(args), "config": cfg.to_json(),
            "environment": env, "results": results, "ratios": ratios}
  common.write_json(args.out + ".json", record)
  rows = [[name, f"{r['env_steps_per_second']:,.0f}", f"{r['train_seconds']:.1f}",
           f"{common.fmt_ms(r['update']['median_ms'])} ({common.fmt_ms(r['update']['q25_ms'])}-"
           f"{common.fmt_ms(r['update']['q75_ms'])})",
           " ".join(f"{v:.0f}" for v in r["eval_returns"])] for name, r in results.items()]
  ratio_rows = [[name, f"{q['train_time_jaxgru_over']:.3f}", f"{q['update_jaxgru_over']:.3f}"]
                for name, q in ratios.items()]
  text = (f"# Recurrent PPO, the core swapped: {cfg.num_models} agents x {cfg.num_envs} "
          f"environments x {cfg.rollout_steps} steps, H={cfg.rnn.hidden_size}, "
          f"{cfg.env_steps:,} environment steps per agent on {cfg.env.name} observing "
          f"{list(cfg.env.observe) if cfg.env.observe else 'all'}\n\n"
          f"`python -m benchmarks.rl --out {args.out}"
          + "".join(f" --{k}={getattr(args, k)}" for k in ("num_models", "env_steps", "num_envs",
                                                           "rollout_steps", "hidden")
                    if getattr(args, k) != ap.get_default(k))
          + f"`; glibc malloc thresholds raised: {'yes' if tuned['applied'] else 'no'}; "
          f"{common.describe(env)}\n\n"
          f"Whole training: every iteration timed, the implementations taking turns; env steps/s "
          f"of all agents together. Update: the {cfg.epochs} x {cfg.minibatches} minibatch steps "
          f"on one rollout, median ms of {args.repeats} interleaved rounds (quartiles). Returns: "
          f"each agent's mean over {cfg.eval_episodes} greedy episodes after training.\n\n"
          + common.table(["core", "env steps/s", "train s", "update ms", "final returns"], rows)
          + "\n" + common.table(["vs", "jaxgru / it, training time", "jaxgru / it, update"],
                                ratio_rows))
  common.write_text(args.out + ".md", text)
  print(text)


if __name__ == "__main__":
  main()
