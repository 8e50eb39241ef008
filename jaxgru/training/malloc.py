"""Keep XLA:CPU's temporaries in the heap: raise glibc's malloc thresholds with ``mallopt``.

XLA:CPU allocates a compiled call's temporaries with ``malloc`` and frees them when the call
returns. Blocks above glibc's mmap threshold (128 KiB at first, raised dynamically up to 32 MiB)
are taken fresh from the kernel with ``mmap`` at every call and given back with ``munmap``, so
every call pays a page fault per 4 KiB page it touches; a heap that has shrunk below the trim
threshold pays the same. With many models trained at once (64 addition models at 64 bits,
batch 128) those faults cost more than the arithmetic: the step took 1.74 times the time of 64
single-model steps, and 0.71 times with the thresholds raised (``benchmarks/models.py``).

:func:`tune_malloc` raises the thresholds for the whole process (it is a process-wide setting,
so the library never calls it, on import or otherwise; entry points call it first thing in
``main``):

* ``M_MMAP_THRESHOLD`` (-3) to 2,000,000,000 bytes: blocks below it come from the heap, which is
  reused from call to call;
* ``M_TRIM_THRESHOLD`` (-1) to 2**31 - 1 bytes (``mallopt`` takes an ``int``): free memory at
  the top of the heap is kept for the next call rather than returned to the kernel;
* ``M_ARENA_MAX`` (-8) to 1: one heap for all threads, so memory freed by one thread is reused
  by another rather than each thread growing its own arena.

The same as ``MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000
MALLOC_ARENA_MAX=1`` in the environment, without having to set it before Python starts. Setting
any of them also turns glibc's dynamic mmap threshold off. The cost: memory freed by a call stays
in the process (its resident size does not shrink after a large call).

Opt out with ``JAXGRU_NO_MALLOPT=1`` in the environment (or ``tune_malloc(enable=False)``, which
entry points wire to a flag). A no-op, reported as such, on platforms whose C library is not glibc
(macOS, Windows, musl). Importing it sets nothing; ``run.py`` and the benchmarks call
:func:`tune_malloc` before JAX allocates anything. When it applied, it tells the time loop's
tuning (:func:`jaxgru._tuning.set_heap_reuse`), whose CPU defaults depend on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from jaxgru import _tuning

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 2_000_000_000
TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is a C int
ARENA_MAX = 1
ENV_OPT_OUT = "JAXGRU_NO_MALLOPT"


def _glibc():
  """The process's C library when it is glibc, else None."""
  if platform.system() != "Linux":
    return None
  libc_name, _ = platform.libc_ver()
  if libc_name != "glibc":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  return libc


def tune_malloc(enable: bool = True, mmap_threshold: int = MMAP_THRESHOLD,
                trim_threshold: int = TRIM_THRESHOLD, arena_max: int = ARENA_MAX) -> dict:
  """Sets glibc's malloc thresholds for this process; returns what it did.

  ``{"applied": bool, "reason": str, "settings": {name: value}}``; ``applied`` is False when
  ``enable`` is False, ``JAXGRU_NO_MALLOPT`` is set (to anything but "" or "0"), the C library
  is not glibc, or ``mallopt`` refused a value. Call it before the first large allocation (first
  thing in ``main``): blocks already mapped keep being mapped and unmapped. When it applied, the
  time loop's CPU defaults switch to those measured for a reused heap (:class:`jaxgru.ScanOptions`).
  """
  settings = {"M_MMAP_THRESHOLD": int(mmap_threshold), "M_TRIM_THRESHOLD": int(trim_threshold),
              "M_ARENA_MAX": int(arena_max)}
  if not enable:
    return {"applied": False, "reason": "disabled by the caller (flag)", "settings": {}}
  if os.environ.get(ENV_OPT_OUT, "") not in ("", "0"):
    return {"applied": False, "reason": f"{ENV_OPT_OUT} is set", "settings": {}}
  libc = _glibc()
  if libc is None:
    return {"applied": False, "reason": "not glibc: left as it is", "settings": {}}
  refused = []
  for name, option in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD),
                       ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD), ("M_ARENA_MAX", M_ARENA_MAX)):
    if libc.mallopt(option, settings[name]) != 1:
      refused.append(name)
  if refused:
    return {"applied": False, "reason": f"mallopt refused {', '.join(refused)}",
            "settings": settings}
  _tuning.set_heap_reuse(True)
  return {"applied": True, "reason": "glibc mallopt", "settings": settings}
