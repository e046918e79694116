"""The tests' `ownllm` processes (tests/cli_zygote.py): forked from a process with the libraries imported, they
behave as `python -m ownllm` does — stdin, stdout, stderr, exit status, working directory, environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import conftest
from tests.conftest import run_cli


def test_a_forked_cli_has_its_own_stdio_status_directory_and_environment(default_model: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    before = conftest._ZYGOTE.forked
    piped = run_cli("tokenize", default_model, "--no-show-tokens", input="some piped text")
    assert piped.returncode == 0 and "tokens: " in piped.stdout
    wrong = run_cli("generate", "no-such-model", "hi")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: ") and wrong.stdout == ""
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}) + "\n")
    relative = run_cli("data", "check", "data.jsonl")  # a path relative to the caller's directory
    assert relative.returncode == 0, relative.stderr
    if os.environ.get("OWNLLM_TEST_FRESH_PROCESSES") != "1":
        # none of these fell back to a plain subprocess
        assert conftest._ZYGOTE.forked == before + 3, conftest._ZYGOTE.fallback
    home = run_cli("models", "--json", env={"OWNLLM_HOME": str(tmp_path / "empty-home")})  # a fresh process
    assert home.returncode == 0 and json.loads(home.stdout)["models"] == []


def test_a_started_cli_can_be_waited_for_polled_and_killed(default_model: str, tmp_path: Path) -> None:
    """`start_cli` (servers, runs a test kills): Popen's pid, poll, wait, send_signal and exit status."""
    import signal
    import subprocess

    from tests.conftest import start_cli
    from tests.serve.conftest import free_port

    log = tmp_path / "help.txt"
    with log.open("w") as stream:
        helped = start_cli("--help", stdout=stream, stderr=subprocess.STDOUT)
    assert helped.wait(timeout=120) == 0 and helped.poll() == 0 and "Usage" in log.read_text()
    server = start_cli("serve", default_model, "--no-jobs", "--port", str(free_port()), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    assert server.poll() is None and server.pid > 0
    with pytest.raises(subprocess.TimeoutExpired):
        server.wait(timeout=0.5)
    server.send_signal(signal.SIGKILL)
    assert server.wait(timeout=60) == -signal.SIGKILL


def test_a_zygote_that_ended_is_replaced(tmp_path: Path) -> None:
    """A zygote gone mid-run (the OOM killer, a crash) is started again for the next call, not left to send every
    later call to a plain subprocess."""
    from tests.cli_zygote import Zygote

    if os.environ.get("OWNLLM_TEST_FRESH_PROCESSES") == "1":
        pytest.skip("OWNLLM_TEST_FRESH_PROCESSES=1 turns the zygote off")
    env = conftest._cli_env()
    zygote = Zygote(lambda: dict(env))
    try:
        assert zygote.run(["--help"], input="", env=env, timeout=300).returncode == 0
        assert zygote._process is not None
        zygote._process.kill()
        zygote._process.wait(60)
        again = zygote.run(["--help"], input="", env=env, timeout=300)
        assert again.returncode == 0 and "Usage" in again.stdout
        assert (zygote.forked, zygote.restarts) == (2, 1), zygote.fallback
    finally:
        zygote.close()
