"""Adapter folders as PEFT writes them: a tiny random Llama for the reading rules, the default model for loading."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ownllm.errors import OwnLLMError
from ownllm.finetune.run_folder import RunRecord, final_model_path, write_record
from ownllm.models.adapters import Adapter

PROJECTIONS = ["q_proj", "v_proj", "down_proj"]


def tiny_model():
    """A two-layer Llama of random weights: real PEFT files in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def save_lora(model, folder: Path, **settings) -> Path:
    from peft import LoraConfig, get_peft_model

    tuned = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules=PROJECTIONS, **settings))
    tuned.save_pretrained(folder)
    return folder


def save_prompt_tuning(model, folder: Path, tokens: int = 3) -> Path:
    """A prompt-tuning adapter with random virtual tokens (nothing trained: only its files matter)."""
    from peft import PromptTuningConfig, get_peft_model

    # prompt tuning wraps the model without changing its layers, so the model needs no copy
    tuned = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    tuned.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_lora_folder_gives_fp32_pairs_per_layer_and_projection(model, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = save_lora(model, tmp_path / "lora")
    adapter = Adapter.open(folder)
    assert adapter.kind == "lora" and adapter.path == folder and adapter.virtual_tokens == 0
    lora = adapter.lora_weights()
    assert set(lora.weights) == {(layer, p) for layer in (0, 1) for p in PROJECTIONS}
    assert lora.scale == 8 / 4
    saved = load_file(folder / "adapter_model.safetensors")
    a, b = lora.weights[(1, "down_proj")]
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"])
    assert torch.equal(b, saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"])
    assert Adapter.open(save_lora(model, tmp_path / "rs", use_rslora=True)).lora_weights().scale == 8 / 4**0.5


def test_the_base_model_comes_from_the_run_record_else_from_peft(model, tmp_path: Path) -> None:
    folder = save_lora(model, tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/peft-base"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert Adapter.open(folder).base_model == "org/peft-base"
    write_record(folder, RunRecord(base_model="/models/run-base", method="lora", spec="run-base"))
    assert Adapter.open(folder).base_model == "/models/run-base"
    (folder / "ownllm_run.json").write_text("{}")
    with pytest.raises(OwnLLMError, match=r"ownllm_run\.json does not name the base model"):
        Adapter.open(folder)


def test_lora_merges_as_peft_merges(model, tmp_path: Path) -> None:
    from peft import PeftModel

    folder = save_lora(model, tmp_path / "lora")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))(ids).logits
        merged = Adapter.open(folder).merge_into(copy.deepcopy(model))
        assert not hasattr(merged, "peft_config")  # a plain transformers model again
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)


