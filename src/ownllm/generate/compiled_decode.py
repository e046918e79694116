"""One-row decode steps of a Llama-block model compiled ahead of time (AOTInductor), for the single user, and the
decode attention of wider steps.

A decode step of one row through the slot forward is ~1,000 small eager ops, and on 2 CPU cores their dispatch
costs as much as the int4 matmuls themselves (bench/RESULTS.md, session 37: 10.3 ms a token, 5.0 of it in the int4
kernel). A set of graphs covers a step's layers:

- `FirstHalf`: the first layer's attention norm, fused q|k|v projection (int4) and rotary turn of q and k;
- `MiddleLayer`: a layer's new key and value stored in its cache, the attention over the cached keys in fp32 on the
  cache's values (`graph_attention`), the o projection, the residual add, the feed-forward norm, gate|up, SiLU, down,
  the residual add (`LastLayer`), then the next layer's `FirstHalf`; the number of keys and the caches' capacity are
  its dynamic sizes. The last layer runs it too, on its own first-half weights in the next one's place, and its
  q|k|v is dropped: one layer's q|k|v product more a token (~0.4% of the default model's products) where a graph
  of its own took a quarter of the compile (~10 s of a core);
- for steps of several rows (which stay eager otherwise), where this machine's C compiler builds `attention_kernel`
  (AVX-512, or AVX2 with FMA) into the set, that kernel stores every row's new key and value and attends, one call
  a layer (it streams the cache: ~1.9x faster for 8 rows, bench/RESULTS.md, session 66); elsewhere `RowAttention`,
  one row's cache write and attention, a call a row. In a bf16 set, on CPUs with AVX-512 BF16, the kernel also
  attends prefill chunks (`DecodeAttention.chunk`, checked and timed against sdpa at load: `_check_chunks`).

Each layer's weights and cache are inputs, not constants, so one compiled set serves every layer; a bf16 model's
and an fp32 model's (whose int4 products take and give bf16 rows, `int4_matmul`) are compiled apart. The ops are
the slot forward's own, in its order and dtypes; inductor is told to round where eager rounds
(`emulate_precision_casts`) and to leave the norms' mean to aten's kernel (`compile_packages`), so everything but
the attention gives the eager forward's bits. The attention (the graphs' or the kernel's) sums in another order than
aten's sdpa kernel, so the logits are the eager forward's up to bf16 rounding, held to the same bound as the slot
forward to transformers' (tests/generate/test_compiled_decode.py).

Compiling takes 30-60 s of a core, so it runs in a child process in the background (the server answers with the
eager forward meanwhile) and the packages are kept in the ownllm home, keyed by everything that shapes them: a
second start loads them in a second or two. Wherever compiling cannot happen (no C++ compiler, another torch),
the eager forward goes on and `note` says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ownllm.errors import env_switch
from ownllm.generate import attention_kernel
from ownllm.home import file_sha256, open_lock_file, ownllm_home
from ownllm.models.gguf_int4 import int4_matmul, kernel_dtype

log = logging.getLogger(__name__)


def wanted() -> bool:
    """`OWNLLM_COMPILED_DECODE=0` keeps one-row steps eager (on by default)."""
    return env_switch("OWNLLM_COMPILED_DECODE", default=True)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # torch.rms_norm without a weight is transformers' x * rsqrt(mean(x^2) + eps) in fp32, bit for bit (checked in
    # test_slot_parity), in one op instead of five
    return torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)


def llama_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it (`_Norm`): normalise in fp32, round, scale in x's dtype."""
    return weight * _rms(x, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_turned: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb, on the first `rotary dims` of each head (phi3 may rotate only part
    of it), bit for bit: rotate_half(x) * sin = cat(-x2, x1) * cat(s1, s2) = roll(x) * cat(-s1, s2)
    (`sin_turned`), a negation moved across a product (exact), in one op where rotate_half takes four."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + x.roll(rotary // 2, -1) * sin_turned
    turned, kept = x[..., :rotary], x[..., rotary:]
    turned = turned * cos + turned.roll(rotary // 2, -1) * sin_turned
    return torch.cat([turned, kept], dim=-1)


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     upcast: bool) -> torch.Tensor:
    """One decoding row's attention over its own cached keys, unmasked, as transformers' sdpa call computes it; with
    `upcast`, in fp32 on the same bf16/fp16 values (faster on some CPUs), left in fp32 for the caller to round."""
    if upcast:
        query, keys, values = query.float(), keys.float(), values.float()
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)


