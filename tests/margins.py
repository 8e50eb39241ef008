"""How close the suite's float comparisons come to their tolerances: a tool, not a test.

    python tests/margins.py [-n N] [pytest arguments...]

runs pytest in this process (on one worker: ``-n 0`` is added) with every call of
``tolerance.assert_close`` recorded, then prints the N tightest margins (largest difference over
the tolerance, per array; 1.0 would fail). The tolerances come from error analysis
(tests/tolerance.py), so a margin above 0.5 on some set of versions means the analysis missed a
source of error: look at that test, do not widen the constant. Example, the loop's tests:

    python tests/margins.py tests/test_resets.py tests/test_fast_path.py -m ''
"""

import argparse
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


class Recorder:
  """A pytest plugin: the largest margin of every (test, array) compared."""

  def __init__(self):
    self.test = "(collection)"
    self.margins = {}

  def observe(self, margin, label):
    key = (self.test, label)
    self.margins[key] = max(margin, self.margins.get(key, 0.0))

  @pytest.hookimpl(tryfirst=True)
  def pytest_runtest_setup(self, item):
    self.test = item.nodeid


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("-n", type=int, default=5, help="how many of the tightest to print")
  args, pytest_args = parser.parse_known_args()
  sys.path.insert(0, HERE)
  import tolerance  # pylint: disable=import-outside-toplevel
  recorder = Recorder()
  tolerance.observers.append(recorder.observe)
  status = pytest.main(["-q", "-n", "0", "-p", "no:cacheprovider", *pytest_args],
                       plugins=[recorder])
  # Above 1 in a suite that passed: inside pytest.raises, a test that a wrong result is caught.
  caught = [key for key, margin in recorder.margins.items() if margin > 1]
  ranked = sorted(((k, m) for k, m in recorder.margins.items() if m <= 1), key=lambda kv: -kv[1])
  import jax  # pylint: disable=import-outside-toplevel
  print(f"\n{len(ranked)} arrays compared (Python {sys.version.split()[0]}, jax {jax.__version__},"
        f" numpy {__import__('numpy').__version__}); the {min(args.n, len(ranked))} tightest:")
  for (test, label), margin in ranked[:args.n]:
    print(f"  {margin:8.4f}  {test}  {label[:60]}")
  for test, label in caught:
    print(f"  (over 1, so caught as a test expects: {test}  {label})")
  return int(status)


if __name__ == "__main__":
  sys.exit(main())
