"""The RL task (jaxgru.tasks.rl): the rollout's episode resets, the update's agreement with the
rollout, many agents against single ones, resume, and run.py's refusals. Tiny sizes throughout."""

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gymnax")

from jaxgru import GRUConfig, RNNConfig  # noqa: E402
from jaxgru import training  # noqa: E402
from jaxgru.tasks import rl  # noqa: E402

from forked_run import run_forked  # noqa: E402

TINY = rl.RLConfig(rnn=RNNConfig(GRUConfig(8, 8), num_layers=2), head_size=8, num_envs=4,
                   rollout_steps=40, env_steps=4 * 40 * 4, epochs=2, minibatches=2,
                   num_models=2, eval_episodes=3, log_every=2, checkpoint_every=2)


def _two_rollouts(cfg, seed=0):
  """Two consecutive rollouts of one agent: the second starts mid-episode, from the carried
  state (nonzero), with episodes ending inside it. Returns (params, h_start, env_start, traj)."""
  state = rl.train.init_state(cfg, seed, 1e-3)
  params = state.train.params
  env, h, _ = rl.rollout(cfg, params, state.env, state.h_LEH, jax.random.PRNGKey(1),
                         state.obs_stats)
  env2, h2, traj = rl.rollout(cfg, params, env, h, jax.random.PRNGKey(2), state.obs_stats)
  return params, h, env, traj


def test_rollout_resets_state_where_episodes_start_as_each_episode_run_alone():
  cfg = TINY
  params, h_start, _, traj = _two_rollouts(cfg)
  agent = cfg.agent()
  starts = np.asarray(traj.starts)
  assert np.abs(np.asarray(h_start)).max() > 0.01  # the segment continues a running episode
  assert 0 < starts[1:].sum() and not starts[0].all()  # and episodes start inside it
  # The reference: every episode (or piece of one) run alone through the per-example step of
  # each layer, one step at a time, from zero where the episode starts in the segment, else
  # from the state carried in.
  steps = [jax.jit(functools.partial(cfg.rnn.layer_cell(l).step, params["core"][l]["fwd"]))
           for l in range(cfg.rnn.num_layers)]
  x_TED = np.asarray(jax.jit(agent._embed)(params, traj.obs))
  y_TEH = np.zeros((cfg.rollout_steps, cfg.num_envs, cfg.rnn.hidden_size), np.float32)
  pieces = 0
  for e in range(cfg.num_envs):
    bounds = [0] + [t for t in range(1, cfg.rollout_steps) if starts[t, e]] + [cfg.rollout_steps]
    for a, b in zip(bounds[:-1], bounds[1:]):
      h = [jnp.zeros(cfg.rnn.hidden_size) if starts[a, e] else h_start[l, e]
           for l in range(cfg.rnn.num_layers)]
      for t in range(a, b):
        x = x_TED[t, e]
        for l, step in enumerate(steps):
          h[l] = x = step(h[l], x)
        y_TEH[t, e] = x
      pieces += 1
  assert pieces > 2 * cfg.num_envs  # several episodes per environment
  logits, values = jax.jit(agent._heads)(params, jnp.asarray(y_TEH))
  log_p = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                             np.asarray(traj.actions)[..., None], -1)[..., 0]
  np.testing.assert_allclose(traj.log_probs, log_p, atol=1e-5, rtol=0)
  np.testing.assert_allclose(traj.values, values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["gru", "mlp"])
def test_update_log_probs_equal_the_rollouts_before_the_first_gradient_step(model):
  cfg = dataclasses.replace(TINY, model=model)
  params, h_start, _, traj = _two_rollouts(cfg)
  logits, values = cfg.agent().sequence(params, h_start, traj.obs, traj.starts)
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), traj.actions[..., None], -1)[..., 0]
  np.testing.assert_allclose(log_p, traj.log_probs, atol=1e-5, rtol=0)
  np.testing.assert_allclose(values, traj.values, atol=1e-5, rtol=1e-5)
  adv, targets = rl.gae(cfg, traj, jnp.zeros(cfg.num_envs))
  _, metrics = rl.ppo_loss(cfg, params, h_start, traj, adv, targets)
  assert abs(float(metrics["approx_kl"])) < 1e-6 and float(metrics["clip_fraction"]) == 0.0


