"""Joining a multi-process JAX job, and turning its runtime's fatal errors into one line.

Owns :func:`initialize` (``jax.distributed.initialize`` with CPU collectives and stated
timeouts) and :func:`supervise` (for entry points: runs the job's process as a child and reports
how it ended).

Why a supervisor: when a process of a ``jax.distributed`` job dies, or the coordinator never
answers, JAX's coordination service does not raise a Python exception in the other processes;
its C++ client logs the error with a stack trace and aborts the process (SIGABRT) once
``heartbeat_timeout`` (a dead peer) or ``initialization_timeout`` (nobody to join) has passed.
Nothing in the aborting process can catch that, so the entry point runs the real work in a child
process and reads the child's stderr: lines pass through as they come, and if the child ends
after the coordination service's fatal error (or after gloo's report that a collective lost its
peer), the supervisor prints one line saying what happened and exits 2 (the job could not be
joined) or 1 (another process stopped) instead of the abort's pages.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from typing import Optional, Sequence

CHILD_ENV = "JAXGRU_JOB_PROCESS"  # set in the supervised child: it does the work itself

# JAX's defaults (jax.distributed.initialize), restated as the entry point's flag defaults.
INITIALIZATION_TIMEOUT = 300
HEARTBEAT_TIMEOUT = 100


class JoinError(ValueError):
  """The job cannot be joined with these settings (found before calling into JAX)."""


def _check_port_free(address: str) -> None:
  """Process 0 starts the coordination service on ``address``'s port: refuse a port that is
  taken here (another job's process 0, or this job's started twice). gRPC binds with
  SO_REUSEPORT, so a second process 0 would otherwise share the port and break the first."""
  host, _, port = address.rpartition(":")
  if not port.isdigit() or not host:
    raise JoinError(f"--coordinator_address must be host:port, got {address!r}")
  for family, where in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
      try:
        probe.bind((where, int(port)))
      except OverflowError:
        raise JoinError(f"--coordinator_address port must be below 65536, got {port}") from None
      except OSError as e:
        raise JoinError(f"--coordinator_address port {port} is in use on this host ({e.strerror}):"
                        " is another process 0 running? Choose a free port") from None
    return


def initialize(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int], *, initialization_timeout: int = INITIALIZATION_TIMEOUT,
               heartbeat_timeout: int = HEARTBEAT_TIMEOUT) -> None:
  """Joins the job: ``jax.distributed.initialize`` with CPU collectives (gloo) turned on.

  Arguments left None are detected by JAX (SLURM, Open MPI, Cloud TPU). A process that finds no
  coordinator within ``initialization_timeout`` seconds, or whose peer has sent no heartbeat for
  ``heartbeat_timeout`` seconds, is aborted by JAX's runtime (see :func:`supervise`).

  Raises:
    JoinError: process 0's port is taken here, or the address is malformed.
  """
  import jax  # the entry point imports this module before it may configure JAX
  # CPU devices of different processes talk through gloo (the default in jax 0.10 and later;
  # said explicitly, as it must be set before the backend starts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _quiet_native_stdout()
  if coordinator_address and process_id == 0:
    _check_port_free(coordinator_address)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout)


def _quiet_native_stdout() -> None:
  """Sends what native code writes to file descriptor 1 (gloo's notes on its connections, one
  per peer, written by several threads at once, so that their pieces interleave) to /dev/null,
  and keeps Python's ``sys.stdout`` on the real output."""
  try:
    sys.stdout.flush()
    python_out = os.dup(1)
    with open(os.devnull, "wb") as null:
      os.dup2(null.fileno(), 1)
  except (OSError, ValueError):  # no file descriptors (an embedding host): leave it as it is
    return
  sys.stdout = os.fdopen(python_out, "w", buffering=1)


# A line logged by XLA's C++ code (absl format), from the distributed runtime.
_RUNTIME_LINE = re.compile(r"(?m)^[EF]\d{4} [0-9:.]+\s+\d+ (coordination_service|client|"
                           r"preemption_sync_manager|distributed)\w*\.\w+:\d+\]")
