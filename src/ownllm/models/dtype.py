"""Pick the compute dtype from what the hardware really does fast, not from what it claims.

On CPUs without native bf16 (AVX2-only), bf16 paths run many times slower than fp32; even with
AVX-512 BF16 / AMX, bf16 matrix-vector products are not always faster. So on a CPU with native bf16
we time both on the shapes decoding uses and keep the faster; the verdict is cached per CPU + torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError, env_switch
from ownllm.home import atomic_write_json, open_lock_file, ownllm_home

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # torch dtype name: float32 | bfloat16 | float16
    reason: str


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def normalize_dtype(requested: str) -> str:
    try:
        return DTYPES[requested.lower()]
    except KeyError:
        shown = requested if len(requested) <= 40 else requested[:40] + "..."  # not a screenful of a pasted value
        raise OwnLLMError(
            f"unknown dtype '{shown}'", param="dtype", hint="use auto, fp32, bf16 or fp16"
        ) from None


def choose_dtype(requested: str = "auto", device: str = "cpu", config: Any = None, rows: int = 1,
                 narrow_fp32: bool = True) -> DtypeChoice:
    """The dtype to compute in: the user's choice, else the fastest correct one for this device.

    Args:
        requested: auto, or a dtype name.
        device: cpu or cuda[:N].
        config: the model's config; its layer shapes make the CPU measurement representative.
        rows: sequences decoded together (1 for one stream; a server batches several).
        narrow_fp32: fp32 products of a few rows are timed as the slot forward computes them, as `narrow_product`
            where its own measurement (`decoder_narrow_rows`) found that faster for this many rows; False where
            the model will run a GGUF's 4-bit weights as stored: the int4 kernel then runs those steps in either
            dtype, and F.linear is the case the two dtypes differ in.
    """
    import torch

    if requested.lower() != "auto":  # as the dtype names: any case
        return DtypeChoice(normalize_dtype(requested), "requested")
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "GPU with native bf16")
        return DtypeChoice("float16", "GPU without bf16")
    flags = cpu_flags()
    if not flags & _NATIVE_BF16_FLAGS:
        return DtypeChoice("float32", "CPU has no native bf16 (bf16 would be many times slower)")
    narrow_rows = decoder_narrow_rows(config) if narrow_fp32 and rows <= NARROW_ROWS_PROBED else 0
    return _measured_cpu_choice(flags, _layer_shapes(config), rows, rows <= narrow_rows)


def _layer_shapes(config: Any) -> list[tuple[int, int]]:
    """(out, in) of one transformer layer's matrices; a generic 2048-wide layer without a config."""
    hidden = getattr(config, "hidden_size", None) or 2048
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    return [(hidden, hidden)] * 4 + [(inner, hidden), (inner, hidden), (hidden, inner)]


def _measured_cpu_choice(flags: set[str], shapes: list[tuple[int, int]], rows: int, narrow: bool) -> DtypeChoice:
    import torch

    def measure() -> dict[str, str]:
        # fp32 as the slot forward computes these rows: as transposed products where its own verdict says so
        decode32, decode16 = _time_decodes((torch.float32, torch.bfloat16), shapes, rows,
                                           narrow=(torch.float32,) if narrow else ())
        transposed = " (fp32 as transposed products)" if narrow else ""
        # Decoding is memory-bound matrix-vector work on these shapes, and dominates generation time:
        # bf16 must be clearly faster there, not just on big batched matmuls.
        measured = f"decode-shaped matmuls, {rows} row(s){transposed}: {decode32 / decode16:.2f}x fp32 speed"
        if decode16 < 0.9 * decode32:
            return {"dtype": "bfloat16", "reason": f"native bf16 measured faster ({measured})"}
        return {"dtype": "float32", "reason": f"native bf16 measured no faster ({measured})"}

    def valid(cached: Any) -> bool:
        return isinstance(cached, dict) and cached.get("dtype") in ("float32", "bfloat16") and isinstance(
            cached.get("reason"), str)

    # "turns": verdicts from before the dtypes were timed in turns are measured again (some were noise); "narrow":
    # fp32 timed as narrow products, as the slot forward's own verdict for these rows says it runs them (a verdict
    # measured on this thread count)
    timed = f"narrow|{torch.get_num_threads()}" if narrow else "turns"
    signature = f"{timed}|{cpu_model()}|{sorted(flags)}|{torch.__version__}|{shapes}|{rows}"
    choice = remembered_measurement("choices", signature, valid, measure)
    return DtypeChoice(choice["dtype"], choice["reason"])