def graph_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """`decode_attention` for the compiled graphs, written out: scores, softmax and weighted sum in fp32 on the
    cache's bf16 values, left in fp32. Inductor fuses each product with its sum and reads the cache once, where
    aten's sdpa kernel first takes fp32 copies of it (bench/RESULTS.md, session 41: 180 -> 125 us a layer at 1,500
    keys, 24 -> 12 at 100). The sums run in another order than the kernel's: the output is the same up to fp32
    rounding, not bit for bit. query [1, heads, 1, D]; keys, values [kv heads, keys, D]."""
    kv_heads, _, head_dim = keys.shape
    grouped = query.float().view(kv_heads, -1, 1, head_dim)  # the query heads that share each key head
    scores = (grouped * keys.float()[:, None]).sum(-1) * scale  # [kv, group, keys]
    weights = torch.softmax(scores, dim=-1)
    return (weights[..., None] * values.float()[:, None]).sum(-2).view(query.shape)


class FirstHalf(torch.nn.Module):
    """A layer up to its attention: the norm, q|k|v and the rotary turn of q and k. Returns (q | k, v),
    [1, heads + kv heads, 1, head_dim] and [1, kv heads, 1, head_dim]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps

    def forward(self, x: torch.Tensor, norm: torch.Tensor, qkv_packed: torch.Tensor, qkv_scales: torch.Tensor,
                cos: torch.Tensor, sin_turned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, kv = self.heads, self.kv_heads
        qkv = int4_matmul(llama_norm(x, norm, self.eps), qkv_packed, qkv_scales)
        qkv = qkv.view(1, 1, h + 2 * kv, self.head_dim).transpose(1, 2)
        return rope(qkv[:, : h + kv], cos, sin_turned), qkv[:, h + kv :]


class RowAttention(torch.nn.Module):
    """One row of a decode step of several rows: its new key and value ([kv heads, 1, head_dim]) stored at
    `position` of its cache, then `graph_attention` over the first `keys.shape[0]` positions, rounded to the
    cache's dtype. Returns [1, heads, 1, head_dim]."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, keys: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # a tensor index: a position taken from a size would be specialised by torch.export's bound checks
        k_cache.index_copy_(1, position, k)
        v_cache.index_copy_(1, position, v)
        count = keys.shape[0]
        return graph_attention(q, k_cache[:, :count], v_cache[:, :count], self.scale).to(k_cache.dtype)


class LastLayer(torch.nn.Module):
    """A layer from storing its new key and value on: the new key (rotated, in `qk` after the query heads) and value
    stored at `position` of the layer's cache (the graph writes into the cache tensors it is given), the attention
    over the first `keys.shape[0]` positions, o projection, residual, feed-forward with its norm, residual.
    Returns x."""

    def __init__(self, heads: int, head_dim: int, intermediate: int, eps: float, scale: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.intermediate, self.eps, self.scale = heads, head_dim, intermediate, eps, scale

    def forward(self, x: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, keys: torch.Tensor, position: torch.Tensor, o_packed: torch.Tensor,
                o_scales: torch.Tensor, norm: torch.Tensor, gate_up_packed: torch.Tensor,
                gate_up_scales: torch.Tensor, down_packed: torch.Tensor, down_scales: torch.Tensor) -> torch.Tensor:
        h = self.heads
        k_cache.index_copy_(1, position, qk[0, h:])  # (as `RowAttention` stores them)
        v_cache.index_copy_(1, position, v[0])
        count = keys.shape[0]  # the keys attended, as a size: the graph's one dynamic dimension besides the caches'
        attended = graph_attention(qk[:, :h], k_cache[:, :count], v_cache[:, :count], self.scale)
        return self.after_attention(x, attended.to(x.dtype), o_packed, o_scales, norm, gate_up_packed,
                                    gate_up_scales, down_packed, down_scales)

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor, o_packed: torch.Tensor,
                        o_scales: torch.Tensor, norm: torch.Tensor, gate_up_packed: torch.Tensor,
                        gate_up_scales: torch.Tensor, down_packed: torch.Tensor, down_scales: torch.Tensor
                        ) -> torch.Tensor:
        """The layer from its attention's output ([1, heads, 1, head dim], in x's dtype) on."""
        attended = attended.transpose(1, 2).reshape(1, 1, self.heads * self.head_dim)
        x = x + int4_matmul(attended, o_packed, o_scales)
        gate_up = int4_matmul(llama_norm(x, norm, self.eps), gate_up_packed, gate_up_scales)
        gate, up = gate_up.split(self.intermediate, -1)
        return x + int4_matmul(F.silu(gate) * up, down_packed, down_scales)


