"""`ownllm` processes for the tests, forked from a process that has already imported torch and transformers.

A CLI test runs `python -m ownllm ...` as a fresh process with its own stdin, stdout, stderr, working directory and
exit status, as a user does; but ~6 of the ~7 seconds such a process takes to answer are the same imports every
time (torch, transformers' modeling code), paid ~100 times in a suite run. Here one process per test worker (the
"zygote") imports them once and forks a child per call; the child runs `ownllm`'s `__main__` exactly as
`python -m ownllm` does. Nothing else is shared: the zygote never runs a model or starts a thread, and a call whose
environment differs from the one the zygote was started with runs as a plain subprocess instead (some libraries
read the environment when imported). What a child cannot show: anything the libraries print or warn once while
they are imported (that went to the zygote's log). `OWNLLM_TEST_FRESH_PROCESSES=1` turns the zygote off.

Run as a script, this file is the zygote: `python cli_zygote.py SOCKET`."""

from __future__ import annotations

import contextlib
import gc
import json
import locale
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Imported before forking: what nearly every `ownllm` verb that touches a model imports, and what many calls import
# on top of that (a suite census: sentence-transformers for adapter scopes and RAG ~16 CPU-s over the calls, typer's
# parameter adapters on every call ~8 s, matplotlib for run plots, rouge for eval, trl and the Trainer for
# fine-tuning). sentence-transformers brings in pyarrow, whose jemalloc starts a background thread: a fork copies
# no threads, and jemalloc's own fork handlers leave the child's background purging off, as for any forked child.
PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "ownllm.cli",
           "ownllm.generate.engine", "ownllm.generate.hf", "ownllm.models.load", "typer._adapters",
           "sentence_transformers", "transformers.trainer", "trl", "rouge_score.rouge_scorer", "matplotlib.pyplot")
# Differences here need no fresh interpreter: pytest sets the first per test; scikit-learn (imported by tests in
# the test process) sets the KMP ones for Intel's OpenMP, which torch's CPU build does not use (it has GNU's); a
# TRL trainer run in the test process sets inductor's cache folder, read only when something compiles; ownllm reads
# OWNLLM_BATCH_INVARIANT and OWNLLM_COMPILED_DECODE when it builds a batched model, OWNLLM_JOB_FORKSERVER when a
# server sets up its jobs, not on import.
PER_CALL_ENV = frozenset({"PYTEST_CURRENT_TEST", "KMP_INIT_AT_FORK", "KMP_DUPLICATE_LIB_OK",
                          "TORCHINDUCTOR_CACHE_DIR", "OWNLLM_BATCH_INVARIANT", "OWNLLM_COMPILED_DECODE",
                          "OWNLLM_JOB_FORKSERVER"})
START_TIMEOUT = 300.0  # a hang guard: the imports take ~6 s
MAX_RESTARTS = 3  # zygotes that end early: then plain subprocesses for the rest of the run
FORK_TIMEOUT = 60.0  # a hang guard for the zygote's answer with the child's pid (a fork takes milliseconds)
ORPHAN_STATUS = 255  # the exit status of a child whose zygote ended first (its real one went to no one)


class _Child(Exception):
    """Raised in a forked child to leave the zygote's loop and become `python -m ownllm`."""

    def __init__(self, args: list[str]) -> None:
        super().__init__()
        self.args = args


