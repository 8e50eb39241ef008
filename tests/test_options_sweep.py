"""A seeded random sweep of scan_layer's options, cell choices and inputs together.

tests/test_fast_path.py checks each option against the plain loop on its own. Here every case
draws all of them at once (variant, activations, T around the CPU's 64-step threshold, sizes up
to where the forward pass's unroll and projection rules apply, reverse, lengths, resets, h0,
unroll, chunk, remat, projection, derivative rule, diagonal backward, vmapped models and forward
mode), so that combinations no single test names are checked too. The reference shares nothing
with the fast loop but the public per-example step: ``tests/reference.py``'s plain loop, vmapped
over the batch, or without resets, run on each segment alone (a segment gives what it gives
alone from h0, docs/resets.md).

Marked slow (about 2 minutes): the cases compile many distinct programs.
"""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from tolerance import assert_close, gru_terms
from jaxgru import GRUConfig, ScanOptions, scan_layer

pytestmark = pytest.mark.slow
CASES = 16


def draw(seed: int) -> dict:
  """One case's choices, all from ``seed``."""
  rng = random.Random(seed)
  case = dict(
      variant=rng.choice(["reset_after", "reset_before"]),
      activation=rng.choice(["tanh", "tanh", "relu", "hard_sigmoid"]),
      recurrent_activation=rng.choice(["sigmoid", "sigmoid", "hard_sigmoid"]),
      T=rng.choice([5, 63, 64, 65, 96, 130]), B=rng.choice([1, 3, 8, 64]),
      I=rng.choice([1, 4, 16, 40]), H=rng.choice([8, 32, 128, 192]),
      reverse=rng.random() < 0.5, lengths=rng.random() < 0.5, resets=rng.random() < 0.4,
      h0=rng.random() < 0.6, models=rng.choice([1, 1, 2, 3]), jvp=rng.random() < 0.4,
      options=dict(unroll=rng.choice([None, None, 1, 2, 3]),
                   chunk=rng.choice([None, None, 7, 16, 32]),
                   remat=rng.choice([None, "none", "products", "full"]),
                   hoist_projection=rng.choice([None, True, False]),
                   custom_vjp=rng.choice([None, True, False]),
                   diagonal_backward=rng.choice([None, True, False])))
  if case["B"] * case["H"] >= 64 * 128:
    case["T"] = min(case["T"], 96)
  if case["resets"]:  # the segment reference unrolls per example: keep it small
    case["B"], case["T"] = rng.choice([1, 3, 8]), min(case["T"], 96)
  return case


# Every option left to the defaults at a shape where the CPU's forward rules apply (unroll 2 with
# the projection in the loop: B*H*3H >= 2**21, H >= 128, I <= H/4, one reset_after model), once
# forward and once in reverse, both with lengths.
DEFAULTS = [
    dict(draw(0), variant="reset_after", activation="tanh", recurrent_activation="sigmoid",
         T=96, B=64, I=16, H=192, reverse=False, lengths=True, resets=False, h0=True, models=1,
         jvp=True, options={}),
    dict(draw(0), variant="reset_after", activation="tanh", recurrent_activation="sigmoid",
         T=70, B=64, I=8, H=128, reverse=True, lengths=True, resets=False, h0=True, models=1,
         jvp=False, options={}),
]