# gloo's error when the process at the other end of a collective is gone.
_PEER_LOST = re.compile(r"Gloo \w+ failed: .*Connection (closed by peer|reset)")
_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|ALREADY_EXISTS|INTERNAL|ABORTED|"
                     r"FAILED_PRECONDITION|INVALID_ARGUMENT|NOT_FOUND|CANCELLED): ([^\n\[]*)")


def explain(runtime_log: str, address: Optional[str], initialization_timeout: int,
            heartbeat_timeout: int) -> tuple[str, int]:
  """The one line and exit status for a process that JAX's runtime aborted, from what the
  runtime logged: ``(line, 2)`` when the job could not be joined, ``(line, 1)`` when another
  process stopped during the job."""
  statuses = _STATUS.findall(runtime_log)
  status = next((f"{c}: {m.strip()}" for c, m in statuses if "incarnation" in m or
                 "heartbeat" in m.lower() or "unhealthy" in m), None)
  status = status or (f"{statuses[0][0]}: {statuses[0][1].strip()}" if statuses else "")
  status = " ".join(status.split())[:140]
  if "RegisterTask" in runtime_log or "Connect()" in runtime_log:
    if "ALREADY_EXISTS" in runtime_log or "incarnation" in runtime_log:
      return (f"could not join the multi-host job: another process registered with the same "
              f"--process_id ({status})", 2)
    return (f"could not join the multi-host job: no coordinator answered at {address or '?'} "
            f"within --initialization_timeout={initialization_timeout}s (is process 0 running, "
            f"and are --coordinator_address and --num_processes right?)", 2)
  why = status or ("gloo: connection closed by peer" if _PEER_LOST.search(runtime_log)
                   else "its runtime aborted")
  return (f"another process of the multi-host job stopped or cannot be reached (JAX: {why}; "
          f"--heartbeat_timeout={heartbeat_timeout}s); this process stops too: run the job again "
          f"to resume from its last checkpoint", 1)


def _die_with_parent() -> None:
  """In the child, before exec: on Linux, die when the supervisor dies (a killed supervisor
  must not leave its worker in the job)."""
  try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def supervise(argv: Sequence[str], prog: str, address: Optional[str],
              initialization_timeout: int, heartbeat_timeout: int) -> int:
  """Runs ``python argv...`` as this process's child (with :data:`CHILD_ENV` set, so that it
  does the work) and returns its exit status.

  The child's stdout is this process's; its stderr passes through line by line, except what
  follows the distributed runtime's first error line or a Python traceback, which is held back
  until the child ends: if it holds the runtime's errors or gloo's report of a lost peer, one
  line ``"{prog}: error: ..."`` (see :func:`explain`) replaces it; else it is shown as it was.
  SIGTERM and SIGINT sent to this process are passed on to the child once (it saves a checkpoint
  and exits 130); the child runs in its own session, so a terminal's Ctrl-C reaches it once.
  """
  child = subprocess.Popen([sys.executable, *argv], env={**os.environ, CHILD_ENV: "1"},
                           stderr=subprocess.PIPE, start_new_session=True,
                           preexec_fn=_die_with_parent if sys.platform == "linux" else None)

  def forward(signum, frame):
    del frame
    try:
      child.send_signal(signum)
    except OSError:
      pass
  for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, forward)
  held: list[str] = []
  for raw in child.stderr:
    line = raw.decode(errors="replace")
    # From the runtime's first error, or a Python traceback (a collective that lost its peer
    # raises one just before the runtime aborts), on: held until the child's end tells.
    if held or _RUNTIME_LINE.match(line) or line.startswith("Traceback (most recent call last)"):
      held.append(line)
    else:
      sys.stderr.write(line)
      sys.stderr.flush()
  status = child.wait()
  text = "".join(held)
  if not (_RUNTIME_LINE.search(text) or _PEER_LOST.search(text)):
    sys.stderr.write(text)
    return status if status >= 0 else 128 - status
  line, code = explain(text, address, initialization_timeout, heartbeat_timeout)
  print(f"{prog}: error: {line}", file=sys.stderr)
  return code
