"""Optional dependencies: which pip extra brings which module, and the import that says so.

``pip install jaxgru`` installs JAX and NumPy only. The Flax and Equinox modules, the training
library, the tasks and the benchmarks import their other dependencies through :func:`require`, so
that a missing one is reported as the extra to install, not as a bare ``ModuleNotFoundError``::

    nn = require("flax.linen")        # in jaxgru/linen.py
    # ImportError: jaxgru.linen needs flax.linen: pip install 'jaxgru[flax]'

This module owns :data:`EXTRAS`, the map from a dependency's top-level import name to the extra in
pyproject.toml that installs it (tests/test_packaging.py checks the two agree). It imports nothing
but the standard library.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ("EXTRAS", "require")

# top-level import name -> the extra of pyproject.toml's [project.optional-dependencies] that installs it
EXTRAS: dict[str, str] = {
    "flax": "flax",
    "equinox": "equinox",
    "optax": "train",
    "orbax": "train",
    "absl": "train",
    "matplotlib": "bench",
    "gymnax": "rl",
}


def require(module: str, extra: str | None = None, *, user: str | None = None) -> types.ModuleType:
    """Import and return ``module``; if it is not installed, raise an ImportError naming the extra.

    Args:
      module: the dotted module to import, e.g. ``"flax.linen"`` or ``"orbax.checkpoint"``.
      extra: the pip extra that installs it; by default looked up in :data:`EXTRAS` by the
        module's top-level name.
      user: who needs it, for the message; by default the calling module's ``__name__``.

    Raises:
      ImportError: ``"<user> needs <module>: pip install 'jaxgru[<extra>]'"`` when ``module`` (or
        a package above it) is missing. Any other import failure inside an installed package is
        raised as it is, since installing the extra would not fix it.
      KeyError: ``extra`` is not given and ``module`` is not in :data:`EXTRAS` (on every call).
    """
    if extra is None:
        extra = EXTRAS[module.partition(".")[0]]  # a KeyError here is a caller's mistake, found on every call
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not missing or not (module == missing or module.startswith(missing + ".")):
            raise
        if user is None:
            user = sys._getframe(1).f_globals.get("__name__", "jaxgru")
        raise ImportError(f"{user} needs {module}: pip install 'jaxgru[{extra}]'", name=module) from None