def reference_layer(cell, params, xs_TBI, h0_BH, lengths_B, resets_BT, reverse):
  """``(ys_TBH, h_last_BH)`` from the plain per-example loop."""
  steps, batch = xs_TBI.shape[:2]
  if resets_BT is None:
    limit = jnp.full((batch,), steps, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B)
    return jax.vmap(lambda x, h, n: reference.sequence(cell, params, x, h, n, reverse),
                    in_axes=(1, 0, 0), out_axes=(1, 0))(xs_TBI, h0_BH, limit)
  ys, lasts = [], []
  for b in range(batch):
    valid = steps if lengths_B is None else int(min(lengths_B[b], steps))
    starts = [0] + [t for t in range(1, valid) if resets_BT[b, t]]
    parts = [reference.sequence(cell, params, xs_TBI[s:e, b], h0_BH[b], reverse=reverse)
             for s, e in zip(starts, starts[1:] + [valid]) if e > s]
    pad = jnp.zeros((steps - valid, cell.hidden_size), xs_TBI.dtype)
    ys.append(jnp.concatenate([y for y, _ in parts] + [pad]))
    # Forward the last segment ends the sequence; in reverse the first one does.
    lasts.append(h0_BH[b] if not parts else parts[0 if reverse else -1][1])
  return jnp.stack(ys, 1), jnp.stack(lasts)


@pytest.mark.parametrize("seed", range(CASES + len(DEFAULTS)))
def test_case_matches_the_plain_loop(seed):
  case = draw(seed) if seed < CASES else DEFAULTS[seed - CASES]
  cell = GRUConfig(case["I"], case["H"], variant=case["variant"], activation=case["activation"],
                   recurrent_activation=case["recurrent_activation"])
  steps, batch, models = case["T"], case["B"], case["models"]
  keys = jax.random.split(jax.random.key(seed), 8)

  def params_of(key):  # biases away from zero, so that every parameter matters
    return jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), cell.init(key))

  params = (params_of(keys[0]) if models == 1
            else jax.vmap(params_of)(jax.random.split(keys[0], models)))
  xs = jax.random.normal(keys[1], (steps, batch, case["I"]))
  h0 = (0.5 * jax.random.normal(keys[2], (batch, case["H"])) if case["h0"]
        else jnp.zeros((batch, case["H"])))
  draws = np.random.default_rng(seed)
  lengths = draws.integers(0, steps + 1, batch).astype(np.int32) if case["lengths"] else None
  resets = draws.random((batch, steps)) < 0.05 if case["resets"] else None
  options = ScanOptions(**case["options"], models=models)

  def fast(p, x, h):
    return scan_layer(cell, p, x, None if lengths is None else jnp.asarray(lengths), h,
                      reverse=case["reverse"], options=options,
                      resets=None if resets is None else jnp.asarray(resets))

  def plain(p, x, h):
    return reference_layer(cell, p, x, h, lengths, resets, case["reverse"])

  if models > 1:  # models share the inputs, as an ensemble does
    fast, plain = (jax.vmap(f, in_axes=(0, None, None)) for f in (fast, plain))
  cotangents = (jax.random.normal(keys[3], (models, steps, batch, case["H"])[models == 1:]),
                jax.random.normal(keys[4], (models, batch, case["H"])[models == 1:]))

  def loss(run):
    return lambda p, x, h: sum(jnp.sum(o * c) for o, c in zip(run(p, x, h), cotangents))

  got, want = jax.jit(fast)(params, xs, h0), jax.jit(plain)(params, xs, h0)
  # The widest sum of a step: gru_terms, or a tangent's (the weights' products and their own).
  terms = max(gru_terms(case["I"], case["H"], batch), 2 * (case["I"] + case["H"] + 1))
  tol = dict(steps=steps, terms=terms, err_msg=str(case))
  assert_close(got, want, **tol)
  # The gradients: jaxgru's rule (or JAX's, as the options say) against JAX's of the plain loop.
  grads = [jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(params, xs, h0) for run in (fast, plain)]
  assert_close(grads[0], grads[1], **tol)
  if case["jvp"]:
    tangents = (jax.tree.map(lambda p: jax.random.normal(keys[5], p.shape), params),
                jax.random.normal(keys[6], xs.shape), jax.random.normal(keys[7], h0.shape))
    outs = [jax.jit(lambda p, x, h, run=run: jax.jvp(run, (p, x, h), tangents)[1])(params, xs, h0)
            for run in (fast, plain)]
    assert_close(outs[0], outs[1], **tol)
