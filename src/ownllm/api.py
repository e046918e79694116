"""The Python API: `ownllm.load(name)` gives an object with the CLI's verbs as methods."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams
from ownllm.models.chat_template import Message
from ownllm.models.tokens import TokenReport, token_report


class LLM:
    """A loaded model. Generation options are SamplingParams' fields, as keywords.

    Example:
        >>> m = ownllm.load("smollm2-135m-instruct")
        >>> m.generate("The capital of France is", max_new_tokens=8).text
        >>> m.chat([{"role": "user", "content": "Hi!"}], strategy="sample", seed=1).text
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def generate(self, prompt: str, **options: Any) -> Completion:
        return self.engine.generate(prompt, SamplingParams.from_options(**options))

    def stream(self, prompt: str, **options: Any) -> Iterator[str]:
        for event in self.engine.stream(prompt, SamplingParams.from_options(**options)):
            if isinstance(event, TextDelta) and event.text:
                yield event.text

    def chat(self, messages: list[Message], **options: Any) -> Completion:
        return self.engine.chat(messages, SamplingParams.from_options(**options))

    def tokenize(self, text: str, *, price_per_1m: float | None = None) -> TokenReport:
        return token_report(self.engine.tokenizer, text, price_per_1m=price_per_1m)


def load(model: str, *, backend: str = "auto", dtype: str = "auto", device: str = "auto") -> LLM:
    """Load a model by alias, pulled name, folder, .gguf file or hub id."""
    return LLM(open_engine(model, backend=backend, dtype=dtype, device=device))
