"""A real `ownllm serve` on loopback (a subprocess on a free port), and a LoRA adapter made with peft."""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_cli


@functools.cache
def _poller() -> httpx.Client:
    """One client for the start-up polls of every server of this test process: each `httpx.get` builds a client,
    and its TLS context loads the CA bundle (~25 ms of CPU, a few hundred times a suite run, for plain loopback)."""
    return httpx.Client(timeout=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`ownllm serve ARGS --port 0`: the system picks a free port and the start-up line says which (read from the
    log), so two servers never race for one port and the line's address is tested with every server."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self._own_data: Path | None = None  # a data folder made here, removed at stop (never one passed in)
        if "--data-dir" not in args and "--no-jobs" not in args:  # files and jobs of this server only
            self._own_data = Path(tempfile.mkdtemp(prefix="ownllm-server-"))
            args = (*args, "--data-dir", str(self._own_data))
        handle, name = tempfile.mkstemp(prefix="ownllm-serve-", suffix=".log")
        os.close(handle)
        self.log = Path(name)
        with self.log.open("w") as log:
            self.process = start_cli("serve", *args, "--port", "0", stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            where = re.search(r"^serving .* on http://127\.0\.0\.1:(\d+)/v1", self.log.read_text(), re.MULTILINE)
            if where is None:
                time.sleep(0.3)
                continue
            self.port = int(where.group(1))
            self.url = f"http://127.0.0.1:{self.port}"
            # the line comes once the socket listens: the first poll answers
            assert self.port != 0 and _poller().get(f"{self.url}/health").status_code == 200
            self._wait_for_compiled_steps()
            return
        self.stop()
        raise RuntimeError("server did not start")

    def _wait_for_compiled_steps(self) -> None:
        """Until the one-row steps' compiled graphs are in use, or known not to be (test_compiled_decode): the tests
        compare replies across requests, and a reply's near-ties may go the other way once they are (their attention
        sums in another order). A first compile in a fresh test home takes a minute or a few; later starts load."""
        deadline = time.monotonic() + 1800  # a hang guard
        while time.monotonic() < deadline:
            note = _poller().get(f"{self.url}/health").json().get("batching", {}).get("compiled_steps") or ""
            if "compiling" not in note and "loading" not in note:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the server's one-row steps were still compiling: {self.log.read_text()[-2000:]}")

    def client(self, api_key: str = "none"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        """Stop the server and remove what it left in the temporary folder (its log, its own data folder)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.unlink(missing_ok=True)
        if self._own_data is not None:
            shutil.rmtree(self._own_data, ignore_errors=True)


@pytest.fixture(scope="session")
def rag_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ownllm.rag.index import Index

    store = tmp_path_factory.mktemp("rag") / "docs.db"
    Index(store).build([Path(__file__).resolve().parents[2] / "examples" / "rag" / "docs"])
    return store


@pytest.fixture(scope="session")
def server(default_model: str, adapter_dir: Path, rag_store: Path) -> Iterator[Server]:
    """The exact server: fp32 on the dequantized weights in every step. Its tests repeat seeded requests whose rows
    decode beside each other (n, best_of), which only rows rounding alike at every step width repeat; the GGUF's
    4-bit steps (the default elsewhere, tests/serve/test_slots.py) round a row by the step it is in."""
    running = Server(default_model, "--adapter", f"tuned={adapter_dir}", "--max-batch", "16", "--dtype", "fp32",
                     "--no-gguf-int4", "--max-model-len", "2048", "--rag-store", str(rag_store))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def strict_server(default_model: str) -> Iterator[Server]:
    """Keys required, one sequence at a time, a queue of one, small bodies: for 401, 413 and 429."""
    running = Server(default_model, "--api-key", "sk-test-1", "--api-key", "sk-test-2", "--max-batch", "1",
                     "--max-queue", "1", "--max-body", "4000", "--dtype", "fp32")
    yield running
    running.stop()
