"""The decode attention kernel (src/ownllm/generate/decode_attention.c) against float64 attention: every row's new
key and value stored where it says, its output within fp32 rounding of the exact one, the same bits on one thread
and on two, and a clear reason where it cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ownllm.generate import attention_kernel
from ownllm.models.dtype import cpu_flags

KV_HEADS, GROUPS, DIM, LAYERS = 3, 3, 64, 2
SCALE = DIM**-0.5

pytestmark = pytest.mark.skipif(not ({"avx2", "fma"} <= cpu_flags() or "avx512f" in cpu_flags()),
                                reason="the kernel is built for AVX-512 or AVX2 with FMA only")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kernel")
    attention_kernel.build(folder)
    return folder / attention_kernel.LIBRARY


def exact(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[heads, D] attention of one row in float64: keys and values [kv heads, n, D]."""
    grouped = q.double().view(KV_HEADS, GROUPS, DIM)
    weights = torch.softmax(grouped @ keys.double().transpose(1, 2) * SCALE, dim=-1)
    return (weights @ values.double()).view(KV_HEADS * GROUPS, DIM)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_of_any_length_attend_as_exact_attention_does(library: Path, dtype: torch.dtype) -> None:
    kernel = attention_kernel.DecodeAttention(library, KV_HEADS, GROUPS, DIM, SCALE)
    generator = torch.Generator().manual_seed(0)
    # lengths around the vector width (the last scores go through a padded copy), one key, a long row
    capacities = [1, 16, 17, 40, 300, 1600]
    positions = [0, 15, 16, 23, 299, 1200]
    buffers = [(torch.randn(LAYERS, 2, KV_HEADS, c, DIM, generator=generator) * 2).to(dtype) for c in capacities]
    before = [b.clone() for b in buffers]
    qkv = (torch.randn(len(capacities), 1, KV_HEADS * GROUPS + 2 * KV_HEADS, DIM, generator=generator) * 2).to(dtype)
    qkv = qkv.transpose(1, 2)  # as the slot forward's q|k|v: heads DIM apart, rows wider apart
    q, k, v = qkv[:, : KV_HEADS * GROUPS], qkv[:, KV_HEADS * GROUPS : -KV_HEADS], qkv[:, -KV_HEADS:]
    threads = torch.get_num_threads()
    try:
        outputs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            copies = [b.clone() for b in before]
            outputs.append(kernel(1, kernel.rows(copies, positions), q, k, v))
            buffers = copies
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])  # each row's heads are one thread's work: the same sums
    assert outputs[0].shape == q.shape and outputs[0].dtype == dtype
    for row, (buffer, old, position) in enumerate(zip(buffers, before, positions, strict=True)):
        stored = old.clone()
        stored[1, 0, :, position], stored[1, 1, :, position] = k[row, :, 0], v[row, :, 0]
        assert torch.equal(buffer, stored), row  # the new key and value where they go, nothing else touched
        want = exact(q[row, :, 0], buffer[1, 0, :, : position + 1], buffer[1, 1, :, : position + 1])
        got = outputs[0][row, :, 0].double()
        # fp32 sums in another order (and, in bf16, the output's own rounding)
        bound = 2 * torch.finfo(dtype).eps if dtype == torch.bfloat16 else 1e-5
        assert (got - want).abs().max() <= bound * want.abs().max(), (row, position)


def test_without_a_compiler_it_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler"):
        attention_kernel.build(tmp_path / "kernel")


def test_rows_it_would_write_past_are_refused_before_any_write(library: Path) -> None:
    """The kernel writes through raw pointers: a position past a buffer, a buffer of another shape or dtype, or
    inputs that do not fit the rows are a ValueError, and nothing is written."""
    kernel = attention_kernel.DecodeAttention(library, KV_HEADS, GROUPS, DIM, SCALE)
    buffer = torch.zeros(LAYERS, 2, KV_HEADS, 8, DIM, dtype=torch.bfloat16)
    for buffers, positions in (([buffer], [8]), ([buffer], [-1]), ([buffer.half()], [0]),
                               ([buffer, buffer.float()], [0, 0]), ([buffer.transpose(3, 4)], [0]),
                               ([torch.zeros(LAYERS, 2, 1, 8, DIM, dtype=torch.bfloat16)], [0]),
                               ([torch.zeros(LAYERS, 1, KV_HEADS, 8, DIM, dtype=torch.bfloat16)], [0])):
        with pytest.raises(ValueError, match="KV buffers"):
            kernel.rows(buffers, positions)
    rows = kernel.rows([buffer], [7])
    q, kv = torch.ones(1, KV_HEADS * GROUPS, 1, DIM, dtype=torch.bfloat16), torch.ones(1, KV_HEADS, 1, DIM,
                                                                                        dtype=torch.bfloat16)
    for layer, inputs in ((LAYERS, (q, kv, kv)), (0, (q.float(), kv.float(), kv.float())), (0, (kv, kv, kv)),
                          (0, (torch.cat([q, q]), kv, kv))):
        with pytest.raises(ValueError, match="do not fit"):
            kernel(layer, rows, *inputs)
    assert not buffer.any()


