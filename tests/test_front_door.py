"""One front door: every entry point takes ``(xs, lengths=None, h0=None, *, resets=None, ...)``.

* The same call, with the same keywords and the same weights, through :func:`jaxgru.scan_layer`,
  :meth:`jaxgru.RNNConfig.apply`, ``jaxgru.linen.GRU``, ``jaxgru.nnx.GRU`` and
  ``jaxgru.equinox.GRU`` (``.batched`` and, vmapped, its per-example call), gives the same
  results, and those of a plain Python loop over :meth:`GRUConfig.step`.
* Each former keyword (``xs_BTI=``, ``lengths_B=``, ``resets_BT=``, ...) and ``scan_layer``'s
  former positional order still work, with a DeprecationWarning that names the new keyword.
* Every weight converter is ``jaxgru.<name>``; the Equinox ones import Equinox only when called.
* The package's modules import each other downwards only: no function-level ``jaxgru`` import,
  no cycle in the module import graph.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
from jaxgru import convert
from tolerance import assert_close, gru_terms

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxgru"

I, H, T, B = 2, 4, 7, 3
# The doors run the same function on the same weights; the Python loop below runs the same step
# one example at a time, so its matrix products may round differently: float32 rounding of sums
# of a few terms of size ~1, carried over T=7 steps and two layers.
ATOL = 1e-5


def randn(*shape, seed=0, scale=1.0):
  return jnp.asarray((scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32))


def inputs(num_cells, steps=T):
  """xs_BTI, lengths_B, h0_NBH and resets_BT over ``steps`` steps: a zero length, a full one,
  resets inside, at t=0 and past a length."""
  xs_BTI = randn(B, steps, I, seed=1)
  lengths_B = jnp.array([steps, 4, 0], jnp.int32)
  h0_NBH = randn(num_cells, B, H, seed=2, scale=0.5)
  resets_BT = np.zeros((B, steps), bool)
  resets_BT[0, [0, 3, 5]] = True
  resets_BT[1, [2, 6]] = True  # step 6 is past sequence 1's length: ignored
  return xs_BTI, lengths_B, h0_NBH, jnp.asarray(resets_BT)


def random_stack(cfg, seed=3):
  """``cfg.init``'s layout with every leaf drawn from N(0, 0.5^2), biases included."""
  leaves, treedef = jax.tree.flatten(cfg.init(jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(scale=0.5, size=np.shape(x))
                                                  .astype(np.float32)) for x in leaves])


def python_loop(cfg, params, xs_BTI, lengths_B, h0_NBH, resets_BT):
  """The stack, one example and one step at a time in Python over ``GRUConfig.step``.

  Forward, the state restarts from h0 before a flagged step; in reverse, before step t where step
  t+1 is flagged (the segment's last step, read first). Steps at or past a length keep the state
  and output zeros."""
  xs, lengths, resets = np.asarray(xs_BTI), np.asarray(lengths_B), np.asarray(resets_BT)
  finals = []
  for l, layer in enumerate(params):
    cell = cfg.layer_cell(l)
    outs = []
    for i, d in enumerate(cfg.directions):
      h0_BH = np.asarray(h0_NBH[l * cfg.num_directions + i])
      ys_BTH = np.zeros((B, xs.shape[1], H), np.float32)
      last_BH = np.zeros((B, H), np.float32)
      for b in range(B):
        n, h = int(lengths[b]), h0_BH[b]
        order = range(n) if d == "fwd" else range(n - 1, -1, -1)
        for t in order:
          restart = resets[b, t] if d == "fwd" else (t + 1 < n and resets[b, t + 1])
          h = np.asarray(cell.step(layer[d], h0_BH[b] if restart else h, xs[b, t]))
          ys_BTH[b, t] = h
        last_BH[b] = h
      outs.append(ys_BTH)
      finals.append(last_BH)
    xs = np.concatenate(outs, axis=-1)
  return xs, np.stack(finals)