class MiddleLayer(LastLayer):
    """`LastLayer` followed by the next layer's `FirstHalf`, in one graph: one call a layer. Returns (x, q | k, v)
    for the next layer."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float, scale: float
                 ) -> None:
        super().__init__(heads, head_dim, intermediate, eps, scale)
        self.following = FirstHalf(heads, kv_heads, head_dim, eps)

    def forward(self, x: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,  # type: ignore[override]
                v_cache: torch.Tensor, keys: torch.Tensor, position: torch.Tensor, o_packed: torch.Tensor,
                o_scales: torch.Tensor, norm: torch.Tensor, gate_up_packed: torch.Tensor,
                gate_up_scales: torch.Tensor, down_packed: torch.Tensor, down_scales: torch.Tensor,
                next_norm: torch.Tensor, next_qkv_packed: torch.Tensor, next_qkv_scales: torch.Tensor,
                cos: torch.Tensor, sin_turned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = super().forward(x, qk, v, k_cache, v_cache, keys, position, o_packed, o_scales, norm, gate_up_packed,
                            gate_up_scales, down_packed, down_scales)
        return x, *self.following(x, next_norm, next_qkv_packed, next_qkv_scales, cos, sin_turned)


# The packages of a compiled set. One-row steps run `FirstHalf` and `MiddleLayer` (its own attention: for one row
# the kernel measured no faster, and a call more a layer cost more than it saved); steps of several rows attend
# through `attention_kernel` where it builds, else through the `RowAttention` graph, a call a row.
GRAPHS = ("first", "middle", "attention")
KERNEL_GRAPHS = ("first", "middle")
KERNEL = "kernel"  # the set's folder for `attention_kernel`'s library, where it could be built
PARTS = (*GRAPHS, KERNEL)  # every folder a set may hold


def graphs_of(folder: Path) -> tuple[str, ...]:
    """The graphs a set holds (or is to hold, once its kernel is built or not): by whether it has the kernel."""
    return KERNEL_GRAPHS if (folder / KERNEL / attention_kernel.LIBRARY).is_file() else GRAPHS


def spec_of(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(what the graphs are compiled for, None) for a `SlotModel` whose one-row steps they can run, else
    (None, why not)."""
    config = model.config
    if model.device.type != "cpu" or not model.four_bit_rows:
        return None, "compiled one-row steps need the GGUF 4-bit weights on the CPU"
    if config.model_type not in ("llama", "mistral") or getattr(config, "hidden_act", None) != "silu":
        return None, f"compiled one-row steps cover llama and mistral blocks (SiLU), not {config.model_type}"
    layers, four = model.layers, model.four_bit.layers
    plain = all(layer.qkv_bias is None and layer.o_bias is None and layer.gate_up_bias is None
                and layer.down_bias is None and layer.q_norm is None and layer.attn_out_norm is None
                and layer.mlp_out_norm is None for layer in layers)
    stored = len(four) == len(layers) and all(
        part is not None and part.plane_count == 1 for f in four for part in (f.qkv, f.o, f.gate_up, f.down))
    if not plain or not stored:
        return None, "compiled one-row steps need every projection in 4 bits, without biases"
    longest = model.max_len + model.prefix_len  # a window at least this long never leaves out a key
    if any(layer.window is not None and layer.window < longest for layer in layers):
        return None, "compiled one-row steps attend over the whole cache (no sliding window shorter than the context)"
    epsilons = {layer.attn_norm.eps for layer in layers} | {layer.mlp_norm.eps for layer in layers}
    first = four[0]
    spec = {
        "heads": model.heads, "kv_heads": model.kv_heads, "head_dim": model.head_dim,
        "hidden": int(model.weights.embed.shape[1]), "intermediate": model.intermediate,
        "rotary": int(model.cos["default"].shape[-1]), "eps": epsilons.pop() if len(epsilons) == 1 else None,
        "scale": float(model.scaling),
        "dtype": str(model.dtype).removeprefix("torch."),
        "shapes": {name: [list(part.packed.shape), list(part.scales_and_zeros.shape)]
                   for name, part in (("qkv", first.qkv), ("o", first.o), ("gate_up", first.gate_up),
                                      ("down", first.down))},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),  # the generated kernels' OpenMP width is fixed when they are compiled
        "code": _code_version(),
    }
    if spec["eps"] is None:
        return None, "compiled one-row steps need one norm epsilon for all layers"
    from ownllm.models.dtype import cpu_flags, cpu_model

    spec["cpu"] = [cpu_model(), sorted(cpu_flags())]
    return spec, None


