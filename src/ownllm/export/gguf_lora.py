"""A LoRA run's adapter alone as a GGUF adapter (llama.cpp's `--lora FILE` on top of the base GGUF), the way
llama.cpp's convert_lora_to_gguf.py writes one: general.type adapter, adapter.type lora, adapter.lora.alpha,
and per adapted weight `<gguf name>.lora_a` (A: rank × in) and `.lora_b` (B: out × rank), B's rows permuted
like the base's q/k rows. One base file then serves many tunings.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ownllm.errors import OwnLLMError
from ownllm.export.gguf_model import (
    add_hyperparameters,
    check_architecture,
    gguf_arch,
    permute,
    staging_file,
)
from ownllm.export.source import inspect_source

# PEFT's projection module names under a decoder layer, as transformers names them
_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_lora_gguf(spec: str, out: Path, quant: str = "f16") -> Path:
    """Write the LoRA adapter of the run `spec` as a GGUF adapter at `out`, whole or not at all.

    llama.cpp scales an adapter by alpha / rank; the alpha written is PEFT's scale × rank, so rsLoRA
    (alpha / sqrt(rank)) comes out right too.

    Raises:
        OwnLLMError: `spec` is not a LoRA run (a prompt-tuning run, a full run or a plain model), its base is
            not an architecture GGUF export supports, or the adapter trains more than projections (embeddings,
            modules_to_save, DoRA), which a GGUF LoRA cannot carry.
    """
    import gguf

    info = inspect_source(spec)
    if info.adapter is None:
        raise OwnLLMError(f"'{spec}' is not a LoRA run or adapter folder", kind="unsupported", param="model",
                          hint="export a full run or a model whole: --format gguf")
    adapter = info.adapter
    if adapter.config.get("modules_to_save"):
        raise OwnLLMError(f"{adapter.path}: the adapter also trains whole modules ({adapter.config['modules_to_save']}"
                          "), which a GGUF LoRA cannot carry", kind="unsupported", param="model",
                          hint="export the merged model instead: --format gguf")
    config = info.config
    architecture = check_architecture(config)
    lora = adapter.lora_weights()  # refuses DoRA, per-module ranks, embedding LoRA
    names = gguf.get_tensor_name_map(gguf_arch(architecture.gguf_name), config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    rank = 0
    for (layer, projection), (a, b) in sorted(lora.weights.items()):
        parent = _MODULES.get(projection)
        name = names.get_name(f"model.layers.{layer}.{parent}.{projection}.weight", try_suffixes=(".weight",)) \
            if parent else None
        if name is None:
            raise OwnLLMError(f"{adapter.path}: no GGUF name for the LoRA on layer {layer} {projection}",
                              kind="unsupported", param="model")
        a_np, b_np = a.numpy(), b.numpy()
        if architecture.permute_qk and projection == "q_proj":
            b_np = permute(b_np, n_head, n_head)
        elif architecture.permute_qk and projection == "k_proj":
            b_np = permute(b_np, n_head, n_kv)
        rank = a_np.shape[0]
        pairs.append((name, np.ascontiguousarray(a_np), np.ascontiguousarray(b_np)))
    if not pairs:
        raise OwnLLMError(f"{adapter.path}: the adapter has no LoRA weights", param="model")
    writer = gguf.GGUFWriter(path=None, arch=architecture.gguf_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.scale * rank))
    writer.add_name(info.source.name)
    add_hyperparameters(writer, config, architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    for name, a_np, b_np in pairs:
        for suffix, data in (("lora_a", a_np), ("lora_b", b_np)):
            qtype = wanted
            if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16  # a row of rank length is rarely a whole Q8_0 block
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data.astype(np.float32), qtype),
                              raw_dtype=qtype)
    with staging_file(out, ".tmp") as staging:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    return out
