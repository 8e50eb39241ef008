"""The GRU cell: the one place where the GRU math lives.

Everything else in jaxgru (sequences, stacks, directions, the Flax and Equinox modules, the
tasks) is a thin layer over :meth:`GRUConfig.step`'s math. The one time loop,
:func:`jaxgru.scan_layer`, calls its private halves (:meth:`GRUConfig._project_inputs` and
:meth:`GRUConfig._recur_with`), which let it do the input projection of many time steps in one
matrix product outside the loop and take the weight gradients of all steps at once.

Gates are stored fused, in the order ``z | r | n`` (update, reset, candidate), the Keras order.
For one example with input ``x`` (I,) and state ``h`` (H,)::

  gx = x @ w_x + b_x                          (3H,)  input projection
  z  = ract(gx_z + h @ w_h_z + b_h_z)                update gate
  r  = ract(gx_r + h @ w_h_r + b_h_r)                reset gate

  reset_after  (PyTorch, cuDNN, Keras reset_after=True, Flax):
    n = act(gx_n + r * (h @ w_h_n + b_h_n))
  reset_before (Cho et al. 2014, Keras reset_after=False; no recurrent bias):
    n = act(gx_n + (r * h) @ w_h_n)

  h' = (1 - z) * n + z * h

with ``act`` = tanh and ``ract`` = sigmoid by default.

Parameters (a dict of arrays; ``use_bias=False`` drops the biases):

  ``w_x``  (I, 3H)   input kernel
  ``w_h``  (H, 3H)   recurrent kernel
  ``b_x``  (3H,)     input bias
  ``b_h``  (3H,)     recurrent bias, reset_after only
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxgru import activations as _act

Params = dict[str, jax.Array]

VARIANTS = ("reset_after", "reset_before")
INITIALIZERS = ("keras", "pytorch")  # the first is the default of every ``init``
# Levels of jax.lax.Precision, most exact first; the first is GRUConfig's default.
PRECISIONS = ("highest", "high", "default")


def field_default(cls: type, name: str) -> Any:
  """The default of dataclass field ``name`` of ``cls``.

  Modules and entry points that expose a config's fields (the Flax modules, ``run.py``) read
  their defaults here, so each default is written once, in the config that owns it.
  """
  for field in dataclasses.fields(cls):
    if field.name == name:
      if field.default is dataclasses.MISSING:
        raise ValueError(f"{cls.__name__}.{name} has no default")
      return field.default
  raise ValueError(f"{cls.__name__} has no field {name!r}")


def default_float_dtype() -> np.dtype:
  """float32, or float64 when JAX's x64 mode is on."""
  return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_flag(name: str, value: Any, optional: bool = False) -> None:
  """Raises ValueError unless ``value`` is a bool (or None, where ``optional``): a string such as
  ``"no"`` would otherwise act as True."""
  if not (isinstance(value, (bool, np.bool_)) or (optional and value is None)):
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _as_dtype(name: str, value: Any) -> Optional[np.dtype]:
  if value is None:
    return None
  try:
    dtype = np.dtype(jnp.dtype(value))
  except TypeError:
    raise ValueError(f"{name} must be a floating dtype, got {value!r}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype, got {dtype}")
  return dtype


def narrowed_dtype(dtype: Any) -> Optional[np.dtype]:
  """The narrower dtype JAX would silently hold ``dtype`` as (float32 for float64 while x64 mode
  is off), or None where JAX holds it as it is."""
  narrowed = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  return None if narrowed == np.dtype(dtype) else narrowed


def _available(name: str, dtype: np.dtype) -> np.dtype:
  """``dtype`` itself, or ValueError where JAX would silently compute in a narrower one."""
  if (narrowed := narrowed_dtype(dtype)) is not None:
    raise ValueError(f"{name}={dtype} needs JAX's x64 mode, which is off (JAX would use "
                     f"{narrowed}): call jax.config.update('jax_enable_x64', True) first, or use "
                     f"float32")
  return dtype


def _as_precision(value: Any) -> Optional[str]:
  """A ``jax.lax.Precision`` level (or one of its names and aliases) as its lowercase name."""
  if value is None:
    return None
  if isinstance(value, jax.lax.Precision):
    return value.name.lower()
  if isinstance(value, str):
    try:
      return jax.lax.Precision(value.lower()).name.lower()
    except ValueError:
      pass
  raise ValueError(f"precision must be one of {PRECISIONS} (or a jax.lax.Precision, or None), "
                   f"got {value!r}")


