"""Checks on .gguf files before anything heavier reads them, and their tensor table."""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.errors import OwnLLMError

_MAGIC = b"GGUF"


def check_gguf(path: Path) -> str:
    """Return the file's architecture, or raise a clear error for a corrupt or truncated file (its header and
    tensor table are read, not its metadata values: those take gguf's reader ~20 s for a 262k-token vocabulary)."""
    with path.open("rb") as handle:
        if handle.read(4) != _MAGIC:
            raise OwnLLMError(f"'{path}' is not a GGUF file (bad magic bytes)", param="model")
    try:
        architecture, tensors = gguf_tensors(path)
    except (ValueError, KeyError, IndexError, OSError, struct.error, UnicodeDecodeError, RecursionError,
            OverflowError) as exc:
        raise OwnLLMError(
            f"'{path}' is a corrupt or truncated GGUF file ({exc.__class__.__name__}: {exc})", param="model"
        ) from None
    if not architecture:
        raise OwnLLMError(f"'{path}' is a corrupt GGUF file (no general.architecture)", param="model")
    if not tensors:  # transformers would fill every weight with random numbers and answer gibberish
        raise OwnLLMError(f"'{path}' is a corrupt GGUF file (no tensors)", param="model")
    return architecture


_READERS_LOCK = threading.Lock()
_ACTIVE = threading.local()


def _plain_views_reader(original: type) -> type:
    """gguf's reader with its metadata read through plain ndarray views of the mapped file.

    It reads every value of every field as its own slice of a `np.memmap`, each paying memmap's Python-level
    `__getitem__`/`__array_finalize__`, through one recursive call per array entry: ~25 s for the metadata of
    Gemma 3's GGUF (262k vocabulary entries, scores and types) on an AVX2 EPYC core. Plain views of the same
    mapping, an array in one loop: the same parts, dtypes and tensors (tests/models/test_gguf_int4.py compares
    them) in ~1.3 s."""

    import gguf

    string, array = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
    length = np.dtype(np.uint64)

    class PlainViewsReader(original):  # type: ignore[misc, valid-type]
        def _plain(self) -> np.ndarray:
            plain = self.__dict__.get("_plain_view")
            if plain is None or plain.base is not self.data:
                plain = self.__dict__["_plain_view"] = self.data.view(np.ndarray)
            return plain

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            count = int(count)
            kind = np.dtype(dtype)
            values = self._plain()[offset : offset + kind.itemsize * count].view(kind)[:count]
            return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            """An array of strings or numbers (the vocabulary, its scores and types) in one loop: the same parts
            as gguf's own recursion, which calls itself once per entry."""
            if self.byte_order != "I" or int(raw_type) != array:  # other-endian files: gguf's own reading
                return super()._get_field_parts(orig_offs, raw_type)
            plain = self._plain()
            item = int(plain[orig_offs : orig_offs + 4].view(np.uint32)[0])
            scalar = self.gguf_scalar_to_np.get(gguf.GGUFValueType(item)) if item != array else None
            if item != string and scalar is None:
                return super()._get_field_parts(orig_offs, raw_type)
            item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            parts: list[np.ndarray] = [item_type, count]
            offset = orig_offs + 12
            if item == string:
                for _ in range(int(count[0])):
                    size = struct.unpack_from("<Q", plain, offset)[0]
                    parts.append(plain[offset : offset + 8].view(length))
                    parts.append(plain[offset + 8 : offset + 8 + size])
                    offset += 8 + size
                data = list(range(3, len(parts), 2))
            else:
                kind = np.dtype(scalar)
                for _ in range(int(count[0])):
                    parts.append(plain[offset : offset + kind.itemsize].view(kind))
                    offset += kind.itemsize
                data = list(range(2, len(parts)))
            types = [gguf.GGUFValueType(raw_type)] + ([gguf.GGUFValueType(item)] if int(count[0]) else [])
            return offset - orig_offs, parts, data, types

    return PlainViewsReader


