"""jaxgru: a functional Gated Recurrent Unit for JAX.

The GRU math is one per-example, carry-first step (:meth:`GRUConfig.step`); sequences, stacks,
directions, variable lengths and the Flax and Equinox modules are thin layers over it, and every
one of them runs time through the one loop, :func:`scan_layer`.

>>> import jax, jax.numpy as jnp, jaxgru
>>> cell = jaxgru.GRUConfig(input_size=2, hidden_size=8)
>>> params = cell.init(jax.random.key(0))
>>> h_H = cell.step(params, jnp.zeros(8), jnp.ones(2))           # one example, one step
>>> ys_TH, h_last_H = cell.sequence(params, jnp.ones((5, 2)))    # one sequence
>>> ys_TH.shape, h_last_H.shape
((5, 8), (8,))

Shape suffixes. Array names in jaxgru end in ``_`` and one capital letter per axis, in order:
``T`` time steps, ``B`` batch, ``I`` input features, ``H`` hidden units, ``F`` features of a
layer's output (H, or 2H for concatenated directions), ``N`` models, ``C`` steps of a chunk,
``K`` classes or vocabulary rows. So ``xs_TBI`` is a time-major batch of inputs, ``lengths_B``
one length per sequence and ``h0_BH`` a batch of states. Names without a suffix are scalars or
pytrees.

One calling convention. Every batched front door, :func:`scan_layer`, :meth:`RNNConfig.apply`
and the linen, NNX and Equinox modules, is called ``(xs, lengths=None, h0=None, *,
resets=None, ...)`` (the per-example Equinox call: ``(xs, length=None, h0=None, *, resets=None,
key=None)``); each docstring states the shapes. Weight converters (``from_*``, ``to_*``) are all
``jaxgru.<name>``.

``import jaxgru`` needs jax and numpy only (the Equinox converters import Equinox when called). ``jaxgru.linen`` and ``jaxgru.nnx`` need
``jaxgru[flax]``, ``jaxgru.equinox`` needs ``jaxgru[equinox]``, and the training library and the
tasks need ``jaxgru[train]``.
"""

from jaxgru._version import __version__
from jaxgru.activations import ACTIVATIONS, hard_sigmoid
from jaxgru.cell import GRUConfig, Params, default_float_dtype
from jaxgru.convert import (from_equinox, from_flax, from_keras, from_torch, to_equinox, to_flax,
                            to_flax_nnx, to_keras, to_torch)
from jaxgru.rnn import RNNConfig, StackParams
from jaxgru.scan import ScanOptions, scan_layer

__all__ = (
    "ACTIVATIONS",
    "GRUConfig",
    "Params",
    "RNNConfig",
    "ScanOptions",
    "StackParams",
    "__version__",
    "default_float_dtype",
    "from_equinox",
    "from_flax",
    "from_keras",
    "from_torch",
    "hard_sigmoid",
    "scan_layer",
    "to_equinox",
    "to_flax",
    "to_flax_nnx",
    "to_keras",
    "to_torch",
)