def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
  """``y + b`` with ``b`` broadcast over the leading axes of ``y`` explicitly."""
  return y + jnp.reshape(b, (1,) * (y.ndim - b.ndim) + b.shape)


def check_shape(what: str, x: Any, expected: tuple[Optional[int], ...], names: str) -> Any:
  """``x``, checked: raises ValueError unless its shape matches ``expected`` (None matches any
  size) and it holds real numbers (a cast to the GRU's real dtype would drop a complex value's
  imaginary part). A nested list or a scalar is returned as a JAX array; NumPy and JAX arrays
  (and abstract ones, ``jax.ShapeDtypeStruct``) as they are."""
  try:
    shape = tuple(np.shape(x))
  except ValueError:  # NumPy's error for a ragged nested list
    raise ValueError(f"{what}: expected shape {names}, got a ragged nested sequence") from None
  ok = len(shape) == len(expected) and all(
      e is None or e == s for e, s in zip(expected, shape))
  if not ok:
    raise ValueError(f"{what}: expected shape {names}, got {shape}")
  if not isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
    try:
      x = jnp.asarray(x)
    except TypeError:  # strings, objects: no numeric dtype
      raise ValueError(f"{what}: expected numbers, got {type(x).__name__}") from None
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"{what}: expected real numbers, got dtype {x.dtype} (pass the "
                     f"real and imaginary parts as separate features)")
  if not (jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.bool_)):
    raise ValueError(f"{what}: expected numbers, got {type(x).__name__} of dtype {x.dtype}")
  return x


