"""`ownllm export`: one verb for every format a model or a tuned run can leave ownllm in."""

from __future__ import annotations

from pathlib import Path

from ownllm.export.formats import check_request
from ownllm.export.gguf_model import ARCHITECTURES, write_model_gguf
from ownllm.export.source import inspect_source, load_source


def export(spec: str, *, format: str = "gguf", out: Path, quant: str | None = None) -> Path:
    """Export a model or a fine-tuning run.

    Args:
        spec: a model (alias, folder, .gguf, hub id) or a run folder; a LoRA or full run is merged first.
        format: gguf (the whole model, for llama.cpp / Ollama / LM Studio), gguf-lora (a LoRA run's adapter
            alone, applied by llama.cpp on the base GGUF with --lora) or hf (a merged HF folder, as `ownllm merge`).
        out: the .gguf file (gguf, gguf-lora) or the folder (hf) to write; its folder must exist.
        quant: gguf: f32, f16 (default), bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k (the k-quants need the `llama`
            extra); gguf-lora: f32, f16 (default), bf16, q8_0.

    Returns:
        `out`, complete. Nothing is left there when an error is raised or the export is interrupted.

    Raises:
        OwnLLMError: unknown format or quantization, an output in a missing folder, a prompt-tuning run, an
            unsupported architecture or tokenizer; all checked before weights load where they can be.
    """
    request = check_request(format, quant, out)
    if request.format == "hf":
        from ownllm.finetune.merge import merge

        return merge(spec, request.out)
    if request.format == "gguf-lora":
        from ownllm.export.gguf_lora import write_lora_gguf

        return write_lora_gguf(spec, request.out, request.quant or "f16")
    info = inspect_source(spec, supported=ARCHITECTURES)
    source = load_source(info)
    return write_model_gguf(source, request.out, request.quant or "f16")
