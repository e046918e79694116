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
        """Tokens the model attends over: prompt plus generated tokens must fit in it."""
        return self.engine.context_length

    def generate(self, prompt: str | list[int], **options: Any) -> Completion:
        """Continue `prompt` (text, or token ids) and return the whole completion.

        Options are SamplingParams' fields (strategy, max_new_tokens, temperature, top_k, top_p, stop, seed,
        logprobs, explain, ...); an unknown or out-of-range one raises OwnLLMError naming it.

        Example:
            >>> c = m.generate("The capital of France is", max_new_tokens=8)
            >>> c.text, c.finish_reason, c.completion_tokens
            (' Paris.\\n\\nThe answer is:', 'length', 8)
        """
        return self.engine.generate(prompt, SamplingParams.from_options(**options))

    def stream(self, prompt: str | list[int], **options: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as it becomes final (stop strings never leak out).

        Example:
            >>> for piece in m.stream("Once upon a time", max_new_tokens=32, strategy="sample", seed=0):
            ...     print(piece, end="", flush=True)
        """
        for event in self.engine.stream(prompt, SamplingParams.from_options(**options)):
            if isinstance(event, TextDelta) and event.text:
                yield event.text

    def chat(self, messages: list[Message], **options: Any) -> Completion:
        """Answer a conversation, rendered with the model's own chat template.

        Example:
            >>> m.chat([{"role": "system", "content": "Answer in one word."},
            ...         {"role": "user", "content": "Capital of Italy?"}], max_new_tokens=8).text
            'Italy is indeed a sovereign state in the'
        """
        return self.engine.chat(messages, SamplingParams.from_options(**options))

    def tokenize(self, text: str, *, price_per_1m: float | None = None) -> TokenReport:
        """How the model splits `text` into tokens (ids, pieces, count; a cost estimate if a price is given).

        Example:
            >>> m.tokenize("Hello world").count
            2
        """
        return token_report(self.engine.tokenizer, text, price_per_1m=price_per_1m)


def load(model: str, *, backend: str = "auto", dtype: str = "auto", device: str = "auto") -> LLM:
    """Load a model by alias, pulled name, HF folder, fine-tuning run folder, .gguf file or hub id.

    Args:
        model: what to load; an unknown name raises OwnLLMError listing the local models and aliases.
        backend: auto (llama.cpp for a .gguf when llama-cpp-python is installed, else transformers),
            transformers or llama.cpp.
        dtype: transformers backend: auto (measured on this machine), fp32, bf16 or fp16.
        device: auto, cpu or cuda.

    Example:
        >>> import ownllm
        >>> m = ownllm.load("smollm2-135m-instruct")
        >>> m.generate("The capital of France is", max_new_tokens=5).text
    """
    return LLM(open_engine(model, backend=backend, dtype=dtype, device=device))
