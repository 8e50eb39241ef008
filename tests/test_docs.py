"""The documentation runs: the README's API tour, the docstring examples, the docs site.

* The README's one ```python block is executed as it stands, and what it leaves behind is
  checked: the shapes it promises in its comments, and gradients that reach every parameter.
* Every ``>>>`` example in the public modules' docstrings runs under doctest; at least one
  example must run in all, so an import that silently finds none cannot pass.
* ``mkdocs build --strict`` builds the site when mkdocs and mkdocstrings are installed (the
  ``[docs]`` extra, part of ``[dev]``): broken links, missing pages or docstrings that mkdocstrings
  cannot render fail it.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Public modules whose docstring examples must run; the optional ones only where their module
# exists in this checkout and its framework is installed.
DOCTEST_MODULES = ("jaxgru", "jaxgru.cell", "jaxgru.rnn", "jaxgru.scan", "jaxgru.convert",
                   "jaxgru.activations", "jaxgru.linen")
OPTIONAL_DOCTEST_MODULES = (("jaxgru.nnx", "flax"), ("jaxgru.equinox", "equinox"))


def _python_blocks(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _readme_namespace() -> dict:
  blocks = _python_blocks(README)
  assert len(blocks) == 1, f"README.md should hold exactly one ```python block, found {len(blocks)}"
  namespace: dict = {"__name__": "readme_api_tour"}
  exec(compile(blocks[0], "README.md (python block)", "exec"), namespace)
  return namespace


def test_readme_quick_start_commands():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  bash_blocks = re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)
  for command in (
      'python3 -m venv .venv && .venv/bin/pip install -e ".[train]" && .venv/bin/python run.py',
      'python3 -m venv .venv && .venv/bin/pip install -e ".[dev,rl]" && .venv/bin/python -m pytest -q',
  ):
    assert command + "\n" in bash_blocks, f"README.md lacks a ```bash block holding only: {command}"


def test_readme_api_tour_runs():
  pytest.importorskip("flax")
  ns = _readme_namespace()
  cell, rnn = ns["cell"], ns["rnn"]
  hidden, steps, batch = cell.hidden_size, 20, 4
  cells = rnn.num_layers * rnn.num_directions
  expected = {
      "h_H": (hidden,),
      "ys_TH": (steps, hidden),
      "h_last_H": (hidden,),
      "ys_TBH": (steps, batch, hidden),
      "h_last_BH": (batch, hidden),
      "ys_BTF": (batch, steps, 2 * hidden),
      "h_n": (cells, batch, hidden),
      "ys_flax_BTF": (batch, steps, hidden),
      "ys_model_BTF": (batch, steps, 2 * hidden),
      "h_model": (cells, batch, hidden),
  }
  for name, shape in expected.items():
    assert np.shape(ns[name]) == shape, f"README {name}: shape {np.shape(ns[name])}, expected {shape}"
  for name in expected:
    assert np.all(np.isfinite(np.asarray(ns[name]))), f"README {name} is not finite"

  # What the comments claim. Padding (steps >= length) leaves the state alone and outputs zeros.
  np.testing.assert_array_equal(np.asarray(ns["ys_TH"])[12:], 0.0)
  np.testing.assert_allclose(ns["h_last_H"], np.asarray(ns["ys_TH"])[11], rtol=1e-6)
  # The scan_layer batch: the sequence of length 7 stopped after its 7th step.
  np.testing.assert_allclose(ns["h_last_BH"][1], np.asarray(ns["ys_TBH"])[6, 1], rtol=1e-6)
  # The gradient reaches every parameter of every cell.
  leaves = jax.tree_util.tree_leaves(ns["grads"])
  assert len(leaves) == len(jax.tree_util.tree_leaves(ns["stack"]))
  assert all(np.any(np.asarray(g) != 0) for g in leaves)
  # The forward-mode tangent equals a finite difference of the stack along the same direction.
  # One compiled program for both points (op by op, each call cost about as much as compiling).
  apply_ys = jax.jit(lambda x: rnn.apply(ns["stack"], x, ns["lengths_B"])[0])
  rnn_apply = lambda x: np.asarray(apply_ys(x), np.float64)
  xs = ns["xs_BTI"]
  eps = 1e-2
  diff = (rnn_apply(xs + eps) - rnn_apply(xs - eps)) / (2 * eps)
  assert np.shape(ns["ys_dot_BTF"]) == (batch, steps, 2 * hidden)
  np.testing.assert_allclose(ns["ys_dot_BTF"], diff, atol=2e-3)
  # The torch state dict round trip gives back the same stack, and the linen module the same
  # kind of output as the stack it wraps.
  torch_cfg = ns["torch_cfg"]
  assert (torch_cfg.input_size, torch_cfg.hidden_size, torch_cfg.num_layers,
          torch_cfg.bidirectional) == (rnn.input_size, rnn.hidden_size, rnn.num_layers,
                                       rnn.bidirectional)
  for a, b in zip(jax.tree_util.tree_leaves(ns["torch_params"]),
                  jax.tree_util.tree_leaves(ns["stack"])):
    np.testing.assert_array_equal(a, b)
  assert ns["flax_cfg"].hidden_size == hidden


def _doctest_modules() -> list[str]:
  names = list(DOCTEST_MODULES)
  for name, framework in OPTIONAL_DOCTEST_MODULES:
    if importlib.util.find_spec(name) is not None and importlib.util.find_spec(framework):
      names.append(name)
  return names


def test_docstring_examples_run():
  attempted, failures, report = 0, 0, io.StringIO()
  finder = doctest.DocTestFinder()
  runner = doctest.DocTestRunner(
      optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
  for name in _doctest_modules():
    module = importlib.import_module(name)
    for test in finder.find(module):
      result = runner.run(test, out=report.write)
      attempted += result.attempted
      failures += result.failed
  assert failures == 0, f"{failures} docstring example(s) failed:\n{report.getvalue()}"
  assert attempted > 0, "no docstring example ran: the doctest collection is broken"


def test_docs_build_strict(tmp_path):
  pytest.importorskip("mkdocs")
  pytest.importorskip("mkdocstrings")
  pytest.importorskip("mkdocstrings_handlers.python")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
       "--config-file", os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
  assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_design_page_names_every_module():
  """docs/design.md describes the code as it is: every module and package under jaxgru/."""
  with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
    design = f.read()
  package = os.path.join(ROOT, "jaxgru")
  missing = []
  for entry in sorted(os.listdir(package)):
    path = os.path.join(package, entry)
    if entry.startswith("__") or entry.startswith("."):
      continue
    if entry.endswith(".py") or (os.path.isdir(path)
                                 and os.path.isfile(os.path.join(path, "__init__.py"))):
      name = f"jaxgru/{entry}"
      if name not in design and name + "/" not in design:
        missing.append(name)
  assert not missing, f"docs/design.md does not describe {missing}"
