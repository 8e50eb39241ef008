"""The fused method (``ScanOptions(method="fused")``): one Pallas kernel runs a layer's T steps.

The sequential loop (:mod:`jaxgru._loop`) is an XLA while loop: every step launches the recurrent
product and the fused gate kernel anew, a few microseconds each on a GPU, which at small batch x
hidden is most of a step's time. Here one kernel per layer and direction runs the whole time
loop, as cuDNN's persistent kernels do:

* before it, the input projection ``gx = x @ w_x + b_x`` of all T steps, ONE product, laid out
  gate-major (3, T, B, H);
* in it, per batch tile of ``block_batch`` rows (the kernel's grid), ``w_h``, the biases and the
  state stay on chip; each step reads its three gate inputs, makes the recurrent product
  ``h @ w_h`` (``GRUConfig.precision`` passed to the in-kernel product: float32 at "highest" is
  computed in float32, no TensorFloat-32), runs the cell's own gate math
  (:meth:`GRUConfig._recur_with`), applies the length mask and the reset mask, and writes its
  output once.

Its derivative is a custom JVP (:func:`fused_layer`). Its primal is the kernel; its tangent is a
primitive, linear in the tangents (:data:`_tangent_p`), whose TRANSPOSE, what ``jax.grad`` runs,
is a second kernel: the backward recurrence, the state's cotangent carried through all T steps in
reverse with ``w_h`` on chip, writing each step's gate cotangents; the weight gradients are then
one large product each outside it (``dw_h = h^T dgh`` over all T*B rows). The forward pass keeps
only its outputs: each step's starting state is the output before it (or ``h0``), rebuilt for
the backward kernel, which also projects the inputs again (one product). Forward mode
(``jax.jvp``, ``jax.jacfwd``) evaluates the same primitive, which runs the sequential loop's own
JVP (:func:`jaxgru._jvp._layer_jvp`): forward mode falls back to the sequential rule, as do
second derivatives. Under ``jax.vmap`` (many models) the kernels gain a grid axis (Pallas's own
batching rule); the primitive's batching rule moves the models' axis first.

Limits (:func:`fused_plan`; outside them the layer runs the sequential loop, with a one-time
warning saying why, never an error):

* float32 parameters and state, products in float32, bfloat16 or float16; activations known to be
  elementwise (padded units must not mix with real ones), gelu excepted (Triton has no erfc);
* on chip, per program: ``w_h`` (H_p x 3H_p in the product dtype) and about a dozen (B_t, H_p)
  float32 tiles, with H_p the hidden size padded to a power of two (at least 16, Triton's
  smallest product) and B_t = 16 rows. On an NVIDIA H100 or H200 (228 KB of shared memory per
  SM, 227 KB per block) that holds H <= 64 with float32 products and H <= 128 with bfloat16
  (:data:`GPU_ON_CHIP_BYTES`). An estimate until a GPU compiles it: Triton decides what it holds
  in registers and what in shared memory;
* a TPU core would hold the blocks of the whole sequence in VMEM (16 MiB scoped by default:
  about T*B_t*H_p*4*10 bytes plus the weights, :data:`TPU_VMEM_BYTES`), but the kernel has not
  been run on a TPU, so a TPU falls back for now;
* on the CPU there is no such kernel: Pallas interprets it (slow; for tests), with a one-time
  warning, under the GPU's limits, so that what falls back here falls back on a GPU.

Padding: batch rows to a multiple of B_t and units to H_p, with zero inputs, weights and states.
Padded units never reach real ones (their rows of ``w_h`` are zero) and stay bounded; padded rows
are dropped. Results equal the sequential loop's up to the order of floating-point additions.

Length: longer than the project's 400-line guide, because the two kernels, the derivative
primitive that joins them and the limits only make sense together.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
try:  # Deprecated since JAX 0.11 in favour of Mosaic GPU; a later JAX may not have it.
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover (the tested JAX versions have it)
  pl_triton = None
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxgru import activations as _act
from jaxgru._jvp import _layer_jvp
from jaxgru._loop import _Static
from jaxgru.cell import GRUConfig

# Rows of the batch per program of the kernel's grid: Triton's smallest product side.
BLOCK_BATCH = 16
# The smallest padded hidden size (Triton's smallest product side).
MIN_HIDDEN = 16
# Shared memory per thread block on an NVIDIA H100/H200 (228 KB per SM, 1 KB reserved).
GPU_ON_CHIP_BYTES = 227 * 1024
# (B_t, H_p) float32 tiles a step holds besides the weights: the state, three gate inputs, three
# products, the gates, the new state and (backward) their cotangents, about.
_TILES = 12
# A TPU core's default scoped VMEM (16 MiB on v4 and v5e).
TPU_VMEM_BYTES = 16 * 2**20
_PRODUCT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


@dataclasses.dataclass(frozen=True)
class _Fused:
  """Everything static about one fused layer (a nondiff argument and a primitive parameter)."""
  cell: GRUConfig
  reverse: bool
  hidden_p: int       # H padded
  block_batch: int    # B_t
  interpret: bool     # Pallas interpret mode (the CPU)
  seq: _Static        # the sequential loop, one chunk: forward mode's fallback


def padded_hidden(hidden: int) -> int:
  """H_p: ``hidden`` rounded up to a power of two, at least :data:`MIN_HIDDEN`."""
  return max(MIN_HIDDEN, 1 << (hidden - 1).bit_length())


def on_chip_bytes(cell: GRUConfig) -> int:
  """What one program of the kernel holds on chip: ``w_h`` and the biases, and :data:`_TILES`
  (B_t, H_p) float32 tiles."""
  hp = padded_hidden(cell.hidden_size)
  weights = 3 * hp * hp * np.dtype(cell.compute_dtype).itemsize + 3 * hp * 4
  return weights + _TILES * BLOCK_BATCH * hp * 4


def tpu_vmem_bytes(cell: GRUConfig, steps: int) -> int:
  """What a TPU core would hold in VMEM: the blocks of the whole sequence (gate inputs, outputs,
  states; double-buffered) besides :func:`on_chip_bytes`."""
  hp = padded_hidden(cell.hidden_size)
  return on_chip_bytes(cell) + 2 * 5 * steps * BLOCK_BATCH * hp * 4


def fused_limit(cell: GRUConfig, steps: int, backend: str) -> Optional[str]:
  """Why the fused kernel cannot run this layer on ``backend`` (None: it can)."""
  if np.dtype(cell.state_dtype) != np.float32:
    return f"parameters and state in {np.dtype(cell.state_dtype)} (float32 only)"
  if np.dtype(cell.compute_dtype) not in _PRODUCT_DTYPES:
    return f"products in {np.dtype(cell.compute_dtype)}"
  acts = (cell.activation, cell.recurrent_activation)
  if not all(_act.is_elementwise(a) for a in acts):
    return "an activation not known to be elementwise"
  if any(_act.resolve(a) is _act.gelu for a in acts):
    return "gelu (exact) needs erfc, which Pallas's Triton lowering lacks"
  if backend == "tpu":
    need = tpu_vmem_bytes(cell, steps)
    return (f"not yet run on a TPU (it would need {need} bytes of VMEM, of "
            f"{TPU_VMEM_BYTES})")
  if backend not in ("gpu", "cpu"):
    return f"no Pallas kernel for backend {backend!r}"
  if backend == "gpu" and pl_triton is None:
    return f"this JAX ({jax.__version__}) has no Pallas Triton backend, which the kernel uses"
  need = on_chip_bytes(cell)
  if need > GPU_ON_CHIP_BYTES:
    return (f"hidden size {cell.hidden_size} needs {need} bytes on chip, more than a GPU "
            f"block's {GPU_ON_CHIP_BYTES} (H <= 64 with float32 products, <= 128 with "
            f"bfloat16)")
  return None


_warned: set = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    warnings.warn(message, stacklevel=4)


def fused_plan(cell: GRUConfig, seq: _Static, steps: int,
               backend: Optional[str] = None, reset_state: bool = False) -> Optional[_Fused]:
  """The fused layer's static description, or None (with a one-time warning saying why) where it
  falls back to the sequential loop. On the CPU it warns once that it runs in interpret mode.
  ``reset_state``: the call restores a state of its own at resets, which the kernel (restoring
  ``h0``) does not do."""
  backend = backend or jax.default_backend()
  reason = ("a reset_state of its own (the kernel restores h0 at a reset)" if reset_state
            else fused_limit(cell, steps, backend))
  if reason is not None:
    _warn_once(f"jaxgru: method='fused' runs the sequential loop instead: {reason}")
    return None
  interpret = backend == "cpu"
  if interpret:
    _warn_once("jaxgru: method='fused' on the CPU runs its Pallas kernel in interpret mode, "
               "which is slow and meant for tests; the sequential loop is faster here")
  seq = dataclasses.replace(seq, single=True, remat="none")
  return _Fused(cell, seq.reverse, padded_hidden(cell.hidden_size), BLOCK_BATCH, interpret,
                seq)

# -- inside the kernels ---------------------------------------------------------------------------


def _gate_products(cell: GRUConfig, w, b):
  """``product(k, a)`` of :meth:`GRUConfig._recur_with` from the on-chip weights ``w`` (three
  (H_p, H_p) gate blocks) and biases ``b`` (three (1, H_p)), and ``back(k, d)``, the cotangent of
  its input ``a`` from the cotangents ``d`` of its gates (``d @ w_k^T``, summed)."""
  cd, sd = cell.compute_dtype, cell.state_dtype
  prec = cell.precision
  dims = {False: (((1,), (0,)), ((), ())), True: (((1,), (1,)), ((), ()))}
  dot = lambda a, w_g, t: jax.lax.dot_general(a.astype(cd), w_g, dims[t], precision=prec,
                                              preferred_element_type=sd)
  # The gates of each product: reset_after's one product makes all three (with a bias);
  # reset_before's first makes z and r, its second (of r * h) the candidate's.
  groups = ((0, 1, 2),) if cell.variant == "reset_after" else ((0, 1), (2,))
  bias = cell.variant == "reset_after" and cell.use_bias

  def product(k, a):
    return tuple(dot(a, w[g], False) + b[g] if bias else dot(a, w[g], False)
                 for g in groups[k])

  def back(k, d):
    terms = [dot(dg, w[g], True) for dg, g in zip(d, groups[k])]
    return functools.reduce(lambda p, q: p + q, terms)

  return product, back, len(groups)


def _pipelined(steps: int, reverse: bool, load, step, carry):
  """``fori_loop`` over the ``steps`` time indices in processing order (``reverse``: T-1 down
  to 0), where ``step(t, inputs, carry) -> carry`` gets the step's ``inputs = load(t)`` read one
  iteration ahead: their reads from memory do not wait for the recurrence, so they overlap the
  step before (a software pipeline by hand; the last iteration's read repeats its own index)."""
  index = lambda s: steps - 1 - s if reverse else s

  def body(s, state):
    inputs, carry = state
    t = index(s)
    ahead = load(index(jnp.minimum(s + 1, steps - 1)))
    return ahead, step(t, inputs, carry)

  return jax.lax.fori_loop(0, steps, body, (load(index(0)), carry))[1]


def _fwd_kernel(fs: _Fused, steps: int, has_len: bool, has_reset: bool, *refs):
  """One batch tile's T steps. Refs: gx (3, T, B_t, H_p), w (3, H_p, H_p), b (3, 1, H_p),
  h0 (B_t, H_p), [lengths (B_t, 1) int32], [resets (T, B_t, 1) int32]; out: ys (T, B_t, H_p),
  h_last (B_t, H_p)."""
  it = iter(refs)
  gx_ref, w_ref, b_ref, h0_ref = next(it), next(it), next(it), next(it)
  len_ref = next(it) if has_len else None
  reset_ref = next(it) if has_reset else None
  ys_ref, hlast_ref = next(it), next(it)
  cell = fs.cell
  w = tuple(w_ref[g] for g in range(3))
  b = tuple(b_ref[g] for g in range(3))
  product, _, _ = _gate_products(cell, w, b)
  h0 = h0_ref[...]
  lengths = len_ref[...] if has_len else None

  def load(t):
    return tuple(gx_ref[g, t] for g in range(3)), reset_ref[t] if has_reset else None

  def step(t, inputs, h):
    gx, reset = inputs
    if has_reset:
      h = jnp.where(reset > 0, h0, h)
    h_new = cell._recur_with(h, gx, product)
    if has_len:
      valid = t < lengths
      ys_ref[t] = jnp.where(valid, h_new, jnp.zeros_like(h_new))
      return jnp.where(valid, h_new, h)
    ys_ref[t] = h_new
    return h_new

  hlast_ref[...] = _pipelined(steps, fs.reverse, load, step, h0)


def _bwd_kernel(fs: _Fused, steps: int, has_len: bool, has_reset: bool, *refs):
  """One batch tile's backward recurrence, in reverse processing order. Refs: gx, w, b (as the
  forward kernel), hs (T, B_t, H_p), dys (T, B_t, H_p), dh_last (B_t, H_p), [lengths],
  [resets]; out: dgx (3, T, B_t, H_p), the cotangents of the gate inputs (of ``gx``); extra
  (T, B_t, H_p): reset_after, the candidate's recurrent product's cotangent ``r * dgx_n``;
  reset_before, the second product's input ``r * h``; dh0 (B_t, H_p)."""
  it = iter(refs)
  gx_ref, w_ref, b_ref, hs_ref, dys_ref, dhl_ref = (next(it) for _ in range(6))
  len_ref = next(it) if has_len else None
  reset_ref = next(it) if has_reset else None
  dgx_ref, extra_ref, dh0_ref = next(it), next(it), next(it)
  cell = fs.cell
  w = tuple(w_ref[g] for g in range(3))
  b = tuple(b_ref[g] for g in range(3))
  product, back, num_products = _gate_products(cell, w, b)
  lengths = len_ref[...] if has_len else None

  def load(t):
    return (hs_ref[t], tuple(gx_ref[g, t] for g in range(3)), dys_ref[t],
            reset_ref[t] if has_reset else None)

  def step(t, inputs, carry):
    dcarry, dh0 = carry
    h, gx, dy, reset = inputs
    if has_len:
      valid = t < lengths
      dnew = jnp.where(valid, dcarry + dy, jnp.zeros_like(dy))
      dskip = jnp.where(valid, jnp.zeros_like(dy), dcarry)
    else:
      dnew, dskip = dcarry + dy, None

    # The step with each product's output shifted by ``e`` (zero) and its input held: the VJP
    # is then elementwise, and the products' own transposes are made below, explicitly.
    def step(h, gx, e):
      ins = []

      def given(k, a):
        ins.append(a)
        return tuple(o + d for o, d in zip(product(k, jax.lax.stop_gradient(a)), e[k]))

      return cell._recur_with(h, gx, given), tuple(ins)

    zeros = jnp.zeros_like(h)
    e0 = ((zeros,) * 3,) if num_products == 1 else ((zeros,) * 2, (zeros,))
    (_, ins), vjp = jax.vjp(step, h, gx, e0)
    no_ins = tuple(jnp.zeros_like(a) for a in ins)
    dh, dgx, de = vjp((dnew, no_ins))
    if num_products == 2:  # reset_before: the second product's input r * h reaches h and r
      da1 = back(1, de[1])
      dh2, dgx2, de2 = vjp((zeros, (zeros, da1)))
      dh = dh + dh2
      dgx = tuple(p + q for p, q in zip(dgx, dgx2))
      de = (tuple(p + q for p, q in zip(de[0], de2[0])), de[1])
      extra = ins[1]
    else:
      extra = de[0][2]
    dh = dh + back(0, de[0])
    if dskip is not None:
      dh = dh + dskip
    for g in range(3):
      dgx_ref[g, t] = dgx[g]
    extra_ref[t] = extra
    if has_reset:
      r = reset > 0
      dh0 = dh0 + jnp.where(r, dh, zeros)
      dh = jnp.where(r, zeros, dh)
    return dh, dh0

  dcarry, dh0 = _pipelined(steps, not fs.reverse, load, step,
                           (dhl_ref[...], jnp.zeros_like(dhl_ref[...])))
  dh0_ref[...] = dh0 + dcarry

# -- around the kernels ---------------------------------------------------------------------------


def _gate_major_weights(fs: _Fused, params):
  """``w_h`` as three (H_p, H_p) gate blocks in the product dtype, the biases as (3, 1, H_p)."""
  cell = fs.cell
  h, hp = cell.hidden_size, fs.hidden_p
  w = jnp.transpose(params["w_h"].reshape((h, 3, h)), (1, 0, 2)).astype(cell.compute_dtype)
  w = jnp.pad(w, ((0, 0), (0, hp - h), (0, hp - h)))
  if "b_h" in params:
    b = params["b_h"].astype(cell.state_dtype).reshape((3, 1, h))
  else:
    b = jnp.zeros((3, 1, h), cell.state_dtype)
  return w, jnp.pad(b, ((0, 0), (0, 0), (0, hp - h)))


def _einsum(cell: GRUConfig, spec: str, a, b):
  """One large product in the cell's product dtype and precision, accumulated in the state's."""
  cd = cell.compute_dtype
  return jnp.einsum(spec, a.astype(cd), b.astype(cd), precision=cell.precision,
                    preferred_element_type=cell.state_dtype)


def _project(fs: _Fused, params, xs_TBI):
  """The input projection of all steps, gate-major: (3, T, B, H), one product."""
  cell = fs.cell
  h = cell.hidden_size
  gx = _einsum(cell, "tbi,igh->gtbh", xs_TBI, params["w_x"].reshape((-1, 3, h)))
  if "b_x" in params:
    gx = gx + params["b_x"].astype(gx.dtype).reshape((3, 1, 1, h))
  return gx


def _masks(fs: _Fused, batch_p: int, lengths_B, resets_TB):
  """The masks as the kernels read them: lengths (B_p, 1), resets (T, B_p, 1), int32; padded
  rows get length 0 and no resets."""
  out = []
  if lengths_B is not None:
    lengths = jnp.asarray(lengths_B).astype(jnp.int32)
    out.append(jnp.pad(lengths, (0, batch_p - lengths.shape[0]))[:, None])
  if resets_TB is not None:
    r = resets_TB.astype(jnp.int32)
    out.append(jnp.pad(r, ((0, 0), (0, batch_p - r.shape[1])))[:, :, None])
  return out


def _specs(fs: _Fused, steps: int, lengths_B, resets_TB):
  bt, hp = fs.block_batch, fs.hidden_p
  gates = pl.BlockSpec((3, steps, bt, hp), lambda i: (0, 0, i, 0))
  seq = pl.BlockSpec((steps, bt, hp), lambda i: (0, i, 0))
  state = pl.BlockSpec((bt, hp), lambda i: (i, 0))
  whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  masks = []
  if lengths_B is not None:
    masks.append(pl.BlockSpec((bt, 1), lambda i: (i, 0)))
  if resets_TB is not None:
    masks.append(pl.BlockSpec((steps, bt, 1), lambda i: (0, i, 0)))
  return gates, seq, state, whole((3, hp, hp)), whole((3, 1, hp)), masks


def _triton(hidden_p: int):
  """On a GPU, the Triton lowering: its blocks are pointers into GPU memory, read one step at a
  time, where Mosaic GPU (Pallas's default there) would copy the whole sequence's blocks into
  shared memory. 4 warps per batch tile (8 from H_p = 128: ``w_h`` is held in registers, 3 H_p^2
  values over the warps' threads); no software pipelining by Triton (each step waits for
  the one before; :func:`_pipelined` reads a step's inputs ahead by hand). Triton is deprecated
  in Pallas since JAX 0.11 (:func:`fused_limit` falls back where it is gone)."""
  if pl_triton is None:
    return None
  return pl_triton.CompilerParams(num_warps=4 if hidden_p <= 64 else 8, num_stages=1)


def _forward(fs: _Fused, params, xs_TBI, h0_BH, lengths_B, resets_TB):
  """``(ys (T, B, H), h_last (B, H))`` by the forward kernel."""
  cell = fs.cell
  steps, batch = xs_TBI.shape[:2]
  h, hp, bt = cell.hidden_size, fs.hidden_p, fs.block_batch
  batch_p = -(-batch // bt) * bt
  sd = cell.state_dtype
  gx = jnp.pad(_project(fs, params, xs_TBI),
               ((0, 0), (0, 0), (0, batch_p - batch), (0, hp - h)))
  w, b = _gate_major_weights(fs, params)
  h0 = jnp.pad(h0_BH.astype(sd), ((0, batch_p - batch), (0, hp - h)))
  masks = _masks(fs, batch_p, lengths_B, resets_TB)
  gates, seq, state, w_spec, b_spec, mask_specs = _specs(fs, steps, lengths_B, resets_TB)
  kernel = functools.partial(_fwd_kernel, fs, steps, lengths_B is not None,
                             resets_TB is not None)
  ys, h_last = pl.pallas_call(
      kernel, grid=(batch_p // bt,),
      out_shape=[jax.ShapeDtypeStruct((steps, batch_p, hp), sd),
                 jax.ShapeDtypeStruct((batch_p, hp), sd)],
      in_specs=[gates, w_spec, b_spec, state, *mask_specs], out_specs=[seq, state],
      interpret=fs.interpret, compiler_params=_triton(hp),
      name="jaxgru_fused_forward")(gx, w, b, h0, *masks)
  return ys[:, :batch, :h], h_last[:batch, :h]


def _starting_states(fs: _Fused, ys_TBH, h0_BH, lengths_B, resets_TB):
  """Each step's starting state (T, B, H), after any reset, from the outputs: the output one step
  earlier in processing order, or ``h0`` at a sequence's first valid step (t = 0 forward,
  t = length - 1 in reverse) and where the step's reset flag is set. (A step past a sequence's
  length gets a state that does not matter: its cotangents are zero.)"""
  steps = ys_TBH.shape[0]
  first = h0_BH[None].astype(ys_TBH.dtype)
  if fs.reverse:
    hs = jnp.concatenate([ys_TBH[1:], first])
    if lengths_B is not None:
      start = jnp.arange(steps, dtype=jnp.int32)[:, None] + 1 >= lengths_B[None, :]
      hs = jnp.where(start[:, :, None], first, hs)
  else:
    hs = jnp.concatenate([first, ys_TBH[:-1]])
  if resets_TB is not None:
    hs = jnp.where(resets_TB[:, :, None], first, hs)
  return hs


def _backward(fs: _Fused, params, xs_TBI, h0_BH, lengths_B, resets_TB, ys, dys, dh_last):
  """The backward kernel: ``(dgx (3, T, B, H), extra (T, B, H), dh0 (B, H), hs (T, B, H))``
  (see :func:`_bwd_kernel`; ``hs`` the starting states) for the cotangents ``dys`` (T, B, H) and
  ``dh_last`` (B, H) of the outputs ``ys``. The gate inputs are projected again (one product)."""
  cell = fs.cell
  steps, batch = xs_TBI.shape[:2]
  h, hp, bt = cell.hidden_size, fs.hidden_p, fs.block_batch
  batch_p = -(-batch // bt) * bt
  sd = cell.state_dtype
  pad = ((0, 0), (0, batch_p - batch), (0, hp - h))
  gx = jnp.pad(_project(fs, params, xs_TBI), ((0, 0),) + pad)
  hs = _starting_states(fs, ys, h0_BH, lengths_B, resets_TB)
  dys = jnp.pad(dys.astype(sd), pad)
  dh_last = jnp.pad(dh_last.astype(sd), pad[1:])
  w, b = _gate_major_weights(fs, params)
  masks = _masks(fs, batch_p, lengths_B, resets_TB)
  gates, seq, state, w_spec, b_spec, mask_specs = _specs(fs, steps, lengths_B, resets_TB)
  kernel = functools.partial(_bwd_kernel, fs, steps, lengths_B is not None,
                             resets_TB is not None)
  dgx, extra, dh0 = pl.pallas_call(
      kernel, grid=(batch_p // bt,),
      out_shape=[jax.ShapeDtypeStruct(gx.shape, sd),
                 jax.ShapeDtypeStruct((steps, batch_p, hp), sd),
                 jax.ShapeDtypeStruct((batch_p, hp), sd)],
      in_specs=[gates, w_spec, b_spec, seq, seq, state, *mask_specs],
      out_specs=[gates, seq, state],
      interpret=fs.interpret, compiler_params=_triton(hp), name="jaxgru_fused_backward")(
          gx, w, b, jnp.pad(hs, pad), dys, dh_last, *masks)
  return dgx[:, :, :batch, :h], extra[:, :batch, :h], dh0[:batch, :h], hs


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _cotangents(fs: _Fused, live, params, xs_TBI, h0_BH, lengths_B, resets_TB, ys, dys,
                dh_last):
  """The cotangents of the live tangents (of params, xs, h0: ``live`` says which), as a tuple,
  from the backward kernel and one large product per weight. The gates' inputs add
  (``gx_g + gh_g``) except reset_after's candidate (``gx_n + r * gh_n``), so the products'
  cotangents are those of ``gx`` but there. Its own derivative (second derivatives) is the
  sequential loop's (:func:`_cotangents_jvp`)."""
  cell = fs.cell
  dgx, extra, dh0, hs = _backward(fs, params, xs_TBI, h0_BH, lengths_B, resets_TB, ys, dys,
                                  dh_last)
  out = []
  if live[0]:
    h = cell.hidden_size
    grads = {"w_x": _einsum(cell, "tbi,gtbh->igh", xs_TBI, dgx).reshape((-1, 3 * h))}
    if cell.variant == "reset_after":
      dgh = jnp.stack([dgx[0], dgx[1], extra])
      grads["w_h"] = _einsum(cell, "tbk,gtbh->kgh", hs, dgh).reshape((h, 3 * h))
    else:
      zr = _einsum(cell, "tbk,gtbh->kgh", hs, dgx[:2]).reshape((h, 2 * h))
      grads["w_h"] = jnp.concatenate([zr, _einsum(cell, "tbk,tbh->kh", extra, dgx[2])], axis=1)
      dgh = None
    if "b_x" in params:
      grads["b_x"] = jnp.sum(dgx, axis=(1, 2)).reshape((3 * h,))
    if "b_h" in params:
      grads["b_h"] = jnp.sum(dgh, axis=(1, 2)).reshape((3 * h,))
    out.append({k: grads[k].astype(params[k].dtype) for k in params})
  if live[1]:
    w_x = params["w_x"].reshape((-1, 3, cell.hidden_size))
    out.append(_einsum(cell, "gtbh,igh->tbi", dgx, w_x).astype(xs_TBI.dtype))
  if live[2]:
    out.append(dh0.astype(h0_BH.dtype))
  return tuple(out)


def _sequential_vjp(fs: _Fused, live, params, xs, h0, lengths, resets, dys, dh_last):
  """What :func:`_cotangents` computes, by the sequential loop's derivative."""
  run, live_primals = _sequential_in_live(fs, live, (params, xs, h0), lengths, resets)
  _, vjp = jax.vjp(run, *live_primals)
  return tuple(vjp((dys, dh_last)))


def _sequential_in_live(fs: _Fused, live, primals, lengths, resets):
  """The sequential layer as a function of the live ones among ``primals`` (params, xs, h0),
  the others held fixed; and those live primals."""
  live_idx = [i for i in range(3) if live[i]]

  def run(*values):
    full = list(primals)
    for i, v in zip(live_idx, values):
      full[i] = v
    return _layer_jvp(fs.seq, full[0], full[1], full[2], lengths, resets)

  return run, [primals[i] for i in live_idx]


@_cotangents.defjvp
def _cotangents_jvp(fs, live, primals, tangents):
  params, xs, h0, lengths, resets, _, dys, dh_last = primals
  dparams, dxs, dh0, _, _, _, ddys, ddh_last = tangents
  out = _cotangents(fs, live, *primals)
  _, dout = jax.jvp(
      lambda p, x, h, a, b: _sequential_vjp(fs, live, p, x, h, lengths, resets, a, b),
      (params, xs, h0, dys, dh_last), (dparams, dxs, dh0, ddys, ddh_last))
  return out, dout

# -- the tangent primitive: sequential forward mode, fused reverse mode ---------------------------


_tangent_p = Primitive("jaxgru_fused_tangent")
_tangent_p.multiple_results = True


def _tangent_base(fs: _Fused, tree, live, *args):
  """The tangents ``(dys, dh_last)`` by the sequential loop's JVP (forward mode's fallback)."""
  (params, xs, h0, lengths, resets, _), tans = jax.tree.unflatten(tree, list(args))
  run, live_primals = _sequential_in_live(fs, live, (params, xs, h0), lengths, resets)
  _, out = jax.jvp(run, live_primals, list(tans))
  return list(out)


def _vmapped(fn, times: int):
  for _ in range(times):
    fn = jax.vmap(fn)
  return fn


def _tangent_impl(*args, fs, tree, live, vmapped):
  return _vmapped(functools.partial(_tangent_base, fs, tree, live), vmapped)(*args)


def _tangent_abstract(*args, fs, tree, live, vmapped):
  del live, vmapped
  (_, xs, h0, _, _, _), _ = jax.tree.unflatten(tree, list(args))
  h = fs.cell.hidden_size
  sd = fs.cell.state_dtype
  return [jax.core.ShapedArray(xs.shape[:-1] + (h,), sd), jax.core.ShapedArray(h0.shape, sd)]


def _tangent_transpose(cts, *args, fs, tree, live, vmapped):
  """Reverse mode: the backward kernel, for the cotangents ``cts`` of ``(ys, h_last)``."""
  res_tree, _ = jax.tree_util.treedef_children(tree)
  n_res = res_tree.num_leaves
  res = args[:n_res]
  (_, xs, h0, _, _, _) = jax.tree.unflatten(res_tree, list(res))
  dys, dh_last = cts
  sd = fs.cell.state_dtype
  if type(dys) is ad.Zero:  # pylint: disable=unidiomatic-typecheck
    dys = jnp.zeros(xs.shape[:-1] + (fs.cell.hidden_size,), sd)
  if type(dh_last) is ad.Zero:  # pylint: disable=unidiomatic-typecheck
    dh_last = jnp.zeros(h0.shape, sd)

  def base(*res_and_cts):
    res = jax.tree.unflatten(res_tree, list(res_and_cts[:-2]))
    return jax.tree.leaves(_cotangents(fs, live, *res, *res_and_cts[-2:]))

  cots = _vmapped(base, vmapped)(*res, dys, dh_last)
  return [None] * n_res + list(cots)


def _tangent_batch(args, dims, *, fs, tree, live, vmapped):
  """Under jax.vmap: every argument gets the mapped axis first; the primitive maps over it."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  moved = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
           for a, d in zip(args, dims)]
  out = _tangent_p.bind(*moved, fs=fs, tree=tree, live=live, vmapped=vmapped + 1)
  return out, [0] * len(out)


def _tangent_jvp(primals, tangents, **params):
  """Second derivatives: the sequential rule's (this primitive's forward-mode value is)."""
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return jax.jvp(functools.partial(_tangent_impl, **params), primals, tangents)


_tangent_p.def_impl(_tangent_impl)
_tangent_p.def_abstract_eval(_tangent_abstract)
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=True))

# -- the layer ------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def fused_layer(fs: _Fused, params, xs_TBI, h0_BH, lengths_B, resets_TB):
  """``(ys (T, B, H), h_last (B, H))`` of the layer by the fused kernel. ``lengths_B`` (B,)
  int32 at most T, or None; ``resets_TB`` (T, B) booleans, the direction's reset mask
  (:func:`jaxgru.scan._reset_mask`), or None."""
  return _forward(fs, params, xs_TBI, h0_BH, lengths_B, resets_TB)


def _is_zero(t) -> bool:
  return isinstance(t, SymbolicZero)


@functools.partial(fused_layer.defjvp, symbolic_zeros=True)
def _fused_layer_jvp(fs, primals, tangents):
  params, xs, h0, lengths, resets = primals
  dparams, dxs, dh0 = tangents[:3]
  live = (not all(_is_zero(t) for t in jax.tree.leaves(dparams, is_leaf=_is_zero)),
          not _is_zero(dxs), not _is_zero(dh0))
  # The layer itself, not its kernel: differentiated again, it takes this rule again.
  ys, h_last = fused_layer(fs, params, xs, h0, lengths, resets)
  if not any(live):
    return (ys, h_last), (jnp.zeros_like(ys), jnp.zeros_like(h_last))
  if live[0]:
    dparams = jax.tree.map(lambda t, p: jnp.zeros(p.shape, p.dtype) if _is_zero(t) else t,
                           dparams, params, is_leaf=_is_zero)
  tans = tuple(t for t, on in zip((dparams, dxs, dh0), live) if on)
  leaves, tree = jax.tree.flatten(((params, xs, h0, lengths, resets, ys), tans))
  dys, dh_last = _tangent_p.bind(*leaves, fs=fs, tree=tree, live=live, vmapped=0)
  return (ys, h_last), (dys, dh_last)
