"""The slot forward on every architecture it covers, against transformers' own forward of the same model.

Tiny random-init models built from small configs (2-3 layers, hidden 64) run in a blink, so each variant the
slot forward implements is checked on its own: fused Phi-3 projections and partial rotary, Gemma 3's norms,
scaled embeddings, per-layer-type rotary bases and final softcapping, sliding windows (Mistral on every layer,
Qwen2 and Gemma 3 on some) shorter than the prompts so prefill chunks and decoding rows both cross them,
llama3 rotary scaling, a prompt-tuning prefix, LoRA on fused projections. Prompts of different lengths are
prefilled in chunks, then decode together in reused slots; the greedy tokens must be transformers' own and
the logits within fp32 summation noise. What the slot forward cannot compute is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from ownllm.errors import OwnLLMError
from ownllm.generate.slots import SlotModel, slot_support

VOCAB = 128
CHUNK = 5
STEPS = 12
SMALL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
GEMMA3 = {**SMALL, "num_hidden_layers": 3, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 6,
          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "final_logit_softcapping": 3.0}

ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_hidden_layers=2)),
    "llama-llama3-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_hidden_layers=2, rope_parameters=LLAMA3_ROPE)),
    "llama-biases": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "mistral-sliding": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SMALL, num_hidden_layers=2, sliding_window=6)),
    "qwen2-sliding-layers": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **SMALL, num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**SMALL, num_hidden_layers=2)),
    "phi3-partial-rotary": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **SMALL, num_hidden_layers=2, partial_rotary_factor=0.5)),
    "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3)),
}


def tiny(name: str) -> Any:
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (3, 11, 17, 1)]


def transformers_greedy(model: Any, prompt: list[int], prefix: torch.Tensor | None = None
                        ) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' forward with its KV cache, fed as the single-stream engine feeds it (a prefix goes in front
    of the first chunk as embeddings, TransformersEngine._forward)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompt), CHUNK):
            ids = torch.tensor([prompt[start : start + CHUNK]])
            if prefix is not None and start == 0:
                embeds = torch.cat([prefix[None], model.get_input_embeddings()(ids)], dim=1)
                out = model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(STEPS):
            row = out.logits[0, -1]
            logits.append(row.float())
            tokens.append(int(row.argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True, logits_to_keep=1)
    return tokens, logits


def slot_greedy(slots: SlotModel, batch: list[list[int]], slot_ids: list[int], adapters: list[str | None] | None = None
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Each prompt prefilled in chunks into its slot, then every row decoding together, each fed its own choice."""
    adapters = adapters or [None] * len(batch)
    last = []
    for prompt, slot, adapter in zip(batch, slot_ids, adapters, strict=True):
        for start in range(0, len(prompt), CHUNK):
            out = slots.forward(torch.tensor([prompt[start : start + CHUNK]]), torch.tensor([slot]),
                                torch.tensor([start]), [adapter])
        last.append(out[0])
    tokens: list[list[int]] = [[] for _ in batch]
    logits: list[list[torch.Tensor]] = [[] for _ in batch]
    for step in range(STEPS):
        for row, values in enumerate(last):
            logits[row].append(values.float())
            tokens[row].append(int(values.argmax()))
        positions = [len(p) + step for p in batch]
        last = list(slots.forward(torch.tensor([[t[-1]] for t in tokens]), torch.tensor(slot_ids),
                                  torch.tensor(positions), adapters))
    return tokens, logits


def assert_same(got: tuple[list[int], list[torch.Tensor]], expected: tuple[list[int], list[torch.Tensor]]) -> None:
    tokens, logits = got
    expected_tokens, expected_logits = expected
    assert tokens == expected_tokens
    gap = max((a - b).abs().max().item() for a, b in zip(logits, expected_logits, strict=True))
    assert gap < 1e-4, gap  # fp32: summation order only


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_slot_forward_is_transformers_forward(name: str) -> None:
    model = tiny(name)
    assert slot_support(model) is None
    batch = prompts()
    expected = [transformers_greedy(model, prompt) for prompt in batch]
    slots = SlotModel(model, slots=5, max_len=64)
    for slot_ids in ([4, 0, 2, 1], [0, 1, 2, 3]):  # the second wave reuses slots holding the first one's keys
        tokens, logits = slot_greedy(slots, batch, slot_ids)
        for row, want in enumerate(expected):
            assert_same((tokens[row], logits[row]), want)


def test_the_window_is_what_decides_on_sliding_layers() -> None:
    """The sweep above would not notice a window that is ignored if the window changed nothing: it does."""
    windowed, full = tiny("mistral-sliding"), tiny("mistral-sliding")
    full.config.sliding_window = None
    prompt = prompts()[2]
    assert transformers_greedy(windowed, prompt)[0] != transformers_greedy(full, prompt)[0]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_a_prompt_tuning_prefix_goes_first(name: str) -> None:
    """The learned embeddings sit at positions 0..P-1 of every sequence (not scaled, as the engine puts them)."""
    model = tiny(name)
    prefix = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    batch = prompts()
    slots = SlotModel(model, slots=4, max_len=64, prefix=prefix)
    tokens, logits = slot_greedy(slots, batch, [3, 1, 0, 2])
    for row, prompt in enumerate(batch):
        assert_same((tokens[row], logits[row]), transformers_greedy(model, prompt, prefix))
    assert tokens[1] != transformers_greedy(model, batch[1])[0]  # the prefix changes the answer


def test_lora_on_fused_phi3_projections_matches_peft(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny("phi3")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path)
    model = tiny("phi3")  # get_peft_model changed that one in place
    batch = prompts()[:3]
    base = transformers_greedy(model, batch[1])
    tuned = PeftModel.from_pretrained(model, str(tmp_path))
    expected = [transformers_greedy(tuned, batch[0]), base, transformers_greedy(tuned, batch[2])]
    model = tuned.unload()
    slots = SlotModel(model, slots=3, max_len=64)
    slots.load_adapter("tuned", tmp_path)
    tokens, logits = slot_greedy(slots, batch, [1, 2, 0], ["tuned", None, "tuned"])
    for row, want in enumerate(expected):
        assert_same((tokens[row], logits[row]), want)
    assert expected[0][0] != transformers_greedy(model, batch[0])[0]


def test_what_the_slot_forward_cannot_compute_is_refused_with_the_reason() -> None:
    longrope = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        **SMALL, num_hidden_layers=2, max_position_embeddings=64, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                         "long_factor": [2.0] * 8}))
    assert "longrope" in slot_support(longrope)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in slot_support(gpt2)
    with pytest.raises(OwnLLMError, match="gpt2"):
        SlotModel(gpt2, slots=1, max_len=8)


def test_the_model_and_the_slot_forward_share_the_fused_weights() -> None:
    """Fusing q|k|v and gate|up does not copy the weights: the model's modules read the fused tensors."""
    model = tiny("llama")
    before = sum(p.numel() for p in model.parameters())
    first = SlotModel(model, slots=1, max_len=8)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.data_ptr() == first.layers[0].qkv[attention.q_proj.weight.shape[0]:].data_ptr()
    assert SlotModel(model, slots=2, max_len=8).layers[0].qkv is first.layers[0].qkv  # built once per model
    assert sum(p.numel() for p in model.parameters()) == before
