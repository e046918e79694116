"""The batched slot forward (what `ownllm serve` runs) is transformers' forward in the same dtype.

Greedy decoding through `SlotModel` (chunked prefill, then rows of different lengths decoding together, slots
reused by a second wave) must pick the tokens that transformers' forward with its KV cache picks (the CLI's
loop), in fp32 and in bf16, with logits within a tolerance that fits the dtype; in bf16 a step may go the other
way only where transformers' own top two tokens tie at bf16 resolution. LoRA rows are held to PEFT's unmerged
forward the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Name three primary colors.",
    "What is 12 times 7?",
    "Who wrote Romeo and Juliet?",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "What is the largest planet in our solar system?",
    "Write a haiku about rain.",
    "What does a bee make?",
    "Explain in one sentence what photosynthesis is, and why plants need sunlight to grow.",
    "What is the chemical symbol for gold?",
    "List two mammals that can fly or glide.",
    "I have three apples and eat one. How many apples do I have left?",
    "What is the capital of Japan?",
    "Hi!",
    "Summarise the plot of Cinderella in two sentences for a child who is five years old.",
    "What language is spoken in Brazil?",
    "What is the square root of 81?",
    "Which ocean is the largest?",
    "Suggest a name for a small black cat that likes to sleep in the sun all day long.",
    "What is the freezing point of water in Fahrenheit?",
]
NEW_TOKENS = 8
CHUNK = 10  # prefill chunk (the server's is 256): small, so every prompt takes several, at offsets > 0
WAVE = 12  # rows decoding together; the second wave reuses the first wave's slots (stale cache beyond its rows)

# Max |logit difference| against transformers' single-sequence forward, same tokens fed, measured on this sweep
# (24 prompts x 8 steps; 2-core AVX512-BF16 CPU, torch 2.13, transformers 5.24):
#
#                                        fp32 prefill / decode   bf16 prefill / decode   bf16 argmax flips
#   transformers' own left-padded batch  5.2e-5 / 1.2e-4         0.88 / 1.56             1
#   slot model with F.rms_norm (before)  0      / 7.6e-5         1.13 / 1.50             2
#   slot model now                       0      / 8.9e-5         0    / 1.04             2 (both exact bf16 ties)
#
# Prefill is one row through the same ops on the same shapes as transformers (the fused q|k|v and gate|up
# matmuls only concatenate outputs), so it is bit-exact; the bf16 bound is one ulp of the largest logits
# (|x| < 64), far under the 0.5-1.1 of a forward that rounds anywhere differently from transformers (the old
# norm; LoRA deltas in bf16 instead of PEFT's fp32: 0.56). Should it fail elsewhere with gaps of that size,
# some kernel there rounds a fused matmul differently: look before loosening. Decoding multiplies [rows, C]
# where the CLI multiplies [1, C], and oneDNN's bf16 kernels round those differently now and then, so decode
# logits get the yardstick of transformers' own batch: its 1.56 rounded up. fp32 differences are summation
# order only (~1e-5 relative), so 1e-3 is tight and not flaky. An argmax may flip only where transformers' own
# top two are within the gap of that step, i.e. a tie at bf16 resolution (a 14.75 vs 14.6875 became 14.625 vs
# 14.625), and only a few times in the sweep; in fp32 never.
PREFILL_ATOL = {"fp32": 1e-3, "bf16": 0.25}
DECODE_ATOL = {"fp32": 1e-3, "bf16": 2.0}
MAX_TIES = {"fp32": 0, "bf16": 4}


@pytest.fixture(scope="module")
def load(default_model: str) -> Callable[[str], Any]:
    """The default model in a dtype, loaded once per dtype for this module."""
    from ownllm.models.load import load_model

    return functools.cache(lambda dtype: load_model(default_model, dtype=dtype))


def chat_prompts(tokenizer: Any, questions: list[str] = QUESTIONS, system: str | None = "Answer briefly."
                 ) -> list[list[int]]:
    """Rendered as the server renders chat requests; a short system message keeps the sweep's prompts short."""
    head = [{"role": "system", "content": system}] if system else []
    return [list(tokenizer.apply_chat_template([*head, {"role": "user", "content": q}], add_generation_prompt=True,
                                               return_dict=False)) for q in questions]


