"""The GRU implementations that benchmarks/speed.py times, all doing the same work.

Every implementation runs a GRU over inputs (B, T, I) to outputs (B, T, D*H), in float32 unless
its name says otherwise: one layer, or a stack of ``L`` layers (shape suffix ``:l<L>``), in one
direction or both (``:bi``, D = 2, the directions' outputs concatenated), over sequences of the
full length T or of variable lengths (``:var``: lengths from T/2 to T, right-padded; PyTorch packs
them into a PackedSequence, Flax passes ``seq_lengths``, Keras a mask, jaxgru ``lengths``,
Equinox and the reference loop keep the state through the padding). A training step is the
forward pass, the mean squared error against a fixed target (B, T, D*H) over the valid steps,
the backward pass and an Adam update (learning rate 1e-3); a forward pass is the outputs alone,
without gradients.

``product_loop`` is not a GRU but the least work of one with XLA's products, a bound for a loop
of them one step after another. Its forward pass: for each layer and direction, the inputs
projected in one product (B*T, I_l) x (I_l, 3H), and T steps of only ``tanh(h_t @ W)`` (B, 3H),
whose first H is the next state: the recurrent product and one transcendental per gate value,
as a GRU's step makes, without the gates' other arithmetic or the inputs' addition. Its training
step adds, per layer and direction, the backward pass's products: a loop of T steps of only
``(g_t = [d, d, d] / 2) @ W^T`` (one multiply per gate value, then the recurrent product's
transpose), the weight gradients ``X^T G`` and ``H^T G`` over all steps, and below the top layer
the inputs' cotangent ``G W_x^T``; no elementwise work besides, no recomputation, no optimizer
update. Each part is compiled alone, and they run one after another, each waited for, so the
time is their sum (with each call's dispatch, tens of microseconds: no bound at tiny shapes). It
ignores lengths (a batched loop runs every step).

:func:`build` returns a :class:`Runner` with the compiled (or eager) step of each mode. An
implementation whose library is not installed raises :class:`Unavailable`.

jaxgru itself comes in variants named ``jaxgru[key=value,...]``: the keys are those of
:class:`jaxgru.ScanOptions` (``unroll``, ``chunk``, ``remat``, ``hoist_projection``,
``custom_vjp``, ``diagonal_backward``) plus ``dtype`` (``bfloat16``: products in bfloat16, accumulated in float32),
``precision`` (:class:`jaxgru.GRUConfig`'s; ``default`` lets a GPU compute float32 products in
TensorFloat-32, as the JAX peers do by default) and
``vmap`` (``vmap=True``: the old path, ``jax.vmap`` of ``GRUConfig.sequence``) and ``heap``
(the CPU defaults traced as if the heap were reused, True, or not, False, whatever
``--mallopt`` did: :func:`jaxgru._tuning.heap_reused`). ``torch`` takes
``dtype=bfloat16``: the model under ``torch.autocast`` to bfloat16 (cuDNN's bfloat16 GRU on a GPU).
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
    "product_loop": ("jax", False),
}
# Not GRUs: lower bounds on a GRU's time, shown beside them.
BOUNDS = ("product_loop",)


class Unavailable(Exception):
  """The implementation's library is not installed (or not usable here)."""


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  time: int
  input: int
  hidden: int
  layers: int = 1
  bidirectional: bool = False
  variable: bool = False

  @classmethod
  def parse(cls, text: str) -> "Shape":
    """``BxTxIxH`` with optional suffixes ``:l<layers>``, ``:bi``, ``:var`` in any order."""
    base, *suffixes = text.lower().split(":")
    try:
      parts = [int(p) for p in base.split("x")]
    except ValueError:
      parts = []
    if len(parts) != 4 or min(parts) < 1:
      raise ValueError(f"a shape is BxTxIxH, four positive integers, then optionally :l<layers>,"
                       f" :bi, :var; got {text!r}")
    fields = {}
    for suffix in suffixes:
      if suffix == "bi":
        fields["bidirectional"] = True
      elif suffix == "var":
        fields["variable"] = True
      elif suffix.startswith("l") and suffix[1:].isdigit() and int(suffix[1:]) >= 1:
        fields["layers"] = int(suffix[1:])
      else:
        raise ValueError(f"bad shape suffix {suffix!r} in {text!r}: expected :l<layers>, :bi or "
                         ":var")
    return cls(*parts, **fields)

  def __str__(self) -> str:
    return (f"{self.batch}x{self.time}x{self.input}x{self.hidden}"
            + (":bi" if self.bidirectional else "")
            + (f":l{self.layers}" if self.layers > 1 else "")
            + (":var" if self.variable else ""))

  @property
  def directions(self) -> int:
    return 2 if self.bidirectional else 1

  @property
  def plain(self) -> bool:
    """One layer, one direction, full lengths: the shape every implementation runs."""
    return self.layers == 1 and not self.bidirectional and not self.variable

  def lengths(self, seed: int = 0) -> np.ndarray:
    """Valid lengths (B,): from T/2 to T, the longest T (right padding)."""
    rng = np.random.default_rng(seed + 1)
    out = rng.integers(max(1, self.time // 2), self.time + 1, size=self.batch)
    out[0] = self.time
    return out.astype(np.int32)

  def forward_flops(self) -> float:
    """Matrix-product FLOPs of one forward pass, over the padded length:
    sum over layers and directions of 2 * B * T * (I_l + H) * 3H."""
    total = 0.0
    for layer in range(self.layers):
      inputs = self.input if layer == 0 else self.directions * self.hidden
      total += self.directions * 2.0 * self.batch * self.time * (inputs + self.hidden) * 3 * \
          self.hidden
    return total

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
  """Inputs (B, T, I), target (B, T, D*H), lengths (B,) or None, mask (B, T, 1) float32."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((shape.batch, shape.time, shape.input), dtype=np.float32)
  y = rng.standard_normal((shape.batch, shape.time, shape.directions * shape.hidden),
                          dtype=np.float32)
  if not shape.variable:
    return x, y, None, np.ones((shape.batch, shape.time, 1), np.float32)
  lengths = shape.lengths(seed)
  mask = (np.arange(shape.time)[None, :] < lengths[:, None]).astype(np.float32)[..., None]
  return x * mask, y, lengths, mask


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
  if options and name not in ("jaxgru", "torch"):
    raise ValueError(f"only jaxgru and torch take options, got {spec!r}")
  if name == "torch":
    if set(options) - {"dtype"}:
      raise ValueError(f"torch takes only dtype, got {spec!r}")
    return _torch(spec, shape, modes, seed, torch_threads, **options)
  if name == "product_loop":
    return _product_loop(shape, modes, seed)
  builder = {"jaxgru": _jaxgru, "flax_linen": _flax_linen, "flax_nnx": _flax_nnx,
             "keras": _keras, "equinox": _equinox, "jax_scan": _jax_scan}[name]
  if not shape.plain and name in ("flax_nnx", "jax_scan"):
    raise Unavailable(f"{name} runs the one-layer, one-direction, full-length shapes only")
  params, apply, library = builder(shape, seed, **options)
  return _jax_runner(spec, IMPLS[name][1], library, params, apply, shape, modes, seed)


# -- JAX implementations ---------------------------------------------------------------------------


def _jax_runner(name, peer, library, params, apply, shape, modes, seed) -> Runner:
  """The shared training step and forward pass of every JAX implementation."""
  import jax
  import jax.numpy as jnp
  import optax

  x, y, lengths, mask = data(shape, seed)
  x, y, mask = jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)
  lengths = None if lengths is None else jnp.asarray(lengths)
  opt = optax.adam(LEARNING_RATE)
  # apply(p, x, lengths): every implementation takes the lengths (None: full length).
  forward = lambda p, x: apply(p, x, lengths)

  def loss(p, x, y):
    out = forward(p, x)
    if shape.variable:  # the valid steps only
      return jnp.sum(jnp.square(out - y) * mask) / (jnp.sum(mask) * out.shape[-1])
    return jnp.mean(jnp.square(out - y))

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
    fwd = jax.jit(forward).lower(p_fwd, x).compile()
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
            precision: Optional[str] = None, heap: Optional[bool] = None, **options):
  import jax
  import jaxgru
  from jaxgru import _tuning

  cell_options = {} if precision is None else {"precision": precision}  # None: GRUConfig's
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(shape.input, shape.hidden, dtype=dtype, **cell_options),
                         num_layers=shape.layers, bidirectional=shape.bidirectional)
  params = cfg.init(jax.random.key(seed))
  if vmap:
    if not shape.plain:
      raise Unavailable("jaxgru[vmap=True] runs the plain shapes only")
    cell = cfg.layer_cell(0)

    def apply(p, x, lengths):
      del lengths
      return jax.vmap(lambda xs: cell.sequence(p[0]["fwd"], xs)[0])(x)
  else:
    opts = jaxgru.ScanOptions(**options)

    def apply(p, x, lengths):
      if heap is None:
        return cfg.apply(p, x, lengths, options=opts)[0]
      saved = _tuning.set_heap_reuse(heap)  # the defaults are resolved while this traces
      try:
        return cfg.apply(p, x, lengths, options=opts)[0]
      finally:
        _tuning.set_heap_reuse(saved)

  return params, apply, "jaxgru"


def _flax_linen(shape: Shape, seed: int):
  """A stack of ``nn.RNN(nn.GRUCell)`` layers, each in ``nn.Bidirectional`` when bidirectional."""
  import jax
  import jax.numpy as jnp
  try:
    import flax.linen as nn
  except ImportError as e:
    raise Unavailable(str(e)) from e
  layers = []
  for _ in range(shape.layers):
    if shape.bidirectional:
      layers.append(nn.Bidirectional(nn.RNN(nn.GRUCell(features=shape.hidden)),
                                     nn.RNN(nn.GRUCell(features=shape.hidden))))
    else:
      layers.append(nn.RNN(nn.GRUCell(features=shape.hidden)))
  x, _, lengths, _ = data(shape, seed)
  params, keys = [], jax.random.split(jax.random.key(seed), shape.layers)
  h = jnp.asarray(x)
  for layer, key in zip(layers, keys):
    params.append(layer.init(key, h, seq_lengths=lengths))
    h = layer.apply(params[-1], h, seq_lengths=lengths)

  def apply(p, x, lengths):
    for layer, q in zip(layers, p):
      x = layer.apply(q, x, seq_lengths=lengths)
    return x

  return params, apply, "flax"


def _flax_nnx(shape: Shape, seed: int):
  import jax.numpy as jnp
  try:
    from flax import nnx
  except ImportError as e:
    raise Unavailable(str(e)) from e
  model = nnx.RNN(nnx.GRUCell(shape.input, shape.hidden, rngs=nnx.Rngs(seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x, lengths):
    del lengths  # plain shapes only
    carry = jnp.zeros((x.shape[0], shape.hidden), x.dtype)  # zeros, as every other one
    return nnx.merge(graphdef, p, rest)(x, initial_carry=carry)

  return params, apply, "flax"


def _keras(shape: Shape, seed: int):
  """``keras.layers.GRU`` layers (in ``Bidirectional`` when bidirectional), a mask for lengths."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError as e:
    raise Unavailable(str(e)) from e
  if keras.backend.backend() != "jax":
    raise Unavailable(f"keras runs on the {keras.backend.backend()} backend; set "
                      "KERAS_BACKEND=jax before anything imports keras")
  import jax.numpy as jnp
  keras.utils.set_random_seed(seed)
  layers, trainable, frozen = [], [], []
  width = shape.input
  for _ in range(shape.layers):
    layer = keras.layers.GRU(shape.hidden, return_sequences=True)
    if shape.bidirectional:
      layer = keras.layers.Bidirectional(layer, merge_mode="concat")
    layer.build((shape.batch, shape.time, width))
    width = shape.directions * shape.hidden
    layers.append(layer)
    trainable.append([v.value for v in layer.trainable_variables])
    frozen.append([v.value for v in layer.non_trainable_variables])

  def apply(p, x, lengths):
    mask = None if lengths is None else jnp.arange(x.shape[1])[None, :] < lengths[:, None]
    for layer, q, f in zip(layers, p, frozen):
      x = layer.stateless_call(q, f, x, mask=mask)[0] if mask is not None else \
          layer.stateless_call(q, f, x)[0]
    return x

  return trainable, apply, "keras"


def _equinox(shape: Shape, seed: int):
  """``eqx.nn.GRUCell`` in a ``lax.scan`` per example under ``vmap``, stacked by hand."""
  import jax
  import jax.numpy as jnp
  try:
    import equinox as eqx
  except ImportError as e:
    raise Unavailable(str(e)) from e
  keys = iter(jax.random.split(jax.random.key(seed), shape.layers * shape.directions))
  cells, width = [], shape.input
  for _ in range(shape.layers):
    cells.append([eqx.nn.GRUCell(width, shape.hidden, key=next(keys))
                  for _ in range(shape.directions)])
    width = shape.directions * shape.hidden
  params, static = eqx.partition(cells, eqx.is_inexact_array)

  def run(c, xs, length, reverse):
    """One example (T, F) in one direction; the state holds still past ``length``."""
    steps = jnp.arange(xs.shape[0])

    def body(h, inputs):
      x_t, t = inputs
      new = c(x_t, h)
      if length is not None:
        new = jnp.where(t < length, new, h)
      return new, new

    return jax.lax.scan(body, jnp.zeros(shape.hidden, xs.dtype), (xs, steps),
                        reverse=reverse)[1]

  def apply(p, x, lengths):
    layers = eqx.combine(p, static)

    def sequence(xs, length):
      for directions in layers:
        xs = jnp.concatenate([run(c, xs, length, reverse=d == 1)
                              for d, c in enumerate(directions)], axis=-1)
      return xs

    if lengths is None:
      return jax.vmap(lambda xs: sequence(xs, None))(x)
    return jax.vmap(sequence)(x, lengths)

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

  def apply(p, x, lengths):
    del lengths  # plain shapes only
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


def _product_loop(shape: Shape, modes, seed: int) -> Runner:
  """The bound of a forward pass and of a training step (see the module docstring). Every part
  is compiled alone, and a mode runs its parts one after the other, each waited for: their sum,
  with no overlap between them."""
  import jax
  import jax.numpy as jnp
  h, t, b = shape.hidden, shape.time, shape.batch
  keys = iter(jax.random.split(jax.random.key(seed), 3 * shape.layers * shape.directions))
  more = iter(jax.random.split(jax.random.key(seed + 1), 3 * shape.layers * shape.directions))
  forward_parts, backward_parts = [], []
  compile_s, width = {"forward": 0.0, "train": 0.0}, shape.input

  def step(s, w):
    s = jnp.tanh(s @ w)[:, :h]
    return s, s

  def loop(w, reverse):
    return jax.lax.scan(lambda s, _: step(s, w), jnp.full((b, h), 0.5), None, length=t,
                        reverse=reverse)[1]

  def back_step(d, w_t):
    g = jnp.concatenate([d, d, d], axis=-1) * 0.5  # (B, 3H): one multiply per gate value
    return g @ w_t, g

  def back_loop(w_t, reverse):
    return jax.lax.scan(lambda d, _: back_step(d, w_t), jnp.full((b, h), 0.5), None, length=t,
                        reverse=not reverse)[1]

  def weight_grads(x, states, g):  # (I, 3H) and (H, 3H) from (T*B, ...) arrays
    return x.T @ g, states.T @ g

  def compiled(fn, *args, static=()):
    t0 = time.perf_counter()
    out = jax.jit(fn, static_argnums=static).lower(*args).compile()
    return out, time.perf_counter() - t0

  for layer in range(shape.layers):
    for d in range(shape.directions):
      x = jax.random.normal(next(keys), (t * b, width))
      w_x = jax.random.normal(next(keys), (width, 3 * h)) / np.sqrt(width)
      w_h = jax.random.normal(next(keys), (h, 3 * h)) / np.sqrt(h)
      project, c1 = compiled(jnp.matmul, x, w_x)
      recur, c2 = compiled(loop, w_h, d == 1, static=(1,))
      compile_s["forward"] += c1 + c2
      forward_parts += [lambda f=project, a=(x, w_x): f(*a), lambda f=recur, w=w_h: f(w)]
      if "train" not in modes:
        continue
      w_t = jnp.array(w_h.T)
      states = jax.random.normal(next(more), (t * b, h))
      g = jax.random.normal(next(more), (t * b, 3 * h))
      back, c3 = compiled(back_loop, w_t, d == 1, static=(1,))
      grads, c4 = compiled(weight_grads, x, states, g)
      parts = [lambda f=back, w=w_t: f(w), lambda f=grads, a=(x, states, g): f(*a)]
      compile_s["train"] += c1 + c2 + c3 + c4
      if layer > 0:  # the input's cotangent, for the layer below
        w_x_t = jnp.array(w_x.T)
        input_grad, c5 = compiled(jnp.matmul, g, w_x_t)
        compile_s["train"] += c5
        parts.append(lambda f=input_grad, a=(g, w_x_t): f(*a))
      backward_parts[:0] = parts  # the backward pass runs the layers top down
    width = shape.directions * h

  def run_parts(parts):
    for part in parts:
      out = jax.block_until_ready(part())
    return out

  run = {}
  if "forward" in modes:
    run["forward"] = lambda: run_parts(forward_parts)
  if "train" in modes:
    run["train"] = lambda: run_parts(forward_parts + backward_parts)
  return Runner("product_loop", "jax", version_of("jax") or "?", False, run,
                jax.block_until_ready, {m: compile_s[m] for m in run},
                {m: None for m in run}, str(jax.devices()[0]))


# -- PyTorch ---------------------------------------------------------------------------------------


def _torch(name: str, shape: Shape, modes, seed: int, threads: int = 0,
           dtype: Optional[str] = None) -> Runner:
  """``torch.nn.GRU(num_layers=L, bidirectional=...)``; a PackedSequence for variable lengths."""
  try:
    import torch
  except ImportError as e:
    raise Unavailable(str(e)) from e
  if dtype not in (None, "float32", "bfloat16"):
    raise ValueError(f"torch dtype is float32 or bfloat16, got {dtype!r}")
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  if not cuda:
    torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(seed)
  model = torch.nn.GRU(shape.input, shape.hidden, num_layers=shape.layers,
                       bidirectional=shape.bidirectional, batch_first=True).to(device)
  opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  x, y, lengths, mask = data(shape, seed)
  x, y, mask = (torch.from_numpy(a).to(device) for a in (x, y, mask))
  lengths = None if lengths is None else torch.from_numpy(lengths.astype(np.int64))  # on the CPU
  pack = torch.nn.utils.rnn.pack_padded_sequence
  unpack = torch.nn.utils.rnn.pad_packed_sequence
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bfloat16" \
      else None

  def outputs():
    if lengths is None:
      return model(x)[0]
    packed = pack(x, lengths, batch_first=True, enforce_sorted=False)
    return unpack(model(packed)[0], batch_first=True, total_length=shape.time)[0]

  def run_model():
    if autocast is None:
      return outputs()
    with autocast():
      return outputs()

  def train():
    opt.zero_grad(set_to_none=True)
    ys = run_model().float()
    if lengths is None:
      value = torch.nn.functional.mse_loss(ys, y)
    else:
      value = ((ys - y).square() * mask).sum() / (mask.sum() * ys.shape[-1])
    value.backward()
    opt.step()
    return value

  def forward():
    with torch.inference_mode():
      return run_model()

  def sync(_):
    if cuda:
      torch.cuda.synchronize()

  run = {m: {"train": train, "forward": forward}[m] for m in modes}
  note = "cuDNN" if cuda else f"CPU, {torch.get_num_threads()} threads"
  if dtype == "bfloat16":
    note += ", bfloat16 autocast"
  return Runner(name, "torch", torch.__version__, True, run, sync,
                {m: None for m in modes}, {m: None for m in modes}, str(device), note)
