"""Rollouts (the completions online RL samples every step) through ownllm's own engine instead of TRL's
`model.generate`: the continuous-batching scheduler decodes the group together, and the completions of one prompt
share its prefill through the prefix cache (GRPO samples `num_generations` of each). Measured faster on a CPU
(bench/rollouts.py, bench/RESULTS.md); TRL's generation stays the fallback for what the batched forward does not
cover (`rollout_support`).

The policy is LoRA on a frozen base, so the base's weights are laid out for the batched forward once, and the
adapter is the PEFT modules' own `lora_A`/`lora_B` parameters: the optimizer updates them in place, so every step
samples the current policy with nothing copied or synchronised.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ownllm.generate.batching import generate_together
from ownllm.generate.hf import TransformersEngine
from ownllm.generate.params import SEED_RANGE, SamplingParams
from ownllm.generate.slots import SlotModel, slot_support
from ownllm.models.adapters import LoraWeights
from ownllm.models.load import LoadedModel

log = logging.getLogger(__name__)
POLICY = "policy"  # the adapter name the rollouts' rows run with
_ATTENTION = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


def live_lora(model: Any) -> tuple[LoraWeights | None, str]:
    """The active LoRA adapter of a PEFT-wrapped causal LM as the batched forward's deltas, sharing the
    parameters' storage; (None, why) when some LoRA module is one the batched forward cannot apply."""
    from peft.tuners.lora import LoraLayer

    name = model.active_adapter
    layers = model.get_base_model().model.layers
    weights: dict[tuple[int, str], tuple[Any, Any]] = {}
    scales = set()
    for index, block in enumerate(layers):
        for parent, projections in ((block.self_attn, _ATTENTION), (getattr(block, "mlp", None), _MLP)):
            for projection in projections:
                module = getattr(parent, projection, None)
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    if module.use_dora.get(name, False):
                        return None, "DoRA adapters are not in the batched forward"
                    weights[index, projection] = (module.lora_A[name].weight, module.lora_B[name].weight)
                    scales.add(float(module.scaling[name]))
    # every adapted module, embeddings included (PEFT keeps theirs in lora_embedding_A, not lora_A)
    adapted = sum(1 for module in model.modules() if isinstance(module, LoraLayer) and (
        name in module.lora_A or name in getattr(module, "lora_embedding_A", {})))
    if adapted != len(weights):
        return None, f"{adapted - len(weights)} LoRA modules sit outside the decoder's projections"
    if not weights:
        return None, "the adapter has no LoRA modules on the decoder's projections"
    if len(scales) != 1:
        return None, "the LoRA modules do not share one scale (rank or alpha patterns)"
    return LoraWeights(weights, scales.pop()), ""


def rollout_support(model: Any) -> str | None:
    """None when `model` (PEFT LoRA on a causal LM) can sample through ownllm's batched engine, else why not."""
    if not hasattr(model, "get_base_model") or not hasattr(model, "active_adapter"):
        return "the policy is not a PEFT LoRA model"
    reason = slot_support(model.get_base_model())
    if reason is not None:
        return reason
    lora, why = live_lora(model)
    return why if lora is None else None


class _PolicyEngine(TransformersEngine):
    """The base model's engine whose batched forwards carry the live policy adapter."""

    def __init__(self, loaded: LoadedModel, policy: LoraWeights) -> None:
        super().__init__(loaded)
        self.policy = policy

    def batched_model(self, slots: int, max_len: int, *, four_bit: bool = False) -> SlotModel | None:
        model = super().batched_model(slots, max_len)
        if model is not None:
            model.adapters[POLICY] = self.policy
        return model


class PolicyRollouts:
    """Samples completions of the policy being trained (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, peft_model: Any) -> None:
        """`loaded`: the model as loaded (its tokenizer, source and device); `peft_model`: the trainer's policy,
        LoRA on `loaded`'s model (`rollout_support` is None for it)."""
        policy, why = live_lora(peft_model)
        if policy is None:
            raise ValueError(why)
        self.engine = _PolicyEngine(replace(loaded, model=peft_model.get_base_model()), policy)

    def sample(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               top_k: int, seed: int, max_batch: int = 32) -> list[list[int]]:
        """The completion ids of each prompt, ending with the end-of-sequence token when one ended it (as TRL's
        own generation returns them); prompt i samples with seed + i."""
        params = SamplingParams(strategy="sample" if temperature > 0 else "greedy", max_new_tokens=max_new_tokens,
                                temperature=temperature if temperature > 0 else 1.0, top_p=top_p, top_k=top_k)
        seeds = [(seed + index) % SEED_RANGE[1] for index in range(len(prompt_ids))]
        completions = generate_together(self.engine, prompt_ids, params, seeds, max_batch=max_batch, adapter=POLICY)
        return [c.token_ids + ([c.stop_token_id] if c.stop_token_id is not None else []) for c in completions]

    def fits(self, prompt_ids: list[list[int]], max_new_tokens: int) -> bool:
        """Whether the longest prompt and its completion fit the model's context."""
        return max(map(len, prompt_ids)) + max_new_tokens <= self.engine.context_length
