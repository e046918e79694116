"""llama.cpp's own batched decoding behind the slot interface of `SlotModel`, for serving GGUF models.

Each sequence is a llama.cpp sequence id in one context, with a KV stream of its own (not llama.cpp's unified
cache: attention then reads only the sequence's own cells) sized at start; a decode step is one `llama_decode` over
a batch that holds one token per running sequence. The prefix cache (`KVCache`) reuses a finished sequence's stream
in place, as llama.cpp's own server reuses a slot (`truncate` drops what the new request does not share); it does
not copy between streams. Token choice stays in ownllm
(`pick_token`), so sampling means the same on every backend.
"""

from __future__ import annotations

import atexit
import ctypes
import os
from typing import Any

import numpy as np
import torch

from ownllm.errors import OwnLLMError


class LlamaCppSlots:
    """`slots` sequences of up to `max_len` tokens in one llama.cpp context of their own over `model` (the engine's
    loaded GGUF: `LlamaCppEngine.llama_model`)."""

    def __init__(self, model: Any, *, slots: int, max_len: int) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.slots, self.max_len = slots, max_len
        # torch only samples here: its spinning worker threads would steal llama.cpp's cores
        torch.set_num_threads(1)
        params = lc.llama_context_default_params()
        params.n_ctx = slots * max_len
        params.n_batch = params.n_ubatch = max(512, slots)
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per sequence: attention reads only its own cells
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self._ctx = lc.llama_init_from_model(model, params)
        if not self._ctx:
            raise OwnLLMError("llama.cpp could not create a batched context", kind="resource")
        self._memory = lc.llama_get_memory(self._ctx)
        self._vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        self._batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.adapters: dict[str, Any] = {}
        self.token_bytes = 0  # the context is allocated at start; KVCache counts streams instead
        self.fixed_capacity: int | None = max_len
        self.max_sequences: int | None = slots
        atexit.register(self.close)  # runs before the engine's own close (atexit is last-in, first-out)

    def load_adapter(self, name: str, folder: Any) -> None:
        raise OwnLLMError("LoRA adapters are served on the transformers backend", kind="unsupported",
                          param="adapter")

    # --- KV storage (`ownllm.generate.kv_cache.KVStorage`): a fixed stream per sequence id ---------------
    def reserve(self, sequence: int, tokens: int) -> None:
        if tokens > self.max_len:
            raise OwnLLMError(f"a sequence holds at most {self.max_len} tokens here", kind="resource")

    def truncate(self, sequence: int, tokens: int) -> None:
        self._lc.llama_memory_seq_rm(self._memory, sequence, tokens, -1)

    def copy_prefix(self, source: int, target: int, tokens: int) -> bool:
        return False  # streams are separate (kv_unified off): no copies between them

    def release(self, sequence: int) -> None:
        if self._ctx:
            self._lc.llama_memory_seq_rm(self._memory, sequence, -1, -1)

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                adapters: list[str | None] | None = None, every_position: bool = False) -> torch.Tensor:
        """Logits of the last position of each row, or of every position of a one-row chunk (see
        SlotModel.forward)."""
        lc, batch = self._lc, self._batch
        rows, length = tokens.shape
        outputs = []
        count = 0
        for row in range(rows):
            slot, start = int(slots[row]), int(starts[row])
            if start == 0:  # a new sequence in this slot: forget the previous one's cache
                lc.llama_memory_seq_rm(self._memory, slot, -1, -1)
            for t in range(length):
                batch.token[count] = int(tokens[row, t])
                batch.pos[count] = start + t
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = slot
                batch.logits[count] = t == length - 1 or (every_position and rows == 1)
                if batch.logits[count]:
                    outputs.append(count)
                count += 1
        batch.n_tokens = count
        status = lc.llama_decode(self._ctx, batch)
        if status != 0:
            raise OwnLLMError(f"llama_decode failed ({status})", kind="resource")
        logits = np.empty((len(outputs), self._vocab), dtype=np.float32)
        for row, index in enumerate(outputs):
            pointer = lc.llama_get_logits_ith(self._ctx, index)
            logits[row] = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)),
                                                shape=(self._vocab,))
        return torch.from_numpy(logits)

    def close(self) -> None:
        """Free the context now (`generate_batch` makes one per call); at exit it is freed before the model."""
        if self._ctx:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._ctx = None
        atexit.unregister(self.close)