def layer_inputs(four: Any, norm: torch.Tensor, mlp_norm: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The weights each graph takes for one layer (`four`: its `_FourBitLayer`), in its order: `first` the
    attention norm and q|k|v; `last` o, the feed-forward norm, gate|up and down. `middle` takes `last`'s weights and
    then the next layer's `first` ones."""
    return {"first": [norm, four.qkv.packed, four.qkv.scales_and_zeros],
            "last": [four.o.packed, four.o.scales_and_zeros, mlp_norm, four.gate_up.packed,
                     four.gate_up.scales_and_zeros, four.down.packed, four.down.scales_and_zeros]}


def _rounding_apart(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal up to a few bf16 roundings, relative to `want`'s largest value (in an fp32 model too: its int4
    products round to bf16, so a last-bit difference in an attention's fp32 sum can move one of them by a bf16 ulp,
    and that reaches every later output). A wrong graph is off by the activations' own size."""
    return want.dtype == got.dtype and bool(
        (want.float() - got.float()).abs().max() <= 4 * torch.finfo(kernel_dtype()).eps * want.float().abs().max())


def checker(model: Any, spec: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """What `CompiledSteps` runs before using a loaded set: every graph on the model's first two layers (their real
    weights, made-up activations and caches) against the eager ops it was traced from; raises unless the keys and
    values the graphs store and the first graph's outputs agree bit for bit, and the outputs computed after an
    attention up to a few bf16 roundings (`_rounding_apart`; a review's deliberately broken graphs, e.g. a wrong
    scale, swapped keys and values, a key left out, no MLP, were all caught, a softmax in bf16 was not)."""
    layers, four = model.layers, model.four_bit.layers
    following = 1 if len(layers) > 1 else 0
    weights = layer_inputs(four[0], layers[0].attn_norm.weight, layers[0].mlp_norm.weight)
    next_weights = layer_inputs(four[following], layers[following].attn_norm.weight, layers[following].mlp_norm.weight)
    position = min(7, model.cos["default"].shape[0] - 1)
    table = [model.cos["default"][position][None, None, None], model.sin_turned["default"][position][None, None, None]]
    eager = _modules(spec)

    def check(graphs: dict[str, Any]) -> None:
        generator = torch.Generator().manual_seed(0)

        def made_up(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator) * 4).to(model.dtype)

        with torch.inference_mode():
            for capacity, count in ((40, 17), (40, 40), (300, 1), (300, 257)):
                x = made_up(1, 1, spec["hidden"])
                qk = made_up(1, spec["heads"] + spec["kv_heads"], 1, spec["head_dim"])
                v = made_up(1, spec["kv_heads"], 1, spec["head_dim"])
                caches = made_up(2, spec["kv_heads"], capacity, spec["head_dim"])
                where = [torch.empty(count, dtype=torch.int8), torch.tensor([count - 1])]
                if "kernel" in graphs:
                    _check_kernel(graphs["kernel"], eager["attention"], spec["heads"], qk, v, caches, where)
                for name in [name for name in GRAPHS if name in graphs]:
                    if name == "first":
                        inputs = [x, *weights["first"], *table]
                    elif name == "attention":
                        inputs = [qk[:, : spec["heads"]].contiguous(), qk[0, spec["heads"] :], v[0],
                                  *caches.clone(), *where]
                    else:
                        inputs = [x, qk, v, *caches.clone(), *where, *weights["last"], *next_weights["first"], *table]
                    ours = inputs[:3] + [cache.clone() for cache in inputs[3:5]] + inputs[5:]  # (caches: written)
                    want, got = eager[name](*inputs), graphs[name](ours)
                    want = list(want) if isinstance(want, tuple) else [want]
                    # `graph_attention` sums in another order when compiled: outputs after an attention agree up
                    # to rounding (a wrong, stale or swapped graph is off by the activations' own size); the rest,
                    # the cache writes included, bit for bit
                    same = torch.equal if name == "first" else _rounding_apart
                    if not (len(got) == len(want)
                            and all(same(w, g.reshape(w.shape)) for w, g in zip(want, got, strict=True))
                            and all(torch.equal(w, g) for w, g in zip(inputs, ours, strict=True))):
                        raise RuntimeError(f"the compiled graph '{name}' does not compute what the eager ops do")
            if "kernel" in graphs and graphs["kernel"].chunks:
                if model.dtype == torch.bfloat16:
                    _check_chunks(graphs["kernel"], spec, made_up, model._chunk_mask)
                else:  # (its dot products are bf16's: an fp32 model's prefill stays with sdpa)
                    graphs["kernel"].chunks = False

    return check


def _check_chunks(kernel: attention_kernel.DecodeAttention, spec: dict[str, Any],
                  made_up: Callable[..., torch.Tensor],
                  chunk_mask: Callable[[int, int, int | None], tuple[int, torch.Tensor | None]]) -> None:
    """The kernel's prefill chunks against sdpa with a causal mask (as the slot forward calls it): a first chunk and
    one after a cached prefix, up to rounding (`_rounding_apart`); then timed against sdpa on a chunk after a cached
    prefix, taking turns, and left to sdpa where that is faster (a CPU whose sdpa has AMX, say)."""
    from ownllm.models.dtype import best_of_turns

    heads, kv_heads, dim = spec["heads"], spec["kv_heads"], spec["head_dim"]

    def sdpa(q: torch.Tensor, caches: torch.Tensor, start: int) -> torch.Tensor:  # as `SlotModel._attend` calls it
        end, (_, mask) = start + q.shape[2], chunk_mask(start, q.shape[2], None)
        return F.scaled_dot_product_attention(q, caches[0][None, :, :end], caches[1][None, :, :end],
                                              attn_mask=mask, is_causal=mask is None, scale=spec["scale"],
                                              enable_gqa=True)

    for start, length in ((0, 37), (70, 45)):
        q, caches = made_up(1, heads, length, dim), made_up(2, kv_heads, 128, dim)
        if not _rounding_apart(sdpa(q, caches, start), kernel.chunk(q, caches[0], caches[1], start)):
            raise RuntimeError("the chunk attention kernel does not compute what sdpa does")
    q, caches = made_up(1, heads, 128, dim), made_up(2, kv_heads, 768, dim)
    ours, theirs = best_of_turns([lambda: kernel.chunk(q, caches[0], caches[1], 640), lambda: sdpa(q, caches, 640)])
    if ours >= theirs:
        kernel.chunks = False
        log.info("prefill chunks attend in sdpa: faster than the C kernel here (%.2f against %.2f ms)",
                 theirs * 1e3, ours * 1e3)


def _check_kernel(kernel: attention_kernel.DecodeAttention, row_attention: torch.nn.Module, heads: int,
                  qk: torch.Tensor, v: torch.Tensor, caches: torch.Tensor, where: list[torch.Tensor]) -> None:
    """The kernel against the eager `RowAttention` on the checker's made-up row: the stored key and value bit for
    bit, the output up to rounding (`_rounding_apart`)."""
    buffer = caches.clone()[None]  # one layer's [1, 2, kv heads, capacity, D], as a sequence's KV buffer holds it
    want_caches = caches.clone()
    want = row_attention(qk[:, :heads].contiguous(), qk[0, heads:], v[0], *want_caches, *where)
    got = kernel(0, kernel.rows([buffer], [int(where[1])]), qk[:, :heads], qk[:, heads:], v)
    if not (torch.equal(buffer[0], want_caches) and _rounding_apart(want, got.reshape(want.shape))):
        raise RuntimeError("the decode attention kernel does not compute what the eager ops do")


def _code_version() -> str:
    """A hash of what the graphs are traced from: this module (the slot forward's norm and rotary turn too) and the
    int4 matmul, and of ownllm's version (a change compiles them anew; the check after loading catches what a key
    cannot)."""
    from importlib.metadata import version

    try:
        sources = [inspect.getsource(sys.modules[__name__]), inspect.getsource(int4_matmul),
                   inspect.getsource(attention_kernel), attention_kernel.source_text()]
    except (OSError, TypeError):  # no source to read (a frozen install): the version stands for it
        sources = []
    return hashlib.sha256("".join([version("ownllm"), *sources]).encode()).hexdigest()[:16]


def _key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _example_inputs(spec: dict[str, Any]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of the right shapes and dtypes per graph (the graphs take weights as inputs: their values do not
    matter)."""
    dtype = getattr(torch, spec["dtype"])
    hidden, heads, kv_heads, head_dim = spec["hidden"], spec["heads"], spec["kv_heads"], spec["head_dim"]

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scales = spec["shapes"][name]
        return torch.randint(0, 255, packed, dtype=torch.uint8), torch.rand(scales).to(kernel_dtype())

    x = torch.randn(1, 1, hidden).to(dtype)
    norm = torch.rand(hidden).to(dtype)
    table = torch.rand(1, 1, 1, spec["rotary"]).to(dtype)
    first = (norm, *part("qkv"))
    cache = torch.randn(kv_heads, 64, head_dim).to(dtype)  # one layer's keys (or values): [kv, capacity, D]
    last = (x, torch.randn(1, heads + kv_heads, 1, head_dim).to(dtype), torch.randn(1, kv_heads, 1, head_dim).to(dtype),
            cache, cache.clone(), torch.empty(40, dtype=torch.int8), torch.tensor([39]),
            *part("o"), norm.clone(), *part("gate_up"), *part("down"))
    return {"first": (x, *first, table, table.clone()), "middle": (*last, *first, table, table.clone()),
            "attention": (last[1][:, :heads].contiguous(), last[1][0, heads:], last[2][0], *last[3:7])}


def _modules(spec: dict[str, Any]) -> dict[str, torch.nn.Module]:
    common = (spec["head_dim"], spec["intermediate"], spec["eps"], spec["scale"])
    return {"first": FirstHalf(spec["heads"], spec["kv_heads"], spec["head_dim"], spec["eps"]),
            "middle": MiddleLayer(spec["heads"], spec["kv_heads"], *common), "attention": RowAttention(spec["scale"])}


def _dynamic_shapes() -> dict[str, Any]:
    """Per graph: the sizes that vary between calls (the caches' capacity and the number of keys)."""
    capacity = torch.export.Dim("capacity", min=2, max=1 << 24)
    keys = torch.export.Dim("keys", min=1, max=1 << 24)
    last = ({}, {}, {}, {1: capacity}, {1: capacity}, {0: keys}, *[{}] * 8)
    return {"first": None, "middle": (*last, *[{}] * 5), "attention": ({}, *last[1:7])}


def compile_packages(spec: dict[str, Any], folder: Path) -> None:
    """Compile the graphs for `spec` into folder/<name>/ (`GRAPHS`), each package unpacked: the child process's
    job. Written whole or not at all; where another process's compile got there first, its folder stays.

    Unpacked because a .pt2 file is extracted again at every load into a new /tmp/aotinductor_* folder that only
    the loader's destructor removes, which a server never reaches (its graphs live as long as it does; a SIGKILL):
    ~7 MB left in /tmp by every start. Loaded from its folder, a package is used where it lies."""
    import torch._inductor.config as inductor_config
    from torch._inductor.lowering import lowerings, make_fallback

    # the kernels are generated for the server's threads; the child process itself computes next to nothing
    torch.set_num_threads(spec.get("threads", 1))
    inductor_config.emulate_precision_casts = True  # round where eager rounds: the same bits
    # and the norms' mean of squares summed by aten's own kernel, as eager sums it: a generated reduction adds in
    # another order, and about one norm in a thousand then rounds an element to another bf16
    lowerings.pop(torch.ops.aten.mean.dim, None)
    make_fallback(torch.ops.aten.mean.dim, warn=False)  # warn=True is an error where $CI is set
    inputs, modules, dynamic = _example_inputs(spec), _modules(spec), _dynamic_shapes()
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        try:  # first: it says which graphs the set needs
            attention_kernel.build(staging / KERNEL, spec["head_dim"])
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(staging / KERNEL, ignore_errors=True)
            (staging / KERNEL_MISSING).write_text(str(exc))
        for name in graphs_of(staging):
            exported = torch.export.export(modules[name], inputs[name], dynamic_shapes=dynamic[name])
            package = staging / f"{name}.pt2"
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
            with zipfile.ZipFile(package) as archive:  # its entries are under <name>/ (the package's own name)
                archive.extractall(staging)
            package.unlink()
            if not (staging / name).is_dir():
                raise RuntimeError(f"the compiled package {package.name} did not unpack into {name}/")
        (staging / MANIFEST).write_text(json.dumps(_fingerprints(staging)))
        if not _complete(folder):
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class CompiledSteps:
    """The compiled set for one model, loaded (or compiled, then loaded) in the background, and checked before use.

    `ready` is None until every graph can run ({name: runner}, `graphs_of`; "kernel": the attention kernel, where
    it is built, also `kernel`); `note` says where things stand
    (the start-up line, /health). `check({name: runner})` raises unless the graphs compute what the eager ops do
    (`SlotModel` runs them on its layers' real weights): a package that loads but does not fit (stale, swapped,
    damaged) is compiled anew once, then left eager."""

    def __init__(self, spec: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> None:
        self.spec, self.check = spec, check
        self.folder = ownllm_home() / "compiled" / f"decode-{_key(spec)}"
        self.note = ("one-row steps: loading their compiled graphs" if _complete(self.folder) else
                     "one-row steps compiling in the background (AOTInductor, once per model and CPU)")
        self.ready: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._load, name="ownllm-compile-decode", daemon=True)
        self.thread.start()

    def _load(self) -> None:
        try:
            for attempt in (1, 2):
                if not _complete(self.folder):
                    self._compile_once()
                try:
                    self.ready = self._loaded_and_checked()
                    with contextlib.suppress(OSError):  # last used now: `_prune` keeps the sets in use
                        os.utime(self.folder)
                    break
                except Exception as exc:
                    if attempt == 2:
                        raise
                    log.warning("the compiled graphs in %s are unusable (%s: %s); compiling them anew",
                                self.folder, exc.__class__.__name__, str(exc)[-300:])
                    with _folder_lock(self.folder):
                        _discard(self.folder)
            self.note = "one-row steps and the decode attention compiled (AOTInductor; " + (
                f"several rows attend in a C kernel, {self.kernel.vector_bits}-bit vectors"
                + (", bf16 prefill chunks too)" if self.kernel.chunks else ")")
                if self.kernel is not None else "several rows attend in a graph: no C kernel, see the log)")
        except Exception as exc:  # compiling is a speed-up: without it the eager forward goes on
            self.note = f"one-row steps eager ({exc.__class__.__name__} while compiling or loading; see the log)"
            log.warning("compiled one-row decode steps unavailable (%s: %s); decoding eagerly",
                        exc.__class__.__name__, str(exc)[-500:])

    @property
    def kernel(self) -> attention_kernel.DecodeAttention | None:
        """The set's attention kernel for steps of several rows, once loaded and checked, where it is built."""
        return self.ready.get("kernel") if self.ready is not None else None

    def _loaded_and_checked(self) -> dict[str, Any]:
        # the loader `aoti_load_package` builds, on the unpacked package's folder (which it would take for an
        # outdated .pt2 file, with a warning); its own run: the package's __call__ parses its input and output
        # specs on every call (~12 us, a call a layer)
        _check_fingerprints(self.folder)  # before any library is mapped: a cut one is a SIGBUS, not an error
        graphs: dict[str, Any] = {
            name: torch._C._aoti.AOTIModelPackageLoader(str(self.folder / name), "model", False, 1, -1).run
            for name in graphs_of(self.folder)}
        library, spec = self.folder / KERNEL / attention_kernel.LIBRARY, self.spec
        if library.is_file():
            graphs["kernel"] = attention_kernel.DecodeAttention(
                library, spec["kv_heads"], spec["heads"] // spec["kv_heads"], spec["head_dim"], spec["scale"])
        else:
            with contextlib.suppress(OSError):
                log.info("no decode attention kernel: %s", (self.folder / KERNEL_MISSING).read_text()[:300])
        self.check(graphs)
        return graphs

    def _compile_once(self) -> None:
        """One compile per key at a time: the others (servers started meanwhile) wait on its lock, then load."""
        with _folder_lock(self.folder) as lock:
            assert lock is not None  # waited for: always held here
            if _complete(self.folder):
                return
            _discard(self.folder)  # whatever is there is not a compiled set (a half, a file, a link)
            for stale in self.folder.parent.glob(f".{self.folder.name}.*"):  # a child killed mid-compile
                _discard(stale)
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            # a child process, one core, at a lower priority (it lowers its own): the server answers eagerly
            # meanwhile, and a child whose server went away still finishes for the next start. It holds the lock
            # too (it inherits the descriptor): a server started after this one stopped waits for that compile
            # instead of removing its staging folder and compiling the same graphs beside it
            result = subprocess.run(
                [sys.executable, "-m", "ownllm.generate.compiled_decode", json.dumps(self.spec), str(self.folder)],
                capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"},
                pass_fds=(lock,))
            if result.returncode < 0:
                raise RuntimeError(f"the compiler process was killed (signal {-result.returncode})")
            if result.returncode != 0:
                lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
                raise RuntimeError("\n".join(lines[-5:])[-500:] or f"exit {result.returncode}")
        _prune(self.folder)


KEPT_SETS = 8  # compiled sets kept in the home (5-7 MB each), the most recently used: one per model and CPU


@contextlib.contextmanager
def _folder_lock(folder: Path, wait: bool = True) -> Iterator[int | None]:
    """The lock of one compiled set's folder (held while it is compiled or removed). Yields its descriptor where
    it is held (always where `wait`, else only where no other process holds it), None where not. A process given
    the descriptor holds the lock with it: it is released when every holder has closed it."""
    locks = ownllm_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    descriptor = open_lock_file(locks / f"compile-{folder.name}")
    if descriptor is None:
        raise OSError(f"the compile lock {locks / f'compile-{folder.name}'} is not a plain file")
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield descriptor
    finally:
        os.close(descriptor)


def _prune(kept: Path) -> None:
    """Remove compiled sets beyond the KEPT_SETS most recently used (by their folders' times), after `kept`
    was compiled: old ones pile up as ownllm, torch or the models change. Each goes under its own lock, and only if
    no other process holds that lock (compiling it) and its time has not moved since the listing (another server
    loaded it meanwhile); a staging folder of a compile killed midway goes where its key's lock is free. A set
    removed while a server runs it costs nothing (it is loaded) or a compile at its next start."""
    def last_used(folder: Path) -> float:
        try:
            return folder.lstat().st_mtime
        except OSError:
            return 0.0

    pairs = {folder: last_used(folder) for folder in kept.parent.glob("decode-*")
             if folder != kept and folder.is_dir() and not folder.is_symlink()}
    old = sorted(pairs, key=pairs.__getitem__, reverse=True)[KEPT_SETS - 1 :]
    staging = [(folder, folder.with_name(folder.name[1:].rsplit(".", 1)[0]))  # .decode-<key>.<pid>
               for folder in kept.parent.glob(".decode-*.*")]
    for folder, key_folder in [(folder, folder) for folder in old] + staging:
        try:
            with _folder_lock(key_folder, wait=False) as held:
                if held is not None and (folder not in pairs or last_used(folder) == pairs[folder]):
                    _discard(folder)
                    if folder.exists() or folder.is_symlink():
                        log.warning("could not remove the old compiled set %s", folder)
        except OSError as exc:  # tidying up is no reason to give up the set just compiled
            log.warning("could not remove the old compiled set %s (%s)", folder, exc)


MANIFEST = "manifest.json"  # every file of a compiled set: its size and sha256, written with it
KERNEL_MISSING = "kernel-missing.txt"  # why `attention_kernel` could not be built, where it could not


def _fingerprints(folder: Path) -> dict[str, list[Any]]:
    """{path within the set: [size, sha256]} of every file of the packages in `folder`."""
    return {str(path.relative_to(folder)): [path.stat().st_size, file_sha256(path)]
            for graph in PARTS for path in sorted((folder / graph).rglob("*"))
            if path.is_file() and not path.is_symlink()}  # (a link, a FIFO: missing from the list, so a mismatch)


def _check_fingerprints(folder: Path) -> None:
    """Raise unless the set's files are byte for byte what its compile wrote (~10 ms for its ~7 MB). A library cut
    short maps without complaint and then dies with SIGBUS where the process touches what is missing: at every
    start, and before the graphs' own check could say anything."""
    try:
        kept = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"its {MANIFEST} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(kept, dict) or kept != _fingerprints(folder):
        raise RuntimeError(f"its files are not those its {MANIFEST} lists (damaged, cut short or changed)")


def _complete(folder: Path) -> bool:
    """A compiled set: a real folder (not a link) with every package (`GRAPHS`) unpacked in a real folder, and its
    manifest."""
    return (folder.is_dir() and not folder.is_symlink() and (folder / MANIFEST).is_file()
            and all((folder / graph).is_dir() and not (folder / graph).is_symlink() for graph in graphs_of(folder)))


def _discard(path: Path) -> None:
    """Remove what is at `path`, never following a link."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":  # the child process of `CompiledSteps._load`
    from ownllm.collector import import_at_start

    os.nice(10)
    import_at_start("torch._inductor.lowering", "torch._inductor.compile_fx", "torch.export")
    compile_packages(json.loads(sys.argv[1]), Path(sys.argv[2]))