def doors(cfg, params):
  """Every batched front door as ``run(xs_BTI, **keywords) -> (ys_BTF, h_last_NBH)``, all on
  ``params``, handed to each framework's module in its own way."""
  linen = pytest.importorskip("jaxgru.linen")
  jnnx = pytest.importorskip("jaxgru.nnx")
  jeqx = pytest.importorskip("jaxgru.equinox")
  c = cfg.cell
  layer = linen.GRU(hidden_size=c.hidden_size, num_layers=cfg.num_layers,
                    bidirectional=cfg.bidirectional)
  variables = {"params": {"gru": params}}
  nnx_model = jnnx.GRU.from_params(cfg, params)
  eqx_model = jeqx.GRU.from_params(cfg, params)

  def per_example(xs, lengths=None, h0=None, resets=None):
    # Equinox's own convention: one example per call, a batch by jax.vmap (h0 batch-major).
    run = lambda x, n, h, r: eqx_model(x, length=n, h0=h, resets=r)
    ys, h_last_BNH = jax.vmap(run)(xs, lengths, jnp.swapaxes(h0, 0, 1), resets)
    return ys, jnp.swapaxes(h_last_BNH, 0, 1)

  found = {
      "RNNConfig.apply": lambda *a, **kw: cfg.apply(params, *a, **kw),
      "linen.GRU": lambda *a, **kw: layer.apply(variables, *a, **kw),
      "nnx.GRU": nnx_model,
      "equinox.GRU.batched": eqx_model.batched,
      "equinox.GRU (vmapped)": per_example,
  }
  if cfg.num_layers == 1 and not cfg.bidirectional:
    def scan(xs, lengths=None, h0=None, resets=None):  # time-major, one cell: (T, B, I), (B, H)
      ys_TBH, h_last_BH = jaxgru.scan_layer(cfg.cell, params[0]["fwd"], jnp.swapaxes(xs, 0, 1),
                                            lengths=lengths, h0=h0[0], resets=resets)
      return jnp.swapaxes(ys_TBH, 0, 1), h_last_BH[None]
    found["scan_layer"] = scan
  return found


# T=70: past the CPU loop's 64-step threshold, where it runs in chunks with its custom derivative.
@pytest.mark.parametrize("steps", [T, 70])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_every_front_door_gives_the_same_results_for_the_same_call(layers, bidirectional, steps):
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H), num_layers=layers, bidirectional=bidirectional)
  params = random_stack(cfg)
  xs, lengths, h0, resets = inputs(layers * cfg.num_directions, steps)
  want_ys, want_h = python_loop(cfg, params, xs, lengths, h0, resets)
  found = doors(cfg, params)
  assert len(found) == (6 if layers == 1 else 5)
  for name, run in found.items():
    with warnings.catch_warnings():
      warnings.simplefilter("error", DeprecationWarning)  # the new keywords warn of nothing
      ys, h_last = run(xs, lengths=lengths, h0=h0, resets=resets)
    for got, want in ((ys, want_ys), (h_last, want_h)):
      assert_close(got, want, steps=steps * layers,
                   terms=gru_terms(max(I, 2 * H), H, B), err_msg=name)


def test_the_keywords_mean_the_same_by_position():
  # (xs, lengths, h0) in this order everywhere, resets by keyword.
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H))
  params = random_stack(cfg)
  xs, lengths, h0, resets = inputs(1)
  for name, run in doors(cfg, params).items():
    by_name = run(xs, lengths=lengths, h0=h0, resets=resets)
    by_position = run(xs, lengths, h0, resets=resets)
    for a, b in zip(by_name, by_position):
      np.testing.assert_array_equal(a, b, err_msg=name)


# -- the former keywords -----------------------------------------------------------------------


