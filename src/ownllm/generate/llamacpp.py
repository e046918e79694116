"""The llama.cpp backend (optional extra `ownllm[llama]`): runs a GGUF as it is, quantized.

llama.cpp computes the logits; choosing the token goes through the same `pick_token` as the
transformers backend, so every strategy and `--explain` mean the same thing on both.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import GrammarState
from ownllm.generate.engine import Completion, Engine, Step, choose_step
from ownllm.generate.llamacpp_slots import LlamaCppSlots
from ownllm.generate.params import SamplingParams


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppEngine(Engine):
    backend = "llama.cpp"

    def __init__(self, gguf: Path, tokenizer: Any, *, name: str, n_ctx: int | None = None,
                 threads: int | None = None) -> None:
        if not llama_cpp_available():
            raise OwnLLMError("the llama.cpp backend needs llama-cpp-python", kind="unsupported",
                              param="backend", hint="pip install 'ownllm[llama]'")
        from llama_cpp import Llama

        self.tokenizer = tokenizer  # the HF tokenizer: same ids as the GGUF vocabulary
        self.name = name
        self._llama = Llama(model_path=str(gguf), n_ctx=n_ctx or 0, n_threads=threads or os.cpu_count(),
                            logits_all=False, verbose=False)
        self.context_length = int(self._llama.n_ctx())
        atexit.register(self._llama.close)  # before interpreter teardown, when llama_cpp can still free it
        self._eos_ids = ({int(self._llama.token_eos()), tokenizer.eos_token_id}) - {None, -1}

    @property
    def vocab_size(self) -> int:
        return int(self._llama.n_vocab())

    @property
    def llama_model(self) -> Any:
        """llama.cpp's handle of the loaded GGUF weights, shared by contexts of its own (batched decoding)."""
        return self._llama.model

    # --- batching: llama.cpp decodes many sequences in one context --------------------------------
    def batching_mode(self) -> tuple[str, str]:
        return "batched", "llama.cpp batched decoding"

    def batched_model(self, slots: int, max_len: int, *, four_bit: bool = False) -> LlamaCppSlots:
        return LlamaCppSlots(self.llama_model, slots=slots, max_len=max_len)

    def _generate_together(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int], *,
                           max_batch: int, progress: Callable[[int], None] | None,
                           adapters: list[str | None] | None = None) -> list[Completion]:
        from ownllm.generate.batching import generate_together

        return generate_together(self, prompt_ids, params, seeds, max_batch=max_batch, progress=progress,
                                 adapter=adapters)

    def _last_logits(self) -> torch.Tensor:
        """The logits of the last evaluated token (llama.cpp keeps only those unless logits_all)."""
        import numpy as np

        pointer = self._llama._ctx.get_logits()
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self._llama.n_vocab(),)).copy())

    def _steps(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               grammar: GrammarState | None = None) -> Iterator[Step]:
        generator = torch.Generator().manual_seed(seed)
        llama = self._llama
        llama.reset()
        llama.eval(prompt_ids)
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        generated: list[int] = []
        while True:
            step = choose_step(self._last_logits(), params, seen, generator, generated,
                               decode=lambda i: self.tokenizer.decode([i]), grammar=grammar)
            token = step.token_id
            generated.append(token)
            yield step
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, torch.tensor([token])])
            llama.eval([token])

    def sequence_logprob(self, prompt_ids: list[int], completion_ids: list[int]) -> float:
        total = 0.0
        llama = self._llama
        llama.reset()
        llama.eval(prompt_ids)
        for token in completion_ids:
            logits = self._last_logits()
            total += float(torch.log_softmax(logits, dim=-1)[token])
            llama.eval([token])
        return total
