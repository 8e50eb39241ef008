"""Tests for episode resets (``resets``): a sequence with resets is its segments, each run alone.

The reference cuts every sequence at its resets (with NumPy), runs each segment through the plain
loop of tests/reference.py from the sequence's own initial state, and assembles the outputs; its
gradients are ``jax.grad`` of that. Every option of test_fast_path's OPTIONS table (chunks,
padding, remat none/products/full, hoisted projection, per-step and diagonal backward, autodiff)
must give the same values and gradients (params, xs, h0), in both directions, with and without
lengths, below and above the custom-VJP threshold (T >= 64 on the CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as plain
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, RNNConfig, ScanOptions, scan_layer
from test_fast_path import OPTIONS, randn, random_params

I, H, B = 3, 5, 3
SHORT, LONG = 7, 70  # below and above the CPU's custom-VJP threshold


def resets_for(steps, seed=0):
  """(B, T) flags: a reset at t=0, at the last step, at adjacent steps and at random."""
  rng = np.random.default_rng(seed)
  r = rng.random((B, steps)) < 0.15
  r[0, 0] = r[0, 3] = r[0, 4] = True     # t=0 (a no-op) and two adjacent starts
  r[1, steps - 1] = True                   # a one-step segment at the end
  r[2] = False
  r[2, 2] = True
  return r


def lengths_for(steps):
  return np.array([steps, steps - 2, 3], np.int32)  # row 1's reset at T-1 lies past its length


def segments(resets_T, length):
  """[(start, end)] of one sequence's valid steps, cut before every flagged step."""
  cuts = [t for t in range(1, length) if resets_T[t]]
  bounds = [0] + cuts + [length]
  return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def segment_batch(resets_BT, lengths_B, reverse):
  """NumPy indices that cut a batch into its segments, each its own sequence from step 0.

  Returns ``(src_t, src_b, seg_lengths, seg_of, at, final_seg)``: segment k's step j reads
  ``(src_t[j, k], src_b[k])`` (padded past ``seg_lengths[k]``); output (t, b) is segment
  ``seg_of[t, b]``'s step ``at[t, b]`` (-1 past the length); sequence b's final state is segment
  ``final_seg[b]``'s (-1: none, the initial state).
  """
  steps = resets_BT.shape[1]
  segs = []
  final_seg = np.full(B, -1)
  seg_of, at = np.zeros((steps, B), np.int32), np.full((steps, B), -1)
  for b in range(B):
    n = steps if lengths_B is None else int(lengths_B[b])
    for s, e in segments(resets_BT[b], n):
      if not reverse or s == 0:
        final_seg[b] = len(segs)
      seg_of[s:e, b], at[s:e, b] = len(segs), np.arange(e - s)
      segs.append((b, s, e))
  src_t = np.array([[min(s + j, steps - 1) for (_, s, _) in segs] for j in range(steps)])
  src_b = np.array([b for (b, _, _) in segs])
  seg_lengths = np.array([e - s for (_, s, e) in segs], np.int32)
  return src_t, src_b, seg_lengths, seg_of, at, final_seg


def per_segment(cell, resets_BT, lengths_B, reverse):
  """The reference ``run(params, xs_TBI, h0_BH) -> (ys_TBH, h_last_BH)`` for fixed flags: the
  plain loop over every segment as its own sequence (one vmapped loop), reassembled, each
  segment from ``h0[b]`` (:func:`per_segment_from` with the reset state ``h0``)."""
  run = per_segment_from(cell, resets_BT, lengths_B, reverse)
  return lambda params, xs_TBI, h0_BH: run(params, xs_TBI, h0_BH, h0_BH)


def loss(run, params, xs, h0, w_ys, w_h):
  ys, h_last = run(params, xs, h0)
  return jnp.sum(ys * w_ys) + jnp.sum(h_last * h_last * w_h)


def values_and_grads(run, params, xs, h0, w_ys, w_h):
  outs = run(params, xs, h0)
  grads = jax.grad(functools.partial(loss, run), argnums=(0, 1, 2))(params, xs, h0, w_ys, w_h)
  return outs, grads


def data(cell, steps, seed=0):
  return (random_params(cell, seed), randn(steps, B, I, seed=seed + 1),
          randn(B, H, seed=seed + 2), randn(steps, B, H, seed=seed + 3), randn(B, H, seed=seed + 4))


CASES = [(False, False), (True, False), (False, True), (True, True)]  # (reverse, masked)