def test_gae_against_a_python_loop():
  cfg = TINY
  _, _, _, traj = _two_rollouts(cfg)
  last = jnp.linspace(-1.0, 1.0, cfg.num_envs)
  r, v, d = (np.asarray(a, np.float64) for a in (traj.rewards, traj.values, traj.dones))
  # Some episodes cut by the time limit: they bootstrap from the step's own value.
  cut = np.zeros(d.shape, bool)
  cut[3, :2] = True
  d[3, :2] = 1.0
  traj = traj._replace(dones=jnp.asarray(d, bool), cut=jnp.asarray(cut))
  adv, targets = rl.gae(cfg, traj, last)
  want = np.zeros_like(r)
  a_next, v_next = np.zeros(cfg.num_envs), np.asarray(last, np.float64)
  for t in reversed(range(cfg.rollout_steps)):
    future = np.where(cut[t], v[t], v_next * (1 - d[t]))
    delta = r[t] + cfg.gamma * future - v[t]
    a_next = delta + cfg.gamma * cfg.gae_lambda * (1 - d[t]) * a_next
    want[t], v_next = a_next, v[t]
  np.testing.assert_allclose(adv, want, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(targets, want + v, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of two agents, 4 iterations, checkpoints at 2 and 4: (cfg, workdir, summary)."""
  cfg = dataclasses.replace(TINY, rnn=RNNConfig(GRUConfig(8, 8)), rollout_steps=16,
                            env_steps=4 * 16 * 4)
  workdir = str(tmp_path_factory.mktemp("rl") / "run")
  return cfg, workdir, rl.train_and_evaluate(cfg, workdir, log=lambda m: None)


def test_vmapped_agents_equal_single_ones_with_the_same_seeds(trained):
  cfg, workdir, _ = trained
  _, many = rl.load_trained(workdir)  # after 4 iterations of the 2 agents, vmapped
  step_one = jax.jit(lambda s: rl.iteration(cfg, s))
  for i in range(cfg.num_models):
    one = rl.train.init_state(cfg, cfg.seed + i, cfg.learning_rates[0])
    for _ in range(cfg.iterations):
      one, _ = step_one(one)
    for a, b in zip(jax.tree.leaves(one.train.params), jax.tree.leaves(many.train.params)):
      np.testing.assert_allclose(b[i], a, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(many.episodes[i], one.episodes)
    np.testing.assert_array_equal(many.env.starts_E[i], one.env.starts_E)


def test_summary_and_learning_curve(trained):
  cfg, workdir, s = trained
  assert s["env_steps"] == cfg.iterations * cfg.num_envs * cfg.rollout_steps
  assert len(s["eval_returns"]) == cfg.num_models
  assert all(1 <= r <= 500 for r in s["eval_returns"])
  assert s["env_steps_per_second"] > 0 and s["train_seconds"] > 0
  curve = rl.train.read_curve(workdir)
  assert [r["env_steps"] for r in curve] == [2 * 64, 4 * 64]
  assert all(len(r["episode_return_per_agent"]) == cfg.num_models for r in curve)
  # The returns recorded are the episodes' own: in CartPole, one reward per step survived.
  returns = [v for r in curve for v in r["episode_return_per_agent"] if v is not None]
  assert returns and all(1 <= v <= 500 for v in returns)


def test_resume_is_bitwise(trained, tmp_path):
  cfg, first, s = trained
  second = str(tmp_path / "b")
  # The same run stopped after its checkpoint at iteration 2, then run again: it resumes.
  shutil.copytree(first, second)
  shutil.rmtree(os.path.join(second, "checkpoints", "4"))
  s2 = rl.train_and_evaluate(cfg, second, log=lambda m: None)
  assert s2["resumed_from_step"] == 2
  _, a = rl.load_trained(first)
  _, b = rl.load_trained(second)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert s2["eval_returns"] == s["eval_returns"]


def test_running_observation_statistics_equal_numpy_over_everything_seen():
  rng = np.random.default_rng(0)
  batches = [rng.normal(3.0, 2.0, (n, 2)).astype(np.float32) for n in (50, 7, 300)]
  stats = rl.train.init_obs_stats(2)
  for b in batches:
    stats = rl.train.update_obs_stats(stats, jnp.asarray(b))
  seen = np.concatenate(batches)
  # The prior (count 1e-4 at mean 0, var 1) weighs 1e-4 / 357 of the result.
  np.testing.assert_allclose(stats.mean, seen.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.var, seen.var(0), rtol=1e-5)


def test_config_refuses_bad_settings():
  with pytest.raises(ValueError, match="observe"):
    rl.EnvConfig("CartPole-v1", (0, 4))
  with pytest.raises(ValueError, match="discrete"):
    rl.EnvConfig("Pendulum-v1", None)
  with pytest.raises(ValueError, match="gymnax environment"):
    rl.EnvConfig("NoSuchEnv-v0", None)
  with pytest.raises(ValueError, match="minibatches"):
    dataclasses.replace(TINY, minibatches=3)
  with pytest.raises(ValueError, match="env_steps"):
    dataclasses.replace(TINY, env_steps=10)


BAD_FLAGS = [  # each check of the config is tested above; these show run.py's one line
    (["--observe=0,7"], "observe"),
    (["--env=Pendulum-v1"], "discrete"),
    (["--steps=10"], "use --env_steps"),
    (["--mode=eval"], "--mode=eval needs a trained rl run"),
]


def test_run_py_refuses_bad_flags_in_one_line(tmp_path):
  cases = [["--task=rl", f"--workdir={tmp_path / f'run{i}'}", *args]
           for i, (args, _) in enumerate(BAD_FLAGS)]
  results = run_forked(cases, str(tmp_path), info=False)
  for i, ((args, says), (status, err)) in enumerate(zip(BAD_FLAGS, results)):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and says in lines[0], (args, status, err)
    assert not os.path.exists(tmp_path / f"run{i}"), args


def test_episodes_cut_by_the_time_limit_are_told_from_terminated_ones():
  """CartPole with a 6-step limit and alternating pushes (which keep the pole up that long):
  every episode ends at step 6, cut, not terminated; with a limit of 500 and one push
  repeated, they terminate (the pole falls) and none is cut."""
  for limit, actions, cut_expected in ((6, "alternate", True), (500, "right", False)):
    cfg = rl.envs.EnvConfig("CartPole-v1", params=(("max_steps_in_episode", limit),))
    env = rl.envs.reset(cfg, jax.random.PRNGKey(0), 3)
    ends = []
    for t in range(12 if cut_expected else 60):
      a = jnp.full((3,), t % 2 if actions == "alternate" else 1, jnp.int32)
      env, _, done, _, cut = rl.envs.step(cfg, jax.random.PRNGKey(t), env, a)
      done, cut = np.asarray(done), np.asarray(cut)
      assert not (cut & ~done).any()  # a cut ends the episode
      if done.any():
        ends.append((t, cut.copy()))
    assert ends, "no episode ended"
    if cut_expected:
      assert [t for t, _ in ends] == [5, 11] and all(c.all() for _, c in ends)
    else:
      assert not any(c.any() for _, c in ends)
