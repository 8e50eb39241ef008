"""The ceiling of a GRU's time loop: the per-step recurrent product alone, in a lax.scan.

Times T steps of ``tanh(h_t @ W)`` with h_t (B, H) and W (H, 3H), which is the serial work of a
forward pass; the same with the state kept feature-major, ``tanh(W^T @ h_t^T)`` with h_t^T
(H, B) and W^T made once outside the loop; and the backward loop's product ``tanh(dy_t @ W^T)``
in two forms: contracting against the stored (H, 3H) matrix, and against a copy transposed once
outside the loop. Each loop's output is (T, 3H or B, B or 3H) floats. With ``--inputs=I``
it also times jaxgru's forward pass at the same shape (``scan_layer`` of one layer over (T, B,
I) inputs, the backend's default options) in the same interleaved rounds, and prints its ratio
to the forward product loop: how close the whole GRU step comes to its product alone. It also
measures the float32 matrix-product peak (a 2048 x 2048 product), so the per-step rate can be
read as a fraction of it. Medians of interleaved runs.

  python -m benchmarks.recurrent_product --batch=64 --hidden=256 --steps=128 --inputs=32
"""

from __future__ import annotations

import time

from absl import flags

from benchmarks import _common

flags.DEFINE_integer("batch", 64, "B.")
flags.DEFINE_integer("hidden", 256, "H.")
flags.DEFINE_integer("steps", 128, "T.")
flags.DEFINE_integer("repeats", 30, "Timed runs of each loop.")
flags.DEFINE_integer("inputs", 0, "I: also time jaxgru's forward pass with I input features "
                     "(0: not).")
FLAGS = flags.FLAGS


def main(argv):
  del argv  # _common.absl_main refuses positional arguments
  _common.check_positive(batch=FLAGS.batch, hidden=FLAGS.hidden, steps=FLAGS.steps,
                         repeats=FLAGS.repeats)
  if FLAGS.inputs < 0:
    raise _common.UsageError(f"--inputs must be >= 0, got {FLAGS.inputs}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  b, h, t = FLAGS.batch, FLAGS.hidden, FLAGS.steps
  w = jax.random.normal(jax.random.key(0), (h, 3 * h))
  w_t = jnp.array(w.T)
  dys = jax.random.normal(jax.random.key(1), (t, b, 3 * h))
  hs = jax.random.normal(jax.random.key(2), (t, b, h))
  hs_t = jnp.array(jnp.swapaxes(hs, 1, 2))

  def loop(product):
    def run(weights, xs):
      return jax.lax.scan(lambda c, x: (c, jnp.tanh(product(x, weights))), 0.0, xs)[1]
    return jax.jit(run)

  contract_1_1 = lambda x, m: jax.lax.dot_general(x, m, (((1,), (1,)), ((), ())))
  loops = {
      "forward: h_t @ W": (loop(jnp.matmul), (w, hs)),
      "forward, feature-major: W^T @ h_t^T": (loop(lambda x, m: m @ x), (w_t, hs_t)),
      "backward: dy_t @ W^T, W as stored": (loop(contract_1_1), (w, dys)),
      "backward: dy_t @ W^T, W^T made once": (loop(jnp.matmul), (w_t, dys)),
  }
  jaxgru_name = "jaxgru forward: scan_layer"
  if FLAGS.inputs > 0:
    import jaxgru  # pylint: disable=import-outside-toplevel
    cell = jaxgru.GRUConfig(FLAGS.inputs, h)
    xs = jax.random.normal(jax.random.key(4), (t, b, FLAGS.inputs))
    loops[jaxgru_name] = (jax.jit(lambda p, x: jaxgru.scan_layer(cell, p, x)[0]),
                          (cell.init(jax.random.key(5)), xs))
  for fn, args in loops.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in loops}
  for _ in range(FLAGS.repeats):
    for name, (fn, args) in loops.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)

  a = jax.random.normal(jax.random.key(3), (2048, 2048))
  square = jax.jit(lambda a: a @ a)
  square(a).block_until_ready()
  peak_times = []
  for _ in range(10):
    t0 = time.perf_counter()
    square(a).block_until_ready()
    peak_times.append(time.perf_counter() - t0)
  peak = 2 * 2048**3 / np.median(peak_times) / 1e9

  flops = 2.0 * t * b * h * 3 * h
  print(f"{jax.devices()[0].device_kind}: B={b} H={h} T={t}; float32 peak {peak:.0f} GFLOP/s")
  for name, ts in times.items():
    rate = flops / np.median(ts) / 1e9
    print(f"{name:40s} {np.median(ts) * 1e3:8.2f} ms  {rate:6.0f} GFLOP/s  {rate / peak:5.0%} "
          "of peak" + (" (the product's FLOPs)" if name == jaxgru_name else ""))
  if FLAGS.inputs > 0:
    ratio = np.median(times[jaxgru_name]) / np.median(times["forward: h_t @ W"])
    print(f"jaxgru forward / forward product loop: {ratio:.2f} (I={FLAGS.inputs})")


if __name__ == "__main__":
  _common.absl_main(main, "recurrent_product.py")