def test_prompt_tuning_folder_gives_its_prefix_and_refuses_to_merge(model, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = save_prompt_tuning(model, tmp_path / "pt", tokens=3)
    adapter = Adapter.open(folder)
    assert adapter.kind == "prompt_tuning" and adapter.virtual_tokens == 3
    prefix = adapter.prefix_embeddings(copy.deepcopy(model))
    assert prefix.shape == (3, 16) and prefix.dtype == torch.float32
    assert torch.equal(prefix, load_file(folder / "adapter_model.safetensors")["prompt_embeddings"])
    for attempt in (adapter.check_mergeable, lambda: adapter.merge_into(copy.deepcopy(model))):
        with pytest.raises(OwnLLMError, match="prefix of 3 virtual tokens, not weights") as info:
            attempt()
        assert info.value.kind == "unsupported"
    with pytest.raises(OwnLLMError, match="prompt-tuning adapter, not a LoRA one"):
        adapter.lora_weights()


def test_folders_that_are_not_usable_adapters_are_refused_by_name(model, tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match=r"has no adapter_config\.json") as info:
        Adapter.open(tmp_path)
    assert info.value.kind == "not_found" and info.value.param == "model"
    with pytest.raises(OwnLLMError, match="is not a LoRA adapter folder") as info:
        Adapter.open(tmp_path / "missing", kinds=("lora",), param="adapter")
    assert info.value.param == "adapter"

    folder = save_lora(model, tmp_path / "lora")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(OwnLLMError, match=r"has no adapter_model\.safetensors or adapter_model\.bin"):
        Adapter.open(folder)

    other = save_lora(model, tmp_path / "ia3")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(OwnLLMError, match=r"ia3/adapter_config\.json: peft_type IA3 cannot be used") as info:
        Adapter.open(other)
    assert info.value.kind == "unsupported"
    (other / "adapter_config.json").write_text("{not json")
    with pytest.raises(OwnLLMError, match=r"adapter_config\.json is not valid JSON"):
        Adapter.open(other)

    prompt = save_prompt_tuning(model, tmp_path / "pt")
    with pytest.raises(OwnLLMError, match="PROMPT_TUNING cannot be used here") as info:
        Adapter.open(prompt, kinds=("lora",), param="adapter")
    assert info.value.kind == "unsupported" and info.value.param == "adapter"

    dora = save_lora(model, tmp_path / "dora", use_dora=True)
    with pytest.raises(OwnLLMError, match="DoRA"):
        Adapter.open(dora).lora_weights()  # its per-row deltas would be wrong: refused, not approximated


@pytest.mark.slow
def test_a_prompt_tuning_run_loads_with_its_prefix(default_model: str, tmp_path: Path) -> None:
    """The real default model: `ownllm generate RUN` on a prompt-tuning run gets the base plus the learned prefix."""
    from safetensors.torch import load_file

    from ownllm.models.load import load_model

    base = load_model(default_model, dtype="fp32")
    run = tmp_path / "run"
    final = save_prompt_tuning(base.model, final_model_path(run), tokens=4)
    write_record(final, RunRecord(base_model=base.source.location, method="prompt-tuning", spec=default_model))
    loaded = load_model(str(run), dtype="fp32")
    assert loaded.source.kind == "adapter" and loaded.prefix_embeds.shape == (4, base.model.config.hidden_size)
    assert torch.equal(loaded.prefix_embeds, load_file(final / "adapter_model.safetensors")["prompt_embeddings"])
    assert not hasattr(loaded.model, "peft_config")
    for name, weight in loaded.model.state_dict().items():  # the base itself is untouched
        assert torch.equal(weight, base.model.state_dict()[name]), name


def test_a_scoring_head_is_not_a_text_model(tmp_path: Path) -> None:
    """A reward-model or classification run's adapter (task SEQ_CLS) is refused by every text path (chat, generate,
    serve --adapter, export), which would otherwise drop its head and write text with an untrained LM head."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0")
    with pytest.raises(OwnLLMError, match="scoring head"):
        Adapter.open(tmp_path)


def test_quantizing_a_gguf_file_is_refused_before_loading(tmp_path: Path) -> None:
    from ownllm.models.load import load_model

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(OwnLLMError, match="already quantized") as caught:
        load_model(str(tmp_path / "model.gguf"), quantize="nf4")
    assert caught.value.param == "quant"


def test_an_adapter_without_tokenizer_files_tokenizes_as_its_base(adapter_dir: Path, default_model: str,
                                                                  tmp_path: Path) -> None:
    """PEFT saves no tokenizer: the base's is the adapter's (`ownllm data check --model FOLDER`, `ownllm tokenize`),
    as load_model uses it; an adapter naming itself as its base is an error, not an endless load."""
    from ownllm.models.load import load_tokenizer

    assert not (adapter_dir / "tokenizer_config.json").exists()
    text = "Norvale Instruments was founded in 1987."
    assert load_tokenizer(str(adapter_dir)).encode(text) == load_tokenizer(default_model).encode(text)
    itself = tmp_path / "itself"
    itself.mkdir()
    (itself / "adapter_model.safetensors").write_bytes(b"x")
    (itself / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                            "base_model_name_or_path": str(itself)}))
    with pytest.raises(OwnLLMError, match="names itself as its base model"):
        load_tokenizer(str(itself))
