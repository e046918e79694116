"""Open an Engine for whatever the user named: pick the backend, load once."""

from __future__ import annotations

from typing import Literal

from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Engine
from ownllm.generate.llamacpp import LlamaCppEngine, llama_cpp_available
from ownllm.models.load import load_model, load_tokenizer
from ownllm.models.resolve import resolve

Backend = Literal["auto", "transformers", "llama.cpp"]


def open_engine(spec: str, *, backend: str = "auto", dtype: str = "auto", device: str = "auto",
                batch_rows: int = 1, quant: str | None = None, gguf_int4: bool = False) -> Engine:
    """Load a model behind the Engine interface.

    Args:
        spec: alias, pulled name, HF folder, .gguf file or hub id.
        backend: auto (llama.cpp for a .gguf file when llama-cpp-python is installed, else
            transformers), transformers, or llama.cpp.
        dtype: transformers backend only: auto, fp32, bf16 or fp16.
        device: transformers backend only: auto, cpu or cuda.
        batch_rows: sequences usually decoded together (a server's batch), for the dtype measurement.
        quant: transformers backend only: int8 or nf4 (bitsandbytes); None runs the weights as they are.
        gguf_int4: a GGUF's 4-bit tensors will run as stored where they can (the dtype measurement weighs that).
    """
    if backend not in ("auto", "transformers", "llama.cpp"):
        raise OwnLLMError(f"unknown backend '{backend}'", param="backend",
                          hint="use auto, transformers or llama.cpp")
    source = resolve(spec)
    if backend == "auto":
        backend = "llama.cpp" if source.kind == "gguf" and llama_cpp_available() and quant is None else "transformers"
    if backend == "llama.cpp" and quant is not None:
        raise OwnLLMError("--quant applies to the transformers backend; a GGUF runs in llama.cpp as it is quantized",
                          param="quant", hint="quantize a GGUF once with: ownllm export MODEL --quant q4_k_m")
    if backend == "llama.cpp":
        gguf = source.gguf_file
        if gguf is None:
            raise OwnLLMError(f"'{spec}' has no GGUF file for the llama.cpp backend", param="backend",
                              kind="unsupported", hint="use --backend transformers")
        return LlamaCppEngine(gguf, load_tokenizer(source), name=source.name)
    from ownllm.generate.hf import TransformersEngine

    return TransformersEngine(load_model(source, dtype=dtype, device=device, batch_rows=batch_rows, quantize=quant,
                                         scoped=True, gguf_int4=gguf_int4))
