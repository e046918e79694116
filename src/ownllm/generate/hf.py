"""The transformers backend: our own token loop over the model's forward and its KV cache.

Our loop (rather than `model.generate`) is what lets every step be explained, streamed and stopped on a
string. Where the architecture has a slot forward (generate/slots.py), every sequence runs through it: many at once
(`batched_model`, driven by the scheduler) and one alone (`_steps`: the CLI, the Python API), so both compute a
prompt alike (the same prefill chunks, the same kernels) and one sequence gets the same speed-ups as a batch (fused
projections, fp32 products of a row as measured fastest). Other architectures run transformers' own forward.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import GrammarState
from ownllm.generate.engine import Completion, Engine, Step, choose_step
from ownllm.generate.params import SamplingParams
from ownllm.generate.slots import PREFILL_CHUNK, SlotModel, slot_support
from ownllm.models.adapters import LoraWeights
from ownllm.models.chat_template import Message
from ownllm.models.load import LoadedModel

SCOPED_ADAPTER = "<scoped>"  # the name a scoped adapter's rows carry in the batched forward (no served name may be)


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
        self.scope = loaded.scope
        self.lora = loaded.lora
        if self.lora is not None:
            self._hook_lora(self.lora)
        self._one_sequence: SlotModel | None = None  # the slot forward of `_steps` (built on first use)
        self._one_sequence_lock = threading.Lock()
        self._sequence_ids = itertools.count()

    def route(self, conversation: list[Message] | str) -> str | None:
        return self.routes([conversation])[0]

    def routes(self, conversations: list[list[Message] | str]) -> list[str | None]:
        if self.scope is None or self.lora is None:
            return [None] * len(conversations)
        return [SCOPED_ADAPTER if covered else None for covered in self.scope.covers_each(conversations)]

    def on_base_weights(self, conversations: list[list[Message] | str]) -> list[bool]:
        if self.scope is None or self.lora is None:
            return [False] * len(conversations)
        return [route is None for route in self.routes(conversations)]

    def recalled(self, conversation: list[Message]) -> list[Message]:
        if self.scope is None or self.lora is None:
            return []
        return self.scope.recalled(conversation)  # type: ignore[arg-type,return-value]

    def _hook_lora(self, lora: LoraWeights) -> None:
        """The adapter's deltas on the one-sequence path (`_steps`, beams), added while `active_adapter` names it;
        the batched forward adds them per row itself (`batched_model`)."""
        modules = {}
        for name, module in self.model.named_modules():
            parts = name.split(".")
            index = parts.index("layers") + 1 if "layers" in parts else len(parts)
            if index < len(parts) - 1 and parts[index].isdigit():
                modules[int(parts[index]), parts[-1]] = module
        for key, (a, b) in lora.weights.items():
            if key not in modules:
                raise OwnLLMError(f"the adapter's LoRA weights name layer {key[0]} {key[1]}, which this model does "
                                  "not have", kind="unsupported", param="model")
            a, b = a.to(self.device), b.to(self.device)

            def add_delta(module: Any, args: tuple[Any, ...], output: torch.Tensor, a: torch.Tensor = a,
                          b: torch.Tensor = b) -> torch.Tensor | None:
                if self.active_adapter != SCOPED_ADAPTER:
                    return None
                return output + ((args[0].float() @ a.T) @ b.T * lora.scale).to(output.dtype)

            modules[key].register_forward_hook(add_delta)

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

    def _steps(self, prompt_ids: list[int], params: SamplingParams, seed: int,
               grammar: GrammarState | None = None) -> Iterator[Step]:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        forward = self._sequence_forward(len(prompt_ids) + params.max_new_tokens)
        try:
            logits = forward(prompt_ids)
            generated: list[int] = []
            while True:
                step = self._choose(logits, params, seen, generator, generated, grammar)
                generated.append(step.token_id)
                yield step
                if params.repetition_penalty != 1.0:
                    seen = torch.cat([seen, torch.tensor([step.token_id])])
                logits = forward([step.token_id])
        finally:
            forward.close()

    def _sequence_forward(self, tokens: int) -> _SequenceForward:
        """The forward of one sequence of up to `tokens` tokens: through the slot forward where the model has one,
        else transformers'. The one-sequence slot model is sized to the longest sequence asked for so far, grown by
        doubling, not to the whole context: its rotary tables for a 128k context would be ~100 MB."""
        if slot_support(self.model) is not None:
            return _TransformersSequence(self)
        with self._one_sequence_lock:
            held = self._one_sequence.max_len if self._one_sequence is not None else 0
            if held < tokens:  # (streams running meanwhile keep the model they started on)
                self._one_sequence = self.batched_model(1, min(self.context_length,
                                                               max(tokens, 2 * held, PREFILL_CHUNK)))
            model = self._one_sequence
        assert model is not None
        return _SlotSequence(model, next(self._sequence_ids), self)

    # --- batching ----------------------------------------------------------------------------
    def batching_mode(self) -> tuple[str, str]:
        reason = slot_support(self.model)
        if reason is not None:
            return "serial", reason
        prefix = f", {self.prefix.shape[0]} prompt-tuning tokens first" if self.prefix is not None else ""
        return "batched", f"slot forward for {self.model.config.model_type} on {self.device}{prefix}"

    def batched_model(self, slots: int, max_len: int, *, four_bit: bool = False) -> SlotModel | None:
        if slot_support(self.model) is not None:
            return None
        model = SlotModel(self.model, slots=slots, max_len=max_len, prefix=self.prefix, four_bit=four_bit)
        if self.lora is not None:
            model.adapters[SCOPED_ADAPTER] = self.lora
        return model

    def _generate_together(self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int], *,
                           max_batch: int, progress: Callable[[int], None] | None,
                           adapters: list[str | None] | None = None) -> list[Completion]:
        from ownllm.generate.batching import generate_together

        return generate_together(self, prompt_ids, params, seeds, max_batch=max_batch, progress=progress,
                                 adapter=adapters)

    def _choose(self, logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                generator: torch.Generator, generated: list[int], grammar: GrammarState | None = None) -> Step:
        return choose_step(logits, params, seen, generator, generated, decode=self._piece, grammar=grammar)

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
        """Sum of log p(token | everything before it) over the completion, in one forward pass (after the
        prompt-tuning prefix, when the model has one, as in generation)."""
        ids = torch.tensor([prompt_ids + completion_ids], device=self.device)
        with torch.inference_mode():
            if self.prefix is None:
                logits = self.model(input_ids=ids).logits[0].float()
            else:
                embeds = torch.cat([self.prefix[None], self.model.get_input_embeddings()(ids)], dim=1)
                logits = self.model(inputs_embeds=embeds).logits[0, self.prefix.shape[0]:].float()
        logprobs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        targets = torch.tensor(completion_ids, device=logprobs.device)
        return float(logprobs.gather(1, targets[:, None]).sum())


class _SequenceForward:
    """Logits of the last position after each call's tokens (the prompt first, then one token at a time)."""

    def __call__(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Frees the sequence's KV."""


class _TransformersSequence(_SequenceForward):
    def __init__(self, engine: TransformersEngine) -> None:
        from transformers import DynamicCache

        self.engine = engine
        self.cache = DynamicCache(config=engine.model.config)

    def __call__(self, ids: list[int]) -> torch.Tensor:
        return self.engine._forward(ids, self.cache)


class _SlotSequence(_SequenceForward):
    """One sequence in the engine's one-sequence slot model, its KV grown by doubling; the prompt in the
    scheduler's chunks. The adapter is the one the stream's step runs with (`active_adapter`)."""

    def __init__(self, model: SlotModel, sequence: int, engine: TransformersEngine) -> None:
        self.model, self.sequence, self.engine = model, sequence, engine
        self.length = 0  # tokens in the sequence's KV
        self.capacity = 0

    def __call__(self, ids: list[int]) -> torch.Tensor:
        if self.length + len(ids) > self.model.max_len:
            raise OwnLLMError(f"the sequence outgrew the model's context of {self.model.max_len} tokens",
                              param="max_new_tokens")
        adapter = self.engine.active_adapter
        if adapter is not None and adapter not in self.model.adapters:
            raise OwnLLMError(f"this model has no adapter named {adapter!r}", param="adapter")
        if self.length + len(ids) > self.capacity:
            self.capacity = min(self.model.max_len, max(self.length + len(ids), 2 * self.capacity, PREFILL_CHUNK))
            self.model.reserve(self.sequence, self.capacity + self.model.prefix_len)
        logits = None
        with torch.inference_mode():
            while ids:
                end = (self.length // PREFILL_CHUNK + 1) * PREFILL_CHUNK
                chunk, ids = ids[: end - self.length], ids[end - self.length :]
                logits = self.model.forward(torch.tensor([chunk]), torch.tensor([self.sequence]),
                                            torch.tensor([self.length]), adapters=[adapter])
                self.length += len(chunk)
        assert logits is not None
        return logits[0]

    def close(self) -> None:
        self.model.release(self.sequence)
