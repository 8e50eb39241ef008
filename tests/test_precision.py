"""GRUConfig.precision: every matrix product of every path carries the cell's precision.

JAX computes float32 products in TensorFloat-32 on recent NVIDIA GPUs (and in bfloat16 passes on
TPUs) unless a product asks for more; the first GPU run of the parity tests failed that way.
The CPU computes float32 at every level, so these tests read the compiled programs' jaxprs:
each ``dot_general`` of the forward pass, of the custom derivative rule (reverse and forward
mode, every remat and chunking option, the GPU's defaults), of stacks with lengths and resets,
of the parallel method and of the modules must carry the precision the cell asks for.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgru
from jaxgru import GRUConfig, RNNConfig, ScanOptions, scan_layer
from jaxgru.tasks import common

I, H, B, T = 3, 5, 2, 70  # T past the CPU's 64-step threshold of the custom rule
# The fused method says once that the CPU interprets its kernel; these tests only read programs.
pytestmark = pytest.mark.filterwarnings("ignore:jaxgru. method='fused'")

OPTIONS = {
    "cpu_default": ScanOptions(),
    "gpu_default": ScanOptions().resolved(T, B, H, backend="gpu", inputs=I),
    "chunks_hoisted": ScanOptions(chunk=16, remat=False, hoist_projection=True,
                                  custom_vjp=True),
    "products": ScanOptions(chunk=24, remat="products", custom_vjp=True),
    "full": ScanOptions(chunk=20, remat="full", custom_vjp=True),
    "per_step": ScanOptions(chunk=16, remat="products", custom_vjp=True,
                            diagonal_backward=False),
    "autodiff": ScanOptions(custom_vjp=False),
    "parallel_quasi": ScanOptions(method="parallel"),
    "parallel_full": ScanOptions(method="parallel", newton="full"),
    # The kernel's in-kernel products (the pallas_call's jaxpr) and the bulk ones around it;
    # forward mode's fallback is the sequential rule, checked above.
    "fused": ScanOptions(method="fused"),
}


def dots(closed_jaxpr):
  """Every dot_general equation of a jaxpr, its sub-jaxprs (loops, custom rules, remat) included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return found


def expected(precision):
  return None if precision is None else (jax.lax.Precision[precision.upper()],) * 2


def assert_all_dots(closed_jaxpr, precision):
  found = dots(closed_jaxpr)
  assert found, "no matrix product found"
  got = {repr(e.params["precision"]) for e in found}
  assert got == {repr(expected(precision))}, got


def inputs(cell, seed=0):
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape) * 0.5, w.dtype),
                        cell.init(jax.random.key(seed)))
  xs = jnp.asarray(rng.normal(size=(T, B, I)), jnp.float32)
  return params, xs


@pytest.mark.parametrize("variant", ["reset_after", "reset_before"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_product_of_scan_layer_carries_the_precision(name, variant):
  # "high", not the default: a product that hard-coded "highest" would not pass.
  check_scan_layer(name, variant, "high")


@pytest.mark.parametrize("name", ["cpu_default", "gpu_default", "parallel_full"])
def test_precision_none_leaves_jax_to_choose(name):
  # conftest.py sets JAX's default to "highest" for the references; JAX's own default is None.
  with jax.default_matmul_precision(None):
    check_scan_layer(name, "reset_before", None)


def check_scan_layer(name, variant, precision):
  cell = GRUConfig(I, H, variant=variant, precision=precision)
  params, xs = inputs(cell)
  lengths = jnp.array([T, T - 9])
  run = lambda p, x: scan_layer(cell, p, x, lengths, options=OPTIONS[name])[0]
  loss = lambda p, x: jnp.sum(run(p, x) ** 2)
  assert_all_dots(jax.make_jaxpr(run)(params, xs), precision)
  assert_all_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, xs), precision)
  tangents = jax.tree.map(jnp.ones_like, (params, xs))
  assert_all_dots(jax.make_jaxpr(lambda p, x: jax.jvp(run, (p, x), tangents))(params, xs),
                  precision)


def test_a_bidirectional_stack_with_lengths_and_resets_carries_the_precision():
  cfg = RNNConfig(GRUConfig(I, H, precision="high"), num_layers=2, bidirectional=True)
  params = cfg.init(jax.random.key(0))
  xs = jnp.ones((B, T, I))
  resets = jnp.zeros((B, T), bool).at[0, 30].set(True)
  loss = lambda p: jnp.sum(cfg.apply(p, xs, jnp.array([T, 40]), resets=resets)[0] ** 2)
  assert_all_dots(jax.make_jaxpr(jax.grad(loss))(params), "high")


def test_the_modules_pass_the_precision_on():
  from jaxgru import linen  # pylint: disable=import-outside-toplevel
  xs = jnp.ones((B, T, I))
  module = linen.GRU(hidden_size=H, precision="tensorfloat32")
  assert module.config(I).cell.precision == "high"
  variables = module.init(jax.random.key(0), xs)
  assert_all_dots(jax.make_jaxpr(module.apply)(variables, xs), "high")
  nnx = pytest.importorskip("flax.nnx")
  from jaxgru import nnx as jnnx  # pylint: disable=import-outside-toplevel
  assert jnnx.GRU(I, H, precision=None, rngs=nnx.Rngs(0)).config.cell.precision is None
  pytest.importorskip("equinox")
  from jaxgru import equinox as jeqx  # pylint: disable=import-outside-toplevel
  model = jeqx.GRU(I, H, precision="default", key=jax.random.key(0))
  assert model.config.cell.precision == "default"
  again = jeqx.GRU.from_params(model.config, model.params)
  assert again.config == model.config


