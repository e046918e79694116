"""A GGUF's 4-bit weights kept as the file stores them, for torch's CPU int4 matmul kernel.

A GGUF model is loaded through transformers, which dequantizes every tensor to the compute dtype: a Q4 file's
weights then take four times the memory and, when decoding a few rows, four times the memory traffic per token.
Q4_0, Q4_1 and Q4_K all store each group of 32 weights as 4-bit integers q with one scale and one offset
(w = scale * q + offset), which is exactly the layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`
(w = (q - 8) * scale + zero per group of 32); so those tensors can run as stored, the file's own integers,
with the group's scale and offset rounded to bf16 as the kernel takes them (the dequantized path rounds each
weight to bf16 instead). The kernel computes on bf16 activations only (fp32 ones fall to a reference path ~20x
slower): an fp32 model's rows go in rounded to bf16 and come out as fp32 again, its norms, rotary and attention
staying fp32. Q8_0 (scale * q, q an 8-bit integer; the usual type of the embedding that doubles as
the output layer) is two such 4-bit planes, q = 16 * high + low, summed: the same integers, half the bytes of
bf16. Other types (Q5, Q6_K, floats) stay dequantized.

Each tensor read here is checked against the weight transformers loaded for it (same values up to that
rounding, rows in the same order), so a name mapping or row permutation this module gets wrong leaves that
tensor dequantized instead of running wrong weights.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.models.dtype import (
    NARROW_ROWS_PROBED,
    best_of_turns,
    linear_products,
    narrow_products,
    pack_weight,
    packed_products,
    remembered_measurement,
)
from ownllm.models.gguf_file import GGUFTensor, gguf_tensors

log = logging.getLogger(__name__)

GROUP = 32  # weights per scale/offset: the kernel's group size and the sub-block of every type read here
_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")
ROW_COUNTS = (1, 2, 4, 8, 12, 16, 24, 32)  # the forward widths measured for `int4_row_limit`


@dataclass
class FourBitRows:
    """One matrix as 4-bit integers per group of 32 along the input: w[n, k] = scale[n, g] * q[n, k] + offset[n, g]
    with g = k // 32; `kind` is the GGUF type it came from."""

    q: np.ndarray  # [out, in] uint8 in 0..15
    scale: np.ndarray  # [out, in / 32] float32
    offset: np.ndarray  # [out, in / 32] float32
    kind: str

    def dequantized(self) -> np.ndarray:
        rows, columns = self.q.shape
        grouped = self.q.reshape(rows, columns // GROUP, GROUP).astype(np.float32)
        return (grouped * self.scale[..., None] + self.offset[..., None]).reshape(rows, columns)

    def permuted(self, order: np.ndarray) -> FourBitRows:
        return FourBitRows(self.q[order], self.scale[order], self.offset[order], self.kind)


Planes = list[FourBitRows]  # a matrix as 4-bit planes whose weights add up: one (Q4 types) or two (Q8_0)


@dataclass
class Int4Weight:
    """A matrix in the int4 kernel's packed layout; `linear` computes x @ w.T. A matrix of several planes (Q8_0)
    has them side by side along the input, each plane's groups scaled as that plane is, and the input repeated
    once per plane: one kernel call whose fp32 sum adds the planes before the single rounding to the activation
    dtype (two calls rounded each plane's product first, and read the same bytes)."""

    packed: Any  # torch uint8 tiling of the integers [out, planes x in]
    scales_and_zeros: Any  # [planes x in / 32, out, 2] in the kernel's dtype (bf16)
    out_features: int
    plane_count: int = 1

    def linear(self, x: Any) -> Any:
        flat = x.reshape(-1, x.shape[-1])
        if self.plane_count > 1:
            flat = flat.repeat(1, self.plane_count)
        return int4_matmul(flat, self.packed, self.scales_and_zeros).view(*x.shape[:-1], self.out_features)

    def tensors(self, prefix: str) -> dict[str, Any]:
        """Its fields as named tensors (`from_tensors` reads them back), for keeping in the home."""
        import torch

        return {f"{prefix}.packed": self.packed, f"{prefix}.scales": self.scales_and_zeros,
                f"{prefix}.planes": torch.tensor([self.plane_count])}

    @classmethod
    def from_tensors(cls, kept: dict[str, Any], prefix: str) -> Int4Weight | None:
        """The matrix `tensors(prefix)` wrote, None where `kept` has none under `prefix`."""
        if f"{prefix}.packed" not in kept:
            return None
        scales = kept[f"{prefix}.scales"]
        return cls(kept[f"{prefix}.packed"], scales, int(scales.shape[1]), int(kept[f"{prefix}.planes"][0]))

    def computes(self, dense: Any) -> bool:
        """Whether this matrix computes `dense`'s products (the weight it stands for, in the model's dtype):
        probed with two random rows, each output within a tenth of its row's weight norm of the dense product.
        The kernel's rounding differs from the dense weight's by ~0.4% of that; another matrix, rows in another
        order or damaged integers by the weights' own size."""
        import torch

        columns = self.plane_count * dense.shape[1]  # (the kernel reads the packed bytes by these sizes: all checked)
        if self.out_features != dense.shape[0] or self.scales_and_zeros.dtype != kernel_dtype() \
                or self.scales_and_zeros.shape != (columns // GROUP, dense.shape[0], 2) or columns % GROUP \
                or self.packed.dtype != torch.uint8 or self.packed.shape != (dense.shape[0], columns // 2):
            return False
        probe = torch.randn(2, dense.shape[1], generator=torch.Generator().manual_seed(0)).to(dense.dtype)
        try:
            got = self.linear(probe).float()
        except RuntimeError:  # packed integers of another shape than the scales say
            return False
        expected = torch.nn.functional.linear(probe, dense).float()
        bound = 0.1 * torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32)
        return bool(((got - expected).abs() <= bound).all())


def int4_matmul(x: Any, packed: Any, scales_and_zeros: Any) -> Any:
    """x @ w.T for a matrix in the int4 kernel's layout (`Int4Weight`'s fields): [..., in] -> [..., out], the output
    width being the scales' second dimension, in x's dtype: other activations than the kernel's (fp32) go in rounded
    to bf16 and the product (summed in fp32 by the kernel, rounded once to bf16) comes back in x's dtype. Also
    traced into the compiled decode graphs."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(scales_and_zeros.dtype), packed, GROUP,
                                                     scales_and_zeros)
    return out.to(x.dtype).view(*x.shape[:-1], scales_and_zeros.shape[1])


@dataclass
class StoredMatrix:
    """A GGUF tensor that holds one of the model's matrices, and the row order the model has it in."""

    tensor: GGUFTensor
    order: np.ndarray | None  # rows as transformers loaded them (llama's q and k), None: as stored

    def planes(self) -> Planes:
        planes = four_bit_planes(self.tensor)
        assert planes is not None  # only 4-bit tensors are kept (`four_bit_weights`)
        return planes if self.order is None else [plane.permuted(self.order) for plane in planes]


def kernel_dtype() -> Any:
    """The dtype of the activations and scales the int4 kernel computes on at its speed: bf16."""
    import torch

    return torch.bfloat16


def pack(matrices: list[StoredMatrix]) -> Int4Weight | None:
    """The matrices' rows one after another (a fused q|k|v or gate|up) in the kernel's layout; None when they
    have different numbers of planes (one Q8_0 among Q4s: they then run dequantized). Unpacked here, one
    projection at a time, so only its integers are ever held unpacked."""
    return pack_planes([matrix.planes() for matrix in matrices])


def pack_planes(parts: list[Planes]) -> Int4Weight | None:
    """`pack` on planes already unpacked."""
    import torch

    if len({len(planes) for planes in parts}) != 1:
        return None
    def side_by_side(field: str) -> np.ndarray:
        """Rows: the parts one after another; columns: the planes side by side (`Int4Weight`)."""
        return np.concatenate([np.concatenate([getattr(part[plane], field) for part in parts])
                               for plane in range(len(parts[0]))], axis=1)

    q = side_by_side("q")
    scale, offset = torch.from_numpy(side_by_side("scale")), torch.from_numpy(side_by_side("offset"))
    zero = offset + 8 * scale  # the kernel centres the integers: (q - 8) * scale + zero
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(kernel_dtype())
    # packed by blocks of rows (the kernel's layout is the same), so the int32 copy it takes stays small
    packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q[row : row + 4096])
                                                                           .to(torch.int32), 1)
                        for row in range(0, q.shape[0], 4096)])
    return Int4Weight(packed, scales_and_zeros, int(q.shape[0]), len(parts[0]))


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 factor at byte `at` of each block, as float32."""
    return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _halves(data: np.ndarray) -> np.ndarray:
    """Low and high nibbles of `data` [..., 16] as [..., 32] (llama.cpp: the low nibbles are weights 0-15)."""
    return np.concatenate([data & 0x0F, data >> 4], axis=-1)


def four_bit_planes(tensor: GGUFTensor) -> Planes | None:
    """A GGUF matrix as 4-bit planes (integers, scales, offsets), or None for a type that is not one."""
    kind = tensor.kind
    if kind not in _TYPES or len(tensor.shape) != 2:
        return None
    columns, rows = tensor.shape  # GGUF lists the fastest-moving dimension first
    if columns % (256 if kind == "Q4_K" else GROUP):
        return None
    raw = np.asarray(tensor.data).reshape(rows, -1)
    if kind == "Q8_0":
        blocks = raw.reshape(rows, columns // GROUP, 34)
        d = _half(blocks, 0)
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, columns)
        high = (q >> 4).astype(np.int16)  # -8..7 (an arithmetic shift: floor), low = q - 16 * high in 0..15
        low = (q.astype(np.int16) - 16 * high).astype(np.uint8)
        return [FourBitRows((high + 8).astype(np.uint8), 16 * d, -128 * d, kind),
                FourBitRows(low, d, np.zeros_like(d), kind)]
    if kind in ("Q4_0", "Q4_1"):
        block = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(rows, columns // GROUP, block)
        d = _half(blocks, 0)
        if kind == "Q4_0":
            offset = -8 * d
            nibbles = blocks[..., 2:]
        else:
            offset = _half(blocks, 2)
            nibbles = blocks[..., 4:]
        q = _halves(nibbles).reshape(rows, columns)
        return [FourBitRows(q, d, offset, kind)]
    # Q4_K: super-blocks of 256 = 8 groups of 32, each with a 6-bit scale and min under two fp16 factors
    blocks = raw.reshape(rows, columns // 256, 144)
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    packed_scales = blocks[..., 4:16].reshape(rows, -1, 3, 4)
    low, high, mixed = packed_scales[..., 0, :], packed_scales[..., 1, :], packed_scales[..., 2, :]
    scales = np.concatenate([low & 0x3F, (mixed & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([high & 0x3F, (mixed >> 4) | ((high >> 2) & 0x30)], axis=-1)
    # 128 bytes per super-block: four runs of 32 bytes, low nibbles = group 2i, high nibbles = group 2i + 1
    runs = blocks[..., 16:].reshape(rows, -1, 4, 32)
    q = np.stack([runs & 0x0F, runs >> 4], axis=3).reshape(rows, columns)
    scale = (d[..., None] * scales.astype(np.float32)).reshape(rows, -1)
    offset = -(dmin[..., None] * minimums.astype(np.float32)).reshape(rows, -1)
    return [FourBitRows(q, scale, offset, kind)]


def _llama_order(rows: int, heads: int) -> np.ndarray:
    """The row order transformers' LlamaTensorProcessor gives q/k (llama.cpp's converter interleaves each
    head's rotary halves; loading undoes it)."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows)