def remembered_measurement(section: str, signature: str, valid: Callable[[Any], bool],
                           measure: Callable[[], Any]) -> Any:
    """A measurement of this machine kept in $OWNLLM_HOME/hardware.json under `section`, keyed by a hash of
    `signature` (CPU, torch, shapes): taken once, and again whenever what is kept is not `valid` (absent, from a
    damaged file, or a verdict the caller wants measured afresh) — never an error. Processes measuring the same at
    once (the ranks of one torchrun) all return the verdict the first of them kept."""
    key = hashlib.sha256(signature.encode()).hexdigest()[:16]
    path = ownllm_home() / "hardware.json"
    entries = _kept(path).get(section, {})
    if key in entries and valid(entries[key]):
        return entries[key]
    value = measure()
    try:
        with _file_lock(path.with_name("hardware.json.lock")):
            # read again: another process may have kept its own measurements while this one measured
            known = _kept(path)
            theirs = known.get(section, {})
            if key in theirs and valid(theirs[key]):  # this very one: one verdict for every process
                return theirs[key]
            atomic_write_json(path, {**known, section: {**theirs, key: value}})
    except OSError as exc:  # a read-only home costs the next start this measurement again, nothing more
        # said once per file and process: a server start takes ~9 measurements, each failing the same way
        level = logging.DEBUG if path in _unwritable else logging.WARNING
        _unwritable.add(path)
        log.log(level, "could not keep the measurement in %s (%s); it is taken again next time", path, exc)
    return value


_unwritable: set[Path] = set()  # hardware.json files this process could not write (warned about once)


