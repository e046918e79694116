"""The Python API: same options as the CLI."""

from __future__ import annotations

import pytest

import ownllm
from ownllm.errors import OwnLLMError

pytestmark = pytest.mark.slow


def test_load_generate_chat(default_model: str) -> None:
    m = ownllm.load(default_model, dtype="fp32")
    assert m.context_length == 8192
    out = m.generate("The capital of France is", max_new_tokens=5)
    assert "Paris" in out.text
    reply = m.chat([{"role": "user", "content": "Say hello."}], strategy="sample", seed=1, max_new_tokens=10)
    assert reply.text and reply.seed == 1
    assert "".join(m.stream("The capital of France is", max_new_tokens=5)) == out.text
    assert m.tokenize("hello world").count >= 2
    with pytest.raises(OwnLLMError, match="top-p"):
        m.generate("x", top_p=2.0)
