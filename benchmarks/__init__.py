"""jaxgru's benchmarks: each module is an entry point, run from the repository root as a module.

  python -m benchmarks.speed --out=benchmarks/results/cpu.json

They import the installed ``jaxgru`` (``pip install -e .[bench]``, or ``PYTHONPATH=.`` from the
repository root) and never edit the import path; helpers they share live in
:mod:`benchmarks._common`, the malloc tuning in :mod:`jaxgru.training.malloc`.
"""
