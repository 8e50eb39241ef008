"""The addition task's data: integers as bitstrings, and random problems made on the device.

At step t the input is the pair of bits (a_t, b_t), least significant first, and the target is
the sum bit s_t. Numbers of ``bits`` bits get one more step for the final carry, so a problem is
``x_TI`` (bits + 1, 2) and ``y_T`` (bits + 1,). Held-out problems come from a key stream
(:data:`EVAL_SALT`) that training never uses.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

EVAL_SALT = 0x5EED  # held-out problems come from a key stream training never uses


def to_bits(n: int, width: int) -> np.ndarray:
  """Non-negative integer -> (width,) uint8 bits, least significant first."""
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
    raise ValueError(f"expected a non-negative integer, got {n!r}")
  n = int(n)
  if n.bit_length() > width:
    raise ValueError(f"{n} needs {n.bit_length()} bits, more than width={width}")
  raw = n.to_bytes((width + 7) // 8 or 1, "little")
  return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:width].copy()


def from_bits(bits: Any) -> int:
  """(T,) bits, least significant first -> the integer they encode (any size)."""
  bits = np.asarray(bits).astype(np.uint8).reshape(-1)
  return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def encode(a: int, b: int, bits: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """The problem ``a + b``: inputs ``x_TI`` (T, 2) float32 and target bits ``y_T`` (T,),
  T = bits + 1.

  ``bits`` defaults to the longer operand's bit length (at least 1).
  """
  width = bits if bits is not None else max(int(a).bit_length(), int(b).bit_length(), 1)
  x_TI = np.stack([to_bits(a, width + 1), to_bits(b, width + 1)], axis=-1).astype(np.float32)
  return x_TI, to_bits(a + b, width + 1)


def random_problem(key: jax.Array, bits: int, mixed: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """ONE random problem of two ``bits``-bit numbers: ``x_TI`` (bits+1, 2) float32, ``y_T``
  (bits+1,) int32.

  ``mixed=False``: every bit uniform. ``mixed=True``: ``a`` uniform and ``b = a XOR m`` where each
  bit of m is 1 with a probability q drawn per problem from U(0, 1); m = 1 is the position where
  an incoming carry propagates, so q near 1 gives the long carry chains that uniform bits make
  rare (their longest chain grows only as log2(bits)), and q near 0 gives none. Each bit of b is
  still uniform on average.

  Batch it with ``jax.vmap(random_problem, in_axes=(0, None, None))(keys, bits, mixed)``.
  """
  if mixed:
    k_a, k_q, k_m = jax.random.split(key, 3)
    a_T = jax.random.bernoulli(k_a, 0.5, (bits,))
    m_T = jax.random.bernoulli(k_m, jax.random.uniform(k_q), (bits,))
    ab_TI = jnp.stack([a_T, a_T ^ m_T], axis=-1).astype(jnp.int32)
  else:
    ab_TI = jax.random.bernoulli(key, 0.5, (bits, 2)).astype(jnp.int32)
  ab_TI = jnp.concatenate([ab_TI, jnp.zeros((1, 2), jnp.int32)], axis=0)

  def add_bit(carry, pair):
    a, b = pair[0], pair[1]
    total = a + b + carry
    return total // 2, total % 2

  _, y_T = jax.lax.scan(add_bit, jnp.zeros((), jnp.int32), ab_TI)
  return ab_TI.astype(jnp.float32), y_T


def random_batch(key: jax.Array, batch: int, bits: int, mixed: float = 0.0
                 ) -> tuple[jax.Array, jax.Array]:
  """B independent problems: ``x_BTI`` (B, bits+1, 2), ``y_BT`` (B, bits+1).

  ``mixed`` is the fraction of the batch drawn with ``random_problem(..., mixed=True)`` (the
  last ``round(mixed * B)`` problems); the others have uniform bits. A bool means 1.0 or 0.0.
  """
  mixed = float(mixed)
  if not 0.0 <= mixed <= 1.0:
    raise ValueError(f"mixed must be a fraction in [0, 1], got {mixed}")
  keys = jax.random.split(key, batch)
  num_mixed = int(round(mixed * batch))
  parts = [jax.vmap(random_problem, in_axes=(0, None, None))(k, bits, m)
           for k, m in ((keys[:batch - num_mixed], False), (keys[batch - num_mixed:], True))
           if k.shape[0]]
  if len(parts) == 1:
    return parts[0]
  return tuple(jnp.concatenate(a) for a in zip(*parts))


def eval_batch(seed: int, bits: int, size: int) -> tuple[jax.Array, jax.Array]:
  """The ``size`` held-out problems of ``bits`` bits of a run with ``seed``: x_BTI, y_BT."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_SALT + bits)
  return random_batch(key, size, bits)