def test_default_and_aliases():
  assert GRUConfig(I, H).precision == "highest"
  for given, stored in [("float32", "highest"), ("HIGHEST", "highest"),
                        ("tensorfloat32", "high"), ("bfloat16", "default"),
                        (jax.lax.Precision.HIGH, "high"), (None, None)]:
    cell = GRUConfig(I, H, precision=given)
    assert cell.precision == stored
    assert cell == GRUConfig(I, H, precision=stored) and hash(cell) == hash(
        GRUConfig(I, H, precision=stored))


@pytest.mark.parametrize("bad", ["fast", "F32_F32_F32", 3, 0.5])
def test_a_bad_precision_is_a_one_line_value_error(bad):
  with pytest.raises(ValueError, match=r"^precision must be one of \('highest', 'high', "
                                       r"'default'\)[^\n]*$"):
    GRUConfig(I, H, precision=bad)


def test_saved_settings_keep_the_precision_and_older_ones_read_as_the_default():
  cfg = RNNConfig(GRUConfig(I, H, precision="high"), num_layers=2)
  assert common.rnn_from_json(common.rnn_to_json(cfg)) == cfg
  older = common.rnn_to_json(RNNConfig(GRUConfig(I, H)))
  del older["cell"]["precision"]  # written before the setting existed
  assert common.rnn_from_json(older).cell.precision == "highest"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's float32 is exact")
def test_on_the_cpu_the_level_changes_no_result():
  """What the docstring promises for the CPU; on an accelerator the levels differ."""
  results = []
  for precision in ("highest", None):
    cell = GRUConfig(I, H, precision=precision)
    params, xs = inputs(cell)
    loss = lambda p, x, cell=cell: jnp.sum(scan_layer(cell, p, x)[0] ** 2)
    with jax.default_matmul_precision(None):  # JAX's own default, not conftest.py's
      results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, xs))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


def test_precision_is_declared_once():
  """The modules read the default from GRUConfig (no second copy of it)."""
  from jaxgru import linen  # pylint: disable=import-outside-toplevel
  default = {f.name: f.default for f in dataclasses.fields(GRUConfig)}["precision"]
  assert linen.GRU(hidden_size=H).precision == default == jaxgru.GRUConfig(I, H).precision


def test_the_tasks_heads_carry_the_precision():
  """The addition readout and the classifier head are products too (run.py's models)."""
  from jaxgru.tasks.addition.models import AdditionModel  # pylint: disable=import-outside-toplevel
  from jaxgru.tasks.classify.models import Classifier  # pylint: disable=import-outside-toplevel
  adder = AdditionModel(RNNConfig(GRUConfig(2, H, precision="high")))
  params = adder.init(jax.random.key(0))
  x = jnp.ones((B, T, 2))
  assert_all_dots(jax.make_jaxpr(lambda p: adder.logits(p, x)[0])(params), "high")
  clf = Classifier(RNNConfig(GRUConfig(I, H, precision="high"), bidirectional=True),
                   vocab_size=None)
  params = clf.init(jax.random.key(0))
  lengths = jnp.array([T, 9])
  assert_all_dots(jax.make_jaxpr(lambda p: clf.logits(p, jnp.ones((B, T, I)), lengths))(params),
                  "high")


def test_a_run_saved_before_the_setting_existed_still_resumes(tmp_path):
  """config.json written without rnn.cell.precision: the addition task resumes it."""
  import os  # pylint: disable=import-outside-toplevel
  from jaxgru import training  # pylint: disable=import-outside-toplevel
  from jaxgru.tasks import addition  # pylint: disable=import-outside-toplevel
  work = str(tmp_path)
  now = addition.AdditionConfig().to_json()
  older = json_copy(now)
  del older["rnn"]["cell"]["precision"]
  training.write_json_atomic(os.path.join(work, "config.json"),
                             {"task": "addition", "config": older})
  os.makedirs(os.path.join(work, "checkpoints", "20"))
  open(os.path.join(work, "checkpoints", "20", "commit_success.txt"), "w").close()
  training.check_resume(work, {"task": "addition", "config": now}, addition.RESUMABLE_CHANGES)
  other = json_copy(now)
  other["rnn"]["cell"]["hidden_size"] += 1  # a real change is still refused
  with pytest.raises(training.ConfigMismatch, match="hidden_size"):
    training.check_resume(work, {"task": "addition", "config": other},
                          addition.RESUMABLE_CHANGES)


def json_copy(d):
  import json  # pylint: disable=import-outside-toplevel
  from jaxgru.training.checkpoints import json_default  # pylint: disable=import-outside-toplevel
  return json.loads(json.dumps(d, default=json_default))