@functools.lru_cache(maxsize=None)
def expected(steps):
  """The reference's values and gradients for every (reverse, masked) case, one jit each."""
  cell = GRUConfig(I, H)
  resets, lengths = resets_for(steps), lengths_for(steps)
  out = {}
  for reverse, masked in CASES:
    run = per_segment(cell, resets, lengths if masked else None, reverse)
    out[reverse, masked] = jax.jit(functools.partial(values_and_grads, run))(*data(cell, steps))
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def fast_all_cases(cell, options, cases, params, xs, h0, w_ys, w_h, resets, lengths):
  """scan_layer's values and gradients for the (reverse, masked) cases, in one program."""
  out = {}
  for reverse, masked in cases:
    n = lengths if masked else None
    run = lambda p, x, h, reverse=reverse, n=n: scan_layer(
        cell, p, x, n, h, resets=resets, reverse=reverse, options=options)
    out[reverse, masked] = values_and_grads(run, params, xs, h0, w_ys, w_h)
  return out


def check(got, want, steps=SHORT, rtol=None, atol=None):
  """Values and gradients of a ``steps``-step loop against the reference's, to float32 rounding
  (tests/tolerance.py); ``rtol=0, atol=0``: bit for bit (the same computation)."""
  if (rtol, atol) == (0, 0):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  else:
    assert_close(got, want, steps=steps, terms=gru_terms(I, H, B))


# Every option in both directions, each with and without lengths; the four combinations for the
# options whose paths differ with lengths (products rebuild the states from the outputs).
ALL_CASES = ("default", "products_whole", "remat", "per_step_vjp_whole")


# Each path once: one chunk and many, remat none/products/full, the diagonal and per-step forms,
# the projection hoisted, one step per chunk, autodiff. (test_fast_path runs every option
# without resets.)
SEGMENT_OPTIONS = ("default", "products_whole", "remat", "per_step_vjp_whole", "chunks",
                   "one_step", "autodiff_remat")


@pytest.mark.parametrize("options", SEGMENT_OPTIONS)
def test_segments_equal_separate_runs(options):
  cell = GRUConfig(I, H)
  cases = tuple(CASES) if options in ALL_CASES else ((False, False), (True, True))
  got = fast_all_cases(cell, OPTIONS[options], cases, *data(cell, SHORT),
                       jnp.asarray(resets_for(SHORT)), jnp.asarray(lengths_for(SHORT)))
  for case in cases:
    check(got[case], expected(SHORT)[case])


@pytest.mark.parametrize("options", [ScanOptions(), ScanOptions(chunk=16, remat="products"),
                                     ScanOptions(chunk=32, remat=True, hoist_projection=True)])
def test_long_sequences_take_the_custom_vjp(options):
  """T=70: the CPU's default is the custom VJP; chunks of 16 and 32 pad to 80 and 96 steps."""
  cell = GRUConfig(I, H)
  assert options.resolved(LONG, B, H, inputs=I).custom_vjp
  got = fast_all_cases(cell, options, tuple(CASES), *data(cell, LONG), jnp.asarray(resets_for(LONG)),
                       jnp.asarray(lengths_for(LONG)))
  for case in CASES:
    check(got[case], expected(LONG)[case], LONG)


@pytest.mark.parametrize("options", ["default", "chunks", "per_step_vjp"])
def test_no_resets_is_bitwise_none(options):
  cell = GRUConfig(I, H)
  args = data(cell, SHORT)

  # The two programs differ (a select on an all-false mask), so their bits are the same only as
  # far as the machine code keeps them: compiled as users' programs are (tests/conftest.py
  # lowers the level for the rest of the suite; at level 0 four values differ by 1 ulp).
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 3})
  def both(params, xs, h0, w_ys, w_h, lengths):
    out = []
    for resets in (None, jnp.zeros((B, SHORT), bool)):
      for reverse, masked in CASES:
        run = lambda p, x, h, reverse=reverse, masked=masked, resets=resets: scan_layer(
            cell, p, x, lengths if masked else None, h, resets=resets, reverse=reverse,
            options=OPTIONS[options])
        out.append(values_and_grads(run, params, xs, h0, w_ys, w_h))
    return out[:len(CASES)], out[len(CASES):]

  without, zeros = both(*args, jnp.asarray(lengths_for(SHORT)))
  for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(zeros), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reset_at_the_first_step_changes_nothing():
  cell = GRUConfig(I, H)
  params, xs, h0, w_ys, w_h = data(cell, LONG)
  first = jnp.zeros((B, LONG), bool).at[:, 0].set(True)

  @jax.jit
  def run(resets):
    f = lambda p, x, h: scan_layer(cell, p, x, h0=h, resets=resets)
    return values_and_grads(f, params, xs, h0, w_ys, w_h)

  check(run(first), run(None), LONG)


