"""A decode step's attention, all its rows (one or several) in one C call a layer (decode_attention.c), built with
the machine's C compiler into a compiled set (`compiled_decode`) and loaded with ctypes; and, on CPUs with AVX-512
BF16, a bf16 prefill chunk's attention (`DecodeAttention.chunk`).

The compiled graphs' attention it stands in for reads the cache at 4-11 GB/s, a call a row (bench/RESULTS.md,
session 65); at 8 chat streams attention was 45% of a decode step. Where the kernel cannot be built (no compiler,
no AVX2 or AVX-512), the graphs attend themselves. A prefill chunk's attention stands in for torch's sdpa, which
was half of a RAG request's prefill after its cached system prompt (session 67)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
LIBRARY = "decode_attention.so"
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}


def source_text() -> str:
    """The kernel's C source (part of the compiled set's key: a change builds it anew)."""
    return SOURCE.read_text()


def build(folder: Path, head_dim: int = 64) -> None:
    """Compile the kernel into folder/decode_attention.so for this machine's CPU and a model of `head_dim`; raises
    RuntimeError saying why it could not be built (or would not serve that head size)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on the PATH")
    folder.mkdir(parents=True, exist_ok=True)
    # OpenMP: its threads are torch's own (the same libgomp, loaded once); without it, one thread
    for threads in (["-fopenmp"], []):
        result = subprocess.run([compiler, "-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", *threads,
                                 "-o", str(folder / LIBRARY), str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode == 0:
            break
    else:
        raise RuntimeError(f"{Path(compiler).name} failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-300:] or 'no message'}")
    width = _load(folder / LIBRARY).vector_width()
    if width == 0 or head_dim % width:
        (folder / LIBRARY).unlink()
        raise RuntimeError("this CPU has neither AVX-512 nor AVX2 with FMA" if width == 0 else
                           f"a head of {head_dim} is not a whole number of {width}-float vectors")


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.vector_width.restype = ctypes.c_int
    function = library.decode_attention
    function.restype = ctypes.c_int
    long, pointer = ctypes.c_long, ctypes.c_void_p
    function.argtypes = [long, long, pointer, pointer, pointer, pointer, long, pointer, long, pointer, long, long,
                         long, long, ctypes.c_float, ctypes.c_int, pointer, ctypes.c_int]
    library.chunk_width.restype = ctypes.c_int
    chunk = library.chunk_attention
    chunk.restype = ctypes.c_int
    chunk.argtypes = [pointer, pointer, pointer, long, long, long, long, long, long, ctypes.c_float, pointer,
                      ctypes.c_int]
    return library


class DecodeAttention:
    """The kernel, loaded. `rows(buffers, positions)` once a step, then per layer `__call__`."""

    def __init__(self, path: Path, kv_heads: int, groups: int, head_dim: int, scale: float) -> None:
        self.library = _load(path)
        self.vector_bits = 32 * self.library.vector_width()
        self.kv_heads, self.groups, self.head_dim, self.scale = kv_heads, groups, head_dim, scale
        # prefill chunks too: built where the CPU has AVX-512 BF16, for heads of 32-256 in steps of 32 (a set's load
        # check turns it off for an fp32 model, and where sdpa is faster: `compiled_decode._check_chunks`)
        self.chunks = self.library.chunk_width() > 0 and head_dim % 32 == 0 and head_dim <= 256

    def rows(self, buffers: list[torch.Tensor], positions: list[int]) -> KernelRows:
        """What every layer's call of one step takes about its rows: each row's KV buffer ([layers, 2, kv heads,
        capacity, head dim], contiguous, all of one dtype) and the position its new key goes to (the kernel writes
        there through raw pointers: checked here, once a step)."""
        dtype, layers = buffers[0].dtype, buffers[0].shape[0]
        if not all(b.is_contiguous() and b.device.type == "cpu" and b.dtype == dtype and b.dim() == 5
                   and b.shape[0] == layers and b.shape[1] == 2
                   and tuple(b.shape[2:]) == (self.kv_heads, b.shape[3], self.head_dim) and 0 <= p < b.shape[3]
                   for b, p in zip(buffers, positions, strict=True)) or dtype not in _DTYPES:
            raise ValueError("the decode attention kernel takes contiguous KV buffers of one dtype (bf16 or fp32) "
                             "with room at each row's position")
        count = len(buffers)
        return KernelRows((ctypes.c_void_p * count)(*[b.data_ptr() for b in buffers]),
                          (ctypes.c_long * count)(*[b.shape[3] for b in buffers]),
                          (ctypes.c_long * count)(*positions), dtype, layers, count)

    def __call__(self, layer: int, rows: KernelRows, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                 ) -> torch.Tensor:
        """Store k and v ([rows, kv heads, 1, head dim]) at the rows' positions in layer `layer` and attend with q
        ([rows, heads, 1, head dim]); returns [rows, heads, 1, head dim] in the cache's dtype."""
        dim = self.head_dim
        one = (rows.count, self.kv_heads, 1, dim)
        if not (0 <= layer < rows.layers and [tuple(t.shape) for t in (q, k, v)] == [
                (rows.count, self.kv_heads * self.groups, 1, dim), one, one]
                and q.dtype == k.dtype == v.dtype == rows.dtype):
            raise ValueError("the decode attention kernel's inputs do not fit its rows")
        q, k, v = (t if t.stride(1) == dim and t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype)
        failed = self.library.decode_attention(
            rows.count, layer, rows.buffers, rows.capacities, rows.positions, q.data_ptr(), q.stride(0), k.data_ptr(),
            k.stride(0), v.data_ptr(), v.stride(0), self.kv_heads, self.groups, dim, self.scale, _DTYPES[q.dtype],
            out.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError("the decode attention kernel could not allocate its scratch memory")
        return out


    def chunk(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """A bf16 prefill chunk's causal attention: q [1, heads, length, head dim], its query i at position
        start + i; k_cache and v_cache one layer's [kv heads, capacity, head dim] (contiguous), the chunk's keys and
        values already stored at start..start+length-1. Each query attends over positions 0..start+i, as sdpa with a
        causal mask (no window) does, in bf16 dot products summed in fp32 (`chunks` says whether it was built).
        Returns [1, heads, length, head dim] in bf16."""
        heads, dim = self.kv_heads * self.groups, self.head_dim
        length = q.shape[2] if q.dim() == 4 else 0
        kv_shape = (self.kv_heads, k_cache.shape[1] if k_cache.dim() == 3 else -1, dim)
        if not (self.chunks and q.dim() == 4 and tuple(q.shape) == (1, heads, length, dim) and length > 0
                and tuple(k_cache.shape) == tuple(v_cache.shape) == kv_shape
                and q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
                and all(t.device.type == "cpu" for t in (q, k_cache, v_cache))
                and k_cache.is_contiguous() and v_cache.is_contiguous() and start >= 0
                and start + length <= k_cache.shape[1]):
            raise ValueError("the chunk attention kernel takes bf16 queries [1, heads, length, head dim] and one "
                             "layer's contiguous keys and values holding the chunk")
        query = q[0].contiguous()
        out = torch.empty((1, heads, length, dim), dtype=torch.bfloat16)
        failed = self.library.chunk_attention(
            query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), heads, self.kv_heads, length, start,
            k_cache.shape[1], dim, self.scale, out.data_ptr(), torch.get_num_threads())
        if failed:
            raise MemoryError("the chunk attention kernel could not allocate its scratch memory")
        return out


class KernelRows(NamedTuple):
    """One step's rows for the kernel (`DecodeAttention.rows`): pointers to their KV buffers, the buffers'
    capacities and the rows' positions (C arrays), and what they were checked for."""

    buffers: ctypes.Array
    capacities: ctypes.Array
    positions: ctypes.Array
    dtype: torch.dtype
    layers: int
    count: int
