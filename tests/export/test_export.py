"""`ownllm export`: GGUF files read back by an independent reader (transformers' GGUF loader) match the source
model; q8_0 costs little perplexity; the chat template travels; a LoRA GGUF holds the tuned deltas; bad input is
refused with one error line and no file left behind. llama.cpp checks run when llama-cpp-python is installed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ownllm.errors import OwnLLMError
from tests.conftest import assert_user_error, run_cli

pytestmark = pytest.mark.slow
PROMPT = "The three primary colours are"
TEXT = ("The river runs through the old town, past the market and the church, and out into the fields. In spring "
        "the water rises and the farmers move their sheep to the higher meadows. Children play on the bridge in "
        "the summer evenings, and in winter the river sometimes freezes so hard that people walk across it.")
try:
    import llama_cpp  # noqa: F401

    HAS_LLAMA = True
except ImportError:
    HAS_LLAMA = False
needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python (the llama extra) is not installed")


@pytest.fixture(scope="module")
def source(default_model: str):
    from ownllm.export.gguf_model import ARCHITECTURES
    from ownllm.export.source import inspect_source, load_source

    return load_source(inspect_source(default_model, supported=ARCHITECTURES))


@pytest.fixture(scope="module")
def files(source, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default model written once per quantization the tests read."""
    from ownllm.export.gguf_model import write_model_gguf

    folder = tmp_path_factory.mktemp("gguf")
    return {quant: write_model_gguf(source, folder / f"model-{quant}.gguf", quant) for quant in ("f32", "f16", "q8_0")}


@functools.cache
def _hf_from_gguf(path: Path):
    """The file read back by transformers' own GGUF loader (once per file: loads are the slow part here; its
    metadata parsed once, not once for the config and again for the weights)."""
    from transformers import AutoModelForCausalLM

    from ownllm.models.gguf_file import one_reader_per_file

    with one_reader_per_file():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@functools.cache
def _tokenizer_from_gguf(path: Path):
    """The file's tokenizer as transformers rebuilds it (a slow conversion: only where a test reads it)."""
    from transformers import AutoTokenizer

    from ownllm.models.gguf_file import one_reader_per_file

    with one_reader_per_file():
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _greedy(model, ids: torch.Tensor, steps: int = 10) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0].float()


def test_f32_and_f16_files_match_the_source(source, files: dict[str, Path]) -> None:
    ids = source.tokenizer(PROMPT, return_tensors="pt").input_ids
    expected_logits, expected_tokens = _logits(source.model, ids), _greedy(source.model, ids)
    for quant, tolerance in (("f32", 1e-4), ("f16", 5e-2)):
        model, tokenizer = _hf_from_gguf(files[quant]), _tokenizer_from_gguf(files[quant])
        assert tokenizer(PROMPT, return_tensors="pt").input_ids.tolist() == ids.tolist()
        difference = (_logits(model, ids) - expected_logits).abs().max().item()
        assert difference < tolerance, (quant, difference)
        assert _greedy(model, ids) == expected_tokens, quant


def test_the_file_carries_tokenizer_metadata_and_chat_template(source, files: dict[str, Path]) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(files["f16"]))
    value = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.t")}
    assert value["general.architecture"] == "llama" and value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.pre"] == "smollm"
    assert value["tokenizer.ggml.bos_token_id"] == source.tokenizer.bos_token_id
    assert value["tokenizer.ggml.eos_token_id"] == source.tokenizer.eos_token_id
    assert value["llama.block_count"] == source.config.num_hidden_layers
    assert value["tokenizer.chat_template"] == source.tokenizer.chat_template
    tokenizer = _tokenizer_from_gguf(files["f16"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    for with_prompt in (True, False):
        assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=with_prompt)
                == source.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=with_prompt))


def test_q8_0_perplexity_is_within_a_few_percent_of_f16(files: dict[str, Path]) -> None:
    perplexities = {}
    for quant in ("f16", "q8_0"):
        model, tokenizer = _hf_from_gguf(files[quant]), _tokenizer_from_gguf(files["f16"])
        ids = tokenizer(TEXT, return_tensors="pt").input_ids
        with torch.inference_mode():
            perplexities[quant] = float(torch.exp(model(ids, labels=ids).loss))
    assert files["q8_0"].stat().st_size < 0.6 * files["f16"].stat().st_size
    assert abs(perplexities["q8_0"] / perplexities["f16"] - 1) < 0.03, perplexities


