"""The GRU implementations that benchmarks/speed.py times, all doing the same work.

Every implementation runs one GRU layer over inputs (B, T, I) to outputs (B, T, H), in float32
unless its name says otherwise. A training step is the forward pass, the mean squared error
against a fixed target (B, T, H), the backward pass and an Adam update (learning rate 1e-3); a
forward pass is the outputs alone, without gradients.

:func:`build` returns a :class:`Runner` with the compiled (or eager) step of each mode. An
implementation whose library is not installed raises :class:`Unavailable`.

jaxgru itself comes in variants named ``jaxgru[key=value,...]``: the keys are those of
:class:`jaxgru.ScanOptions` (``unroll``, ``chunk``, ``remat``, ``hoist_projection``,
``custom_vjp``, ``diagonal_backward``) plus ``dtype`` (``bfloat16``: products in bfloat16, accumulated in float32) and
``vmap`` (``vmap=True``: the old path, ``jax.vmap`` of ``GRUConfig.sequence``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from benchmarks._common import version_of

LEARNING_RATE = 1e-3

# name -> (library, is a peer). Peers are the other GRU libraries; jax_scan is a reference: a
# plain fused-gate lax.scan written out by hand, as one would without a library.
IMPLS = {
    "jaxgru": ("jaxgru", False),
    "flax_linen": ("flax", True),
    "flax_nnx": ("flax", True),
    "keras": ("keras", True),
    "torch": ("torch", True),
    "equinox": ("equinox", True),
    "jax_scan": ("jax", False),
}


class Unavailable(Exception):
  """The implementation's library is not installed (or not usable here)."""


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  time: int
  input: int
  hidden: int

  @classmethod
  def parse(cls, text: str) -> "Shape":
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    if len(parts) != 4 or min(parts) < 1:
      raise ValueError(f"a shape is BxTxIxH, four positive integers; got {text!r}")
    return cls(*parts)

  def __str__(self) -> str:
    return f"{self.batch}x{self.time}x{self.input}x{self.hidden}"

  def forward_flops(self) -> float:
    """Matrix-product FLOPs of one forward pass: 2 * B * T * (I + H) * 3H."""
    return 2.0 * self.batch * self.time * (self.input + self.hidden) * 3 * self.hidden

  def flops(self, mode: str) -> float:
    """Model FLOPs of a mode: a training step counts 3x the forward pass (forward, and the two
    products of the backward pass), the usual convention."""
    return self.forward_flops() * (3.0 if mode == "train" else 1.0)


@dataclasses.dataclass
class Runner:
  """One implementation at one shape: a callable per mode, and what was measured building it."""
  name: str
  library: str
  version: str
  peer: bool
  run: dict[str, Callable[[], Any]]
  sync: Callable[[Any], Any]
  compile_s: dict[str, Optional[float]]
  planned_bytes: dict[str, Optional[int]]
  device: str
  note: str = ""