def _old_and_new(door):
  """``(run, new_keywords, {old: new})`` for one front door: a one-layer stack on fixed data."""
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H))
  params = random_stack(cfg)
  xs_BTI, lengths_B, h0_NBH, resets_BT = inputs(1)
  if door == "scan_layer":
    run = lambda **kw: jaxgru.scan_layer(cfg.cell, params[0]["fwd"], **kw)
    new = {"xs": jnp.swapaxes(xs_BTI, 0, 1), "lengths": lengths_B, "h0": h0_NBH[0],
           "resets": resets_BT}
    return run, new, {"xs_TBI": "xs", "lengths_B": "lengths", "h0_BH": "h0",
                      "resets_BT": "resets"}
  if door == "nnx.GRU":
    jnnx = pytest.importorskip("jaxgru.nnx")
    run = jnnx.GRU.from_params(cfg, params)
  else:
    jeqx = pytest.importorskip("jaxgru.equinox")
    model = jeqx.GRU.from_params(cfg, params)
    if door == "equinox.GRU":
      new = {"xs": xs_BTI[0], "length": lengths_B[0], "h0": h0_NBH[:, 0],
             "resets": resets_BT[0]}
      return model, new, {"xs_TI": "xs", "resets_T": "resets"}
    run = model.batched
  new = {"xs": xs_BTI, "lengths": lengths_B, "h0": h0_NBH, "resets": resets_BT}
  return run, new, {"xs_BTI": "xs", "lengths_B": "lengths", "resets_BT": "resets"}


@pytest.mark.parametrize("door", ["scan_layer", "nnx.GRU", "equinox.GRU.batched", "equinox.GRU"])
def test_each_former_keyword_works_and_warns_with_the_new_name(door):
  run, new, renames = _old_and_new(door)
  want = run(**new)
  for old, name in renames.items():
    kw = {(old if k == name else k): v for k, v in new.items()}
    with pytest.warns(DeprecationWarning, match=rf"{old}= is deprecated.*use {name}=$"):
      got = run(**kw)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b, err_msg=f"{door} {old}=")
    with pytest.raises(TypeError, match=f"got {name} twice"):
      run(**kw, **{name: new[name]})


def test_scan_layer_former_positional_order_warns_and_runs_as_the_new_one():
  # scan_layer(cell, params, xs, h0, lengths) was the order before (xs, lengths, h0).
  cell = jaxgru.GRUConfig(I, H)
  params = random_stack(jaxgru.RNNConfig(cell))[0]["fwd"]
  xs_BTI, lengths_B, h0_NBH, _ = inputs(1)
  xs_TBI, h0_BH = jnp.swapaxes(xs_BTI, 0, 1), h0_NBH[0]
  calls = [  # the former call, the same call in the new order
      ((h0_BH, lengths_B), (lengths_B, h0_BH)),
      ((h0_BH,), (None, h0_BH)),
      ((None, lengths_B), (lengths_B, None)),
      ((h0_BH.tolist(), lengths_B.tolist()), (lengths_B, h0_BH)),
  ]
  for old, new in calls:
    want = jaxgru.scan_layer(cell, params, xs_TBI, *new)
    with pytest.warns(DeprecationWarning, match=r"positional order \(xs, h0, lengths\)"):
      got = jaxgru.scan_layer(cell, params, xs_TBI, *old)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  with pytest.warns(DeprecationWarning):  # recognized under jax.jit too: ranks are static
    got = jax.jit(lambda x, h, n: jaxgru.scan_layer(cell, params, x, h, n))(xs_TBI, h0_BH,
                                                                             lengths_B)
  np.testing.assert_allclose(got[1], jaxgru.scan_layer(cell, params, xs_TBI, lengths_B, h0_BH)[1],
                             rtol=0, atol=ATOL)
  with warnings.catch_warnings():  # the new order is never taken for the old one
    warnings.simplefilter("error", DeprecationWarning)
    jaxgru.scan_layer(cell, params, xs_TBI, lengths_B, h0_BH)
    jaxgru.scan_layer(cell, params, xs_TBI, lengths_B)
    jaxgru.scan_layer(cell, params, xs_TBI, None, h0_BH)


