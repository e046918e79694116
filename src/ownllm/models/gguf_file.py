"""Checks on .gguf files before anything heavier reads them."""

from __future__ import annotations

from pathlib import Path

from ownllm.errors import OwnLLMError

_MAGIC = b"GGUF"


def check_gguf(path: Path) -> str:
    """Return the file's architecture, or raise a clear error for a corrupt or truncated file."""
    with path.open("rb") as handle:
        if handle.read(4) != _MAGIC:
            raise OwnLLMError(f"'{path}' is not a GGUF file (bad magic bytes)", param="model")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise OwnLLMError(
            f"'{path}' is a corrupt or truncated GGUF file ({exc.__class__.__name__}: {exc})", param="model"
        ) from None
