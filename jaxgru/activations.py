"""Activation functions by name, for the candidate state and the gates.

Names follow Keras where Keras defines the function (``hard_sigmoid`` is Keras 3's
``relu6(x + 3) / 6``); any callable ``f(x) -> y`` is accepted as well.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

Activation = Union[str, Callable[[jax.Array], jax.Array]]


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """Keras 3 ``hard_sigmoid``: ``clip(x / 6 + 1/2, 0, 1)``, i.e. ``relu6(x + 3) / 6``."""
  return jax.nn.relu6(x + 3.0) / 6.0


def gelu(x: jax.Array) -> jax.Array:
  """Keras's (and PyTorch's) default, exact ``gelu``: ``x * Phi(x)``, not the tanh approximation
  that ``jax.nn.gelu`` gives by default."""
  return jax.nn.gelu(x, approximate=False)


def linear(x: jax.Array) -> jax.Array:
  """The identity."""
  return x


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "relu": jax.nn.relu,
    "gelu": gelu,
    "softsign": jax.nn.soft_sign,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "linear": linear,
}


def resolve(activation: Activation) -> Callable[[jax.Array], jax.Array]:
  """Returns the function for a name in ``ACTIVATIONS`` or a callable as given.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if callable(activation):
    return activation
  if isinstance(activation, str) and activation in ACTIVATIONS:
    return ACTIVATIONS[activation]
  raise ValueError(
      f"unknown activation {activation!r}; expected one of "
      f"{sorted(ACTIVATIONS)} or a callable")


def is_elementwise(activation: Activation) -> bool:
  """Whether ``activation`` is known to act on each element alone: a name in ``ACTIVATIONS`` or
  one of their functions. Any other callable might mix elements (a softmax), so it is not."""
  try:
    return activation in ACTIVATIONS or any(activation is f for f in ACTIVATIONS.values())
  except TypeError:  # an unhashable callable
    return False
