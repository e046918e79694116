"""Rollouts through ownllm's engine sample the policy as it is now: the live LoRA parameters, not a copy taken
when the trainer started (greedy completions equal PEFT's own `generate`, before and after an in-place update as
the optimizer makes); the EOS that ends a completion is kept, as TRL's generation keeps it."""

from __future__ import annotations

import pytest
import torch

from ownllm.finetune.rollouts import PolicyRollouts, live_lora, rollout_support


@pytest.fixture(scope="module")
def policy(default_model: str):
    from peft import LoraConfig, get_peft_model

    from ownllm.models.load import load_model

    loaded = load_model(default_model, dtype="fp32")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (the base's answers): make the adapter change them
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return loaded, model


def peft_greedy(model, tokenizer, prompt_ids: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_rollouts_follow_the_live_adapter(policy) -> None:
    loaded, model = policy
    assert rollout_support(model) is None
    rollouts = PolicyRollouts(loaded, model)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("Name a colour.", "What is 2 + 3?", "Say hello in French.")]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]

    def both() -> tuple[list[list[int]], list[list[int]]]:
        ours = rollouts.sample(prompts, max_new_tokens=12, temperature=0, top_p=1.0, top_k=0, seed=0)
        theirs = [peft_greedy(model, tokenizer, p, 12) for p in prompts]
        return ours, theirs

    before, expected = both()
    assert before == expected
    lora, _ = live_lora(model)
    assert lora is not None and len(lora.weights) == 30 * 7
    with torch.no_grad():  # what an optimizer step does: the same tensors, new values
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(-3.0)
    after, expected_after = both()
    assert after == expected_after and after != before
    eos = set(rollouts.engine.eos_token_ids)
    assert all(ids[-1] in eos for ids in before + after if len(ids) < 12)  # a stopped completion keeps its EOS


def test_sampled_rollouts_are_reproducible_per_seed(policy) -> None:
    loaded, model = policy
    rollouts = PolicyRollouts(loaded, model)
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a word."}],
                                                  add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    first = rollouts.sample([prompt] * 4, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, seed=7)
    again = rollouts.sample([prompt] * 4, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, seed=7)
    assert first == again and len({tuple(ids) for ids in first}) > 1  # a group differs within, not between runs


def test_an_unknown_rollout_engine_is_named() -> None:
    from ownllm.errors import OwnLLMError
    from ownllm.finetune.config import load_config

    with pytest.raises(OwnLLMError, match="rollouts must be one of auto, ownllm, trl"):
        load_config(model="m", data="d.jsonl", method="grpo", reward_fn=["exact"], rollouts="vllm")


def test_a_lora_on_the_embeddings_is_not_sampled_without_it(default_model: str) -> None:
    """PEFT keeps an embedding's LoRA apart (lora_embedding_A/B): the batched forward has no place for it, so such a
    policy is left to TRL's generation rather than sampled without its embedding deltas."""
    from peft import LoraConfig, get_peft_model

    from ownllm.models.load import load_model

    loaded = load_model(default_model, dtype="fp32")
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                     task_type="CAUSAL_LM"))
    assert rollout_support(model) == "1 LoRA modules sit outside the decoder's projections"


def test_a_step_ours_cannot_sample_is_an_error_when_ownllm_was_asked_for(default_model: str, tmp_path) -> None:
    """`rollouts: ownllm` never falls back in silence (a prompt past the context here); `auto` would, and counts it
    for the run card."""
    import json

    from ownllm.errors import OwnLLMError
    from ownllm.finetune.config import load_config
    from ownllm.finetune.grpo import build_rl_trainer, rollouts_card_note

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    cfg = load_config(model=default_model, data=str(data), out=str(tmp_path / "run"), method="grpo",
                      reward_fn=["json-valid"], num_generations=2, max_completion_length=8, lora_r=4,
                      batch_size=1, grad_accum=1, rollouts="ownllm")
    trainer, _ = build_rl_trainer(cfg, tmp_path / "run", data)
    context = trainer.own_rollouts.engine.context_length
    too_long = [[1] * context]
    with pytest.raises(OwnLLMError, match=f"a prompt of {context} tokens \\+ max_completion_length 8 is past"):
        trainer._generate_single_turn(too_long, None, {}, 2)
    assert trainer._not_ours(trainer.own_rollouts, [[1] * 10], None, {}) is None
    trainer.rollout_fallbacks = 1
    assert rollouts_card_note(trainer).endswith("1 sampling call(s) fell back to TRL's generation (a prompt past "
                                                "the context, or sampling settings ours does not take)")