@contextlib.contextmanager
def one_reader_per_file() -> Iterator[None]:
    """While loading: every `gguf.GGUFReader(path)` of the same file is the same reader (a faster one, see
    `_plain_views_reader`), and transformers' metadata-only parse of it is done once. transformers parses a
    GGUF's metadata for the config, again for the tokenizer's config and again with the weights, each parse
    turning every vocabulary entry into a Python value (~10 s each for Gemma 3's 262k tokens); and it asks gguf
    for the same architecture's tensor-name map once per module of the model (397 times for SmolLM2, ~30 ms
    each: 12 of its 30 s), so that map is built once. Loads wait for each other here, so the module attributes
    are swapped and restored in order."""
    import copy

    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    if getattr(_ACTIVE, "on", False):  # a load inside a load (the tokenizer's): the outer one's readers serve it
        yield
        return
    with _READERS_LOCK:
        _ACTIVE.on = True
        original, original_checkpoint = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint
        original_name_map = gguf.get_tensor_name_map
        fast = _plain_views_reader(original)
        readers: dict[tuple[str, str], Any] = {}
        metadata: dict[str, Any] = {}
        name_maps: dict[tuple[Any, int], Any] = {}

        def name_map_once(arch: Any, n_blocks: int) -> Any:  # only read (get_name) by its callers
            if (arch, n_blocks) not in name_maps:
                name_maps[arch, n_blocks] = original_name_map(arch, n_blocks)
            return name_maps[arch, n_blocks]

        def reused(path: Any, mode: str = "r") -> Any:
            key = (str(Path(path).resolve()), mode)
            if mode != "r":
                return original(path, mode)
            if key not in readers:
                readers[key] = fast(path, mode)
            return readers[key]

        def metadata_once(path: Any, return_tensors: bool = False, *args: Any, **kwargs: Any) -> Any:
            if return_tensors or args or kwargs:
                return original_checkpoint(path, return_tensors, *args, **kwargs)
            key = str(Path(path).resolve())
            if key not in metadata:
                metadata[key] = original_checkpoint(path, False)
            # callers may edit what they get (the config); the vocabulary lists are only read, and copying
            # them would cost seconds
            return {part: dict(values) if part == "tokenizer" else copy.deepcopy(values)
                    for part, values in metadata[key].items()}

        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reused, metadata_once
        gguf.get_tensor_name_map = name_map_once
        try:
            yield
        finally:
            gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = original, original_checkpoint
            gguf.get_tensor_name_map = original_name_map
            _ACTIVE.on = False


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its GGML type name, shape (fastest-moving dimension first, as GGUF lists it)
    and raw bytes (a view of the memory-mapped file)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    data: np.ndarray


# value sizes of the fixed-width GGUF metadata types (8: string and 9: array are read by length)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_NESTING = 8


def gguf_tensors(path: Path) -> tuple[str, list[GGUFTensor]]:
    """(architecture, tensors) of a GGUF file, reading the tensor table only: gguf's GGUFReader parses every
    metadata value (seconds for a 262k-token vocabulary), this skips them. A malformed or truncated file raises
    ValueError, struct.error or OwnLLMError."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    data = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(data)  # type: ignore[arg-type]
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, buffer, offset)
        offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def text() -> str:
        nonlocal offset
        length = take("Q")
        value = bytes(buffer[offset : offset + length]).decode("utf-8", errors="replace")
        offset += length
        return value


    def skip(kind: int, depth: int = 0) -> None:
        nonlocal offset
        if kind == 8:
            length = take("Q")  # (read before adding: take moves the offset too)
            offset += length
        elif kind == 9:
            if depth >= _MAX_NESTING:  # arrays of arrays of ...: no model has more than two levels
                raise ValueError(f"metadata arrays nested more than {_MAX_NESTING} deep")
            inner, count = take("IQ")
            if inner in _SCALAR_BYTES:
                offset += _SCALAR_BYTES[inner] * count
            else:
                for _ in range(count):
                    skip(inner, depth + 1)
        else:
            offset += _SCALAR_BYTES[kind]

    if bytes(buffer[:4]) != _MAGIC:
        raise OwnLLMError(f"'{path}' is not a GGUF file (bad magic bytes)", param="model")
    offset = 4
    _version, tensor_count, field_count = take("IQQ")
    architecture, alignment = "", 32
    for _ in range(field_count):
        key, kind = text(), take("I")
        if key == "general.architecture" and kind == 8:
            architecture = text()
        elif key == "general.alignment" and kind == 4:
            alignment = take("I")
        else:
            skip(kind)
    if alignment <= 0:
        raise ValueError(f"general.alignment is {alignment}")
    infos = []
    for _ in range(tensor_count):
        name = text()
        dims = take("I")
        shape = tuple(int(n) for n in struct.unpack_from(f"<{dims}Q", buffer, offset))
        offset += 8 * dims
        kind, start = take("IQ")
        infos.append((name, GGMLQuantizationType(kind), shape, start))
    base = -(-offset // alignment) * alignment
    tensors = []
    for name, kind, shape, start in infos:
        if kind not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name}: unknown type {kind.name}")
        block, block_bytes = GGML_QUANT_SIZES[kind]
        size = int(np.prod(shape)) // block * block_bytes
        if base + start + size > data.size:
            raise ValueError(f"tensor {name} ends past the end of the file (truncated?)")
        tensors.append(GGUFTensor(name, kind.name, shape, data[base + start : base + start + size]))
    return architecture, tensors