# -- a reset state of its own (reset_state=) -------------------------------------------------------


def per_segment_from(cell, resets_BT, lengths_B, reverse):
  """The reference ``run(params, xs_TBI, h0_BH, hr_BH)`` with a reset state: the plain loop over
  every segment as its own sequence, the one read first (forward: from step 0, unless flagged
  there; reverse: ending at the sequence's length) from ``h0[b]``, every other one from
  ``hr[b]``."""
  src_t, src_b, seg_lengths, seg_of, at, final_seg = segment_batch(resets_BT, lengths_B, reverse)
  steps = resets_BT.shape[1]
  first = []
  for k, b in enumerate(src_b):
    n = steps if lengths_B is None else int(lengths_B[b])
    start = int(np.min(src_t[0, k]))
    # Forward, a flag at t=0 starts the first segment from the reset state too.
    first.append(start + seg_lengths[k] == n if reverse else start == 0 and not resets_BT[b, 0])
  first = jnp.asarray(np.array(first))

  def run(params, xs_TBI, h0_BH, hr_BH):
    xs_seg = xs_TBI[src_t, src_b[None, :]]
    starts = jnp.where(first[:, None], h0_BH[src_b], hr_BH[src_b])
    one = lambda x, h, n: plain.sequence(cell, params, x, h, n, reverse)
    ys_seg, h_seg = jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 0))(
        xs_seg, starts, jnp.asarray(seg_lengths))
    ys = ys_seg[np.maximum(at, 0), seg_of]
    ys = jnp.where(jnp.asarray(at >= 0)[:, :, None], ys, 0.0)
    h_last = jnp.where(jnp.asarray(final_seg >= 0)[:, None], h_seg[np.maximum(final_seg, 0)],
                       h0_BH)
    return ys, h_last

  return run


def values_and_grads_from(run, params, xs, h0, hr, w_ys, w_h):
  f = lambda p, x, h, r: loss(lambda p, x, h: run(p, x, h, r), p, x, h, w_ys, w_h)
  return run(params, xs, h0, hr), jax.grad(f, argnums=(0, 1, 2, 3))(params, xs, h0, hr)


RESET_STATE_OPTIONS = {
    **{k: OPTIONS[k] for k in SEGMENT_OPTIONS},
    "parallel": ScanOptions(method="parallel"),
    "parallel_full": ScanOptions(method="parallel", newton="full"),
    "fused": ScanOptions(method="fused"),  # the kernel restores h0 only: the sequential loop
}


@functools.lru_cache(maxsize=None)
def expected_from(steps):
  """The reference's values and gradients with a reset state, every (reverse, masked) case."""
  cell = GRUConfig(I, H)
  resets, lengths = resets_for(steps), lengths_for(steps)
  params, xs, h0, w_ys, w_h = data(cell, steps)
  hr = randn(B, H, seed=9)

  @jax.jit
  def reference(params, xs, h0, hr):
    return {case: values_and_grads_from(per_segment_from(cell, resets, lengths if case[1] else None,
                                                         case[0]), params, xs, h0, hr, w_ys, w_h)
            for case in CASES}

  return reference(params, xs, h0, hr)


@pytest.mark.parametrize("options, steps",
                         [(k, SHORT) for k in RESET_STATE_OPTIONS]
                         + [(k, LONG) for k in ("default", "chunks", "parallel")])
def test_reset_state_restarts_every_later_segment(options, steps):
  """Segments after a reset start from ``reset_state``, the first from ``h0``: values and the
  gradients of params, xs, h0 and the reset state, both directions, with and without lengths,
  against the plain loop per segment; every path at T=7, and at T=70 those whose chunks and
  thresholds differ there (the custom VJP, chunked and padded)."""
  cell = GRUConfig(I, H)
  params, xs, h0, w_ys, w_h = data(cell, steps)
  hr = randn(B, H, seed=9)
  resets, lengths = jnp.asarray(resets_for(steps)), jnp.asarray(lengths_for(steps))
  opts = RESET_STATE_OPTIONS[options]
  cases = tuple(CASES) if options in ALL_CASES + ("parallel",) else ((False, False), (True, True))

  @jax.jit
  def fast(params, xs, h0, hr):
    out = {}
    for reverse, masked in cases:
      n = lengths if masked else None
      run = lambda p, x, h, r, reverse=reverse, n=n: scan_layer(
          cell, p, x, n, h, resets=resets, reset_state=r, reverse=reverse, options=opts)
      out[reverse, masked] = values_and_grads_from(run, params, xs, h0, hr, w_ys, w_h)
    return out

  got, want = fast(params, xs, h0, hr), expected_from(steps)
  for case in cases:
    if options.startswith("parallel"):
      # Newton stops at a per-step residual of tol (1e-5): the loop's rounding plus that.
      assert_close(got[case], want[case], steps=steps, terms=gru_terms(I, H, B), residual=1e-5)
    else:
      check(got[case], want[case], steps)
  # Not the restarts from h0: where a later segment exists, the outputs differ.
  old = per_segment(cell, resets_for(steps), None, False)(params, xs, h0)[0]
  assert np.max(np.abs(np.asarray(got[False, False][0][0]) - np.asarray(old))) > 0.1