_files: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()


def remember_gguf(model: Any, path: Path) -> None:
    """Note that `model` was loaded from `path`, so its 4-bit tensors can be read again when a forward wants them."""
    _files[model] = path


def has_gguf(model: Any) -> bool:
    return model in _files


def gguf_path(model: Any) -> Path | None:
    """The GGUF `model` was loaded from (`remember_gguf`), if any."""
    return _files.get(model)


def four_bit_weights(model: Any) -> dict[str, StoredMatrix]:
    """{parameter name: where its 4-bit planes are} for the model's weights stored as Q4_0/Q4_1/Q4_K/Q8_0 in the
    GGUF it came from, each checked against the loaded weight; {} for a model not loaded from a GGUF, or a file
    that cannot be read again (truncated, changed, hostile): the model then runs on its dequantized weights, as it
    would without this, and a warning says why."""
    path = _files.get(model)
    if path is None:
        return {}
    try:
        return _checked_matrices(model, path)
    except Exception as exc:  # any failure costs the speed-up, never the server
        log.warning("%s: 4-bit tensors not used (%s: %s); running dequantized weights", path,
                    exc.__class__.__name__, exc)
        return {}


def _checked_matrices(model: Any, path: Path) -> dict[str, StoredMatrix]:
    architecture, tensors = gguf_tensors(path)
    names = _parameter_names(model, architecture)
    parameters = dict(model.named_parameters())
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    found: dict[str, StoredMatrix] = {}
    for tensor in tensors:
        name = names.get(tensor.name)
        weight = parameters.get(name) if name else None
        if weight is None or weight.dim() != 2:
            continue
        planes = four_bit_planes(tensor)
        if planes is None or planes[0].q.shape != tuple(weight.shape):
            continue
        orders: list[np.ndarray | None] = [None]
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            orders.append(_llama_order(planes[0].q.shape[0], heads if ".attn_q." in tensor.name else kv_heads))
        for order in orders:
            candidate = planes if order is None else [plane.permuted(order) for plane in planes]
            if _same_weights(candidate, weight):
                found[name] = StoredMatrix(tensor, order)  # type: ignore[index]
                break
    return found


