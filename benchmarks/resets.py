"""Episode resets on an RL-shaped batch: jaxgru with resets, without, and the hand-written Flax way.

The batch is a PPO-style rollout: ``--batch`` environments x ``--steps`` steps, H hidden units, I
input features, and an episode ending at random (``--p_done`` per step). Three implementations:

* ``jaxgru_resets``: :meth:`RNNConfig.apply` with ``resets`` (the custom VJP at T >= 64 on CPU);
* ``jaxgru_plain``: the same call without ``resets`` (what resets cost on top of the loop);
* ``flax_where``: what a user writes today (purejaxrl's ScannedRNN): a ``jnp.where`` reset of the
  carry around ``flax.linen.GRUCell`` inside ``lax.scan``, differentiated by JAX.

For each: the forward pass and a training step (gradients of a loss over every output with
respect to the parameters and the inputs, as when an encoder sits below the GRU), timed in
interleaved rounds; medians and ratios to JSON and markdown under ``--out`` (a path prefix).

  python -m benchmarks.resets --out benchmarks/results/resets_cpu
  python -m benchmarks.resets --mallopt --out /tmp/resets_mallopt  # glibc thresholds raised

``--mallopt`` raises glibc's malloc thresholds first, as ``run.py`` does: XLA:CPU then reuses
large temporaries instead of faulting fresh pages in at every call, which speeds up the
hand-written Flax step more than jaxgru's (whose defaults keep its working set small).
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks import _common as common


def build(batch, steps, hidden, inputs, p_done, seed=0):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  import jaxgru  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  xs_BTI = jnp.asarray(rng.normal(size=(batch, steps, inputs)).astype(np.float32))
  resets_BT = jnp.asarray(rng.random((batch, steps)) < p_done)
  w_BTH = jnp.asarray(rng.normal(size=(batch, steps, hidden)).astype(np.float32))

  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(inputs, hidden))
  jparams = cfg.init(jax.random.key(0))

  cell = nn.GRUCell(features=hidden)
  fparams = cell.init(jax.random.key(0), jnp.zeros((batch, hidden)), jnp.zeros((batch, inputs)))

  def flax_where(params, xs_BTI, resets_BT):
    """purejaxrl's ScannedRNN: reset the carry with jnp.where, then one GRUCell step."""
    def body(h, inp):
      x, done = inp
      h = jnp.where(done[:, None], jnp.zeros_like(h), h)
      h, y = cell.apply(params, h, x)
      return h, y
    h0 = jnp.zeros((xs_BTI.shape[0], hidden), jnp.float32)
    _, ys = jax.lax.scan(body, h0, (jnp.swapaxes(xs_BTI, 0, 1), jnp.swapaxes(resets_BT, 0, 1)))
    return jnp.swapaxes(ys, 0, 1)

  runs = {
      "jaxgru_resets": (lambda p, x: cfg.apply(p, x, resets=resets_BT)[0], jparams),
      "jaxgru_plain": (lambda p, x: cfg.apply(p, x)[0], jparams),
      "flax_where": (lambda p, x: flax_where(p, x, resets_BT), fparams),
  }
  fns = {}
  for name, (run, params) in runs.items():
    loss = lambda p, x, run=run: jnp.mean(run(p, x) * w_BTH)
    fwd = jax.jit(run)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    fns[name] = {"forward": (lambda f=fwd, p=params: f(p, xs_BTI)),
                 "train_step": (lambda g=grad, p=params: g(p, xs_BTI))}
  return fns, float(np.asarray(resets_BT).mean())


def main(argv=None):
  ap = common.argument_parser(prog="resets.py", description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--steps", type=int, default=128)
  ap.add_argument("--hidden", type=int, default=64)
  ap.add_argument("--inputs", type=int, default=16)
  ap.add_argument("--p_done", type=float, default=0.02)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "resets_cpu"))
  ap.add_argument("--mallopt", action="store_true",
                  help="raise glibc's malloc thresholds first (jaxgru/training/malloc.py, as "
                       "run.py does); by default they are left as they are")
  args = ap.parse_args(argv)
  if not 0 <= args.p_done <= 1:
    ap.error(f"--p_done must be a probability in [0, 1], got {args.p_done}")
  try:
    common.check_positive(**{n: getattr(args, n)
                             for n in ("batch", "steps", "hidden", "inputs", "repeats")})
    common.check_writable(args.out + ".json")
  except common.UsageError as e:
    ap.error(str(e))

  from jaxgru.training import malloc  # pylint: disable=import-outside-toplevel
  tuned = malloc.tune_malloc(enable=args.mallopt)  # before JAX allocates anything
  import jax  # pylint: disable=import-outside-toplevel
  env = common.environment({"malloc": tuned})
  fns, reset_rate = build(args.batch, args.steps, args.hidden, args.inputs, args.p_done)
  times = {name: {phase: [] for phase in phases} for name, phases in fns.items()}
  for name, phases in fns.items():  # compile and warm up
    for fn in phases.values():
      jax.block_until_ready(fn())
  order = list(fns.items())
  for r in range(args.repeats):  # interleaved rounds: drifting load hits every entry alike
    for name, phases in (order if r % 2 == 0 else order[::-1]):  # none always runs first
      for phase, fn in phases.items():
        times[name][phase] += common.time_calls(fn, jax.block_until_ready, 1, warmup=0)
  env["load_average_at_end"] = common.load_average()

  results = {name: {phase: common.summary(t) for phase, t in phases.items()}
             for name, phases in times.items()}
  med = lambda name, phase: results[name][phase]["median_ms"]
  ratios = {phase: {"resets_over_plain": med("jaxgru_resets", phase) / med("jaxgru_plain", phase),
                    "resets_over_flax_where": med("jaxgru_resets", phase)
                    / med("flax_where", phase)}
            for phase in ("forward", "train_step")}
  record = {"benchmark": "resets", "args": vars(args), "measured_reset_rate": reset_rate,
            "environment": env, "results": results, "ratios": ratios}
  common.write_json(args.out + ".json", record)

  rows = [[name] + [f"{common.fmt_ms(med(name, phase))} "
                    f"({common.fmt_ms(results[name][phase]['q25_ms'])}-"
                    f"{common.fmt_ms(results[name][phase]['q75_ms'])})"
                    for phase in ("forward", "train_step")] for name in results]
  ratio_rows = [[phase, f"{r['resets_over_plain']:.3f}", f"{r['resets_over_flax_where']:.3f}"]
                for phase, r in ratios.items()]
  text = (f"# Episode resets: {args.batch} environments x {args.steps} steps, H={args.hidden}, "
          f"I={args.inputs}, p_done={args.p_done} (measured {reset_rate:.4f})\n\n"
          f"`python -m benchmarks.resets --out {args.out}"
          f"{' --mallopt' if args.mallopt else ''}`; glibc malloc thresholds raised: "
          f"{'yes' if tuned['applied'] else 'no'}; {common.describe(env)}\n\n"
          f"Median ms over {args.repeats} interleaved rounds (quartiles in brackets); a training "
          "step is the gradient with respect to the parameters and the inputs.\n\n"
          + common.table(["implementation", "forward ms", "train step ms"], rows) + "\n"
          + common.table(["phase", "jaxgru resets / no resets", "jaxgru resets / flax where"],
                         ratio_rows))
  common.write_text(args.out + ".md", text)
  print(text)


if __name__ == "__main__":
  main()