def test_reset_state_equal_to_h0_is_the_default():
  """``reset_state=h0`` is what resets do without it, bit for bit (the same computation), and
  the gradient of h0 is then the sum of the two."""
  cell = GRUConfig(I, H)
  params, xs, h0, w_ys, w_h = data(cell, LONG)
  resets = jnp.asarray(resets_for(LONG))

  @jax.jit
  def both(params, xs, h0):
    plain_run = lambda p, x, h: scan_layer(cell, p, x, h0=h, resets=resets)
    given = lambda p, x, h: scan_layer(cell, p, x, h0=h, resets=resets, reset_state=h)
    return (values_and_grads(plain_run, params, xs, h0, w_ys, w_h),
            values_and_grads(given, params, xs, h0, w_ys, w_h))

  a, b = both(params, xs, h0)
  check(b, a, LONG)


def test_stack_and_modules_take_reset_state():
  """RNNConfig.apply, the Flax and Equinox modules pass ``reset_state`` (L*D, B, H) to every
  cell: a 2-layer bidirectional stack against the stack run per segment."""
  pytest.importorskip("flax")
  import jaxgru.linen  # pylint: disable=import-outside-toplevel
  import jaxgru.nnx  # pylint: disable=import-outside-toplevel
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2)
  steps = 9
  params = cfg.init(jax.random.key(0))
  xs, h0, hr = randn(B, steps, I, seed=1), randn(2, B, H, seed=2), randn(2, B, H, seed=3)
  resets = resets_for(steps)
  got = cfg.apply(params, xs, h0=h0, resets=jnp.asarray(resets), reset_state=hr)
  # Reference: layer by layer, the per-segment loop of each cell from (h0, hr).
  x_TBI = jnp.swapaxes(xs, 0, 1)
  finals = []
  for l in range(2):
    cell = cfg.layer_cell(l)
    x_TBI, h_last = per_segment_from(cell, resets, None, False)(params[l]["fwd"], x_TBI, h0[l],
                                                                 hr[l])
    finals.append(h_last)
  check(got, (jnp.swapaxes(x_TBI, 0, 1), jnp.stack(finals)), 2 * steps)
  layer = jaxgru.linen.GRU(hidden_size=H, num_layers=2)
  variables = {"params": {"gru": params}}
  check(layer.apply(variables, xs, None, h0, resets=jnp.asarray(resets), reset_state=hr), got,
        rtol=0, atol=0)
  module = jaxgru.nnx.GRU.from_params(cfg, params)
  check(module(xs, None, h0, resets=jnp.asarray(resets), reset_state=hr), got, rtol=0, atol=0)
  eqx_mod = pytest.importorskip("jaxgru.equinox")
  model = eqx_mod.GRU.from_params(cfg, params)
  check(model.batched(xs, None, h0, resets=jnp.asarray(resets), reset_state=hr), got,
        rtol=0, atol=0)
  ys, h_last = jax.vmap(lambda x, h, r, rs: model(x, None, h, resets=rs, reset_state=r),
                        in_axes=(0, 1, 1, 0))(xs, h0, hr, jnp.asarray(resets))
  check((ys, jnp.swapaxes(h_last, 0, 1)), got, 2 * steps)
  with pytest.raises(ValueError, match=r"RNN reset_state.*\(L\*D=2, B=3, H=5\)"):
    cfg.apply(params, xs, resets=jnp.asarray(resets), reset_state=hr[0])
  with pytest.raises(ValueError, match=r"scan_layer reset_state.*\(B=3, hidden_size=5\)"):
    scan_layer(cfg.cell, params[0]["fwd"], jnp.swapaxes(xs, 0, 1), resets=jnp.asarray(resets),
               reset_state=hr)


