"""Renamed keyword arguments: the old names keep working for one release, with a warning.

Every front door (:func:`jaxgru.scan_layer`, :meth:`jaxgru.RNNConfig.apply` and the linen, NNX
and Equinox modules) takes the same plain keywords, ``(xs, lengths=None, h0=None, *,
resets=None, ...)``. Some of them used to take shape-suffixed ones (``xs_BTI=``,
``lengths_B=``, ``resets_BT=``, ...); :func:`renamed` maps those to the new names::

    @renamed("jaxgru.nnx.GRU", xs_BTI="xs", lengths_B="lengths", resets_BT="resets")
    def __call__(self, xs, lengths=None, h0=None, *, resets=None): ...

    model(xs_BTI=x)   # DeprecationWarning: jaxgru.nnx.GRU: xs_BTI= is deprecated ...; use xs=

Imports nothing but the standard library.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

__all__ = ("renamed",)

F = TypeVar("F", bound=Callable[..., Any])


def renamed(owner: str, **old_to_new: str) -> Callable[[F], F]:
  """Decorator: a call with an old keyword ``old=value`` runs as ``new=value``.

  Each old keyword used emits a ``DeprecationWarning`` that names the new one. Giving both the
  old and the new name, or the old name for an argument already given by position, is a
  ``TypeError``, as Python's own "got multiple values" is.

  Args:
    owner: who is called, for the messages, e.g. ``"jaxgru.scan_layer"``.
    **old_to_new: each deprecated keyword and the keyword that replaces it.
  """

  def decorate(fn: F) -> F:
    # The positions of the new names, to catch an old keyword given beside its positional value.
    names = list(_parameters(fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      for old in [k for k in kwargs if k in old_to_new]:
        new = old_to_new[old]
        if new in kwargs or (new in names and names.index(new) < len(args)):
          raise TypeError(f"{owner}: got {new} twice (as {new}= or by position, and as {old}=, "
                          f"its deprecated name)")
        warnings.warn(f"{owner}: the keyword {old}= is deprecated and will be removed in the "
                      f"next release; use {new}=", DeprecationWarning, stacklevel=2)
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

  return decorate


def _parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
  """The names of ``fn``'s positional-or-keyword parameters, in order (``self`` included)."""
  code = fn.__code__
  return code.co_varnames[:code.co_argcount]
