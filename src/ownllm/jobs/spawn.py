"""Starting a job's worker process without paying its imports each time.

A worker is `python -m ownllm.jobs.worker` in a process of its own (training must not share the server's process:
a crash or an out-of-memory kill takes only the job, and SIGTERM stops only it). A fresh interpreter spends ~5 s
importing torch, transformers and peft before it reads the job; the server cannot fork itself instead (it runs
threads, and a fork copies none of them). So workers are forked from multiprocessing's forkserver: a
single-threaded process started on the first job, that has imported those once (PyTorch's own advice for worker
processes: https://pytorch.org/docs/stable/notes/multiprocessing.html). It ends when the server ends, and a worker
that outlives it notices that its parent changed (ownllm.jobs.worker) and checkpoints.

Where the forkserver cannot start, or with `OWNLLM_JOB_FORKSERVER=0`, a worker is a fresh interpreter.

As with any multiprocessing start method but fork, a forked worker imports the launching program's main script
(as `__mp_main__`) before it runs: `ownllm serve` guards its own, and a program that runs the job manager itself
needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import Literal, Protocol

from ownllm.errors import env_switch

log = logging.getLogger(__name__)
PRELOAD = ["ownllm.jobs.preload"]  # imported once in the forkserver
FORKSERVER_LOST = 255


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class WorkerProcess(Protocol):
    """What the job manager uses of a worker: `subprocess.Popen`'s names."""

    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class ForkedWorker:
    """A worker forked from the forkserver, behind `subprocess.Popen`'s interface. Its exit status is Popen's: the
    code it exited with, or minus the signal that ended it. Safe to poll and wait on from several threads (the
    manager's loop, a cancel's wait, the server's stop): the status is read once, under a lock."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        if not process.pid:
            raise OSError("the forkserver gave no process id")
        self.process = process
        self.pid = int(process.pid)
        self._status_lock = threading.Lock()

    def poll(self) -> int | None:
        with self._status_lock:
            code = self.process.exitcode
        # 255 is also what multiprocessing says when the forkserver died without telling: the worker may still
        # be running (it checkpoints and stops once it sees its parent gone); not ended until it has
        return None if code == FORKSERVER_LOST and pid_alive(self.pid) else code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            multiprocessing.connection.wait([self.process.sentinel], left)  # readable once it has ended
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"job worker {self.pid}", timeout or 0)
            time.sleep(0.05)  # the forkserver is gone (its pipe stays readable) and the worker still runs

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_context_lock = threading.Lock()
_context: ForkServerContext | Literal[False] | None = None  # set up on first use; False where it cannot be


def _forkserver() -> ForkServerContext | Literal[False]:
    global _context
    with _context_lock:
        if _context is None:
            try:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(PRELOAD)
                _context = context
            except (ValueError, OSError) as exc:  # no forkserver on this platform
                log.warning("job workers start as fresh processes: %s", exc)
                _context = False
        return _context


def warm_forkserver() -> None:
    """Start the forkserver (its imports take seconds) if it is not running: called by the job manager outside its
    lock, so a request that needs the lock (a cancel) does not wait for the imports."""
    context = _forkserver()
    if context:
        try:
            forkserver.ensure_running()
        except (OSError, EOFError) as exc:
            log.warning("the forkserver did not start (%s): the next job starts a fresh process", exc)


def forked_workers() -> bool:
    """`OWNLLM_JOB_FORKSERVER=0` starts each worker as a fresh interpreter (on by default)."""
    return env_switch("OWNLLM_JOB_FORKSERVER", default=True)


def start_worker(argv: list[str], env: dict[str, str], log_path: Path, *, fork: bool = True) -> WorkerProcess:
    """Start `python -m ownllm.jobs.worker ARGV` with `env`, its output appended to `log_path`: forked from the
    forkserver (with `fork`), else or where that fails a fresh interpreter."""
    context = _forkserver() if fork else None
    if context:
        try:
            process = context.Process(target=_run_worker, args=(argv, env, str(log_path)),
                                      name=f"ownllm-job-{argv[1]}", daemon=False)
            process.start()
            # a subprocess's lifetime, not a multiprocessing child's: the manager stops it (SIGTERM, then a kill)
            # and nothing waits at the server's exit for a job that could train for hours (multiprocessing joins
            # its children then; a daemonic one could not start processes of its own)
            multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
            return ForkedWorker(process)
        except (OSError, EOFError) as exc:  # EOFError: the forkserver died before it answered (killed, OOM)
            log.warning("cannot fork a job worker (%s): starting a fresh process", exc)
    with log_path.open("ab") as log_file:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "ownllm.jobs.worker", *argv], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)


def _run_worker(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """In the forked child: become the worker a fresh `python -m ownllm.jobs.worker` would be (environment, thread
    count, output), then run it; its return value is the exit status."""
    # The forkserver stays up while any process holds its "alive" pipe, and every child inherits it: closed here, it
    # ends with the server, so a worker whose server was killed sees its parent change (and checkpoints)
    server = forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    handle = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.close(handle)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS") or 1)))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from ownllm.jobs.worker import main

    sys.exit(main(argv))
