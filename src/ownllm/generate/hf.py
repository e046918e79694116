"""The transformers backend: our own token loop over the model's forward and its KV cache.

Our loop (rather than `model.generate`) is what lets every step be explained, streamed, stopped on
a string and, later, batched with other requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Engine, Step, choose_step
from ownllm.generate.params import SamplingParams
from ownllm.models.load import LoadedModel


class TransformersEngine(Engine):
    backend = "transformers"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.source.name
        self.context_length = loaded.context_length
        self.device = loaded.device
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(eos) if isinstance(eos, list) else {eos}
        self._eos_ids = (ids | {self.tokenizer.eos_token_id}) - {None}
        self.prefix = loaded.prefix_embeds
        if self.prefix is not None:
            self.supports_batching = False  # the batched paths know nothing of prefix embeddings

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings  # may exceed the tokenizer's (padded tables)

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        """Logits for the last position; `cache` (a transformers Cache) is extended in place. The first call
        of a sequence puts a prompt-tuning prefix, if the model has one, in front of the prompt."""
        tokens = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            if self.prefix is not None and cache.get_seq_length() == 0:
                embeds = torch.cat([self.prefix[None], self.model.get_input_embeddings()(tokens)], dim=1)
                out = self.model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                out = self.model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def _steps(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> Iterator[Step]:
        from transformers import DynamicCache

        generator = torch.Generator(device="cpu").manual_seed(seed)
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(prompt_ids, cache)
        generated: list[int] = []
        while True:
            step = self._choose(logits, params, seen, generator, generated)
            generated.append(step.token_id)
            yield step
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, torch.tensor([step.token_id])])
            logits = self._forward([step.token_id], cache)

    supports_batching = True

    def _batch_steps(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int]
                     ) -> Iterator[list[Step]]:
        """One static batch: prompts left-padded, one forward per step for all rows."""
        from transformers import DynamicCache

        rows, width = len(prompt_ids), max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos_ids)
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        seen = [torch.tensor(p, dtype=torch.long) for p in prompt_ids]
        cache = DynamicCache(config=self.model.config)
        logits = self._forward_batch(ids, mask, positions, cache)
        next_position = positions[:, -1:] + 1
        generated: list[list[int]] = [[] for _ in range(rows)]
        while True:
            steps = [self._choose(logits[row], params, seen[row], generators[row], generated[row])
                     for row in range(rows)]
            for row, step in enumerate(steps):
                generated[row].append(step.token_id)
            yield steps
            if params.repetition_penalty != 1.0:
                seen = [torch.cat([s, torch.tensor([step.token_id])]) for s, step in zip(seen, steps, strict=True)]
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
            tokens = torch.tensor([[step.token_id] for step in steps])
            logits = self._forward_batch(tokens, mask, next_position, cache)
            next_position = next_position + 1

    def _forward_batch(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
                       ) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _choose(self, logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator, generated: list[int]) -> Step:
        return choose_step(logits, params, seen, generator, generated, decode=self._piece)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _beam(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        if self.prefix is not None:
            raise OwnLLMError("beam search is not available for prompt-tuned models", kind="unsupported",
                              param="strategy")
        input_ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=params.num_beams,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.ignore_eos else 0,
                repetition_penalty=params.repetition_penalty,
                early_stopping=True,
                length_penalty=1.0,
                eos_token_id=sorted(self._eos_ids),
                pad_token_id=self.tokenizer.pad_token_id or sorted(self._eos_ids)[0],
            )
        return out[0, len(prompt_ids):].tolist()

    def sequence_logprob(self, prompt_ids: list[int], completion_ids: list[int]) -> float:
        """Sum of log p(token | everything before it) over the completion, in one forward pass."""
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        targets = torch.tensor(completion_ids, device=logprobs.device)
        return float(logprobs.gather(1, targets[:, None]).sum())
