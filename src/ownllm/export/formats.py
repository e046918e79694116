"""The export formats and quantizations, checked before any weights load (a typo costs no work)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ownllm.errors import OwnLLMError

FORMATS = ("gguf", "gguf-lora", "hf")
# GGUF quantizations: written by gguf's own quantizers, or (the k-quants) by llama.cpp's from an f32 GGUF
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")
LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's convert_lora_to_gguf.py writes
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
DEFAULT_QUANT = {"gguf": "f16", "gguf-lora": "f16"}
LLAMA_EXTRA_HINT = "pip install 'ownllm[llama]', which brings llama-cpp-python"


@dataclass(frozen=True)
class ExportRequest:
    """A checked export: the format, the quantization (None for hf) and the output path."""

    format: str
    quant: str | None
    out: Path


def check_request(format: str, quant: str | None, out: Path) -> ExportRequest:
    """Check the format, the quantization and the output path; nothing is loaded or written.

    Raises:
        OwnLLMError: an unknown format or quantization (param format / quant), a quantization the format has
            none of, a k-quant without llama-cpp-python (kind unsupported), or an output in a folder that does
            not exist, or that is a folder itself (param out).
    """
    fmt = format.strip().lower()
    if fmt not in FORMATS:
        raise OwnLLMError(f"unknown format '{format}'", param="format", hint=f"use one of {', '.join(FORMATS)}")
    chosen = quant.strip().lower() if quant is not None else None
    if chosen == "":
        raise OwnLLMError("--quant is empty", param="quant", hint=f"use one of {', '.join(GGUF_QUANTS)}")
    if fmt == "hf":
        if chosen is not None:
            raise OwnLLMError("--quant does not apply to --format hf (an HF folder keeps the full weights)",
                              param="quant", hint="quantize while running: ownllm generate FOLDER --quant int8")
        _check_folder_out(out)
        return ExportRequest(fmt, None, out)
    allowed = GGUF_QUANTS if fmt == "gguf" else LORA_QUANTS
    chosen = chosen or DEFAULT_QUANT[fmt]
    if chosen not in allowed:
        raise OwnLLMError(f"unknown quantization '{quant}' for --format {fmt}", param="quant",
                          hint=f"use one of {', '.join(allowed)}")
    if chosen in K_QUANTS:
        require_llama_quantizer(chosen)
    _check_file_out(out)
    return ExportRequest(fmt, chosen, out)


def require_llama_quantizer(quant: str) -> None:
    """The k-quants are llama.cpp's own algorithms: gguf's Python quantizers do not write them."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise OwnLLMError(f"--quant {quant} needs llama.cpp's quantizer, from the `llama` extra",
                          kind="unsupported", param="quant", hint=LLAMA_EXTRA_HINT) from None


def _check_file_out(out: Path) -> None:
    if out.is_dir():
        raise OwnLLMError(f"--out {out} is a folder; name the .gguf file to write", param="out")
    if out.exists() and not out.is_file():
        raise OwnLLMError(f"--out {out} is not a regular file", param="out")
    if out.is_file() and out.stat().st_size and _head(out) != b"GGUF":  # an earlier export may be replaced
        raise OwnLLMError(f"--out {out} exists and is not a GGUF file: refusing to replace it", param="out",
                          hint="name a new file, or remove that one first")
    if not out.absolute().parent.is_dir():
        raise OwnLLMError(f"--out {out}: the folder {out.absolute().parent} does not exist", kind="not_found",
                          param="out", hint="create it first, or name a file in an existing folder")


def _head(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(4)


def _check_folder_out(out: Path) -> None:
    if not out.absolute().parent.is_dir():
        raise OwnLLMError(f"--out {out}: the folder {out.absolute().parent} does not exist", kind="not_found",
                          param="out", hint="create it first, or name a folder inside an existing one")
