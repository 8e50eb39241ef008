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
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _strict_promotion():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"), \
      jax.default_matmul_precision("highest"):
    yield