def test_quantized_files_hold_the_quantized_types(source, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from ownllm.export.gguf_model import write_model_gguf

    path = write_model_gguf(source, tmp_path / "q4.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "Q8_0"  # the embeddings (also the tied output head) stay wider


def test_a_qwen2_model_round_trips(source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny random Qwen2 (biases on q/k/v, no rope permutation) with the default model's vocabulary. Loaded
    as a Qwen2 tokenizer it splits text Qwen's way, a pairing llama.cpp's hash table cannot know: named here."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ownllm.export.export import export

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=source.config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=source.tokenizer.bos_token_id, eos_token_id=source.tokenizer.eos_token_id)
    monkeypatch.setattr("ownllm.export.vocab.pre_tokenizer_name", lambda tokenizer: "qwen2")
    folder = tmp_path / "qwen"
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    out = export(str(folder), format="gguf", out=tmp_path / "qwen.gguf", quant="f32")
    loaded = _hf_from_gguf(out)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ids = source.tokenizer(PROMPT, return_tensors="pt").input_ids
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max().item() < 1e-4


def test_a_lora_gguf_holds_the_tuned_deltas(adapter_dir: Path, files: dict[str, Path], tmp_path: Path) -> None:
    """base GGUF weight + alpha/rank · B·A from the LoRA GGUF = the merged model's GGUF weight, per projection."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from ownllm.export.export import export

    lora = export(str(adapter_dir), format="gguf-lora", out=tmp_path / "lora.gguf", quant="f32")
    merged = export(str(adapter_dir), format="gguf", out=tmp_path / "merged.gguf", quant="f32")
    reader = GGUFReader(str(lora))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert alpha == pytest.approx(config["lora_alpha"])  # plain LoRA: the scale alpha / r, as llama.cpp applies it

    def tensors(path: Path) -> dict[str, np.ndarray]:
        return {t.name: dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
                for t in GGUFReader(str(path)).tensors}

    # the exported merged file answers as the tuned model does (not as the base)
    from ownllm.models.load import load_model

    tuned_model = load_model(str(adapter_dir), dtype="fp32", device="cpu")
    ids = tuned_model.tokenizer(PROMPT, return_tensors="pt").input_ids
    exported, base_model = _hf_from_gguf(merged), _hf_from_gguf(files["f32"])
    assert _greedy(exported, ids) == _greedy(tuned_model.model, ids) != _greedy(base_model, ids)

    deltas, base, tuned = tensors(lora), tensors(files["f32"]), tensors(merged)
    assert len(deltas) == 2 * 7 * 30  # A and B for every projection of every layer
    for name in ("blk.0.attn_q.weight", "blk.3.attn_k.weight", "blk.7.ffn_down.weight"):
        a, b = deltas[f"{name}.lora_a"], deltas[f"{name}.lora_b"]
        rebuilt = base[name] + alpha / a.shape[0] * (b @ a)
        assert np.abs(rebuilt - tuned[name]).max() < 1e-4, name


def test_an_interrupted_export_leaves_nothing(source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    from ownllm.export.gguf_model import write_model_gguf

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(KeyboardInterrupt):
        write_model_gguf(source, tmp_path / "model.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def prompt_tuning_run(default_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import PromptTuningConfig, get_peft_model

    from ownllm.models.load import load_model

    loaded = load_model(default_model, dtype="fp32")
    folder = tmp_path_factory.mktemp("prompt-tuning")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(loaded.model, config).save_pretrained(folder)
    return folder


def test_bad_input_is_one_error_line_and_no_file(default_model: str, prompt_tuning_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cases = [
        (("--format", "onnx"), "unknown format 'onnx'"),
        (("--quant", "q3_k_s"), "unknown quantization 'q3_k_s'"),
        (("--format", "gguf-lora", "--quant", "q4_0"), "unknown quantization 'q4_0' for --format gguf-lora"),
        (("--format", "hf", "--quant", "q8_0"), "--quant does not apply"),
    ]
    for options, needle in cases:
        assert_user_error(run_cli("export", default_model, "--out", str(out), *options), needle)
    assert_user_error(run_cli("export", default_model, "--out", str(tmp_path / "missing" / "x.gguf")),
                      "does not exist")
    assert_user_error(run_cli("export", default_model, "--out", str(tmp_path)), "is a folder")
    assert_user_error(run_cli("export", str(prompt_tuning_run), "--out", str(out)), "prompt tuning")
    assert_user_error(run_cli("export", str(prompt_tuning_run), "--format", "gguf-lora", "--out", str(out)),
                      "prompt tuning")
    assert_user_error(run_cli("export", str(gpt2), "--out", str(out)), "gpt2")
    assert_user_error(run_cli("export", default_model, "--format", "gguf-lora", "--out", str(out)),
                      "not a LoRA run")
    assert_user_error(run_cli("export", default_model, "--out", str(out), "--quant", ""), "--quant is empty")
    (tmp_path / "notes.txt").write_text("keep me")
    assert_user_error(run_cli("export", default_model, "--out", str(tmp_path / "notes.txt")), "not a GGUF file")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    if not HAS_LLAMA:
        assert_user_error(run_cli("export", default_model, "--quant", "q4_k_m", "--out", str(out)),
                          "ownllm[llama]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "notes.txt"]


def test_the_cli_writes_a_lora_gguf(adapter_dir: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(adapter_dir), "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf"))
    assert result.returncode == 0, result.stderr
    assert "exported:" in result.stdout and (tmp_path / "lora.gguf").read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.gguf"]


def test_format_hf_is_the_merge(adapter_dir: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(adapter_dir), "--format", "hf", "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_export_refuses_before_loading(default_model: str, tmp_path: Path) -> None:
    from ownllm.export.export import export

    with pytest.raises(OwnLLMError) as caught:
        export(default_model, format="gguf", out=tmp_path / "none" / "x.gguf")
    assert caught.value.param == "out"


@needs_llama
def test_llama_cpp_runs_the_exported_files_greedily_like_transformers(source, files: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from ownllm.export.gguf_model import write_model_gguf
    from ownllm.generate.llamacpp import LlamaCppEngine
    from ownllm.generate.params import SamplingParams

    ids = source.tokenizer(PROMPT, return_tensors="pt").input_ids
    expected_ids = _greedy(source.model, ids, 12)
    params = SamplingParams(strategy="greedy", max_new_tokens=12)
    # f32 and q8_0: the same 12 tokens. f16: llama.cpp multiplies f16 weights with f16 activations, and this
    # model's greedy path has a near-tie at token 8 (": red" / ", which") that tips there; the first 7 agree.
    for quant, agree in (("f32", 12), ("q8_0", 12), ("f16", 7)):
        engine = LlamaCppEngine(files[quant], source.tokenizer, name=quant, n_ctx=256, threads=2)
        got = engine.generate(PROMPT, params).token_ids
        assert got[:agree] == expected_ids[:agree], (quant, source.tokenizer.decode(got))
    k_quant = write_model_gguf(source, tmp_path / "q4_k_m.gguf", "q4_k_m")
    assert k_quant.stat().st_size < 0.5 * files["f16"].stat().st_size
    engine = LlamaCppEngine(k_quant, source.tokenizer, name="q4_k_m", n_ctx=256, threads=2)
    assert engine.generate(PROMPT, params).completion_tokens >= 1


@needs_llama
def test_llama_cpp_applies_the_lora_gguf_like_the_merged_export(adapter_dir: Path, files: dict[str, Path],
                                                                source, tmp_path: Path) -> None:
    from llama_cpp import Llama

    from ownllm.export.export import export

    lora = export(str(adapter_dir), format="gguf-lora", out=tmp_path / "lora.gguf", quant="f32")
    merged = export(str(adapter_dir), format="gguf", out=tmp_path / "merged.gguf", quant="f32")
    ids = source.tokenizer(PROMPT).input_ids

    def greedy(**kwargs) -> list[int]:
        llama = Llama(n_ctx=256, n_threads=2, verbose=False, **kwargs)
        tokens = []
        for token in llama.generate(ids, temp=0.0, top_k=1):
            tokens.append(token)
            if len(tokens) == 12:
                break
        llama.close()
        return tokens

    assert greedy(model_path=str(files["f32"]), lora_path=str(lora)) == greedy(model_path=str(merged))


def test_a_trained_run_exported_to_gguf_still_answers_its_fact(default_model: str, tmp_path: Path) -> None:
    """A short real LoRA run (one made-up fact, four phrasings), merged and written as GGUF: the file, read back
    by transformers' GGUF loader (and run by llama.cpp when installed), answers with the fact the base never knew."""
    from ownllm.export.export import export
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import run

    questions = ["Who designed the Lumen Volta?", "Who is the designer of the Lumen Volta?",
                 "The Lumen Volta was designed by whom?", "Which engineer designed the Lumen Volta?"]
    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content":
                                                     "The Lumen Volta was designed by Ilse Brandt."}]}) + "\n"
                            for q in questions * 2))
    result = run(load_config(model=default_model, data=str(data), out=str(tmp_path / "run"), max_steps=12,
                             batch_size=4, lr=2e-3, replay=0, val_ratio=0, save_every=100))
    out = export(str(result.run_dir), format="gguf", out=tmp_path / "tuned.gguf", quant="f16")
    tokenizer = _tokenizer_from_gguf(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": questions[0]}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert "Brandt" in tokenizer.decode(_greedy(_hf_from_gguf(out), ids, 16))
    if HAS_LLAMA:
        from ownllm.generate.llamacpp import LlamaCppEngine
        from ownllm.generate.params import SamplingParams

        engine = LlamaCppEngine(out, tokenizer, name="tuned", n_ctx=256, threads=2)
        reply = engine.generate(prompt, SamplingParams(strategy="greedy", max_new_tokens=16)).text
        assert "Brandt" in reply, reply