def stack_per_segment(cfg, resets_BT, lengths_B):
  """A stack's reference: RNNConfig.apply (no resets) over every segment as its own sequence."""
  fwd = segment_batch(resets_BT, lengths_B, False)
  bwd = segment_batch(resets_BT, lengths_B, True)
  src_t, src_b, seg_lengths, seg_of, at, _ = fwd

  def run(params, xs_BTI, h0):
    xs_seg = jnp.swapaxes(xs_BTI[src_b[None, :], src_t], 0, 1)  # (S, T, I)
    ys_seg, h_seg = cfg.apply(params, xs_seg, jnp.asarray(seg_lengths), h0[:, src_b])
    ys = ys_seg[seg_of, np.maximum(at, 0)]  # (T, B, F)
    ys = jnp.swapaxes(jnp.where(jnp.asarray(at >= 0)[:, :, None], ys, 0.0), 0, 1)
    finals = []
    for i in range(h0.shape[0]):  # forward cells end in the last segment, backward in the first
      last = (fwd if i % 2 == 0 else bwd)[5]
      finals.append(jnp.where(jnp.asarray(last >= 0)[:, None], h_seg[i, np.maximum(last, 0)],
                              h0[i]))
    return ys, jnp.stack(finals)

  return run


def test_bidirectional_stack_equals_each_segment_alone():
  cfg = RNNConfig(GRUConfig(I, H), num_layers=2, bidirectional=True)
  steps = 9
  params = cfg.init(jax.random.key(0))
  xs, h0 = randn(B, steps, I, seed=1), randn(4, B, H, seed=2)
  w_ys, w_h = randn(B, steps, 2 * H, seed=3), randn(4, B, H, seed=4)
  resets, lengths = resets_for(steps), lengths_for(steps)
  options = ScanOptions(chunk=4, custom_vjp=True)
  fast = lambda p, x, h: cfg.apply(p, x, jnp.asarray(lengths), h, options=options,
                                   resets=jnp.asarray(resets))
  got = jax.jit(functools.partial(values_and_grads, fast))(params, xs, h0, w_ys, w_h)
  want = jax.jit(functools.partial(values_and_grads, stack_per_segment(cfg, resets, lengths)))(
      params, xs, h0, w_ys, w_h)
  check(got, want, 2 * steps)  # two layers: the first one's error enters the second
  # time_major takes (T, B) flags.
  ys_tm, h_tm = jax.jit(lambda p, x, h: cfg.apply(
      p, x, jnp.asarray(lengths), h, options=options, resets=jnp.asarray(resets.T),
      time_major=True))(params, jnp.swapaxes(xs, 0, 1), h0)
  check((jnp.swapaxes(ys_tm, 0, 1), h_tm), got[0], 2 * steps)


def test_modules_pass_resets_through():
  pytest.importorskip("flax")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jaxgru.linen  # pylint: disable=import-outside-toplevel
  import jaxgru.nnx  # pylint: disable=import-outside-toplevel
  cfg = RNNConfig(GRUConfig(I, H))
  steps = 9
  xs, resets = randn(B, steps, I), jnp.asarray(resets_for(steps))
  layer = jaxgru.linen.GRU(hidden_size=H)
  variables = layer.init(jax.random.key(0), xs)
  got = layer.apply(variables, xs, resets=resets)
  want = cfg.apply(variables["params"]["gru"], xs, resets=resets)
  check(got, want, rtol=0, atol=0)
  module = jaxgru.nnx.GRU.from_params(cfg, variables["params"]["gru"])
  check(module(xs, resets=resets), want, rtol=0, atol=0)
  eqx_mod = pytest.importorskip("jaxgru.equinox")
  model = eqx_mod.GRU.from_params(cfg, variables["params"]["gru"])
  check(model.batched(xs, resets=resets), want, rtol=0, atol=0)
  ys, h_last = jax.vmap(lambda x, r: model(x, resets=r))(xs, resets)
  check((ys, jnp.swapaxes(h_last, 0, 1)), want, steps)
  del nnx


@pytest.mark.parametrize("bad", [np.zeros((SHORT, B), bool), np.zeros((B, SHORT + 1), bool),
                                 np.zeros((B, SHORT), np.int32), np.zeros((B, SHORT), np.float32)])
def test_wrong_resets_raise(bad):
  cell = GRUConfig(I, H)
  params, xs = random_params(cell), randn(SHORT, B, I)
  with pytest.raises(ValueError, match=rf"resets.*\(B={B}, T={SHORT}\)"):
    scan_layer(cell, params, xs, resets=bad)
  cfg = RNNConfig(cell)
  with pytest.raises(ValueError, match=rf"RNN resets.*\(B={B}, T={SHORT}\)"):
    cfg.apply(cfg.init(jax.random.key(0)), jnp.swapaxes(xs, 0, 1), resets=bad)
