"""Shared fixtures: a test model home (pulled once per machine) and the real default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"
TEST_HOME = Path(os.environ.get("OWNLLM_TEST_HOME", platformdirs.user_cache_dir("ownllm-tests")))
os.environ["OWNLLM_HOME"] = str(TEST_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model() -> str:
    """The embedded default model, pulled into the test home (once; later runs reuse it)."""
    from ownllm.models.pull import pull

    pull(DEFAULT_MODEL)
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def engine(default_model: str):
    from ownllm.generate.open import open_engine

    return open_engine(default_model, dtype="fp32")


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `ownllm ARGS` the way a user does: a fresh process, real stdin/stdout/stderr."""
    return subprocess.run(
        [sys.executable, "-m", "ownllm", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one `error:` line naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
