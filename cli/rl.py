"""``run.py --task=rl``: the RL task's flags, its config builder and its modes.

  python run.py --task=rl                                # 8 PPO agents on the masked CartPole
  python run.py --task=rl --model=mlp                    # the same with a feed-forward core
  python run.py --task=rl --observe=all                  # the fully observed CartPole
  python run.py --task=rl --mode=eval --workdir=runs/rl  # the trained agents play again

Defines only the RL task's own flags; the shared ones (``--num_models``, ``--seed``,
``--hidden_size``, ``--num_layers``, ``--learning_rate``, ``--clip_norm``, ``--schedule``,
``--log_every``, ``--checkpoint_every``, ``--embed_size``, ``--variant``, ...) are defined in
``cli/common.py``. A bad setting raises :class:`cli.common.UsageError` (run.py prints it as one
line and exits with status 2).
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags, logging

from cli import common
from cli.common import FLAGS, UsageError

flags.DEFINE_string("env", None, "rl: a gymnax environment with discrete actions "
                    "(default CartPole-v1).")
flags.DEFINE_list("observe", None, "rl: indices of the observation the agent sees, or 'all' "
                  "(default: 0,2 on CartPole-v1, the cart position and pole angle; else all).")
flags.DEFINE_list("env_params", None, "rl: environment parameters as name=value, e.g. "
                  "memory_length=30 for MemoryChain-bsuite.")
flags.DEFINE_enum("model", None, ("gru", "mlp"), "rl: the agent's core: a jaxgru stack, or "
                  "feed-forward layers (no memory).")
flags.DEFINE_integer("num_envs", None, "rl: environments per agent.")
flags.DEFINE_integer("rollout_steps", None, "rl: steps per rollout segment.")
flags.DEFINE_integer("env_steps", None, "rl: environment steps per agent in all.")
flags.DEFINE_integer("ppo_epochs", None, "rl: passes over each rollout.")
flags.DEFINE_integer("minibatches", None, "rl: minibatches (of whole segments) per pass.")
flags.DEFINE_float("gamma", None, "rl: discount.")
flags.DEFINE_float("gae_lambda", None, "rl: GAE's lambda.")
flags.DEFINE_float("clip_eps", None, "rl: PPO's ratio (and value) clipping.")
flags.DEFINE_float("vf_coef", None, "rl: weight of the value loss.")
flags.DEFINE_float("ent_coef", None, "rl: weight of the entropy bonus.")
flags.DEFINE_integer("head_size", None, "rl: units of the policy's and value's hidden layer.")
flags.DEFINE_integer("eval_episodes", None, "rl: episodes each agent plays after training.")


# Flags of run.py that mean nothing to this task.
_NOT_RL = ("steps", "batch_size", "bits", "consolidate_steps", "consolidate_bits",
           "consolidate_batch_size", "consolidate_mixed", "eval_bits", "data_path", "text",
           "vocab_size", "max_length", "truncate", "bigram_buckets", "ensemble", "bidirectional",
           "pooling", "dropout", "embed_dropout", "weight_decay", "epochs", "subset",
           "train_size", "random_labels", "warmup_steps", "a", "b")


def _parsed(name: str, kind: type) -> tuple | None:
  values = getattr(FLAGS, name)
  if values is None:
    return None
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise UsageError(f"--{name} must be a comma list of {kind.__name__}s, got "
                     f"{','.join(values)!r}") from None


def _env_params() -> tuple:
  out = []
  for item in FLAGS.env_params or ():
    name, eq, value = item.partition("=")
    if not eq or not name:
      raise UsageError(f"--env_params takes name=value items, got {item!r}")
    try:
      number = float(value)
    except ValueError:
      raise UsageError(f"--env_params: {name} must be a number, got {value!r}") from None
    out.append((name, int(number) if number.is_integer() and "." not in value else number))
  return tuple(out)


def config():
  """The :class:`jaxgru.tasks.rl.RLConfig` the flags ask for (unset flags: its defaults)."""
  from jaxgru.tasks import rl
  for name in _NOT_RL:
    if name in FLAGS and FLAGS[name].present:
      instead = {"steps": "--env_steps", "epochs": "--ppo_epochs", "batch_size": "--num_envs"}
      raise UsageError(f"--{name} is not a setting of --task=rl"
                       + (f"; use {instead[name]}" if name in instead else ""))
  if FLAGS.optimizer not in (None, "adam"):
    raise UsageError(f"--task=rl trains with adam, not --optimizer={FLAGS.optimizer}")
  if FLAGS.dtype != "float32":
    raise UsageError(f"--task=rl runs in float32, not --dtype={FLAGS.dtype}")
  base = rl.RLConfig()
  name = FLAGS.env or base.env.name
  if FLAGS.observe is None:
    observe = base.env.observe if name == rl.DEFAULT_ENV else None
  elif [v.strip() for v in FLAGS.observe] == ["all"]:
    observe = None
  else:
    observe = _parsed("observe", int)
  try:
    env = rl.EnvConfig(name, observe, _env_params())
    cell = dict(variant=FLAGS.variant, activation=FLAGS.activation,
                recurrent_activation=FLAGS.recurrent_activation,
                precision=FLAGS.matmul_precision, **common.given("hidden_size"))
    if FLAGS.embed_size is not None:
      cell["input_size"] = FLAGS.embed_size
    rnn = dataclasses.replace(base.rnn, cell=dataclasses.replace(base.rnn.cell, **cell),
                              **common.given("num_layers"))
    fields = common.given("model", "num_envs", "rollout_steps", "env_steps", "minibatches", "gamma",
                    "gae_lambda", "clip_eps", "vf_coef", "ent_coef", "head_size",
                    "eval_episodes", "clip_norm", "schedule", "seed", "num_models",
                    "log_every", "checkpoint_every")
    if FLAGS.ppo_epochs is not None:
      fields["epochs"] = FLAGS.ppo_epochs
    if (rates := _parsed("learning_rate", float)) is not None:
      fields["learning_rates"] = rates
    return dataclasses.replace(base, env=env, rnn=rnn, **fields)
  except ValueError as e:
    raise UsageError(f"invalid settings: {' '.join(str(e).split())}") from None


def run(mode: str, workdir: str) -> int:
  """Runs ``--task=rl`` in ``mode`` ("train" or "eval") on ``workdir``; returns the exit status."""
  from jaxgru import training
  from jaxgru.tasks import common as task_common, rl
  if mode not in ("train", "eval"):
    raise UsageError(f"--mode={mode} is not for --task=rl (train or eval)")
  if mode == "eval":
    if not training.has_checkpoint(workdir):
      raise UsageError(f"--mode=eval needs a trained rl run in --workdir={workdir}")
    try:
      task_common.read_run(workdir, (rl.TASK,))
      cfg, state = rl.load_trained(workdir)
    except (OSError, ValueError, KeyError, TypeError, training.CheckpointError) as e:
      raise UsageError(f"--mode=eval: {' '.join(str(e).split())}") from None
    episodes = FLAGS.eval_episodes or cfg.eval_episodes
    if episodes < 1:
      raise UsageError(f"--eval_episodes must be a positive integer, got {episodes}")
    returns = rl.make_evaluate(cfg, episodes)(state).mean(axis=1)
    for i, r in enumerate(returns):
      print(f"agent {i}: mean return {r:.1f} over {episodes} episodes")
    return 0
  cfg = config()
  try:
    task_common.check_fits(cfg.memory_needs())
  except task_common.TooBig as e:
    raise UsageError(f"--{e}") from None
  s = rl.train_and_evaluate(cfg, workdir, log=logging.info, progress=common.progress(),
                              flags=common.run_flags(sys.modules[__name__]))
  print(f"eval returns per agent ({s['eval_episodes']} greedy episodes each): "
        f"{' '.join(f'{r:.1f}' for r in s['eval_returns'])}; {s['env_steps']} env steps per "
        f"agent, {s['env_steps_per_second']:.0f} env steps/s (all agents), train "
        f"{s['train_seconds']:.0f}s; summary in {os.path.join(workdir, 'summary.json')}")
  return 0
