"""Layers over the cell: batches, stacks, both directions, variable lengths, dropout.

Every function here is a thin layer over :class:`jaxgru.GRUConfig`: a batch is one time-major loop
(:func:`jaxgru.scan_layer`, equal to ``jax.vmap`` of :meth:`GRUConfig.sequence`), a stack feeds
one layer's outputs to the next, and the backward direction is the same loop with
``reverse=True``.

Parameters are a list with one dict per layer, ``{"fwd": cell_params}`` or
``{"fwd": ..., "bwd": ...}`` when bidirectional, each cell's params as in :mod:`jaxgru.cell`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru.cell import (INITIALIZERS, GRUConfig, Params, check_flag, check_key,
                         check_lengths, check_shape)
from jaxgru.scan import ScanOptions, check_options, check_resets, scan_layer

StackParams = list[dict[str, Params]]

MERGES = ("concat", "sum")
DIRECTIONS = ("fwd", "bwd")


@dataclasses.dataclass(frozen=True)
class RNNConfig:
  """Static, hashable description of a (possibly stacked, bidirectional) GRU layer.

  A stack holds ONE cell description, :class:`GRUConfig`, shared by every cell; its
  ``input_size`` is the first layer's (layer l > 0 reads ``output_size`` features). So every cell
  setting (variant, activations, bias, dtypes) is declared once, in :class:`GRUConfig`.

  >>> import jaxgru
  >>> rnn = jaxgru.RNNConfig(jaxgru.GRUConfig(8, 32), num_layers=2, bidirectional=True)
  >>> rnn.layer_cell(1).input_size, rnn.output_size
  (64, 64)

  Attributes:
    cell: the cell of the first layer: input size I, hidden size H and every cell setting.
    num_layers: L, stacked layers; layer l > 0 reads the outputs of layer l - 1.
    bidirectional: run a backward cell beside the forward one in every layer.
    merge: how the two directions' outputs are combined: ``"concat"`` (2H) or ``"sum"`` (H).
    dropout: dropout rate on the outputs of every layer but the last (as ``torch.nn.GRU``),
      applied only when :meth:`apply` is given a ``dropout_key``.
  """

  cell: GRUConfig
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.cell, GRUConfig):
      raise ValueError(f"cell must be a jaxgru.GRUConfig, got {type(self.cell).__name__}")
    if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, (int, np.integer)) \
        or self.num_layers < 1:
      raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}")
    if not isinstance(self.bidirectional, (bool, np.bool_)):
      raise ValueError(f"bidirectional must be a bool, got {self.bidirectional!r}")
    if self.merge not in MERGES:
      raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.floating)) \
        or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")

  @property
  def input_size(self) -> int:
    """I, features per time step of the input (the first layer's cell's)."""
    return self.cell.input_size

  @property
  def hidden_size(self) -> int:
    """H, the state size of every cell."""
    return self.cell.hidden_size

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  @property
  def directions(self) -> tuple[str, ...]:
    return DIRECTIONS[: self.num_directions]

  @property
  def output_size(self) -> int:
    """Features per time step of the output: 2H with concat-merged directions, else H."""
    if self.bidirectional and self.merge == "concat":
      return 2 * self.hidden_size
    return self.hidden_size

  def layer_cell(self, layer: int) -> GRUConfig:
    """The cell configuration of ``layer``: :attr:`cell` with that layer's input size."""
    if layer == 0:
      return self.cell
    return dataclasses.replace(self.cell, input_size=self.output_size)

  def init(self, key: jax.Array, initializer: str = INITIALIZERS[0]) -> StackParams:
    """Fresh parameters: a list of ``num_layers`` dicts of cell params by direction."""
    check_key("RNN init key", key)
    keys = jax.random.split(key, self.num_layers * self.num_directions)
    nd = self.num_directions
    return [{d: self.layer_cell(l).init(keys[l * nd + i], initializer) for i, d in enumerate(self.directions)}
            for l in range(self.num_layers)]

  def check_params(self, params: StackParams) -> None:
    """Raises ValueError unless ``params`` matches this configuration."""
    if not isinstance(params, (list, tuple)) or len(params) != self.num_layers:
      got = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
      raise ValueError(f"RNN params: expected a list of {self.num_layers} layers, got {got}")
    for l, layer in enumerate(params):
      if not isinstance(layer, dict) or set(layer) != set(self.directions):
        got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
        raise ValueError(f"RNN params[{l}]: expected directions {list(self.directions)}, got {got}")
      for d in self.directions:
        self.layer_cell(l).check_params(layer[d])

  def apply(self, params: StackParams, xs: jax.Array, lengths: Optional[jax.Array] = None,
            h0: Optional[jax.Array] = None, *, resets: Optional[jax.Array] = None,
            reset_state: Optional[jax.Array] = None, dropout_key: Optional[jax.Array] = None, unroll: Optional[int] = None,
            time_major: bool = False,
            options: Optional[ScanOptions] = None) -> tuple[jax.Array, jax.Array]:
    """Runs the stack over a batch of sequences.

    Each cell runs as one time-major loop over the whole batch (:func:`jaxgru.scan_layer`), with
    the same results as ``jax.vmap`` of :meth:`GRUConfig.sequence` over the batch.

    Args:
      params: from :meth:`init`.
      xs: inputs, (B, T, I); (T, B, I) when ``time_major``.
      lengths: optional valid lengths, (B,) integers in [0, T]. Each sequence's state stops
        changing after its last valid step, outputs past it are zero, and the backward direction
        starts at each sequence's own last valid step.
      h0: optional initial states, (L * D, B, H) in ``torch.nn.GRU``'s order (layer-major,
        forward before backward); zeros when None.
      resets: optional episode boundaries, (B, T) booleans ((T, B) when ``time_major``): where
        ``resets[b, t]`` is set, step t starts a new segment of sequence b, and every cell's
        state is replaced by its initial state (its row of ``h0``, zeros by default) before it;
        the backward direction reads each segment from its own last step. Each segment gives
        what the stack gives run over it alone (values and gradients). See docs/resets.md.
      reset_state: optional states a reset restores in the place of ``h0``, shaped as ``h0``
        (L * D, B, H): each sequence's first segment (the backward direction's last) starts
        from ``h0``, every later one from ``reset_state``; e.g. zeros, where a reinforcement
        learner's rollout segment continues a stored state and its new episodes start afresh
        (:func:`jaxgru.scan_layer`). Used only with ``resets``.
      dropout_key: PRNG key for dropout between layers; None (evaluation) disables dropout.
      unroll: the ``lax.scan`` unroll factor; None picks the backend's default. Shorthand for
        ``options.unroll``.
      time_major: inputs and outputs are (T, B, ...), which saves two transposes.
      options: how the time loops run (:class:`jaxgru.ScanOptions`: chunks, rematerialization,
        the custom derivative rule); None means the backend's defaults. Never changes the results.

    Returns:
      ``(ys, h_last)``: the last layer's outputs (B, T, output_size) ((T, B, output_size) when
      ``time_major``) and every cell's final state (L * D, B, H).
    """
    self.check_params(params)
    check_flag("RNN time_major", time_major)
    if dropout_key is not None:
      check_key("RNN dropout_key", dropout_key)
    names = "(T, B, input_size" if time_major else "(B, T, input_size"
    xs = check_shape("RNN xs", xs, (None, None, self.input_size), f"{names}={self.input_size})")
    if time_major:
      steps, batch = xs.shape[0], xs.shape[1]
    else:
      batch, steps = xs.shape[0], xs.shape[1]
    if lengths is not None:
      check_shape("RNN lengths", lengths, (batch,), f"(B={batch},), one per sequence")
      check_lengths(lengths, steps)
      lengths = jnp.asarray(lengths)  # a list or tuple becomes one array
    num_cells = self.num_layers * self.num_directions
    if h0 is None:
      h0 = jnp.zeros((num_cells, batch, self.hidden_size), self.cell.state_dtype)
    h0 = check_shape("RNN h0", h0, (num_cells, batch, self.hidden_size),
                     f"(L*D={num_cells}, B={batch}, H={self.hidden_size})")
    if resets is not None:
      if isinstance(resets, (list, tuple)):
        resets = jnp.asarray(resets)
      if time_major:
        check_resets(resets, (steps, batch), f"(T={steps}, B={batch}) (time_major)",
                     "RNN resets")
        resets = jnp.swapaxes(resets, 0, 1)
      else:
        check_resets(resets, (batch, steps), f"(B={batch}, T={steps})", "RNN resets")
    if reset_state is not None:
      reset_state = check_shape("RNN reset_state", reset_state,
                                (num_cells, batch, self.hidden_size),
                                f"(L*D={num_cells}, B={batch}, H={self.hidden_size}), as h0")
    options = options if options is not None else ScanOptions()
    check_options(options, "RNN options")
    if unroll is not None:
      options = dataclasses.replace(options, unroll=unroll)

    xs_TBF = xs if time_major else jnp.swapaxes(xs, 0, 1)
    finals = []
    for l, layer in enumerate(params):
      cell = self.layer_cell(l)
      outs = []
      for i, d in enumerate(self.directions):
        k = l * self.num_directions + i
        ys, hs = scan_layer(cell, layer[d], xs_TBF, lengths, h0[k], resets=resets,
                            reset_state=None if reset_state is None else reset_state[k],
                            reverse=d == "bwd", options=options)
        outs.append(ys)
        finals.append(hs)
      if len(outs) == 1:
        xs_TBF = outs[0]
      elif self.merge == "concat":
        xs_TBF = jnp.concatenate(outs, axis=-1)
      else:
        xs_TBF = outs[0] + outs[1]
      if dropout_key is not None and self.dropout > 0 and l < self.num_layers - 1:
        # Drawn batch-major whatever the layout, so a key gives the same mask either way.
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, l), 1.0 - self.dropout,
                                    (batch, steps, xs_TBF.shape[-1]))
        keep = jnp.swapaxes(keep, 0, 1)
        xs_TBF = jnp.where(keep, xs_TBF / (1.0 - self.dropout), jnp.zeros_like(xs_TBF))
    ys = xs_TBF if time_major else jnp.swapaxes(xs_TBF, 0, 1)
    return ys, jnp.stack(finals)
