"""Shared test setup: every test runs with strict dtype promotion and rank promotion raising.

Strict promotion makes an implicit ``float32 + bfloat16`` (or ``int + float``) an error, and
rank promotion makes an implicit ``(T, H) + (H,)`` broadcast an error, so the library has to say
what it means with explicit casts and reshapes.

The modes are set twice: globally at import, so that code run while pytest collects the tests
(parametrize arguments, module constants) sees them too, and again around every test by an
autouse fixture, so that a test that changes the global config cannot leak into the next one.
A test that needs the permissive behaviour can ask for it locally with
``with jax.numpy_dtype_promotion("standard"):``.

JAX's default matrix-product precision is set to "highest" likewise. The references the tests
compare against (plain loops, Flax and Equinox cells) then compute float32 products in float32
on a GPU too (JAX's own default there is TensorFloat-32). jaxgru is unaffected: it passes its
cell's precision to every product itself, which tests/test_precision.py checks.

The suite is compile-bound: most tests compile a few programs and run them once on tiny arrays.
So the programs the tests compile in this process are built with LLVM's optimizations off
(``--xla_backend_optimization_level=0``; XLA's default is 3), unless ``XLA_FLAGS`` already sets
that level. XLA's own passes on the program (fusion, layout, scheduling) are the same; only the
machine code of each fused kernel is less optimized, which does not change what is computed
beyond rounding. On this 2-core CPU that took the suite from 319-329 s to 217-226 s. XLA reads
``XLA_FLAGS`` once, when its backend starts, so the backend is started here and the variable is
then put back: subprocesses (run.py, the benchmarks) compile as users' programs do. A test whose
claim rests on the machine code being the default one (two different programs giving the same
bits) compiles at the default level itself: ``jax.jit(f, compiler_options=
{"xla_backend_optimization_level": 3})``.
"""

import os

_LEVEL = "--xla_backend_optimization_level"
_FLAGS = os.environ.get("XLA_FLAGS")
if _LEVEL not in (_FLAGS or ""):
  os.environ["XLA_FLAGS"] = f"{_FLAGS or ''} {_LEVEL}=0".strip()

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

jax.devices()  # the backend starts and reads XLA_FLAGS
if _FLAGS is None:
  os.environ.pop("XLA_FLAGS")
else:
  os.environ["XLA_FLAGS"] = _FLAGS

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"), \
      jax.default_matmul_precision("highest"):
    yield