def transformers_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits from transformers' forward with its KV cache (the CLI's loop), one
    sequence, its prompt fed in the same chunks as the slot path (chunk boundaries alone move bf16 logits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompt), CHUNK):
            out = model(input_ids=torch.tensor([prompt[start : start + CHUNK]], device=model.device), cache=cache,
                        use_cache=True, logits_to_keep=1)
        for step in range(steps):
            row = out.logits[0, -1]
            logits.append(row.float().cpu())  # where the slot forward returns its logits
            tokens.append(int(row.argmax()))
            if step < steps - 1:
                out = model(input_ids=torch.tensor([[tokens[-1]]], device=model.device), cache=cache, use_cache=True,
                            logits_to_keep=1)
    return tokens, logits


_references: dict[tuple[int, tuple[int, ...], int], tuple[list[int], list[torch.Tensor]]] = {}


def base_greedy(model: Any, prompt: list[int], steps: int = NEW_TOKENS) -> tuple[list[int], list[torch.Tensor]]:
    """`transformers_greedy` of one of this module's loaded base models (`load`: alive, so their ids stay theirs,
    and never left changed), computed once: the sweeps here share prompts (~0.5 s each a dtype, one core)."""
    key = (id(model), tuple(prompt), steps)
    if key not in _references:
        _references[key] = transformers_greedy(model, prompt, steps)
    return _references[key]