def _parameter_names(model: Any, architecture: str) -> dict[str, str]:
    """{GGUF tensor name: the model's parameter name}, by gguf's own name map for the architecture (what
    transformers' GGUF loader uses)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        return {}
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for parameter, _ in model.named_parameters():
        module, _, suffix = parameter.rpartition(".")
        tensor = name_map.get_name(module)
        if tensor is not None:
            names[f"{tensor}.{suffix}"] = parameter
    return names


def _same_weights(planes: Planes, weight: Any) -> bool:
    """Whether the planes dequantize to the loaded weight (up to its dtype's rounding): rows in another order or
    another tensor differ by the weights' own size."""
    import torch

    rows = np.unique(np.linspace(0, weight.shape[0] - 1, 512).astype(np.int64))  # a large matrix: 512 of its rows
    sample = [FourBitRows(p.q[rows], p.scale[rows], p.offset[rows], p.kind) for p in planes]
    ours = torch.from_numpy(sum(plane.dequantized() for plane in sample)).to(weight.dtype)  # type: ignore[arg-type]
    return bool(torch.allclose(ours.float(), weight.detach()[torch.from_numpy(rows)].float(), rtol=1e-2, atol=1e-6))


def int4_row_limit(hidden: int, intermediate: int, *, against_packed: bool = False, dtype: Any = None) -> int:
    """Up to how many rows (tokens) per forward the int4 kernel beats the dense matmuls of a model in `dtype`
    (bf16 or fp32; None: bf16) on this CPU (0: never), those on weights packed for oneDNN too with `against_packed`
    (where the slot forward runs them so) and, in fp32, those computed as `narrow_product`; the int4 side with an
    fp32 model's rows rounded to bf16 and back, as `Int4Weight.linear` runs them. Measured on one layer's shapes
    out of the caches and kept per CPU + torch (+ thread count, against packed) in hardware.json."""
    import torch

    from ownllm.models.dtype import cpu_model

    dtype = dtype or torch.bfloat16
    signature = f"int4|{cpu_model()}|{torch.__version__}|{hidden}|{intermediate}"
    # (the verdict moves with the thread count once packed products are in it: 4 rows on one thread here, 8 on two)
    signature += f"|packed|{torch.get_num_threads()}" if against_packed else ""
    if dtype != torch.bfloat16:  # (a bf16 verdict keeps the signature it was kept under) fp32's narrow products
        # move with the thread count too
        signature += f"|{str(dtype).removeprefix('torch.')}" + ("" if against_packed else f"|{torch.get_num_threads()}")
    # a verdict of 0 (never faster) is measured again at the next start: one taken while the CPU was busy with
    # something else must not switch the speed-up off for good; anything not a row count is measured again too
    return remembered_measurement("int4_rows", signature,
                                  lambda cached: type(cached) is int and 0 < cached <= ROW_COUNTS[-1],
                                  lambda: _measure_row_limit(hidden, intermediate, against_packed=against_packed,
                                                             dtype=dtype))


def _measure_row_limit(hidden: int, intermediate: int, budget_bytes: int = 64 << 20, *,
                       against_packed: bool = False, dtype: Any) -> int:
    import torch

    shapes = [(3 * hidden, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate)]
    shapes = [(out, inner) for out, inner in shapes if inner % GROUP == 0]
    copies = max(1, budget_bytes // (sum(o * i for o, i in shapes) * dtype.itemsize))
    dense = [torch.randn(o, i).to(dtype) for _ in range(copies) for o, i in shapes]
    four = [pack_planes([[FourBitRows(np.random.randint(0, 16, (o, i), dtype=np.uint8),
                               np.full((o, i // GROUP), 0.01, np.float32), np.zeros((o, i // GROUP), np.float32),
                               "Q4_0")]]) for o, i in shapes] * copies

    def run_four_bit(inputs: dict[int, Any]) -> None:
        for weight, (_, columns) in zip(four, shapes * copies, strict=True):
            weight.linear(inputs[columns])  # type: ignore[union-attr]

    packed = [pack_weight(weight) for weight in dense] if against_packed else []

    limit = 0
    for rows in ROW_COUNTS:
        inputs = {i: torch.randn(rows, i).to(dtype) for _, i in shapes}
        dense_runs = [functools.partial(linear_products, dense, inputs)]
        if packed:
            dense_runs.append(functools.partial(packed_products, dense, packed, inputs))
        if dtype == torch.float32 and rows <= NARROW_ROWS_PROBED:
            dense_runs.append(functools.partial(narrow_products, dense, inputs))
        four_bit_time, *dense_times = best_of_turns([functools.partial(run_four_bit, inputs), *dense_runs])
        if four_bit_time >= 0.9 * min(dense_times):
            break
        limit = rows
    return limit