def test_a_nan_or_infinite_key_gives_nan_as_torchs_softmax_does(library: Path) -> None:
    """Not a finite average that hides the blow-up: a query head whose scores hold a NaN, or whose top score is
    infinite, is NaN, as torch's softmax makes it; the other heads are as they were."""
    kernel = attention_kernel.DecodeAttention(library, KV_HEADS, GROUPS, DIM, SCALE)
    for bad in (float("nan"), float("inf")):
        buffer = torch.randn(LAYERS, 2, KV_HEADS, 8, DIM)
        buffer[0, 0, 1, 3, 0] = bad  # a key of kv head 1
        q, kv = torch.randn(1, KV_HEADS * GROUPS, 1, DIM), torch.randn(1, KV_HEADS, 1, DIM)
        q[0, GROUPS : 2 * GROUPS, 0, 0] = 1.0  # its query heads: a score of +inf (or NaN)
        out = kernel(0, kernel.rows([buffer], [5]), q, kv, kv)[0, :, 0]
        want = exact(q[0, :, 0], buffer[0, 0, :, :6], buffer[0, 1, :, :6]).float()
        assert torch.equal(out.isnan(), want.isnan()) and out[GROUPS : 2 * GROUPS].isnan().all(), bad


def exact_chunk(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """[1, heads, length, D] causal attention of a prefill chunk at `start` in float64 (keys, values [kv heads, n,
    D]: its query i sees positions 0..start+i)."""
    length, end = q.shape[2], start + q.shape[2]
    scores = q.double() @ keys[:, :end].double().repeat_interleave(GROUPS, 0).transpose(1, 2) * SCALE
    allowed = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ values[:, :end].double().repeat_interleave(GROUPS, 0)).view(1, -1, length, DIM)


def chunk_kernel(library: Path) -> attention_kernel.DecodeAttention:
    kernel = attention_kernel.DecodeAttention(library, KV_HEADS, GROUPS, DIM, SCALE)
    if not kernel.chunks:
        pytest.skip("the chunk kernel is built where the CPU has AVX-512 BF16 only")
    return kernel


def test_prefill_chunks_attend_as_exact_attention_does_within_sdpas_own_error(library: Path) -> None:
    """First chunks and chunks after a cached prefix, of lengths around the kernel's 16 queries and 32 keys: within
    the error torch's sdpa makes on the same bf16 inputs (against float64), the same bits on one thread and two."""
    kernel = chunk_kernel(library)
    generator = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    for start, length in ((0, 1), (0, 2), (0, 17), (0, 256), (5, 3), (31, 33), (100, 16), (927, 410), (1500, 47)):
        capacity = start + length + 9
        caches = (torch.randn(2, KV_HEADS, capacity, DIM, generator=generator) * 2).to(torch.bfloat16)
        q = (torch.randn(1, KV_HEADS * GROUPS, length, DIM, generator=generator) * 2).to(torch.bfloat16)
        outputs = []
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                outputs.append(kernel.chunk(q, caches[0], caches[1], start))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(outputs[0], outputs[1]) and outputs[0].dtype == torch.bfloat16
        want = exact_chunk(q, caches[0], caches[1], start)
        end = start + length
        allowed = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, caches[0][None, :, :end], caches[1][None, :, :end], attn_mask=allowed, scale=SCALE, enable_gqa=True)
        ours, theirs = (outputs[0].double() - want).abs().max(), (sdpa.double() - want).abs().max()
        assert ours <= 1.5 * theirs + 1e-3, (start, length, float(ours), float(theirs))


def test_prefill_chunks_it_would_read_past_are_refused(library: Path) -> None:
    kernel = chunk_kernel(library)
    caches = torch.zeros(2, KV_HEADS, 64, DIM, dtype=torch.bfloat16)
    q = torch.zeros(1, KV_HEADS * GROUPS, 8, DIM, dtype=torch.bfloat16)
    for bad in [(q, caches[0], caches[1], 57),  # past the capacity
                (q, caches[0], caches[1], -1),
                (q.float(), caches[0].float(), caches[1].float(), 0),  # fp32: sdpa attends
                (q[:, :3], caches[0], caches[1], 0),  # heads that do not fit
                (q, caches[0][:, ::2], caches[1][:, ::2], 0),  # not contiguous
                (q, caches[0][:2], caches[1][:2], 0)]:
        with pytest.raises(ValueError, match="chunk attention kernel"):
            kernel.chunk(*bad)
    assert kernel.chunk(q, caches[0], caches[1], 56).shape == q.shape  # the last room there is


def test_a_nan_or_infinite_key_in_a_chunk_gives_nan_where_torchs_softmax_does(library: Path) -> None:
    """A prefill chunk's queries that see a NaN key, or whose top score is infinite, are NaN; the queries before
    that key and the other kv heads' are finite, as exact attention's are."""
    kernel = chunk_kernel(library)
    for bad in (float("nan"), float("inf")):
        caches = torch.randn(2, KV_HEADS, 64, DIM).to(torch.bfloat16)
        caches[0, 1, 40, 0] = bad  # a key of kv head 1, at position 40
        q = torch.randn(1, KV_HEADS * GROUPS, 20, DIM).to(torch.bfloat16)
        q[0, GROUPS : 2 * GROUPS, :, 0] = 1.0  # its query heads: a score of +inf (or NaN) from position 40 on
        out = kernel.chunk(q, caches[0], caches[1], 30)
        want = exact_chunk(q, caches[0], caches[1], 30)
        assert torch.equal(out.isnan(), want.isnan()), bad
        assert out[0, GROUPS : 2 * GROUPS, 10:].isnan().all() and not out[0, :, :10].isnan().any(), bad