def slot_decode(slots: Any, prompts: list[list[int]], slot_ids: list[int], steps: int,
                feed: list[list[int]] | None = None, adapters: list[str | None] | None = None
                ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """The server's path: each prompt prefilled in chunks into its slot, then all rows decode together.

    Returns each row's greedy choice and logits per step. Rows are fed their own choice, or `feed` (another
    path's tokens, so that both paths see the same history and every step compares).
    """
    adapters = adapters or [None] * len(prompts)
    last = []
    for prompt, slot, adapter in zip(prompts, slot_ids, adapters, strict=True):
        for start in range(0, len(prompt), CHUNK):
            out = slots.forward(torch.tensor([prompt[start : start + CHUNK]]), torch.tensor([slot]),
                                torch.tensor([start]), [adapter])
        last.append(out[0])
    tokens: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for step in range(steps):
        for row, values in enumerate(last):
            logits[row].append(values.float())
            tokens[row].append(int(values.argmax()))
        if step < steps - 1:
            fed = [[t[step]] for t in (feed or tokens)]
            positions = [len(p) + step for p in prompts]  # where the token fed now goes
            last = list(slots.forward(torch.tensor(fed), torch.tensor(slot_ids), torch.tensor(positions), adapters))
    return tokens, logits


def compare(tokenizer: Any, prompt: list[int], got: tuple[list[int], list[torch.Tensor]],
            expected: tuple[list[int], list[torch.Tensor]], dtype: str, prefill_exact: bool = True) -> int:
    """Assert the slot path's steps match transformers'; returns how many near-ties went the other way.

    A step may pick another token than transformers only where transformers' own top two are closer than the
    logit gap measured at that step (a tie that rounding may break either way); the gap itself is bounded: the
    prefill's by one ulp where it runs transformers' own ops (`prefill_exact`), else as a decode step's.
    """
    (tokens, logits), (expected_tokens, expected_logits) = got, expected
    text = tokenizer.decode(prompt)
    gaps = [(a - b).abs().max().item() for a, b in zip(logits, expected_logits, strict=True)]
    assert gaps[0] <= (PREFILL_ATOL if prefill_exact else DECODE_ATOL)[dtype], (text, gaps)
    assert max(gaps) <= DECODE_ATOL[dtype], (text, gaps)
    ties = 0
    for step, (token, expected_token) in enumerate(zip(tokens, expected_tokens, strict=True)):
        if token != expected_token:
            margin = (expected_logits[step][expected_token] - expected_logits[step][token]).item()
            assert margin <= 2 * gaps[step], (text, step, tokenizer.decode(tokens), tokenizer.decode(expected_tokens))
            ties += 1
    return ties


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_slot_greedy_and_logits_match_transformers(load: Callable[[str], Any], dtype: str) -> None:
    from ownllm.generate.slots import SlotModel

    loaded = load(dtype)
    # a full wave, then 4 of the other 12 questions in the same slots (the second wave takes them in reverse, so
    # "Hi!" lands in the slot of a prompt 7 tokens longer: stale rows beyond its end; then two of the longest, and
    # one a token shorter than its slot's): each question costs ~13 forwards a path
    prompts = chat_prompts(loaded.tokenizer, QUESTIONS[:WAVE] + [QUESTIONS[i] for i in (17, 12, 18, 21)])
    slots = SlotModel(loaded.model, slots=WAVE, max_len=128)
    ties = 0
    for wave in range(0, len(prompts), WAVE):
        batch = prompts[wave : wave + WAVE]
        expected = [base_greedy(loaded.model, prompt) for prompt in batch]
        ids = list(range(len(batch))) if wave == 0 else list(reversed(range(len(batch))))
        tokens, logits = slot_decode(slots, batch, ids, NEW_TOKENS, feed=[e[0] for e in expected])
        for prompt, got, want in zip(batch, zip(tokens, logits, strict=True), expected, strict=True):
            ties += compare(loaded.tokenizer, prompt, got, want, dtype)
    assert ties <= MAX_TIES[dtype], ties


@pytest.mark.parametrize("fp32_attention", [False, True], ids=["bf16-attention", "fp32-attention"])
def test_the_server_path_in_bf16_answers_as_transformers_does(load: Callable[[str], Any],
                                                               fp32_attention: bool) -> None:
    """Regression: batched bf16 answered the France question with 'L'Étoile, la Marseillaise, la femme,' where
    transformers' bf16 forward said Paris (on an AVX-512 BF16 CPU). On an AVX2-only CPU transformers' own bf16
    forward gives that answer too: the slot path must answer as it does, Paris wherever it does. Decoding
    attention runs in bf16 or on the same values in fp32, whichever this CPU does faster: both are checked."""
    from ownllm.generate.slots import SlotModel

    loaded = load("bf16")
    prompts = chat_prompts(loaded.tokenizer, [QUESTIONS[0], QUESTIONS[12]], system=None)  # the template's own
    theirs, _ = transformers_greedy(loaded.model, prompts[0], 8)
    slots = SlotModel(loaded.model, slots=2, max_len=128)
    slots._upcast_decode = fp32_attention
    tokens, _ = slot_decode(slots, prompts, [1, 0], 8)
    assert loaded.tokenizer.decode(tokens[0]) == loaded.tokenizer.decode(theirs)


def test_lora_rows_match_peft_in_bf16(load: Callable[[str], Any], tmp_path: Path) -> None:
    """Adapter rows next to a base row, against PEFT's unmerged forward (adapter weights in fp32, as PEFT keeps
    them under a bf16 base)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ownllm.generate.slots import SlotModel

    loaded = load("bf16")
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    random_adapter = get_peft_model(model, config)
    random_adapter.save_pretrained(tmp_path)
    random_adapter.unload()  # the module's shared model stays LoRA-free
    prompts = chat_prompts(tokenizer, [QUESTIONS[1], QUESTIONS[12], QUESTIONS[5]])
    adapters: list[str | None] = ["tuned", None, "tuned"]
    base = base_greedy(model, prompts[1])
    tuned = PeftModel.from_pretrained(model, str(tmp_path))
    try:
        expected = [transformers_greedy(tuned, prompts[0], NEW_TOKENS), base,
                    transformers_greedy(tuned, prompts[2], NEW_TOKENS)]
    finally:
        tuned.unload()
    slots = SlotModel(model, slots=3, max_len=128)
    slots.load_adapter("tuned", tmp_path)
    tokens, logits = slot_decode(slots, prompts, [2, 0, 1], NEW_TOKENS, [e[0] for e in expected], adapters)
    ties = sum(compare(tokenizer, prompt, (tokens[row], logits[row]), expected[row], "bf16")
               for row, prompt in enumerate(prompts))
    assert ties <= MAX_TIES["bf16"]
    assert expected[0][0] != base_greedy(model, prompts[0])[0]  # the adapter changes the answer


GEMMA_PROMPTS = ["The capital of France is", "Water boils at a temperature of",
                 "Once upon a time, in a small village by the sea, there lived an old fisherman who",
                 "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def gemma3(gemma3_folder: Path) -> Any:
    from ownllm.generate.open import open_engine

    return open_engine(str(gemma3_folder), dtype="fp32")


def test_gemma3_batches_give_the_single_stream_engines_greedy_tokens(gemma3: Any) -> None:
    """Gemma 3 (q/k norms, (1 + w) norms, scaled embeddings, local and global layers) decoded together through the
    scheduler (`generate_batch`) picks the tokens the single-stream engine picks, prompt by prompt."""
    from ownllm.generate.params import SamplingParams

    assert gemma3.batching_mode()[0] == "batched"
    params = SamplingParams(max_new_tokens=10)
    batch = gemma3.generate_batch(GEMMA_PROMPTS, params)
    assert [c.token_ids for c in batch] == [gemma3.generate(p, params).token_ids for p in GEMMA_PROMPTS]


def test_gemma3_slot_logits_match_transformers(gemma3: Any) -> None:
    """The same in chunks at offsets, rows decoding together in reused slots, held to the fp32 tolerance."""
    from ownllm.generate.slots import SlotModel

    prompts = [gemma3.encode(p) for p in GEMMA_PROMPTS]
    expected = [transformers_greedy(gemma3.model, prompt, NEW_TOKENS) for prompt in prompts]
    slots = SlotModel(gemma3.model, slots=4, max_len=64)
    tokens, logits = slot_decode(slots, prompts, [2, 0, 3, 1], NEW_TOKENS, feed=[e[0] for e in expected])
    for prompt, got, want in zip(prompts, zip(tokens, logits, strict=True), expected, strict=True):
        assert compare(gemma3.tokenizer, prompt, got, want, "fp32") == 0


def test_prompt_tuned_batches_give_the_single_stream_engines_tokens(load: Callable[[str], Any], engine: Any,
                                                                     tmp_path: Path) -> None:
    """A prompt-tuning adapter (PEFT folder, loaded as `ownllm generate FOLDER` loads it) decodes in batches: its
    learned tokens go in front of every sequence, and each answer is the single-stream engine's."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    loaded = load("fp32")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text="Always answer in French, like a pirate.",
                                tokenizer_name_or_path=loaded.source.location)
    get_peft_model(loaded.model, config).save_pretrained(tmp_path)
    tuned = open_engine(str(tmp_path), dtype="fp32")
    assert tuned.prefix is not None and tuned.prefix.shape[0] == 8
    assert tuned.batching_mode()[0] == "batched"
    prompts = [chat_prompts(tuned.tokenizer, [q])[0] for q in QUESTIONS[:4]]
    params = SamplingParams(max_new_tokens=8)
    batch = tuned.generate_batch(prompts, params)
    assert [c.token_ids for c in batch] == [tuned.generate(p, params).token_ids for p in prompts]
    assert [c.token_ids for c in batch] != [c.token_ids for c in engine.generate_batch(prompts, params)]


