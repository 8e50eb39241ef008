"""jaxgru: a functional Gated Recurrent Unit for JAX.

The GRU math is one per-example, carry-first step (:meth:`GRUConfig.step`); sequences, stacks,
directions, variable lengths and the Flax module are thin layers over it.

>>> import jax, jax.numpy as jnp, jaxgru
>>> cell = jaxgru.GRUConfig(input_size=2, hidden_size=8)
>>> params = cell.init(jax.random.key(0))
>>> h = cell.step(params, jnp.zeros(8), jnp.ones(2))           # one example, one step
>>> ys, h_last = cell.sequence(params, jnp.ones((5, 2)))      # one sequence: (T, I)
>>> ys.shape, h_last.shape
((5, 8), (8,))
"""

from jaxgru.activations import ACTIVATIONS, hard_sigmoid
from jaxgru.cell import GRUConfig, Params, default_float_dtype
from jaxgru.convert import from_flax, from_keras, from_torch, to_flax, to_keras, to_torch
from jaxgru.rnn import RNNConfig, StackParams
from jaxgru.scan import ScanOptions, scan_layer

__version__ = "0.1.0"

__all__ = (
    "ACTIVATIONS",
    "GRUConfig",
    "Params",
    "RNNConfig",
    "ScanOptions",
    "StackParams",
    "default_float_dtype",
    "from_flax",
    "from_keras",
    "from_torch",
    "hard_sigmoid",
    "scan_layer",
    "to_flax",
    "to_keras",
    "to_torch",
)
