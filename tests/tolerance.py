"""Tolerances from rounding-error analysis, for a loop's values and gradients against a reference.

Two float computations of the same recurrence (jaxgru's loop and the plain loop of
tests/reference.py, or another framework) differ only in the order of their additions and
products. The standard worst-case bound gives the size of that difference:

* a sum of K products ``sum_k a_k b_k`` evaluated in floating point is off by at most
  ``K * eps * sum_k |a_k b_k|`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1);
* a recurrence ``h_t = F(h_{t-1}, x_t)`` whose step makes such an error carries it to every later
  step through the Jacobians ``dh_t/dh_{t-1}``. A GRU's state is a convex mix of the old state and
  a tanh, so those Jacobians are of norm about 1 and T steps add up their errors: at most
  ``T * K * eps * M``, where M is the magnitude of the terms one step sums.
* The backward pass is the same recurrence run the other way, and a parameter's gradient sums one
  outer product per step and per example: the same form, with K the widest sum of one step
  (I + H for a gate's input, 3H for the state's cotangent, B for a parameter's gradient).
* Products whose factors are rounded to a narrower dtype and summed in float32 (bfloat16 or
  float16 compute) are each off by about that dtype's eps, whatever K: terms=1 at that dtype.

Each of the two float results lies that far from the exact one, so they agree to

    |got - want| <= 2 * steps * (terms * eps + residual) * scale,

where ``eps`` is the machine epsilon of the dtype the products are rounded to (2**-23 for
float32, 2**-7 for bfloat16), ``scale`` the magnitude M of the terms summed, and ``residual`` the
per-step error an iterative solver leaves on purpose (the parallel method's ``tol``; 0 for a
loop). M is taken from the reference as the largest entry of the array compared (its infinity
norm), not entrywise: an entry near 0 that sums terms of either sign (a gradient whose terms
cancel) has the rounding of its terms, not of its value, so an entrywise relative tolerance is
wrong for it. Entries of one array sum terms of one kind, so the largest entry is of their size.

The bound is a worst case (rounding errors of random sign grow like sqrt(T K) instead), so the
differences measured are well inside it; `python tests/margins.py` reports how far.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Called with (margin, label) for every array compared; tests/margins.py adds one to collect them.
observers = []


def epsilon(dtype):
  """Machine epsilon of ``dtype`` (a float dtype; bfloat16 too): the gap above 1.0."""
  return float(jnp.finfo(dtype).eps)


def gru_terms(inputs, hidden, batch=1):
  """K for a GRU loop: the widest sum one step makes, forward (a gate's I inputs, H states and
  bias) or backward (3H gate cotangents into the state's, B examples into a weight's)."""
  return max(inputs + hidden + 1, 3 * hidden, batch)


def bound(want, *, steps, terms, dtype=None, residual=0.0, scale=None):
  """``2 * steps * (terms * eps + residual) * max|want|``: how far a float recomputation of the
  array ``want`` may lie from it (the module docstring derives it).

  Args:
    want: the reference array.
    steps: T, the recurrence steps the error goes through (1 for a single step).
    terms: K, the most products summed into one number in one step, forward or backward.
    dtype: the dtype products are rounded to; None: ``want``'s (float32 for integers).
    residual: an iterative solver's accepted per-step error, relative to the scale.
    scale: the magnitude of the terms summed, where ``want``'s largest entry does not show it
      (a scalar that sums terms of either sign: give the sum of their absolute values).
  """
  want = np.asarray(want)
  if dtype is None:
    dtype = want.dtype if jnp.issubdtype(want.dtype, jnp.floating) else np.float32
  if scale is None:
    scale = float(np.max(np.abs(want.astype(np.float64)), initial=0.0))
  return 2 * steps * (terms * epsilon(dtype) + residual) * scale


def assert_close(got, want, *, steps, terms, dtype=None, residual=0.0, scale=None, err_msg=""):
  """Asserts every array of the pytree ``got`` lies within :func:`bound` of ``want``'s.

  The bound is absolute and per array (from its largest entry), with no relative part. ``dtype``
  None: the coarser of the two arrays' dtypes (a float32 result against a float64 reference is
  held to float32's rounding).
  """
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_leaves) == len(want_leaves), f"{len(got_leaves)} arrays vs {len(want_leaves)}"
  for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, f"array {i}: shape {g.shape} vs {w.shape} {err_msg}"
    floats = [a.dtype for a in (g, w) if jnp.issubdtype(a.dtype, jnp.floating)]
    coarser = max(floats, key=epsilon) if floats else np.float32
    tol = bound(w, steps=steps, terms=terms, dtype=coarser if dtype is None else dtype,
                residual=residual, scale=scale)
    err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)), initial=0.0))
    margin = err / tol if tol > 0 else (0.0 if err == 0 else np.inf)
    for observe in observers:
      observe(margin, f"array {i} {w.shape} {err_msg}".rstrip())
    assert margin <= 1, (
        f"array {i} {w.shape}: max |got - want| = {err:.3g} exceeds {tol:.3g} = 2 x {steps} "
        f"steps x ({terms} terms x eps + {residual:g}) x max|want| {err_msg}")