def check_key(what: str, key: Any) -> None:
  """Raises TypeError unless ``key`` is a PRNG key: a typed key (``jax.random.key``) or a raw
  uint32 one (``jax.random.PRNGKey``), whose shape JAX itself checks."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                            or (np.dtype(dtype) == np.uint32 and np.ndim(key) >= 1)):
    return
  got = type(key).__name__ if dtype is None else f"{type(key).__name__} of dtype {dtype}"
  raise TypeError(f"{what}: expected a PRNG key, such as jax.random.key(0), got {got}")


# The time loop lives a layer above the cell (jaxgru.scan, which imports this module), so the
# cell does not import it: the loop hands :meth:`GRUConfig.sequence` its one-sequence runner here
# when it is imported, and ``import jaxgru`` imports it.
_sequence_loop: Optional[Callable[..., tuple[jax.Array, jax.Array]]] = None


def set_sequence_loop(run: Callable[..., tuple[jax.Array, jax.Array]]) -> None:
  """Installs the function behind :meth:`GRUConfig.sequence`: ``run(cell, params, xs, h0,
  length, reverse, unroll) -> (ys, h_last)`` (:func:`jaxgru.scan.sequence`; the loop layer
  calls this once, on import)."""
  global _sequence_loop
  _sequence_loop = run


@dataclasses.dataclass(frozen=True)
class GRUConfig:
  """Static, hashable description of one GRU cell; pass it to ``jax.jit`` as a static argument.

  Attributes:
    input_size: I, features per time step.
    hidden_size: H, size of the state.
    variant: ``"reset_after"`` (default; PyTorch/cuDNN/Keras/Flax) or ``"reset_before"``
      (Cho et al. 2014, Keras ``reset_after=False``).
    activation: candidate activation ``act``, a name from ``jaxgru.ACTIVATIONS`` or a callable.
    recurrent_activation: gate activation ``ract``, likewise (``"hard_sigmoid"`` is Keras's).
    use_bias: whether the cell has biases.
    param_dtype: dtype of the parameters and of the state; None means float32 (float64 in x64
      mode).
    dtype: dtype of the matrix products (for instance bfloat16, accumulated in ``param_dtype``);
      None means ``param_dtype``.
    precision: how exactly accelerators compute the matrix products, a ``jax.lax.Precision``
      level. ``"highest"`` (the default): in the full precision of ``dtype`` on every backend,
      so float32 parameters give float32 products on a GPU as on the CPU. ``"high"`` or
      ``"default"``: faster and less exact where the hardware offers it (TensorFloat-32, a
      10-bit mantissa, on NVIDIA GPUs since Ampere; bfloat16 passes on TPUs). None: whatever
      ``jax.default_matmul_precision`` says (JAX's own default is ``"default"``). The CPU
      computes float32 products in float32 at every level. Aliases (``"float32"``,
      ``"tensorfloat32"``, ``"bfloat16"``) are stored as the level they name.
  """

  input_size: int
  hidden_size: int
  variant: str = "reset_after"
  activation: _act.Activation = "tanh"
  recurrent_activation: _act.Activation = "sigmoid"
  use_bias: bool = True
  param_dtype: Any = None
  dtype: Any = None
  precision: Optional[str] = PRECISIONS[0]

  def __post_init__(self):
    _positive_int("input_size", self.input_size)
    _positive_int("hidden_size", self.hidden_size)
    if self.variant not in VARIANTS:
      raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
    check_flag("use_bias", self.use_bias)
    _act.resolve(self.activation)
    _act.resolve(self.recurrent_activation)
    object.__setattr__(self, "param_dtype", _as_dtype("param_dtype", self.param_dtype))
    object.__setattr__(self, "dtype", _as_dtype("dtype", self.dtype))
    object.__setattr__(self, "precision", _as_precision(self.precision))

  # -- dtypes -------------------------------------------------------------------------------------

  @property
  def state_dtype(self) -> np.dtype:
    """dtype of the parameters and the state (``param_dtype`` resolved).

    Raises ValueError for a 64-bit dtype while JAX's x64 mode is off, where JAX would make the
    arrays float32 instead (checked when used, so a config made before x64 is turned on works).
    """
    if self.param_dtype is None:
      return default_float_dtype()
    return _available("param_dtype", self.param_dtype)

  @property
  def compute_dtype(self) -> np.dtype:
    """dtype of the matrix products (``dtype`` resolved; checked as ``state_dtype`` is)."""
    return _available("dtype", self.dtype) if self.dtype is not None else self.state_dtype

  def _dot(self, a: jax.Array, w: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    return jnp.matmul(a.astype(cd), w.astype(cd), precision=self.precision,
                      preferred_element_type=self.state_dtype)

  # -- parameters ---------------------------------------------------------------------------------

  def param_shapes(self) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter, by name."""
    i, h = self.input_size, self.hidden_size
    shapes = {"w_x": (i, 3 * h), "w_h": (h, 3 * h)}
    if self.use_bias:
      shapes["b_x"] = (3 * h,)
      if self.variant == "reset_after":
        shapes["b_h"] = (3 * h,)
    return shapes

  def init(self, key: jax.Array, initializer: str = INITIALIZERS[0]) -> Params:
    """Returns fresh parameters.

    Args:
      key: a PRNG key.
      initializer: ``"keras"`` (Glorot-uniform ``w_x``, orthogonal ``w_h``, zero biases, as Keras
        and Flax) or ``"pytorch"`` (everything uniform in ``±1/sqrt(H)``, as ``torch.nn.GRU``).

    Returns:
      A dict of arrays with the shapes of :meth:`param_shapes`, in ``state_dtype``.
    """
    check_key("GRU init key", key)
    if initializer not in INITIALIZERS:
      raise ValueError(f"initializer must be one of {INITIALIZERS}, got {initializer!r}")
    dtype = self.state_dtype
    shapes = self.param_shapes()
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    if initializer == "pytorch":
      k = 1.0 / math.sqrt(self.hidden_size)
      return {n: jax.random.uniform(keys[n], s, dtype, -k, k) for n, s in shapes.items()}
    params = {
        "w_x": jax.nn.initializers.glorot_uniform()(keys["w_x"], shapes["w_x"], dtype),
        # The QR behind orthogonal has no half-precision kernel: draw in float32, then cast.
        "w_h": jax.nn.initializers.orthogonal()(
            keys["w_h"], shapes["w_h"], dtype if dtype.itemsize >= 4 else np.float32
        ).astype(dtype),
    }
    for n in ("b_x", "b_h"):
      if n in shapes:
        params[n] = jnp.zeros(shapes[n], dtype)
    return params

  def check_params(self, params: Params) -> None:
    """Raises ValueError unless ``params`` has exactly the expected names and shapes."""
    shapes = self.param_shapes()
    if not isinstance(params, Mapping) or set(params) != set(shapes):
      got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
      raise ValueError(f"GRU params: expected keys {sorted(shapes)}, got {got}")
    for n, s in shapes.items():
      value = check_shape(f"GRU params[{n!r}]", params[n], s, str(s))
      if not jnp.issubdtype(value.dtype, jnp.floating):
        # An integer or boolean weight is a mistake (a cast would run it as given, rounded).
        raise ValueError(f"GRU params[{n!r}]: expected floating-point numbers, got dtype "
                         f"{value.dtype}")

  # -- the math -----------------------------------------------------------------------------------

  def _project_inputs(self, params: Params, x: jax.Array, terms: bool = False) -> jax.Array:
    """Input projection ``gx = x @ w_x + b_x``: (..., I) -> (..., 3H).

    Applied to a whole sequence (T, I) it is one matrix product for all time steps. ``terms``:
    the same sum written as I multiply-adds ``x[..., i:i+1] * w_x[i]`` (each factor rounded to
    the compute dtype, the sum in the state dtype, as the product accumulates), which XLA fuses
    into the elementwise work that follows instead of running a product of its own.
    """
    if terms:
      sd, cd = self.state_dtype, self.compute_dtype
      xs, w = x.astype(cd).astype(sd), params["w_x"].astype(cd).astype(sd)
      w = w.reshape((1,) * (x.ndim - 1) + w.shape)
      gx = xs[..., 0:1] * w[..., 0, :]
      for i in range(1, self.input_size):
        gx = gx + xs[..., i:i + 1] * w[..., i, :]
    else:
      gx = self._dot(x, params["w_x"])
    if self.use_bias:
      gx = add_bias(gx, params["b_x"])
    return gx

  def _recur(self, params: Params, h: jax.Array, gx: jax.Array) -> jax.Array:
    """One recurrent update from a projected input: ``h`` (H,), ``gx`` (3H,) -> ``h'`` (H,).

    Also accepts matching leading batch axes, (B, H) and (B, 3H).
    """
    return self._recur_with(h, gx, lambda k, a: self._recurrent_product(params, k, a))

  # The recurrent matrix products, named so that a time loop can replay or record them: the
  # loop's derivative (jaxgru._jvp) differentiates the gates step by step but takes the weights'
  # share of these products once, over all steps, as one large matrix product.

  @property
  def _num_recurrent_products(self) -> int:
    """How many recurrent products one step makes: 1 (reset_after) or 2 (reset_before)."""
    return 1 if self.variant == "reset_after" else 2

  def _recurrent_product(self, params: Params, k: int, a: jax.Array) -> jax.Array:
    """The k-th recurrent product of a step, affine in ``a`` (..., H).

    reset_after: k=0, ``a @ w_h + b_h`` (..., 3H), ``a`` = h.
    reset_before: k=0, ``a @ w_h[:, :2H]`` (..., 2H), ``a`` = h; k=1, ``a @ w_h[:, 2H:]`` (..., H),
    ``a`` = r * h.
    """
    size = self.hidden_size
    w_h = params["w_h"]
    if self.variant == "reset_after":
      gh = self._dot(a, w_h)
      return add_bias(gh, params["b_h"]) if self.use_bias else gh
    return self._dot(a, w_h[:, : 2 * size] if k == 0 else w_h[:, 2 * size:])

  def _recur_with(self, h: jax.Array, gx: Any, product: Any) -> jax.Array:
    """:meth:`_recur` with the recurrent products computed by ``product(k, a)``.

    ``product`` stands in for :meth:`_recurrent_product` (bound to ``params``) and may return its
    result as one array or already split into gates (a tuple); ``gx`` may likewise be the tuple
    ``(gx_z, gx_r, gx_n)``. A time loop over gate-split arrays avoids slicing each step's
    columns out of a wide (T, B, 3H) array, which XLA:CPU fuses into slow element loops.
    """
    h = h.astype(self.state_dtype)
    if self.variant == "reset_after":
      return self._recur_gates(h, gx, product(0, h))[0]
    act = _act.resolve(self.activation)
    ract = _act.resolve(self.recurrent_activation)
    gx_z, gx_r, gx_n = split_gates(gx, 3)
    gh_z, gh_r = split_gates(product(0, h), 2)
    z = ract(gx_z + gh_z)
    r = ract(gx_r + gh_r)
    (gh_n,) = split_gates(product(1, r * h), 1)
    n = act(gx_n + gh_n)
    return (1.0 - z) * n + z * h

  def _recur_gates(self, h: jax.Array, gx: Any, gh: Any
                   ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """A reset_after step from its state ``h`` (..., H), projected input ``gx`` and recurrent
    product ``gh`` (each (..., 3H) or split by gate): ``(h', (z, r, n, gh_n))``, the new state
    and the gates the step's derivative needs (``gh_n`` is the candidate's recurrent product)."""
    act = _act.resolve(self.activation)
    ract = _act.resolve(self.recurrent_activation)
    gx_z, gx_r, gx_n = split_gates(gx, 3)
    gh_z, gh_r, gh_n = split_gates(gh, 3)
    z = ract(gx_z + gh_z)
    r = ract(gx_r + gh_r)
    n = act(gx_n + r * gh_n)
    return (1.0 - z) * n + z * h, (z, r, n, gh_n)

  def step(self, params: Params, h: jax.Array, x: jax.Array) -> jax.Array:
    """One GRU step for ONE example, carry first: ``h`` (H,), ``x`` (I,) -> ``h'`` (H,).

    Batch with ``jax.vmap(cfg.step, in_axes=(None, 0, 0))``; scan over time with
    ``jax.lax.scan(lambda h, x: (cfg.step(params, h, x),) * 2, h0, xs)``.
    """
    self.check_params(params)
    h = check_shape("GRU step h", h, (self.hidden_size,), f"(hidden_size={self.hidden_size},)")
    x = check_shape("GRU step x", x, (self.input_size,), f"(input_size={self.input_size},)")
    return self._recur(params, h, self._project_inputs(params, x))

  # -- one sequence -------------------------------------------------------------------------------

  def initial_state(self) -> jax.Array:
    """The zero state, (H,)."""
    return jnp.zeros((self.hidden_size,), self.state_dtype)

  def sequence(self, params: Params, xs: jax.Array, h0: Optional[jax.Array] = None,
               length: Optional[jax.Array] = None, reverse: bool = False,
               unroll: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """Runs the cell over ONE sequence: :func:`jaxgru.scan_layer` over a batch of one.

    The loop is a layer above the cell: this method calls the function that layer installs
    with :func:`set_sequence_loop` (:func:`jaxgru.scan.sequence`) when jaxgru is imported.

    ``jax.vmap`` it over many sequences, or call :func:`jaxgru.scan_layer` (or
    :meth:`RNNConfig.apply`) with the whole batch, which runs one loop for all of them.

    Args:
      params: parameters from :meth:`init`.
      xs: inputs, (T, I).
      h0: initial state, (H,); zeros when None.
      length: optional scalar valid length L (0 <= L <= T). Steps t >= L leave the state
        unchanged and output zeros, so ``h_last`` is the state after step L-1 (or after step 0
        when ``reverse``) and padding never reaches it.
      reverse: read the sequence from its end (with ``length``, from step L-1). Outputs stay in
        input order.
      unroll: how many steps ``lax.scan`` unrolls per loop iteration; None picks the
        backend's default (:class:`jaxgru.ScanOptions`).

    Returns:
      ``(ys, h_last)``: every step's state (T, H) and the final state (H,).
    """
    if _sequence_loop is None:
      raise RuntimeError("GRUConfig.sequence needs jaxgru's time loop, which 'import jaxgru' "
                         "installs (jaxgru.scan)")
    return _sequence_loop(self, params, xs, h0, length, reverse, unroll)


def split_gates(y: Any, parts: int) -> tuple[jax.Array, ...]:
  """``y`` (..., parts * H) split along its last axis, or ``y`` itself when already a tuple."""
  if isinstance(y, (tuple, list)):
    if len(y) != parts:
      raise ValueError(f"expected {parts} gate arrays, got {len(y)}")
    return tuple(y)
  return tuple(jnp.split(y, parts, axis=-1))


def check_lengths(lengths: Any, max_length: int) -> None:
  """Raises ValueError for lengths that are not signed integers, or outside [0, T] when their
  values are known (not traced).

  The dtype is static, so it is checked under ``jax.jit`` too: an unsigned dtype would wrap
  values above 2**31 into negative int32 ones and a float would be truncated, silently. Under jit
  the values themselves are not known at trace time; a length above T then behaves as T.
  """
  dtype = np.dtype(lengths.dtype) if hasattr(lengths, "dtype") else np.asarray(lengths).dtype
  if not np.issubdtype(dtype, np.signedinteger):
    raise ValueError(f"lengths must be signed integers, got dtype {dtype}")
  if isinstance(lengths, jax.core.Tracer):
    return
  values = np.asarray(lengths)
  if values.size and (values.min() < 0 or values.max() > max_length):
    raise ValueError(
        f"lengths must lie in [0, T={max_length}], got values in "
        f"[{values.min()}, {values.max()}]")