def data(shape: Shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((shape.batch, shape.time, shape.input), dtype=np.float32)
  y = rng.standard_normal((shape.batch, shape.time, shape.hidden), dtype=np.float32)
  return x, y


def parse_impl(spec: str) -> tuple[str, dict[str, Any]]:
  """``"jaxgru[unroll=4,remat=False]"`` -> ("jaxgru", {"unroll": 4, "remat": False})."""
  if "[" not in spec:
    return spec, {}
  name, rest = spec.split("[", 1)
  if not rest.endswith("]"):
    raise ValueError(f"bad implementation {spec!r}: expected name[key=value,...]")
  options = {}
  for item in filter(None, rest[:-1].split(",")):
    key, _, value = item.partition("=")
    low = value.lower()
    if low in ("true", "false"):
      options[key] = low == "true"
    elif low in ("none", ""):
      options[key] = None
    else:
      try:
        options[key] = int(value)
      except ValueError:
        options[key] = value
  return name, options


def build(spec: str, shape: Shape, modes: tuple[str, ...], seed: int = 0,
          torch_threads: int = 0) -> Runner:
  name, options = parse_impl(spec)
  if name not in IMPLS:
    raise ValueError(f"unknown implementation {name!r}; known: {sorted(IMPLS)}")
  if options and name != "jaxgru":
    raise ValueError(f"only jaxgru takes options, got {spec!r}")
  if name == "torch":
    return _torch(spec, shape, modes, seed, torch_threads)
  builder = {"jaxgru": _jaxgru, "flax_linen": _flax_linen, "flax_nnx": _flax_nnx,
             "keras": _keras, "equinox": _equinox, "jax_scan": _jax_scan}[name]
  params, apply, library = builder(shape, seed, **options)
  return _jax_runner(spec, IMPLS[name][1], library, params, apply, shape, modes, seed)


# -- JAX implementations ---------------------------------------------------------------------------


def _jax_runner(name, peer, library, params, apply, shape, modes, seed) -> Runner:
  """The shared training step and forward pass of every JAX implementation."""
  import jax
  import jax.numpy as jnp
  import optax

  x, y = (jnp.asarray(a) for a in data(shape, seed))
  opt = optax.adam(LEARNING_RATE)

  def loss(p, x, y):
    return jnp.mean(jnp.square(apply(p, x) - y))

  def train_step(p, s, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  run, compile_s, planned = {}, {}, {}
  if "train" in modes:
    # Parameters and optimizer state are donated: updated in place, not copied.
    state = [jax.tree.map(jnp.copy, params), opt.init(params)]
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=(0, 1)).lower(state[0], state[1], x, y).compile()
    compile_s["train"] = time.perf_counter() - t0
    planned["train"] = _planned_bytes(step)

    def train(step=step, state=state):
      state[0], state[1], value = step(state[0], state[1], x, y)
      return value

    run["train"] = train
  if "forward" in modes:
    p_fwd = jax.tree.map(jnp.copy, params)
    t0 = time.perf_counter()
    fwd = jax.jit(apply).lower(p_fwd, x).compile()
    compile_s["forward"] = time.perf_counter() - t0
    planned["forward"] = _planned_bytes(fwd)
    run["forward"] = lambda fwd=fwd: fwd(p_fwd, x)
  return Runner(name, library, version_of(library) or "?", peer, run, jax.block_until_ready,
                compile_s, planned, str(jax.devices()[0]))


def _planned_bytes(compiled) -> Optional[int]:
  """XLA's buffer assignment for one call: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def _jaxgru(shape: Shape, seed: int, dtype: Optional[str] = None, vmap: bool = False,
            **options):
  import jax
  import jaxgru

  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(shape.input, shape.hidden, dtype=dtype))
  params = cfg.init(jax.random.key(seed))
  if vmap:
    cell = cfg.layer_cell(0)

    def apply(p, x):
      return jax.vmap(lambda xs: cell.sequence(p[0]["fwd"], xs)[0])(x)
  else:
    opts = jaxgru.ScanOptions(**options)

    def apply(p, x):
      return cfg.apply(p, x, options=opts)[0]

  return params, apply, "jaxgru"


def _flax_linen(shape: Shape, seed: int):
  import jax
  try:
    import flax.linen as nn
  except ImportError as e:
    raise Unavailable(str(e)) from e
  model = nn.RNN(nn.GRUCell(features=shape.hidden))
  x, _ = data(shape, seed)
  params = model.init(jax.random.key(seed), x)
  return params, model.apply, "flax"


def _flax_nnx(shape: Shape, seed: int):
  import jax.numpy as jnp
  try:
    from flax import nnx
  except ImportError as e:
    raise Unavailable(str(e)) from e
  model = nnx.RNN(nnx.GRUCell(shape.input, shape.hidden, rngs=nnx.Rngs(seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x):
    carry = jnp.zeros((x.shape[0], shape.hidden), x.dtype)  # zeros, as every other one
    return nnx.merge(graphdef, p, rest)(x, initial_carry=carry)

  return params, apply, "flax"


def _keras(shape: Shape, seed: int):
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError as e:
    raise Unavailable(str(e)) from e
  if keras.backend.backend() != "jax":
    raise Unavailable(f"keras runs on the {keras.backend.backend()} backend; set "
                      "KERAS_BACKEND=jax before anything imports keras")
  keras.utils.set_random_seed(seed)
  layer = keras.layers.GRU(shape.hidden, return_sequences=True)
  layer.build((shape.batch, shape.time, shape.input))
  trainable = [v.value for v in layer.trainable_variables]
  frozen = [v.value for v in layer.non_trainable_variables]

  def apply(p, x):
    return layer.stateless_call(p, frozen, x)[0]

  return trainable, apply, "keras"


def _equinox(shape: Shape, seed: int):
  import jax
  import jax.numpy as jnp
  try:
    import equinox as eqx
  except ImportError as e:
    raise Unavailable(str(e)) from e
  cell = eqx.nn.GRUCell(shape.input, shape.hidden, key=jax.random.key(seed))
  params, static = eqx.partition(cell, eqx.is_inexact_array)

  def apply(p, x):
    c = eqx.combine(p, static)

    def sequence(xs):  # one example, (T, I): Equinox's cells take one example
      def body(h, x_t):
        h = c(x_t, h)
        return h, h
      return jax.lax.scan(body, jnp.zeros(shape.hidden, xs.dtype), xs)[1]

    return jax.vmap(sequence)(x)

  return params, apply, "equinox"


def _jax_scan(shape: Shape, seed: int):
  """A plain fused-gate GRU (reset_after) in one lax.scan, time-major, no library."""
  import jax
  import jax.numpy as jnp
  i, h = shape.input, shape.hidden
  k = jax.random.split(jax.random.key(seed), 2)
  params = {"w_x": jax.random.normal(k[0], (i, 3 * h)) / np.sqrt(i),
            "w_h": jax.random.normal(k[1], (h, 3 * h)) / np.sqrt(h),
            "b_x": jnp.zeros(3 * h), "b_h": jnp.zeros(3 * h)}

  def apply(p, x):
    def body(s, x_t):
      gx = x_t @ p["w_x"] + p["b_x"]
      gh = s @ p["w_h"] + p["b_h"]
      z = jax.nn.sigmoid(gx[:, :h] + gh[:, :h])
      r = jax.nn.sigmoid(gx[:, h:2 * h] + gh[:, h:2 * h])
      n = jnp.tanh(gx[:, 2 * h:] + r * gh[:, 2 * h:])
      s = (1.0 - z) * n + z * s
      return s, s
    s0 = jnp.zeros((x.shape[0], h), x.dtype)
    return jnp.swapaxes(jax.lax.scan(body, s0, jnp.swapaxes(x, 0, 1))[1], 0, 1)

  return params, apply, "jax"


# -- PyTorch ---------------------------------------------------------------------------------------


def _torch(name: str, shape: Shape, modes, seed: int, threads: int = 0) -> Runner:
  try:
    import torch
  except ImportError as e:
    raise Unavailable(str(e)) from e
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(seed)
  model = torch.nn.GRU(shape.input, shape.hidden, batch_first=True).to(device)
  opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  x, y = (torch.from_numpy(a).to(device) for a in data(shape, seed))

  def train():
    opt.zero_grad(set_to_none=True)
    ys, _ = model(x)
    value = torch.nn.functional.mse_loss(ys, y)
    value.backward()
    opt.step()
    return value

  def forward():
    with torch.inference_mode():
      return model(x)[0]

  def sync(_):
    if cuda:
      torch.cuda.synchronize()

  run = {m: {"train": train, "forward": forward}[m] for m in modes}
  note = "cuDNN" if cuda else f"CPU, {torch.get_num_threads()} threads"
  return Runner(name, "torch", torch.__version__, True, run, sync,
                {m: None for m in modes}, {m: None for m in modes}, str(device), note)