def _kept(path: Path) -> dict[str, Any]:
    """hardware.json's sections ({} for a missing or damaged file, or a section that is not a mapping)."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {name: entries for name, entries in known.items() if isinstance(entries, dict)}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` for the read-and-write of a file that several processes update; where it cannot
    be had (not a plain file, the home read-only) the update goes on without it."""
    try:
        handle = open_lock_file(path)
    except OSError:
        handle = None
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _time_decodes(dtypes: tuple[Any, ...], shapes: list[tuple[int, int]], rows: int = 1, rounds: int = 5,
                  budget_bytes: int = 96 << 20, narrow: tuple[Any, ...] = ()) -> list[float]:
    """Seconds per dtype for `rows`-row products through enough copies of a layer to fall out of the CPU caches,
    the best of `rounds`: as F.linear computes them, or for the dtypes in `narrow` as `narrow_product` does. The
    dtypes take turns round by round, so that a burst of other work on the machine slows both alike instead of
    deciding the verdict kept for good."""
    import torch

    copies = max(1, budget_bytes // (sum(o * i for o, i in shapes) * 4))
    weights = {dtype: _layer_copies(shapes, dtype, copies) for dtype in dtypes}
    inputs = {dtype: {i: torch.randn(rows, i).to(dtype) for _, i in shapes} for dtype in dtypes}
    return best_of_turns([functools.partial(narrow_products if dtype in narrow else linear_products,
                                            weights[dtype], inputs[dtype]) for dtype in dtypes], rounds)


def _layer_copies(shapes: list[tuple[int, int]], dtype: Any, copies: int) -> list[Any]:
    """`copies` random copies of a layer's [out, in] weights: enough of them, one after another, read past the CPU
    caches as a model's layers are."""
    import torch

    return [torch.randn(o, i).to(dtype) for _ in range(copies) for o, i in shapes]


def linear_products(weights: list[Any], inputs: dict[int, Any]) -> None:
    """Each weight [out, in] times the input of its width (`inputs[in]`): one timed pass over a layer's shapes."""
    import torch

    for weight in weights:
        torch.nn.functional.linear(inputs[weight.shape[1]], weight)


def best_of_turns(runs: list[Callable[[], Any]], rounds: int = 5) -> list[float]:
    """The fastest of `rounds` timings of each run (no grad), the runs taking turns within each round."""
    import torch

    best = [float("inf")] * len(runs)
    with torch.inference_mode():
        for _ in range(rounds):
            for index, run in enumerate(runs):
                start = time.perf_counter()
                run()
                best[index] = min(best[index], time.perf_counter() - start)
    return best


def _decoder_stacks(dtype: Any, shapes: list[tuple[int, int]], layers: int,
                    output: tuple[int, int] | None) -> tuple[list[list[Any]], list[float]]:
    """Weights to time a decoder's products on (`layers` layers of `shapes`, an output layer `output`): copies of a
    layer and a slice of the output layer, each past the CPU caches as a model's weights are, and what each
    stack's time counts for in the whole decoder."""
    import torch

    # enough copies of the layer to fall out of the CPU caches, as a model's layers do; scaled to `layers`
    copies = min(64, max(1, (64 << 20) // (sum(o * i for o, i in shapes) * dtype.itemsize)))
    stacks = [_layer_copies(shapes, dtype, copies)]
    # of a large output layer, a slice of its rows (up to 64 MiB, past the caches too), scaled to the whole
    kept = min(output[0], max(1, (64 << 20) // (output[1] * dtype.itemsize))) if output else 1
    stacks += [[torch.randn(kept, output[1]).to(dtype)]] if output else []
    return stacks, [layers / copies, output[0] / kept if output else 1.0]


def _wins_over_linear(stacks: list[list[Any]], weight_of: list[float], dtype: Any, rows: int,
                      other: Callable[[int, dict[int, Any]], None]) -> bool:
    """Whether `other(index, inputs)`, stacks[index]'s products computed another way, takes 0.9x F.linear's time
    or less for `rows` rows, over the whole decoder (`_decoder_stacks`), the two taking turns."""
    import torch

    runs = []
    for index, stack in enumerate(stacks):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in stack}
        runs += [functools.partial(linear_products, stack, inputs), functools.partial(other, index, inputs)]
    times = best_of_turns(runs)
    as_linear = sum(weight_of[k] * times[2 * k] for k in range(len(stacks)))
    as_other = sum(weight_of[k] * times[2 * k + 1] for k in range(len(stacks)))
    return as_other <= 0.9 * as_linear


NARROW_ROWS_PROBED = 16  # the widest product `narrow_product_rows` times


def narrow_product_rows(dtype: Any, shapes: list[tuple[int, int]], layers: int = 1,
                        output: tuple[int, int] | None = None) -> int:
    """Up to how many rows the products of a decoder (`layers` layers of `shapes`, [out, in] weights, and an
    output layer `output`) run clearly faster here (0.9x the time or less) as `narrow_product` computes them than
    as F.linear does; 0 where they never do. MKL's fp32 path gives F.linear of one to three rows a kernel that
    reads the weight at ~12 GB/s on one thread and does not use a second one; the transposed product reads it at
    ~18 GB/s and uses every thread. On an AVX-512 EPYC, a 135M model's layers plus output layer: one row 45 ->
    31 ms on one thread, 45 -> 18 ms on two; two rows 82 -> 31 ms on one; F.linear wins again from 6-12 rows.
    (bf16's kernels ran 0.6-0.97x as fast so there.) Taken once per CPU + torch + thread count + dtype + shapes
    and kept in hardware.json."""
    import torch

    def measure() -> int:
        stacks, weight_of = _decoder_stacks(dtype, shapes, layers, output)
        widest = 0
        for rows in range(1, NARROW_ROWS_PROBED + 1):  # the first width it loses at ends the probe
            if not _wins_over_linear(stacks, weight_of, dtype, rows,
                                     lambda index, inputs: narrow_products(stacks[index], inputs)):
                break
            widest = rows
        return widest

    signature = (f"narrow|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}|"
                 f"{dtype}|{shapes}|{layers}|{output}")
    return remembered_measurement(
        "narrow_products", signature,
        lambda kept: isinstance(kept, int) and not isinstance(kept, bool) and 0 <= kept <= NARROW_ROWS_PROBED,
        measure)


PACKED_ROWS_PROBED = (4, 64)  # a decode step's rows and a prefill chunk's: the widths `packed_products_win` times


def packed_products_win(dtype: Any, shapes: list[tuple[int, int]], layers: int = 1,
                        output: tuple[int, int] | None = None) -> bool:
    """Whether a decoder's products (`layers` layers of `shapes`, [out, in] weights, and an output layer `output`)
    run clearly faster here (0.9x the time or less, at 4 rows and at 64) with their weights packed ahead for
    oneDNN (`pack_weight`, as inductor's CPU freezing packs them) than through F.linear. MKL's sgemm copies the
    whole weight into its own layout on every call, which for a few rows costs as much as the product: on an
    AVX-512 EPYC, fp32 at 4-64 rows ran 1.5-2.4x faster packed, bf16 1.1-2x. Taken once per CPU + torch + thread
    count + dtype + shapes and kept in hardware.json."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False

    def measure() -> bool:
        stacks, weight_of = _decoder_stacks(dtype, shapes, layers, output)
        packed = [[pack_weight(w) for w in stack] for stack in stacks]
        return all(_wins_over_linear(stacks, weight_of, dtype, rows,
                                     lambda index, inputs: packed_products(stacks[index], packed[index], inputs))
                   for rows in PACKED_ROWS_PROBED)

    signature = (f"packed|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}|"
                 f"{dtype}|{shapes}|{layers}|{output}")
    return remembered_measurement("packed_products", signature, lambda kept: isinstance(kept, bool), measure)


def packed_products_wanted() -> bool:
    """`OWNLLM_PACKED_WEIGHTS=0` keeps the slot forward's wide products on F.linear (and its memory at one copy of
    the weights); on by default where `packed_products_win` measures it faster."""
    return env_switch("OWNLLM_PACKED_WEIGHTS", default=True)


def pack_weight(weight: Any) -> Any:
    """`weight` [out, in] copied into oneDNN's layout for `packed_linear` (a copy as large as the weight)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: Any, packed: Any, bias: Any = None) -> Any:
    """F.linear(x, weight, bias) with the weight as `pack_weight` made it: the same values up to rounding (the
    sums run in another order), and each row rounds alike in any number of rows from two up."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def packed_products(weights: list[Any], packed: list[Any], inputs: dict[int, Any]) -> None:
    """`linear_products` with each weight as `pack_weight` made it (`packed`, in the same order)."""
    for weight, ready in zip(weights, packed, strict=True):
        packed_linear(inputs[weight.shape[1]], ready)


def batch_invariance_asked() -> bool:
    """`OWNLLM_BATCH_INVARIANT=1` (as vLLM's VLLM_BATCH_INVARIANT): a row's logits never depend on which other
    rows share its forward, at the cost of narrow steps computed wider where the CPU needs it (and no
    `narrow_product`, whose rounding differs from a wide product's)."""
    return env_switch("OWNLLM_BATCH_INVARIANT", default=False)


def slot_product_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int
                        ) -> list[tuple[int, int]]:
    """[out, in] of a decoder layer's products as the slot forward fuses them: q|k|v, o, gate|up, down."""
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden),
            (hidden, intermediate)]


def decoder_narrow_rows(config: Any) -> int:
    """`narrow_product_rows` for an fp32 decoder of this config, as the slot forward measures it (the same verdict,
    kept once): up to how many rows its products run as `narrow_product`. 0 where invariance is asked (the slot
    forward then never uses them) or the config lacks a decoder's sizes."""
    import torch

    from ownllm.models.memory import shape_from_config

    if batch_invariance_asked():
        return 0
    try:  # (the sizes as the memory estimate reads them; params given: nothing counted)
        shape = shape_from_config(getattr(config, "text_config", None) or config, params=0, source="")
    except (AttributeError, TypeError, ZeroDivisionError):
        return 0
    shapes = slot_product_shapes(shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate)
    return narrow_product_rows(torch.float32, shapes, shape.layers, (shape.vocab, shape.hidden))


def narrow_product(x: Any, weight: Any) -> Any:
    """F.linear(x, weight) for a few rows, computed as (weight @ x.T).T, one row doubled (see
    `narrow_product_rows`): the same values up to rounding."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    product = torch.mm(weight, (flat.repeat(2, 1) if rows == 1 else flat).t())
    return product[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


def narrow_products(weights: list[Any], inputs: dict[int, Any]) -> None:
    """`linear_products` computed as `narrow_product`."""
    for weight in weights:
        narrow_product(inputs[weight.shape[1]], weight)


def upcast_decode_attention(heads: int, kv_heads: int, head_dim: int, context: int = 1024) -> bool:
    """Whether one-query bf16 attention over a sequence's cached keys runs clearly faster here when computed in
    fp32 on the same values (rounded back once) than in bf16 itself. CPUs differ both ways: over 1,500 keys,
    bf16 687 us against fp32 116 us per call on an AVX-512 EPYC, bf16 107 us against fp32 385 us on an AMX Xeon.
    Taken once per CPU + torch + thread count + shape and kept in hardware.json."""
    import torch

    signature = (f"attention|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}|"
                 f"{heads}|{kv_heads}|{head_dim}|{context}")
    verdict = remembered_measurement("decode_attention", signature, lambda cached: cached in ("fp32", "bf16"),
                                     lambda: _measure_decode_attention(heads, kv_heads, head_dim, context))
    return verdict == "fp32"


def _measure_decode_attention(heads: int, kv_heads: int, head_dim: int, context: int, layers: int = 16) -> str:
    import torch
    import torch.nn.functional as F

    # as the slot forward reads them: a window of each layer's cache buffer, longer than the sequence
    caches = [torch.randn(2, kv_heads, 2 * context, head_dim).to(torch.bfloat16) for _ in range(layers)]
    query = torch.randn(1, heads, 1, head_dim).to(torch.bfloat16)

    def attend(upcast: bool) -> None:
        for cache in caches:
            q, k, v = query, cache[0][None, :, :context], cache[1][None, :, :context]
            if upcast:
                q, k, v = q.float(), k.float(), v.float()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True).to(torch.bfloat16)

    in_bf16, in_fp32 = best_of_turns([lambda: attend(False), lambda: attend(True)])
    return "fp32" if in_fp32 < 0.8 * in_bf16 else "bf16"
