"""A whole model as one GGUF file: gguf's writer, its tensor-name maps and its quantizers, with the metadata and
tensor transforms llama.cpp's convert_hf_to_gguf.py applies for the Llama family (Llama, Mistral) and Qwen2.

f32/f16/bf16/q8_0/q4_0 are written directly; the k-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's own algorithms,
so an f32 GGUF is written first and llama.cpp's quantizer (llama-cpp-python's llama_model_quantize) makes the
file from it. Either way the file appears under its name only once complete (temp file + rename).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.errors import OwnLLMError
from ownllm.export.formats import K_QUANTS, require_llama_quantizer
from ownllm.export.source import ExportSource
from ownllm.export.vocab import add_vocab
from ownllm.home import usual_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """How one transformers model_type is written: llama.cpp's architecture name and whether q/k rows are
    permuted (llama.cpp's LLAMA rope pairs dimensions (i, i+1); transformers' rotate_half pairs (i, i+d/2))."""

    gguf_name: str  # a gguf.MODEL_ARCH_NAMES value
    permute_qk: bool


ARCHITECTURES = {
    "llama": Architecture("llama", permute_qk=True),
    "mistral": Architecture("llama", permute_qk=True),  # convert_hf_to_gguf.py writes Mistral as llama
    "qwen2": Architecture("qwen2", permute_qk=False),  # NEOX-style rope in llama.cpp: no permutation
}


def gguf_arch(name: str) -> Any:
    """gguf.MODEL_ARCH member for an architecture name."""
    import gguf

    return next(arch for arch, text in gguf.MODEL_ARCH_NAMES.items() if text == name)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows of q/k (or a LoRA B) from rotate_half order to
    llama.cpp's interleaved rope order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _file_type(quant: str) -> Any:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]


def tensor_type(quant: str, gguf_name: str, shape: tuple[int, ...]) -> Any:
    """The GGML type of one tensor: vectors (norms, biases) stay F32 as in convert_hf_to_gguf.py; a row length
    that is not a whole number of blocks falls back to F16. With q4_0 the embeddings and output stay Q8_0:
    llama.cpp's own quantizer keeps them wider too (it uses Q6_K, which gguf's Python quantizers lack)."""
    import gguf

    types = gguf.GGMLQuantizationType
    wanted = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return types.F32
    if wanted == types.Q4_0 and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = types.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return types.F16
    return wanted


def add_hyperparameters(writer: Any, config: Any, architecture: Architecture) -> None:
    """The architecture's numbers as llama.cpp's keys (convert_hf_to_gguf.py's set_gguf_parameters)."""
    import gguf

    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if architecture.gguf_name == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise OwnLLMError(f"rope scaling '{kind}' is not supported by the GGUF export", kind="unsupported",
                          param="model", hint="export it as an HF folder (--format hf) and convert it with "
                                              "llama.cpp's convert_hf_to_gguf.py")


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in rope_parameters (4.x: rope_theta and rope_scaling)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and "rope_type" not in rope:
        rope.update(scaling)
    return rope


def check_architecture(config: Any) -> Architecture:
    """The Architecture for this config, or an error naming the ones that are supported."""
    architecture = ARCHITECTURES.get(getattr(config, "model_type", ""))
    if architecture is None:
        raise OwnLLMError(f"a {config.model_type} model cannot be exported to GGUF (supported: "
                          f"{', '.join(sorted(ARCHITECTURES))})", kind="unsupported", param="model")
    return architecture


def model_tensors(model: Any, config: Any, architecture: Architecture) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) per weight, renamed by gguf's tensor-name map and with q/k permuted as llama.cpp
    needs. A tied output head is left out: llama.cpp then uses token_embd for it, as transformers does."""
    import gguf

    names = gguf.get_tensor_name_map(gguf_arch(architecture.gguf_name), config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise OwnLLMError(f"the weight {name} has no GGUF name for {architecture.gguf_name}",
                              kind="unsupported", param="model")
        data = tensor.detach().float().cpu().numpy()
        if architecture.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, n_head, n_head)
        elif architecture.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, n_head, n_kv)
        yield new_name, np.ascontiguousarray(data)


def write_model_gguf(source: ExportSource, out: Path, quant: str) -> Path:
    """Write `source` as a GGUF at `out` in `quant`, whole or not at all.

    Raises:
        OwnLLMError: an unsupported architecture, tokenizer or rope scaling (nothing is written), or llama.cpp's
            quantizer failing (the partial file is removed).
    """
    if quant in K_QUANTS:
        require_llama_quantizer(quant)
        with _staging(out, ".f32.tmp") as unquantized:
            _write(source, unquantized, "f32")
            with _staging(out, ".tmp") as staging:
                llama_quantize(unquantized, staging, quant)
                os.replace(staging, out)
        return out
    with _staging(out, ".tmp") as staging:
        _write(source, staging, quant)
        os.replace(staging, out)
    return out


def _write(source: ExportSource, path: Path, quant: str) -> None:
    import gguf

    config = source.config
    architecture = check_architecture(config)
    writer = gguf.GGUFWriter(path=None, arch=architecture.gguf_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.name)
    add_hyperparameters(writer, config, architecture)
    writer.add_file_type(_file_type(quant))
    add_vocab(writer, source.tokenizer, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data in model_tensors(source.model, config, architecture):
        qtype = tensor_type(quant, name, data.shape)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LLAMA_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.h's LLAMA_FTYPE_MOSTLY_*


def llama_quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize, as llama-quantize runs it) from a GGUF to another."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    code, report = _with_c_stderr_captured(
        lambda: llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params))
    for line in report.splitlines():  # a line per tensor from the C library: kept out of the user's terminal
        if "fallback" in line:  # rows not a multiple of the k-quant block: llama.cpp picked another type there
            log.warning("llama.cpp's quantizer: %s (their rows are not a multiple of its 256-wide blocks)",
                        line.rsplit("WARNING: ", 1)[-1].strip())
    if code != 0 or not target.is_file():
        last = report.strip().splitlines()[-1] if report.strip() else "no message"
        raise OwnLLMError(f"llama.cpp's quantizer failed on {source.name} (code {code}): {last}", kind="resource",
                          param="quant")


def _with_c_stderr_captured(call: Any) -> tuple[Any, str]:
    """call()'s result and what C code wrote to file descriptor 2 meanwhile (Python's own stderr is left as is)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result = call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return result, sink.read().decode("utf-8", errors="replace")


class _staging:
    """A hidden temp path beside `out` (same filesystem, so the final rename is atomic), removed unless it was
    renamed: an interrupted or failed export leaves nothing behind."""

    def __init__(self, out: Path, suffix: str) -> None:
        self.out, self.suffix = out, suffix

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.out.absolute().parent, prefix=f".{self.out.name}.", suffix=self.suffix)
        os.close(fd)
        os.chmod(name, usual_mode(0o666))  # mkstemp's 0600 would make the export private to its writer
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


staging_file = _staging  # shared with gguf_lora.py
