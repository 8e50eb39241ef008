"""The version of jaxgru, written in this one place.

pyproject.toml reads it (setuptools' dynamic version) and ``jaxgru.__version__`` is this value.
"""

__version__ = "0.2.0"