# -- the converters ------------------------------------------------------------------------------


def test_every_converter_is_a_name_of_the_package():
  names = sorted(n for n in dir(convert) if re.fullmatch(r"(from|to)_[a-z_]+", n)
                 and callable(getattr(convert, n)))
  assert {"from_equinox", "to_equinox", "from_torch", "to_flax_nnx"} <= set(names)
  for name in names:
    assert name in jaxgru.__all__, name
    assert getattr(jaxgru, name) is getattr(convert, name), name
  jeqx = pytest.importorskip("jaxgru.equinox")  # and they still work from their module
  assert jeqx.from_equinox is jaxgru.from_equinox and jeqx.to_equinox is jaxgru.to_equinox


def test_equinox_converters_round_trip_from_the_package():
  eqx = pytest.importorskip("equinox")
  cell = eqx.nn.GRUCell(I, H, key=jax.random.key(4))
  cfg, params = jaxgru.from_equinox(cell)
  back = jaxgru.to_equinox(cfg, params)
  for name in ("weight_ih", "weight_hh", "bias", "bias_n"):
    np.testing.assert_array_equal(getattr(back, name), getattr(cell, name), err_msg=name)
  # And the converted cell computes what Equinox's does, one step from a non-zero state.
  x, h = randn(I, seed=5), randn(H, seed=6)
  np.testing.assert_allclose(cfg.cell.step(params[0]["fwd"], h, x), cell(x, h), rtol=0,
                             atol=1e-6)


def test_equinox_converters_name_the_extra_when_equinox_is_missing(monkeypatch):
  cfg = jaxgru.RNNConfig(jaxgru.GRUConfig(I, H))
  params = cfg.init(jax.random.key(0))
  monkeypatch.setitem(sys.modules, "equinox", None)  # `import equinox` now fails
  with pytest.raises(ImportError, match=re.escape(
      "jaxgru.to_equinox needs equinox: pip install 'jaxgru[equinox]'")):
    jaxgru.to_equinox(cfg, params)
  with pytest.raises(ImportError, match=re.escape(
      "jaxgru.from_equinox needs equinox: pip install 'jaxgru[equinox]'")):
    jaxgru.from_equinox(object())


# -- the import graph ----------------------------------------------------------------------------


def _modules():
  """Every module of the package: dotted name -> path."""
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _imported(node, module, is_package, modules):
  """The jaxgru modules an Import/ImportFrom node names (``from jaxgru import cell`` names
  jaxgru.cell; ``from jaxgru.cell import X`` names jaxgru.cell; relative imports resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "jaxgru"]
  base = node.module or ""
  if node.level:
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[:len(anchor) - (node.level - 1)]
    base = ".".join(anchor + ([base] if base else []))
  if base.split(".")[0] != "jaxgru":
    return []
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def test_no_module_imports_jaxgru_inside_a_function_and_the_import_graph_has_no_cycle():
  modules = _modules()
  assert {"jaxgru.cell", "jaxgru.scan", "jaxgru._parallel", "jaxgru.training.malloc"} <= set(modules)
  inner, graph = [], {}
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    edges = graph.setdefault(module, set())
    functions = [n for n in ast.walk(tree)
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    in_function = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        targets = _imported(node, module, is_package, modules)
        if id(node) in in_function and targets:
          inner.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        edges.update(t for t in targets if t != module)
  assert not inner, "function-level jaxgru imports:\n" + "\n".join(inner)

  # Depth-first search for a back edge; an edge to a package is to its __init__.py.
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        cycle = stack[stack.index(n):] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_every_module_of_the_package_imports():
  for module in _modules():
    try:
      importlib.import_module(module)
    except ImportError as e:  # an extra that is not installed here: it must say which
      assert "pip install 'jaxgru[" in str(e), (module, str(e))
