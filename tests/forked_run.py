"""run.py's command lines, each in a process forked from one that imported run.py once.

A fresh interpreter per command line would spend most of a table of bad inputs importing JAX.
Each child parses its own flags, initializes its own JAX backend and exits with run.py's status;
its stderr goes to a file of its own, so a test sees what a user's terminal would.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")

# Reads [[args, stderr_path, cwd], ...] as JSON on stdin, runs each as run.py in a forked child,
# prints [exit_status, ...] as JSON. INFO: run.py's own logging set-up (as its __main__ makes it:
# INFO, other libraries quieted), so a check of "one error line" sees the INFO lines a user sees.
_RUNNER = r"""
import importlib.util, json, os, sys, traceback
sys.path.insert(0, ROOT)
spec = importlib.util.spec_from_file_location("run_cli", RUN)
run = importlib.util.module_from_spec(spec)
sys.modules["run_cli"] = run
spec.loader.exec_module(run)
from absl import app, logging
codes = []
for args, err_path, cwd in json.loads(sys.stdin.read()):
  pid = os.fork()
  if pid == 0:
    os.chdir(cwd)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    code = 0
    try:
      if INFO:
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(run._quiet_libraries)
      else:
        logging.set_verbosity(logging.WARNING)
      app.run(run._main, argv=[RUN] + args, flags_parser=run._parse_flags)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  codes.append(os.waitstatus_to_exitcode(status))
print(json.dumps(codes))
"""


def run_forked(cases, tmp, cwd=None, info=True, timeout=600):
  """Runs each ``args`` list of ``cases`` as run.py (in ``cwd``, by default the current folder);
  returns ``[(exit_status, stderr), ...]``. ``info``: run.py's INFO logging as its ``__main__``
  sets it up (else warnings and errors only). ``tmp`` holds the stderr files."""
  cwd = os.getcwd() if cwd is None else cwd
  jobs = [[list(args), os.path.join(tmp, f"stderr{i}.txt"), cwd] for i, args in enumerate(cases)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  code = f"ROOT, RUN, INFO = {ROOT!r}, {RUN!r}, {bool(info)!r}\n" + _RUNNER
  proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(jobs), text=True,
                        capture_output=True, timeout=timeout, env=env)
  assert proc.returncode == 0, proc.stderr
  codes = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(codes) == len(jobs), proc.stdout
  return [(c, open(p).read()) for c, (_, p, _) in zip(codes, jobs)]
