"""Fuzz the OpenAPI schema of a live server with schemathesis: whatever it sends, no 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import Server

pytestmark = pytest.mark.slow


def test_no_server_errors_under_fuzzing(default_model: str) -> None:
    pytest.importorskip("schemathesis")
    # a short context keeps every generated request (even n=16 at the largest max_tokens) quick
    server = Server(default_model, "--max-model-len", "256", "--dtype", "fp32")
    try:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "12", "--request-timeout", "120", "--no-color"],
            capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