def test_gguf_int4_rows_are_as_close_to_fp32_as_bf16_rows(load: Callable[[str], Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF's 4-bit weights run as stored (int4 kernel, bf16 activations) are a bf16-class computation of the
    file's weights: against transformers in fp32 (the file dequantized exactly), their logit gaps and argmax flips
    are of the size the dequantized bf16 path has, measured in the same run (on the full 24 x 24 sweep: median
    gap 0.48 vs 0.41, flips 18 vs 13 of 576; bench/RESULTS.md). So are an fp32 model's int4 rows (its rows
    rounded to bf16 into the kernel, everything between the products fp32)."""
    import statistics

    from ownllm.generate.slots import SlotModel

    monkeypatch.setenv("OWNLLM_COMPILED_DECODE", "0")  # these sweeps decode many rows at once: nothing to compile
    reference, bf16 = load("fp32"), load("bf16")
    prompts = chat_prompts(reference.tokenizer)[:WAVE]
    expected = [base_greedy(reference.model, prompt) for prompt in prompts]
    measured = {}
    for name, loaded, four_bit in (("bf16", bf16, False), ("bf16 int4", bf16, True), ("fp32 int4", reference, True)):
        slots = SlotModel(loaded.model, slots=WAVE, max_len=128, four_bit=four_bit)
        if four_bit:
            assert slots.four_bit.lm_head is not None and all(layer.qkv for layer in slots.four_bit.layers)
            slots.four_bit_rows = 64  # every forward of this sweep (whatever this CPU measured as faster)
        tokens, logits = slot_decode(slots, prompts, list(range(WAVE)), NEW_TOKENS, feed=[e[0] for e in expected])
        gaps = [(a - b).abs().max().item() for row, want in zip(logits, expected, strict=True)
                for a, b in zip(row, want[1], strict=True)]
        flips = sum(t != e for row, want in zip(tokens, expected, strict=True) for t, e in zip(row, want[0],
                                                                                             strict=True))
        measured[name] = (statistics.median(gaps), flips)
    dense_gap, dense_flips = measured["bf16"]
    for name in ("bf16 int4", "fp32 int4"):
        four_gap, four_flips = measured[name]
        assert four_gap <= 2 * dense_gap, measured
        assert four_flips <= dense_flips + 4, measured


def test_gguf_int4_off_or_past_its_rows_is_the_dequantized_forward(load: Callable[[str], Any]) -> None:
    from ownllm.generate.slots import SlotModel

    bf16 = load("bf16")
    prompts = chat_prompts(bf16.tokenizer)[:3]
    dense = slot_decode(SlotModel(bf16.model, slots=3, max_len=128), prompts, [0, 1, 2], 4)
    wide = SlotModel(bf16.model, slots=3, max_len=128, four_bit=True)
    wide.four_bit_rows = 0  # no forward is narrow enough: the int4 kernel is never used
    # nor the compiled attention, whose sums run in another order (test_compiled_decode holds it to a bound)
    wide.compiled = None
    assert slot_decode(wide, prompts, [0, 1, 2], 4)[0] == dense[0]
    assert all(torch.equal(a, b) for got, want in zip(slot_decode(wide, prompts, [0, 1, 2], 4)[1], dense[1],
                                                      strict=True) for a, b in zip(got, want, strict=True))
    narrow = SlotModel(bf16.model, slots=3, max_len=128, four_bit=True)
    narrow.four_bit_rows = 64
    # A question whose first token wins by a wide margin (4.2 logits in fp32): the France one is a near tie
    # there ("The" 25.36 vs "L" 25.26), which int4 weights turn into "L'Étoile" on some CPUs, fairly.
    gold = QUESTIONS.index("What is the chemical symbol for gold?")
    tokens, _ = slot_decode(narrow, chat_prompts(bf16.tokenizer, [QUESTIONS[gold]], system=None), [0], 8)
    assert "Au" in bf16.tokenizer.decode(tokens[0])