def _serve(socket_path: str) -> None:
    sys.path.pop(0)  # this file's folder (tests/): `python -m ownllm` has the working directory there instead
    import matplotlib

    from ownllm.collector import import_at_start

    matplotlib.use("Agg")  # as ownllm's plots choose it: pyplot then imports no GUI toolkit
    import_at_start(*PRELOAD)
    _warm_model_loading()
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    listener.listen(16)
    gc.freeze()  # the collector in a child leaves the inherited objects alone (and their pages shared)
    os.rename(socket_path + ".tmp", socket_path)  # the client waits for this name: it appears once ready
    waiting: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # the test worker is gone: so is its zygote
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:  # (no memory for another process now): this call runs as a plain subprocess
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    connection.sendall(json.dumps({"error": f"fork failed: {exc}"}).encode() + b"\n")
                connection.close()
                continue
            if pid == 0:
                for other in (listener, connection, *waiting.values()):
                    other.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                os.chdir(request["cwd"])
                sys.path.insert(0, request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                raise _Child(request["args"])
            for fd in fds:
                os.close(fd)
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with contextlib.suppress(OSError):  # the client gave up on it (its timeout)
                    connection.sendall(json.dumps({"returncode": code}).encode() + b"\n")
                connection.close()


def _warm_model_loading() -> None:
    """What transformers builds on its first model load in a process and keeps (its table of checkpoint key
    renamings: ~1,200 regular expressions, ~0.1 s), built once here rather than in every child that loads one."""
    with contextlib.suppress(ImportError, AttributeError):  # a transformers without it: each child builds its own
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")


def _main() -> None:
    try:
        _serve(sys.argv[1])
    except _Child as child:
        os._exit(_run_ownllm(child.args))


def _run_ownllm(args: list[str]) -> int:
    """`python -m ownllm ARGS` in the forked child; its exit status. The interpreter's own teardown is skipped
    (exit handlers and flushing are not): freeing the zygote's inherited objects writes to every page of them,
    a copy of each, ~2 s of a `--help` that otherwise takes 0.2 s."""
    import atexit
    import runpy
    import traceback

    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["ownllm", *args]
    code = 0
    try:
        runpy.run_module("ownllm", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = (exc.code or 0) & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        traceback.print_exc()
        code = -signal.SIGINT if isinstance(exc, KeyboardInterrupt) else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code == -signal.SIGINT:  # as Python ends on an uncaught KeyboardInterrupt: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


class ZygoteProcess:
    """A forked `ownllm` child as much of `subprocess.Popen` as the tests use: `pid`, `returncode`, `poll`, `wait`,
    `send_signal`, `terminate`, `kill`. It is the zygote's child, not this process's: its exit status comes over
    the socket the zygote answers on."""

    def __init__(self, args: list[str], replies: socket.socket) -> None:
        self.args = args
        self.pid = 0
        self.returncode: int | None = None
        self._replies = replies
        self._buffer = b""

    def read_reply(self, timeout: float | None) -> dict[str, Any]:
        """The zygote's next line (the child's pid, then its exit status), or TimeoutExpired."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._replies], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            chunk = self._replies.recv(4096)
            if not chunk:
                raise OSError("the zygote closed the connection without an exit status")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:  # (a zygote gone without an answer: still None, as Popen.poll never raises)
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.wait(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.read_reply(timeout)["returncode"]
            except OSError:  # the zygote ended before its child: wait for the child as Popen would, status unknown
                self.returncode = self._wait_orphan(timeout)
            self._replies.close()
        return self.returncode

    def _wait_orphan(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while _alive(self.pid):
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.05)
        return ORPHAN_STATUS

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # (a status not yet read: the pid is still the zygote's to reap)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The client side, one per test worker: `run` is `subprocess.run([python, -m, ownllm, *args], ...)`."""

    def __init__(self, base_env: Callable[[], dict[str, str]]) -> None:
        self._base_env = base_env  # what a call without overrides runs with: the zygote starts with it
        self._env: dict[str, str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._socket = ""
        self._broken = False
        self.forked = 0  # calls answered by a forked child (the others ran as plain subprocesses)
        self.fallback = ""  # why the last call that could not be forked ran as a plain subprocess
        self.restarts = 0  # zygotes started again after one ended

    def run(self, args: list[str], *, input: str, env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess[str]:
        if not self._usable(env):
            return _plain_run(args, input=input, env=env, timeout=timeout)
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        deadline = time.monotonic() + timeout  # one deadline for the whole call, as subprocess.run has
        child = self._fork(args, env, (stdin_read, stdout_write, stderr_write), timeout)
        for fd in (stdin_read, stdout_write, stderr_write):  # the child's ends: it has its own copies now
            os.close(fd)
        if child is None:
            for fd in (stdin_write, stdout_read, stderr_read):
                os.close(fd)
            return _plain_run(args, input=input, env=env, timeout=timeout)
        outputs: dict[int, bytes] = {}

        def drain(fd: int) -> None:
            with os.fdopen(fd, "rb") as stream:
                outputs[fd] = stream.read()

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError), os.fdopen(stdin_write, "wb") as stream:
                stream.write(input.encode(locale.getpreferredencoding(False)))

        threads = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (stdout_read, stderr_read)]
        threads.append(threading.Thread(target=feed, daemon=True))
        for thread in threads:
            thread.start()
        try:
            returncode = child.wait(max(0.0, deadline - time.monotonic()))
            for thread in threads:  # output still open after the exit (a process it started holds it): no result
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    raise subprocess.TimeoutExpired(["ownllm", *args], timeout)
        except (subprocess.TimeoutExpired, OSError):
            child.kill()
            raise subprocess.TimeoutExpired(["ownllm", *args], timeout) from None
        return subprocess.CompletedProcess(["ownllm", *args], returncode, _text(outputs.get(stdout_read, b"")),
                                           _text(outputs.get(stderr_read, b"")))

    def popen(self, args: list[str], *, stdout: Any = None, stderr: Any = None, env: dict[str, str]
              ) -> ZygoteProcess | subprocess.Popen[bytes]:
        """`subprocess.Popen([python, -m, ownllm, *args], stdin=DEVNULL, stdout=..., stderr=...)` for a process
        the test watches, signals or stops while it runs (a server, a training run to kill): `stdout` and
        `stderr` are None (this process's), DEVNULL or an open file; `stderr` may be STDOUT."""
        command = [sys.executable, "-m", "ownllm", *args]
        if not self._usable(env):
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
        opened = []

        def target(where: Any, default: int) -> int:
            if where is None:
                return default
            if where == subprocess.DEVNULL:
                opened.append(os.open(os.devnull, os.O_RDWR))
                return opened[-1]
            return where.fileno()

        stdin_fd = os.open(os.devnull, os.O_RDONLY)
        stdout_fd = target(stdout, 1)
        stderr_fd = stdout_fd if stderr == subprocess.STDOUT else target(stderr, 2)
        try:
            child = self._fork(args, env, (stdin_fd, stdout_fd, stderr_fd), START_TIMEOUT)
        finally:
            for fd in (stdin_fd, *opened):
                os.close(fd)
        if child is None:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)
        return child

    def _fork(self, args: list[str], env: dict[str, str], fds: tuple[int, int, int], timeout: float
              ) -> ZygoteProcess | None:
        """A child running `ownllm ARGS` with copies of `fds` as its stdin, stdout and stderr; None when the
        zygote could not fork this once (this call runs as a plain subprocess) or is stuck (a new one is started
        for the next call)."""
        try:
            message = json.dumps({"args": args, "cwd": os.getcwd(), "env": env}).encode()
        except (OSError, ValueError) as exc:  # (a deleted working directory): nothing to do with the zygote
            self.fallback = f"cannot describe the call: {exc!r}"
            return None
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(self._socket)
            socket.send_fds(client, [message], list(fds))
            child = ZygoteProcess(["ownllm", *args], client)
            reply = child.read_reply(min(timeout, FORK_TIMEOUT))
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            client.close()
            self._retire(f"the zygote did not answer: {exc!r}")  # stuck or gone: the next call starts another
            return None
        if "pid" not in reply:
            client.close()
            self.fallback = reply.get("error", f"the zygote answered {reply}")
            return None
        child.pid = reply["pid"]
        self.forked += 1
        return child

    def _usable(self, env: dict[str, str]) -> bool:
        if self._broken or os.environ.get("OWNLLM_TEST_FRESH_PROCESSES") == "1":
            return False
        if self._process is not None and self._process.poll() is not None:  # killed (the OOM killer?)
            self._retire(f"the zygote ended with {self._process.returncode}")
        if self._broken:
            return False
        if self._process is None and not self._start(self._base_env()):
            return False
        assert self._process is not None
        wanted, started = _settled(env), _settled(self._env or {})
        if wanted != started:
            self.fallback = "the environment differs from the zygote's in " + ", ".join(
                sorted(name for name in wanted.keys() | started.keys() if wanted.get(name) != started.get(name)))
            return False
        return True

    def _retire(self, reason: str) -> None:
        """Stop the zygote (if it still runs) and remove its socket; the next call starts another, up to
        MAX_RESTARTS times. Its children run on: their exit status then is ORPHAN_STATUS."""
        self.fallback = reason
        if not self._stop():
            return
        with contextlib.suppress(OSError):
            os.unlink(self._socket)  # (its log stays, for the reason)
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            self._broken = True
            self.fallback += f"; {MAX_RESTARTS} restarts used: plain subprocesses from now on"

    def close(self) -> None:
        """Stop the zygote and remove its folder (at the end of the test run)."""
        if self._stop():
            shutil.rmtree(os.path.dirname(self._socket), ignore_errors=True)

    def _stop(self) -> bool:
        """Kill the zygote and reap it; False if there was none."""
        if self._process is None:
            return False
        self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(10)
        self._process = None
        return True

    def _start(self, env: dict[str, str]) -> bool:
        self._socket = os.path.join(tempfile.mkdtemp(prefix="ownllm-zygote-"), "socket")
        log = open(self._socket + ".log", "wb")  # noqa: SIM115 (the zygote's for its lifetime)
        self._process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self._socket],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self._env = env
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self._socket):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._broken = True  # plain subprocesses from now on; the zygote's log says why
                self.fallback = f"the zygote did not start: see {self._socket}.log"
                self._process.kill()
                return False
            time.sleep(0.05)
        return True


def _plain_run(args: list[str], *, input: str, env: dict[str, str], timeout: float
               ) -> subprocess.CompletedProcess[str]:
    """`python -m ownllm ARGS` as a fresh interpreter: a call the zygote does not take."""
    return subprocess.run([sys.executable, "-m", "ownllm", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _settled(env: dict[str, str]) -> dict[str, str]:
    """What must be as the zygote's imports saw it; the rest of a call's environment is its child's alone."""
    return {name: value for name, value in env.items() if name not in PER_CALL_ENV}


def _text(data: bytes) -> str:
    """As `subprocess.run(..., text=True)` decodes: the locale's encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    _main()
