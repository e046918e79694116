"""A decoder forward pass over per-sequence KV, for continuous batching (nanoGPT-sized on purpose).

Each running sequence owns a KV buffer [layers, 2, kv_heads, positions, head_dim] that grows as it does
(`reserve`, driven by `ownllm.generate.kv_cache.KVCache`: the budget, the prefix cache, preemption), so sequences
of different lengths decode together in one batched forward: each row has its own position and attends over its
own sequence's keys only, read in place (no gather: a buffer is one contiguous tensor). Prompts are prefilled in
chunks. Weights are the loaded transformers model's, fused (q|k|v and gate|up) for fewer, larger matmuls.
Everything else is transformers' forward op for op, with its casts, in the model's dtype: in bf16 a rounding step
done differently (even a more precise one) moves the logits by whole bf16 ulps, which 30 layers turn into other
greedy answers than the CLI's (tests/generate/test_slot_parity.py). LoRA adapters (PEFT folders) add their
low-rank delta per row, as PEFT computes it, so base and adapter requests share a batch. A prompt-tuning prefix
(learned embeddings) goes in front of every sequence at positions 0..P-1, as the
single-stream engine puts it.

Architectures: llama, mistral, qwen2 (the Llama block, biases optional), phi3 (the same block with fused
projections; fixed rotary tables only) and gemma3_text (q/k norms, (1 + w) norms around attention and
feed-forward, scaled embeddings, local and global layers with their own rotary bases, final logit
softcapping). Sliding-window layers attend over the last `sliding_window` positions, as transformers' masks
do. Everything runs on the model's device; logits come back on the CPU for the sampler. `slot_support` says
why a model is not covered: the engine then serves it one request at a time and says so.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from ownllm.errors import OwnLLMError
from ownllm.generate import compiled_decode
from ownllm.generate.compiled_decode import CompiledSteps, _rms, decode_attention, llama_norm, rope
from ownllm.home import kept_tensors
from ownllm.models.adapters import Adapter, LoraWeights
from ownllm.models.dtype import (
    batch_invariance_asked,
    cpu_flags,
    cpu_model,
    narrow_product,
    narrow_product_rows,
    pack_weight,
    packed_linear,
    packed_products_wanted,
    packed_products_win,
    remembered_measurement,
    slot_product_shapes,
    upcast_decode_attention,
)
from ownllm.models.gguf_int4 import Int4Weight, four_bit_weights, gguf_path, has_gguf, int4_row_limit, pack

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "phi3", "gemma3_text"}
# Projections a served LoRA adapter may touch, over every architecture above (phi3 fuses q|k|v and gate|up).
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj")
# Rotary variants whose tables depend on the position alone; dynamic and longrope (Phi-3's "su") rescale with
# the length of the sequence, which the shared tables of a batch cannot follow.
_FIXED_ROPE = {"default", "linear", "llama3", "yarn"}
# Families whose config names each layer's attention (`layer_types`); mistral and phi3 window every layer or none.
_TYPED_LAYERS = {"qwen2", "gemma3_text"}
# Prompt tokens per prefill forward (chunks end at its multiples), in the scheduler and the one-sequence path alike:
# the same chunks give a prompt the same KV and logits on both.
PREFILL_CHUNK = 256
# Matmuls of up to PROBE_ROWS rows are probed against a wide one (wider ones are taken to round as it does).
PROBE_ROWS = 64
PROBE_SHAPE = (512, 256)  # [out, in] of the product probed where no model's own shape is given
_probed_widths: dict[tuple[Any, ...], dict[int, int]] = {}


def invariant_widths(dtype: torch.dtype, device: torch.device, shape: tuple[int, int] = PROBE_SHAPE
                     ) -> dict[int, int]:
    """Row counts whose matmul of `shape` ([out, in]) rounds a row otherwise than a wide one does here, each with
    the next count that rounds alike ({} where all do). MKL's AVX2 fp32 path: 1 row is a gemv and 2-3 rows another
    kernel, and with two threads 5-7 and 9-11 rows too. The kernel depends on the shape as well: on an Ice Lake
    Xeon, fp32 [512, 256] rounds 11+ rows alike, SmolLM2's [576, 1536] only 33+ (two threads), so a model pads
    each of its products by its own probe. Probed once per dtype, device, thread count and shape."""
    key = (dtype, device.type, torch.get_num_threads(), shape)
    if key not in _probed_widths:
        def probe() -> dict[str, int]:
            generator = torch.Generator().manual_seed(0)
            out_features, in_features = shape
            x = torch.randn(4 * PROBE_ROWS, in_features, generator=generator).to(device=device, dtype=dtype)
            w = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(
                device=device, dtype=dtype)
            wide = F.linear(x, w)
            alike = [True] + [torch.equal(F.linear(x[:rows], w), wide[:rows]) for rows in range(1, PROBE_ROWS + 1)]
            return {str(rows): next((wider for wider in range(rows + 1, PROBE_ROWS + 1) if alike[wider]),
                                    PROBE_ROWS + 1)
                    for rows in range(1, PROBE_ROWS + 1) if not alike[rows]}

        if device.type == "cpu":  # (an output layer's probe takes seconds: kept with the machine's measurements)
            signature = (f"widths|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}|"
                         f"{dtype}|{shape}|{PROBE_ROWS}")
            kept = remembered_measurement("invariant_widths", signature, lambda value: isinstance(value, dict), probe)
        else:
            kept = probe()
        _probed_widths[key] = {int(rows): wider for rows, wider in kept.items()}
    return _probed_widths[key]


# Steps whose rows are each compared with the same row alone (`rows_placed_alike`).
PLACE_STEPS = (2, 3, 4, 5, 8, 16)
_probed_places: dict[tuple[Any, ...], bool] = {}


def rows_placed_alike(dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]]) -> bool:
    """Whether each row of a step's product [out, in] rounds as that row alone, at every place in steps of
    `PLACE_STEPS` rows, for each of `shapes` (the model's own: oneDNN's bf16 product of SmolLM2's down projection,
    [576, 1536], rounded the fourth row of a 4- or 8-row step otherwise than that row alone, where a probe of
    other shapes found nothing), each width computed as `_linear` computes it under OWNLLM_BATCH_INVARIANT (the
    widths `invariant_widths` names, wider). Probed once per dtype, device, thread count and shapes; on the CPU kept
    in hardware.json (the output layer's products make it ~0.7 s a dtype, paid by every server and batched model
    start before)."""
    key = (dtype, device.type, torch.get_num_threads(), tuple(shapes), batch_invariance_asked())
    if key not in _probed_places:
        def widths(shape: tuple[int, int]) -> dict[int, int]:
            # the widths the model pads by where invariance is asked (its own shapes' probes); else the general
            # probe's, which costs nothing more (this then only decides what the start-up line advises)
            return invariant_widths(dtype, device, shape if batch_invariance_asked() else PROBE_SHAPE)

        def probe() -> bool:
            generator = torch.Generator().manual_seed(0)
            for out_features, in_features in shapes:
                padded_rows = widths((out_features, in_features))
                x = torch.randn(max(PLACE_STEPS), in_features, generator=generator).to(device=device, dtype=dtype)
                w = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(
                    device=device, dtype=dtype)
                alone = [_linear(x[row : row + 1], w, padded_rows=padded_rows) for row in range(max(PLACE_STEPS))]
                if not all(torch.equal(_linear(x[:rows], w, padded_rows=padded_rows)[row : row + 1], alone[row])
                           for rows in PLACE_STEPS for row in range(rows)):
                    return False
            return True

        if device.type == "cpu":
            # the padding is part of what is probed: a change of the kept widths is another measurement
            padding = [sorted(widths(tuple(shape)).items()) for shape in shapes]
            signature = (f"places|{cpu_model()}|{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}|"
                         f"{dtype}|{[tuple(shape) for shape in shapes]}|{PLACE_STEPS}|{padding}")
            _probed_places[key] = remembered_measurement("rows_placed_alike", signature,
                                                         lambda value: isinstance(value, bool), probe)
        else:
            _probed_places[key] = probe()
    return _probed_places[key]


def rows_round_alike(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every row of a matmul rounds the same whatever the number of rows, here."""
    return not invariant_widths(dtype, device)


def slot_support(model: Any) -> str | None:
    """None when the slot forward computes what `model`'s own forward does, else the reason it cannot (the
    engine then serves one request at a time and reports the reason)."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED_ARCHITECTURES:
        return (f"the batched forward does not cover {kind} models (it covers "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    if any(not p.is_floating_point() for p in model.parameters()):
        return "the weights are quantized (4-bit or 8-bit): the batched forward needs plain weights"
    for settings in _rope_parameters(config):
        rope_type = settings.get("rope_type", "default")
        if rope_type not in _FIXED_ROPE:
            return (f"{rope_type} rotary scaling changes with the sequence length; the batched forward takes "
                    "fixed rotary tables only")
    if getattr(config, "use_bidirectional_attention", False):
        return "the model attends bidirectionally"
    if getattr(getattr(model, "model", None), "rotary_emb", None) is None:
        return "the model has no rotary embedding module to take the tables from"
    return None


def _rope_parameters(config: Any) -> list[dict[str, Any]]:
    """The rotary settings: one dict, or one per layer type (gemma3: local and global layers differ)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(value, dict) for value in rope.values()):
        return list(rope.values())
    return [rope]


@dataclass(frozen=True)
class _Norm:
    """The family's RMSNorm as transformers computes it: normalise in fp32, then

    - Llama (and Mistral, Qwen2, Phi-3): round to the input dtype, then scale in that dtype. Not F.rms_norm:
      that scales in fp32 and rounds once, so in bf16 a quarter of the values land one ulp away from what the
      model computes everywhere else (0.9 apart in the logits after 30 layers);
    - Gemma: scale by (1 + weight) in fp32, then round once.
    """

    weight: torch.Tensor  # Gemma: 1 + weight in fp32 (the same sum transformers computes on every call)
    eps: float
    gemma: bool

    @classmethod
    def of(cls, module: Any, gemma: bool) -> _Norm:
        eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
        return cls(1.0 + module.weight.float() if gemma else module.weight, eps, gemma)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemma:
            return (_rms(x, self.eps) * self.weight).type_as(x)
        return llama_norm(x, self.weight, self.eps)


@dataclass
class _Layer:
    attn_norm: _Norm
    qkv: torch.Tensor  # q | k | v rows
    qkv_bias: torch.Tensor | None
    q_norm: _Norm | None  # gemma3: RMSNorm over each head's query and key
    k_norm: _Norm | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    attn_out_norm: _Norm | None  # gemma3: the attention output is normed before the residual add
    mlp_norm: _Norm
    gate_up: torch.Tensor  # gate | up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    mlp_out_norm: _Norm | None  # gemma3: so is the feed-forward output
    act: Callable[[torch.Tensor], torch.Tensor]  # the model's own activation module's forward
    window: int | None  # sliding-window layers attend over this many positions up to their own
    rope: str  # which rotary table (gemma3: "sliding_attention" or "full_attention")


@dataclass
class _Weights:
    """A model's weights in the slot forward's layout, built once per model and kept for as long as it lives."""

    layers: list[_Layer]
    embed: torch.Tensor
    embed_scale: torch.Tensor | None  # gemma3: sqrt(hidden), in the model dtype
    final_norm: _Norm
    lm_head: torch.Tensor
    final_softcap: float | None
    rotary: Any  # the model's rotary module (its tables are built per cache length)
    rope_types: list[str]
    scaling: float
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    qkv_lora: tuple[str, ...]  # the PEFT module names of the fused projections (LoRA keys)
    gate_up_lora: tuple[str, ...]
    source: tuple[int, torch.dtype, torch.device]  # the model's first projection weight when built
    # the dense products' weights packed for oneDNN (`SlotModel.pack_for`), by id of the dense tensor;
    # None: not decided yet, empty: not packed (and `packed_note` says why)
    packed: dict[int, torch.Tensor] | None = None
    packed_note: str | None = None
    packed_versions: tuple[int, ...] = ()  # `watched`'s version counters when packed (`_repack_if_changed`)
    # the model's own projection weights (a fused weight's parts are views with counters of their own): an optimizer
    # step or another in-place write to one moves its version counter
    watched: list[torch.Tensor] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)


_built: weakref.WeakKeyDictionary[Any, _Weights] = weakref.WeakKeyDictionary()


def _weights(model: Any) -> _Weights:
    """The slot layout of `model`, built on first use. Fusing q|k|v and gate|up needs one tensor per fused
    projection: the model's own modules are pointed at its rows, so both forwards read the same memory (the
    server and every `generate_batch` call share it, and it does not double the model's weights)."""
    inner = model.model
    first = inner.layers[0].self_attn
    source = (first.qkv_proj if hasattr(first, "qkv_proj") else first.q_proj).weight
    built = _built.get(model)
    if built is not None and built.source == (source.data_ptr(), source.dtype, source.device):
        return built  # (a model moved or cast since has new tensors: built again)
    config = model.config
    gemma = config.model_type == "gemma3_text"
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    typed = config.model_type in _TYPED_LAYERS and getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    layers = []
    with torch.no_grad():
        for index, block in enumerate(inner.layers):
            attn, mlp = block.self_attn, block.mlp
            fused_qkv = hasattr(attn, "qkv_proj")
            qkv_modules = [attn.qkv_proj] if fused_qkv else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up_modules = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
            layer_type = config.layer_types[index] if typed else None
            layers.append(_Layer(
                attn_norm=_Norm.of(block.input_layernorm, gemma),
                qkv=_fused(qkv_modules), qkv_bias=_fused_bias(qkv_modules),
                q_norm=_Norm.of(attn.q_norm, gemma) if gemma else None,
                k_norm=_Norm.of(attn.k_norm, gemma) if gemma else None,
                o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
                attn_out_norm=_Norm.of(block.post_attention_layernorm, gemma) if gemma else None,
                mlp_norm=_Norm.of(block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm, gemma),
                gate_up=_fused(gate_up_modules), gate_up_bias=_fused_bias(gate_up_modules),
                down=mlp.down_proj.weight, down_bias=mlp.down_proj.bias,
                mlp_out_norm=_Norm.of(block.post_feedforward_layernorm, gemma) if gemma else None,
                act=(getattr(mlp, "act_fn", None) or mlp.activation_fn).forward,  # (no module hooks to run)
                window=(window if layer_type == "sliding_attention" else None) if typed else window,
                rope=layer_type if gemma else "default"))  # gemma3: a rotary base per layer type
    embed_module = inner.embed_tokens
    scale = getattr(embed_module, "embed_scale", None)
    built = _Weights(
        layers=layers, embed=embed_module.weight,
        embed_scale=None if scale is None else scale.to(embed_module.weight.dtype),
        final_norm=_Norm.of(inner.norm, gemma), lm_head=model.lm_head.weight,
        final_softcap=getattr(config, "final_logit_softcapping", None),
        rotary=inner.rotary_emb, rope_types=sorted({layer.rope for layer in layers}),
        scaling=getattr(first, "scaling", head_dim**-0.5),
        heads=heads, kv_heads=config.num_key_value_heads or heads, head_dim=head_dim,
        intermediate=config.intermediate_size,
        qkv_lora=("qkv_proj",) if hasattr(first, "qkv_proj") else ("q_proj", "k_proj", "v_proj"),
        gate_up_lora=("gate_up_proj",) if hasattr(inner.layers[0].mlp, "gate_up_proj") else ("gate_proj", "up_proj"),
        source=(0, source.dtype, source.device))
    source = (first.qkv_proj if hasattr(first, "qkv_proj") else first.q_proj).weight  # now a view of the fused one
    built.source = (source.data_ptr(), source.dtype, source.device)
    built.watched = [module.weight for block in inner.layers for module in block.modules()
                     if isinstance(module, torch.nn.Linear)] + [model.lm_head.weight]
    _built[model] = built
    return built


def _fused(modules: list[Any]) -> torch.Tensor:
    """One weight with the modules' rows one after another; the modules then use views of it (same values)."""
    if len(modules) == 1:
        return modules[0].weight
    fused = torch.cat([m.weight.detach() for m in modules]).contiguous()
    offset = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight.data = fused[offset : offset + rows]
        offset += rows
    return fused


def _fused_bias(modules: list[Any]) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return biases[0] if len(biases) == 1 else torch.cat([b.detach() for b in biases])


@dataclass
class _FourBitLayer:
    """A layer's projections as the GGUF stores them in 4 bits (`ownllm.models.gguf_int4`); None where one of
    a projection's parts is stored otherwise (it then runs dequantized)."""

    qkv: Int4Weight | None
    o: Int4Weight | None
    gate_up: Int4Weight | None
    down: Int4Weight | None


_DEQUANTIZED = _FourBitLayer(None, None, None, None)  # a layer's forward on the dequantized weights


@dataclass
class _FourBit:
    layers: list[_FourBitLayer]  # empty when the model has none (its forwards never ask)
    lm_head: Int4Weight | None


_four_bit_built: weakref.WeakKeyDictionary[Any, tuple[tuple[int, torch.dtype], _FourBit]] = (
    weakref.WeakKeyDictionary())


FOUR_BIT_FOLDER = "int4-cache"  # in the ownllm home: packed 4-bit weights, by GGUF file, CPU and torch
FOUR_BIT_FORMAT = 1  # raise when what is kept (how a GGUF's tensors are read, checked or packed) changes meaning
_FOUR_BIT_PARTS = ("qkv", "o", "gate_up", "down")  # (`_FourBitLayer`)


class _NoFourBit(Exception):
    """The model's GGUF has no matrix the int4 kernel can run (nothing to keep)."""


def _four_bit(model: Any, weights: _Weights) -> _FourBit:
    """The model's 4-bit projections per layer and output layer, read from its GGUF once per model (and packed
    once per file, CPU and torch: kept in the home, where a later start reads them in a fraction of the time,
    each matrix checked against the loaded weight it stands for); no layers when it has none."""
    built = _four_bit_built.get(model)
    if built is not None and built[0] == weights.source[:2]:
        return built[1]
    located = gguf_path(model)
    path = located.resolve() if located is not None else None
    signature = _four_bit_signature(path, model, weights) if path is not None else None
    if signature is None:
        built_now = _four_bit_from_file(model, weights)
    else:
        def packed_now() -> dict[str, torch.Tensor]:
            tensors = _four_bit_tensors(_four_bit_from_file(model, weights))
            if not tensors:
                raise _NoFourBit
            return tensors

        try:
            kept = kept_tensors(FOUR_BIT_FOLDER, "int4", signature, packed_now,
                                lambda kept: _four_bit_fits(kept, weights),
                                entry=str(path))  # (one entry a file: a new one replaces it)
        except _NoFourBit:
            kept = {}
        built_now = _four_bit_of(kept, len(weights.layers))
    _four_bit_built[model] = (weights.source[:2], built_now)
    return built_now


def _four_bit_signature(path: Path, model: Any, weights: _Weights) -> str | None:
    """What the packed 4-bit weights of `model` depend on: its GGUF at `path` (resolved: where, size, modification
    time), the shapes, this CPU and torch (the kernel's layout is theirs); None where the file cannot be read. Not
    the model's dtype: the scales are bf16 for a bf16 and an fp32 model alike, so both share the file's one entry."""
    try:
        stat = path.stat()
    except OSError:
        return None
    config = model.config
    return json.dumps([FOUR_BIT_FORMAT, str(path), stat.st_size, stat.st_mtime_ns, len(weights.layers),
                       config.hidden_size, weights.intermediate, weights.heads, weights.kv_heads,
                       cpu_model(), torch.__version__])


def _four_bit_from_file(model: Any, weights: _Weights) -> _FourBit:
    """`_four_bit` read from the GGUF itself: each 4-bit tensor unpacked, checked against its loaded weight and
    packed for the kernel."""
    stored = four_bit_weights(model)
    names = {id(module): name for name, module in model.named_modules()}

    def packed(modules: list[Any]) -> Int4Weight | None:
        parts = [stored.get(f"{names[id(module)]}.weight") for module in modules]
        if any(part is None for part in parts):
            return None
        return pack(parts)  # type: ignore[arg-type]

    layers = []
    lm_head = None
    if stored:
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            layers.append(_FourBitLayer(
                qkv=packed([attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]),
                o=packed([attn.o_proj]),
                gate_up=packed([mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]),
                down=packed([mlp.down_proj])))
        # a tied output layer is the embedding's tensor, stored (and named) once
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        lm_head = packed([model.model.embed_tokens if tied else model.lm_head])
    return _FourBit(layers, lm_head)


def _four_bit_tensors(four: _FourBit) -> dict[str, torch.Tensor]:
    """`four` as named tensors (`_four_bit_of` reads them back); {} where it has no 4-bit matrix."""
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(four.layers):
        for part in _FOUR_BIT_PARTS:
            weight = getattr(layer, part)
            if weight is not None:
                tensors.update(weight.tensors(f"{index}.{part}"))
    if four.lm_head is not None:
        tensors.update(four.lm_head.tensors("lm_head"))
    return tensors


def _four_bit_of(kept: dict[str, torch.Tensor], layer_count: int) -> _FourBit:
    if not kept:
        return _FourBit([], None)
    layers = [_FourBitLayer(*(Int4Weight.from_tensors(kept, f"{index}.{part}") for part in _FOUR_BIT_PARTS))
              for index in range(layer_count)]
    return _FourBit(layers, Int4Weight.from_tensors(kept, "lm_head"))


def _four_bit_fits(kept: dict[str, torch.Tensor], weights: _Weights) -> bool:
    """Whether kept packed weights are whole and compute the model's own weights (`Int4Weight.computes`): a
    damaged or foreign entry is packed again from the GGUF."""
    expected = {f"{index}.{part}": getattr(layer, part) for index, layer in enumerate(weights.layers)
                for part in _FOUR_BIT_PARTS}
    expected["lm_head"] = weights.lm_head
    fields = (".packed", ".scales", ".planes")
    prefixes = {name.rpartition(".")[0] for name in kept}
    if not kept or not prefixes <= expected.keys() \
            or any(f"{prefix}{field}" not in kept for prefix in prefixes for field in fields):
        return False
    try:
        with torch.no_grad():
            return all(weight is not None and weight.computes(expected[prefix])
                       for prefix in prefixes for weight in [Int4Weight.from_tensors(kept, prefix)])
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            padded_rows: dict[int, int] | None = None, narrow_rows: int = 0,
            packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; where `padded_rows` (`invariant_widths`) names this number of rows, computed that many rows wide
    (zero rows added, then dropped), so that each row rounds as in any wider batch; up to `narrow_rows` rows
    (`narrow_product_rows`), as `narrow_product` computes it; past them, with `packed` (the weight as
    `pack_weight` made it) where given."""
    rows = x.numel() // x.shape[-1]
    if rows <= narrow_rows:
        out = narrow_product(x, weight)
        return out if bias is None else out + bias
    if packed is not None and rows > 1:  # (one row: never measured packed, and it rounds otherwise there)
        return packed_linear(x, packed, bias)
    wide = padded_rows.get(rows) if padded_rows else None
    if wide is None:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(wide - rows, flat.shape[1])])
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


LoraAdapter = LoraWeights  # what SlotModel.adapters holds per name: deltas per (layer, projection) and the scale
RowPlace = tuple[torch.Tensor, torch.Tensor]  # a decoding row's (keys attended as a length, new key's position)


class SlotModel:
    """The batched forward of one model over `slots` sequences of up to `max_len` tokens each (plus the prefix)."""

    def __init__(self, model: Any, *, slots: int, max_len: int, prefix: torch.Tensor | None = None,
                 four_bit: bool = False) -> None:
        """
        Args:
            model: a transformers causal LM of a supported architecture (`slot_support`), on any device.
            slots: sequences held at once.
            max_len: tokens per sequence (prompt and completion), not counting the prefix.
            prefix: prompt-tuning embeddings [virtual tokens, hidden] put in front of every sequence.
            four_bit: a bf16 or fp32 model on the CPU loaded from a GGUF runs its Q4_0/Q4_1/Q4_K projections as
                stored (int4 kernel, on bf16 activations) in decode steps of up to `four_bit_rows` rows, where
                that was measured faster than its dense matmuls; wider steps and every prefill chunk (a prompt's
                tokens, scored or cached) use the dequantized weights.
        """
        reason = slot_support(model)
        if reason is not None:
            raise OwnLLMError(f"no batched forward for this model: {reason}", kind="unsupported")
        weights = _weights(model)
        self.weights = weights
        self.config = model.config
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.heads, self.kv_heads, self.head_dim = weights.heads, weights.kv_heads, weights.head_dim
        self.intermediate = weights.intermediate
        self.scaling = weights.scaling
        self.layers = weights.layers
        self.slots, self.max_len = slots, max_len
        self.prefix = None if prefix is None else prefix.to(device=self.device, dtype=self.dtype)
        self.prefix_len = 0 if prefix is None else int(prefix.shape[0])
        positions = max_len + self.prefix_len
        # KV per sequence id, grown on demand (`reserve`): [layers, 2 (k, v), kv_heads, positions, head_dim]
        self.buffers: dict[int, torch.Tensor] = {}
        self._views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per layer (k, v) [kv, pos, D]
        self.token_bytes = len(self.layers) * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize
        self.fixed_capacity: int | None = None
        self.max_sequences: int | None = None
        # on some CPUs torch's sdpa kernel for one bf16/fp16 query runs 2-6x slower than for the same values in
        # fp32, on others the reverse (`upcast_decode_attention` measures it); the fp32 call on the exact bf16
        # values, rounded back once, differs from transformers' bf16 call by at most an ulp of the output (the
        # slot parity test's decode bound holds either way)
        self._upcast_decode = self.device.type == "cpu" and (
            self.dtype == torch.float16 or (self.dtype == torch.bfloat16 and upcast_decode_attention(
                self.heads, self.kv_heads, self.head_dim)))
        self.cos, sin = self._rotary_tables(positions)
        self.sin_turned = {kind: torch.cat([-table[:, : table.shape[1] // 2], table[:, table.shape[1] // 2 :]], -1)
                           for kind, table in sin.items()}  # (`_rope`)
        self.four_bit = _FourBit([], None)  # used only in decode steps of up to four_bit_rows (0) rows
        self.four_bit_rows = 0
        self.four_bit_note: str | None = None  # why a GGUF model's 4-bit weights are not used, when they are not
        self._packable = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        self._may_pack = self._packable and not batch_invariance_asked() and packed_products_wanted()
        # seeded sampling gives a request the same tokens under any load only where rows round alike
        self.invariant = rows_round_alike(self.dtype, self.device)
        self.padded = False  # whether products of some row counts are computed wider (`_padding`): invariance asked
        self.invariance_note: str | None = None  # why OWNLLM_BATCH_INVARIANT cannot hold here, where it cannot
        placed_alike = True
        # measured where it decides something: a claim of invariance, or what the start-up line advises (fp32's
        # few-row products are padded wider under the switch; a row's place is what no padding mends)
        if self.invariant or batch_invariance_asked() or self.dtype != torch.float32:
            placed_alike = rows_placed_alike(self.dtype, self.device,
                                             [*self.layer_shapes(), tuple(self.weights.lm_head.shape)])
            self.invariant = self.invariant and placed_alike
        if not placed_alike:
            dtype = str(self.dtype).removeprefix("torch.")
            # (float32's products kept their rows apart on every CPU measured but one: an Ice Lake Xeon's did not)
            remedy = "; --dtype float32 can" if self.dtype != torch.float32 and rows_placed_alike(
                torch.float32, self.device, [*self.layer_shapes(), tuple(self.weights.lm_head.shape)]) else ""
            self.invariance_note = (f"OWNLLM_BATCH_INVARIANT cannot hold in {dtype} here: a row of its products "
                                    f"rounds by its place in the step{remedy}")
        if batch_invariance_asked():
            self.padded = True
            self.invariant = placed_alike
            if four_bit and has_gguf(model):  # the int4 kernel in narrow steps, dense in wide ones: never alike
                self.four_bit_note = "GGUF 4-bit weights off: OWNLLM_BATCH_INVARIANT is set"
        elif four_bit and has_gguf(model):
            self._use_four_bit(model, weights)
            self.invariant = self.invariant and not self.four_bit_rows  # int4 in narrow steps, dense in wide ones
        # fp32 products of a few rows computed as `narrow_product` where measured faster (with the invariance asked,
        # never: every width then rounds as a wide one)
        self.narrow_rows = 0
        if self.dtype == torch.float32 and self.device.type == "cpu" and not batch_invariance_asked():
            self.narrow_rows = self._measured_narrow_rows()
            self.invariant = self.invariant and not self.narrow_rows
        # wider products through weights packed for oneDNN where measured faster (with the invariance asked, never:
        # one row rounds otherwise than two or more there), packed once the model has wide steps to run (`pack_for`)
        self.packed: dict[int, torch.Tensor] = {}
        self.packed_note: str | None = None
        if self._may_pack and weights.packed is not None:  # packed by an earlier SlotModel of this model: from the
            self.packed, self.packed_note = weights.packed, weights.packed_note or ""  # first chunk on, no mix
            self.invariant = self.invariant and not self.packed
        elif self._packable and not self._may_pack:
            # switched off (not merely undecided): the start-up line and /health say so
            self.packed_note = "packed weights off: " + ("OWNLLM_BATCH_INVARIANT is set" if batch_invariance_asked()
                                                         else "OWNLLM_PACKED_WEIGHTS=0")
        self.adapters: dict[str, LoraAdapter] = {}
        self._adapters_here: dict[str, tuple[LoraAdapter, LoraAdapter]] = {}  # (as loaded, on self.device)
        # one-row decode steps through compiled graphs, once they are there (`ownllm.generate.compiled_decode`)
        self.compiled: CompiledSteps | None = None
        self.compiled_note: str | None = None
        self._compiled_weights: tuple[list[torch.Tensor], list[list[torch.Tensor]]] | None = None
        if compiled_decode.wanted() and self.four_bit_rows:  # (the switch is checked wherever it is set)
            spec, self.compiled_note = compiled_decode.spec_of(self)
            if spec is not None:
                self.compiled = CompiledSteps(spec, compiled_decode.checker(self, spec))

    @property
    def compiled_steps(self) -> str | None:
        """Whether one-row decode steps run compiled, are being compiled, or why not (None: not asked)."""
        return self.compiled.note if self.compiled is not None else self.compiled_note

    def _use_four_bit(self, model: Any, weights: _Weights) -> None:
        # an fp32 model's rows go into the kernel rounded to bf16 (`Int4Weight.linear`): its products then round as a
        # bf16 model's do, everything between them (norms, rotary, attention, residuals) stays fp32
        if self.dtype not in (torch.bfloat16, torch.float32) or self.device.type != "cpu":
            self.four_bit_note = f"GGUF 4-bit weights off: the int4 kernel runs on the CPU for bf16 and fp32 " \
                                 f"models, this is {str(self.dtype).removeprefix('torch.')} on {self.device.type}"
            return
        try:
            # against the dense products as they would run: on packed weights where those are faster here
            limit = int4_row_limit(self.config.hidden_size, self.intermediate,  # first: 0 needs no file read
                                   against_packed=self._may_pack and self._packing_faster(), dtype=self.dtype)
        except Exception as exc:  # a measurement that fails costs the speed-up, not the server
            log.warning("int4 kernel not measured (%s: %s); running dequantized weights", exc.__class__.__name__, exc)
            limit = 0
        if limit == 0:
            dtype = str(self.dtype).removeprefix("torch.")
            self.four_bit_note = f"GGUF 4-bit weights off: measured no faster than {dtype} on this CPU"
            return
        try:
            stored = _four_bit(model, weights)
        except Exception as exc:  # a shape the kernel refuses costs the speed-up, not the server
            log.warning("GGUF 4-bit weights not packed (%s: %s); running dequantized weights",
                        exc.__class__.__name__, exc)
            stored = _FourBit([], None)
        if not stored.layers and stored.lm_head is None:
            self.four_bit_note = "GGUF 4-bit weights off: no Q4_0/Q4_1/Q4_K/Q8_0 matrices usable (see the log)"
            return
        self.four_bit, self.four_bit_rows = stored, limit

    @property
    def dense_rows_from(self) -> int:
        """Steps of more rows than this run on the packed weights, where packed (fewer: narrow products, the
        4-bit ones, or F.linear for one row)."""
        return max(self.narrow_rows, self.four_bit_rows, 1)

    def layer_shapes(self) -> list[tuple[int, int]]:
        """[out, in] of a layer's products as this forward fuses them (q|k|v, o, gate|up, down)."""
        return slot_product_shapes(self.config.hidden_size, self.heads, self.kv_heads, self.head_dim,
                                   self.intermediate)

    @property
    def short_forward(self) -> int:
        """Forwards of this many tokens or fewer compute their products otherwise than wide ones (narrow products,
        the int4 kernel for a one-token forward, F.linear for one row beside packed weights), so their rows round
        otherwise: a prompt's last chunk is computed whole after a cached prefix that would leave fewer of its
        tokens (`KVCache`). 0: every width rounds alike (F.linear, padded where it must be)."""
        return max(self.narrow_rows, 1 if self.packed or self.four_bit_rows else 0)

    def pack_for(self, rows: int, reserve: int = 0) -> None:
        """Pack the dense weights for oneDNN (once per model: every SlotModel of it shares them) if decode steps
        of `rows` rows would run on them, where `packed_products_win` measured it faster and a copy of them fits
        twice in the memory free now, less `reserve` bytes others will still take (a server's KV budget, allocated
        as sequences grow); `packed_note` says which. The server calls it at start with its widest step; other
        callers' first wide decode step does (one sequence's prefill chunks alone gain too little for the copy)."""
        if not self._may_pack or self.packed_note is not None or rows <= self.dense_rows_from:
            return
        weights = self.weights
        with weights._lock:
            if weights.packed is None:
                weights.packed, weights.packed_note = self._pack_now(reserve)
        self.packed, self.packed_note = weights.packed, weights.packed_note or ""
        self.invariant = self.invariant and not self.packed

    def _packing_faster(self) -> bool:
        return packed_products_win(self.dtype, self.layer_shapes(), len(self.layers),
                                   tuple(self.weights.lm_head.shape))

    def _pack_now(self, reserve: int = 0) -> tuple[dict[int, torch.Tensor], str]:
        dense = self._dense()
        size = sum(t.numel() * t.element_size() for t in {id(t): t for t in dense}.values())
        try:
            faster = self._packing_faster()
        except Exception as exc:  # a measurement that fails costs the speed-up, not the forward
            log.warning("packed products not measured (%s: %s); running F.linear", exc.__class__.__name__, exc)
            return {}, "packed weights off: not measured (see the log)"
        if not faster:
            return {}, "packed weights off: measured no faster than F.linear here"
        free = psutil.virtual_memory().available
        if free - reserve < 2 * size:
            beside = f" beside the KV budget ({reserve / 2**20:,.0f} MiB)" if reserve else ""
            return {}, (f"packed weights off: their copy ({size / 2**20:,.0f} MiB) does not fit twice in the "
                        f"{free / 2**20:,.0f} MiB free{beside}")
        packed = {id(t): pack_weight(t) for t in dense}
        self.weights.packed_versions = self._dense_versions()
        return packed, (f"products of {self.dense_rows_from + 1}+ rows on weights packed for oneDNN "
                        f"(+{size / 2**20:,.0f} MiB)")

    def _dense(self) -> list[torch.Tensor]:
        """The dense weights the forward's products read (`_project`), the output layer last."""
        return [t for layer in self.layers for t in (layer.qkv, layer.o, layer.gate_up, layer.down)] + \
            [self.weights.lm_head]

    def _dense_versions(self) -> tuple[int, ...]:
        # torch counts in-place writes per tensor: an optimizer step or a copy_ into a weight moves it (an inference
        # tensor has no counter, and cannot be written outside inference mode)
        return tuple(-1 if t.is_inference() else t._version for t in self.weights.watched)

    def _repack_if_changed(self) -> None:
        """Pack again where the model's weights were written in place since (an optimizer step of full fine-tuning
        between two generations in one process): the packed copy must never answer with weights the model no
        longer has. (Writes through `.data` bypass the counters; nothing of ownllm's writes so after packing.)"""
        weights = self.weights
        if self._dense_versions() == weights.packed_versions:
            return
        with weights._lock:
            if self._dense_versions() != weights.packed_versions and weights.packed:
                # one matrix at a time, each packed copy replacing its old one: never two copies of them all
                for key, tensor in {id(t): t for t in self._dense()}.items():
                    weights.packed[key] = pack_weight(tensor)
                weights.packed_versions = self._dense_versions()

    def _measured_narrow_rows(self) -> int:
        try:
            return narrow_product_rows(torch.float32, self.layer_shapes(), len(self.layers),
                                       tuple(self.weights.lm_head.shape))
        except Exception as exc:  # a measurement that fails costs the speed-up, not the forward
            log.warning("narrow products not measured (%s: %s); running F.linear", exc.__class__.__name__, exc)
            return 0

    def _project(self, x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None,
                 four_bit: Int4Weight | None) -> torch.Tensor:
        """A projection of the forward: the stored 4-bit weight where given, else the dense one (`_linear`)."""
        if four_bit is None:
            return _linear(x, dense, bias, self._padding(dense), self.narrow_rows, self.packed.get(id(dense)))
        out = four_bit.linear(x)
        return out if bias is None else out + bias

    def _padding(self, weight: torch.Tensor) -> dict[int, int] | None:
        """The row counts whose product with `weight` is computed wider, where invariance is asked: its shape's own
        probe (`invariant_widths`), made once (a LoRA adapter's shapes at their first step)."""
        if not self.padded:
            return None
        return invariant_widths(weight.dtype, weight.device, (weight.shape[0], weight.shape[1]))

    def _rotary_tables(self, positions: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """cos/sin [positions, rotary dims] per rotary kind, in the model dtype, from the model's own rotary module
        (its inv_freq and attention scaling, computed in fp32 and then cast, as in every forward)."""
        ids = torch.arange(positions, device=self.device)[None]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = {}, {}
        with torch.no_grad():
            for kind in self.weights.rope_types:
                args = () if kind == "default" else (kind,)
                table_cos, table_sin = self.weights.rotary(probe, ids, *args)
                cos[kind], sin[kind] = table_cos[0], table_sin[0]
        return cos, sin

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV the sequences hold now."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    # --- KV storage (`ownllm.generate.kv_cache.KVStorage`) -----------------------------------------
    def reserve(self, sequence: int, positions: int) -> None:
        """Room for `positions` positions (prefix included) in `sequence`: a new buffer, or a larger one with the
        old one's contents."""
        positions = min(positions, self.max_len + self.prefix_len)
        old = self.buffers.get(sequence)
        if old is not None and old.shape[3] >= positions:
            return
        shape = (len(self.layers), 2, self.kv_heads, positions, self.head_dim)
        buffer = _kv_buffer(shape, self.dtype, self.device)
        if old is not None:
            buffer[:, :, :, : old.shape[3]] = old
        self.buffers[sequence] = buffer
        self._views[sequence] = [(buffer[index, 0], buffer[index, 1]) for index in range(len(self.layers))]

    def truncate(self, sequence: int, tokens: int) -> None:
        pass  # positions past a sequence's length are never read

    def copy_prefix(self, source: int, target: int, tokens: int) -> bool:
        positions = tokens + self.prefix_len
        self.buffers[target][:, :, :, :positions] = self.buffers[source][:, :, :, :positions]
        return True

    def release(self, sequence: int) -> None:
        self.buffers.pop(sequence, None)
        self._views.pop(sequence, None)

    # --- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: Path) -> LoraAdapter:
        """A PEFT LoRA adapter folder, its deltas kept apart from the base weights so rows can choose it."""
        lora = Adapter.open(folder, kinds=("lora",), param="adapter").lora_weights()
        unknown = sorted({projection for _, projection in lora.weights} - set(_PROJECTIONS))
        if unknown:
            raise OwnLLMError(f"{folder}: LoRA on {', '.join(unknown)} cannot be served in batches (only on "
                              f"{', '.join(_PROJECTIONS)})", kind="unsupported", param="adapter")
        if not lora.weights:
            raise OwnLLMError(f"{folder}: no LoRA weights for {', '.join(_PROJECTIONS)}", param="adapter")
        self.adapters[name] = lora
        return lora

    def _plus_lora(self, out: torch.Tensor, x: torch.Tensor, layer: int, projections: tuple[str, ...],
                   groups: list[tuple[str, Any]], width: list[int]) -> torch.Tensor:
        """A (possibly fused) projection's base output `out` of input `x`, plus its adapters' deltas, row groups
        by adapter. Called only when some row has an adapter.

        As PEFT's unmerged LoRA forward: input cast to fp32, B(A(x)) * scale in fp32, added to the base output
        in fp32 and rounded once to the model dtype; rows without an adapter add zeros, which leaves their base
        output bit for bit.
        """
        delta = torch.zeros(*x.shape[:-1], sum(width), dtype=torch.float32, device=x.device)
        for name, rows in groups:
            adapter = self._adapter_here(name)
            x_rows = x[rows].float()
            offset = 0
            for projection, size in zip(projections, width, strict=True):
                pair = adapter.weights.get((layer, projection))
                if pair is not None:
                    a, b = pair
                    down = _linear(x_rows, a, padded_rows=self._padding(a))
                    delta[rows, ..., offset : offset + size] = _linear(down, b, padded_rows=self._padding(b)) \
                        * adapter.scale
                offset += size
        return (out.float() + delta).to(out.dtype)

    def _adapter_here(self, name: str) -> LoraAdapter:
        """The adapter's weights on the model's device (loaded on the CPU; moved once, on first use)."""
        adapter = self.adapters[name]
        if self.device.type == "cpu":
            return adapter
        loaded, moved = self._adapters_here.get(name, (None, None))
        if loaded is not adapter:
            weights = {key: (a.to(self.device), b.to(self.device)) for key, (a, b) in adapter.weights.items()}
            moved = LoraWeights(weights, adapter.scale)
            self._adapters_here[name] = (adapter, moved)
        return moved  # type: ignore[return-value]

    # --- the forward pass -------------------------------------------------------------------
    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequences: list[int],
                starts: list[int], window: int | None, mask: tuple[int, torch.Tensor | None],
                compiled_rows: tuple[Any, list[RowPlace], Any] | None = None) -> torch.Tensor:
        """Store k/v in the rows' sequences and attend, each row over exactly its own keys (within its window).

        The sdpa calls are transformers' own (sdpa_attention_forward on CPU, softmax in fp32 inside the
        kernel): a fresh prompt is causal with no mask, a later chunk (or one longer than the window) gets a mask
        over the cache from `mask` = (first key, mask), a decoding row attends unmasked over its own keys. A bf16
        prefill chunk of a layer without a window attends in the compiled set's C kernel where it has one for chunks
        (`DecodeAttention.chunk`, AVX-512 BF16: the same steps as sdpa's, 2.5-4x faster here). One
        call per decoding row rather than one over rows padded to the longest: padding reorders the kernel's
        sums (bf16 logits then drift by whole ulps from the CLI's), and the per-row calls skip both the padded
        work and a gather of the sequences' keys. With `compiled_rows` (the compiled `RowAttention` graph, each
        row's `_row_places` and the attention kernel's rows, if it is built), decoding rows attend through the
        kernel or that graph instead (`_compiled_attention`): the same per-row attention, its sums in another order.
        """
        length = q.shape[2]
        if length > 1:  # one prefill chunk (rows = 1)
            k_cache, v_cache = self._views[sequences[0]][index]
            start = starts[0]
            end = start + length
            k_cache[:, start:end] = k[0]
            v_cache[:, start:end] = v[0]
            first, chunk_mask = mask
            kernel = self.compiled.kernel if self.compiled is not None else None
            if kernel is not None and kernel.chunks and window is None and first == 0 and kernel.scale == self.scaling:
                return kernel.chunk(q, k_cache, v_cache, start)
            return F.scaled_dot_product_attention(q, k_cache[None, :, first:end], v_cache[None, :, first:end],
                                                  attn_mask=chunk_mask, is_causal=chunk_mask is None,
                                                  scale=self.scaling, enable_gqa=True)
        if compiled_rows is not None and window is None:  # (a set is compiled only where no window is shorter)
            return self._compiled_attention(*compiled_rows, q, k, v, sequences, index)
        outputs = []
        upcast = self._upcast_decode
        for row, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
            k_cache, v_cache = self._views[sequence][index]
            k_cache[:, start] = k[row, :, 0]
            v_cache[:, start] = v[row, :, 0]
            first = _first_key(start, window)
            outputs.append(decode_attention(q[row : row + 1], k_cache[None, :, first : start + 1],
                                            v_cache[None, :, first : start + 1], self.scaling, upcast))
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return attended.to(q.dtype) if upcast else attended

    def _compiled_attention(self, graph: Any, places: list[RowPlace], kernel_rows: Any, q: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor, sequences: list[int], index: int) -> torch.Tensor:
        """`_attend`'s decoding rows through the attention kernel in one call (`attention_kernel`), or else the
        compiled `RowAttention` graph, one call a row (the attention of the one-row graphs: `graph_attention`)."""
        if kernel_rows is not None:
            return self.compiled.kernel(index, kernel_rows, q, k, v)  # type: ignore[union-attr,misc]
        outputs = []
        for row, (sequence, (keys, position)) in enumerate(zip(sequences, places, strict=True)):
            k_cache, v_cache = self._views[sequence][index]
            outputs.append(graph([q[row : row + 1].contiguous(), k[row].contiguous(), v[row].contiguous(), k_cache,
                                  v_cache, keys, position])[0])
        return torch.cat(outputs).view(q.shape)

    def _row_places(self, sequences: list[int], starts: list[int]) -> list[RowPlace]:
        """Per decoding row, what the compiled graphs take to find its place in its cache, made once a step (not
        once a layer): the number of keys it attends, as a tensor's length (a size the graphs read), and the
        position its new key goes to."""
        # the graphs index the caches as contiguous [kv heads, capacity, head dim] (they take no strides)
        assert all(view.is_contiguous() for sequence in sequences for pair in self._views[sequence] for view in pair)
        return [(torch.empty(start + 1, dtype=torch.int8), torch.tensor([start])) for start in starts]

    def _chunk_mask(self, start: int, length: int, window: int | None) -> tuple[int, torch.Tensor | None]:
        """(first key, boolean mask [1, 1, length, keys]) for a prefill chunk at `start`: causal, and within the
        window on sliding layers (key > query - window, as transformers' sliding mask); no mask where sdpa's own
        causal one is the same."""
        first = _first_key(start, window)
        if start == 0 and (window is None or length <= window):
            return 0, None
        queries = torch.arange(start, start + length, device=self.device)[:, None]
        keys = torch.arange(first, start + length, device=self.device)[None, :]
        allowed = keys <= queries
        if window is not None:
            allowed &= keys > queries - window
        return first, allowed[None, None]

    _rope = staticmethod(rope)  # (in compiled_decode, which traces it too)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                adapters: list[str | None] | None = None, every_position: bool = False) -> torch.Tensor:
        """Logits of the last position of each row, on the CPU (of every position of a prefill chunk with
        `every_position`: [T, vocab]).

        Args:
            tokens: [rows, T] token ids (T = 1 for decoding; rows = 1 for a prefill chunk).
            slots: [rows] sequence id of each row (a sequence without room gets `max_len` positions: the scheduler
                reserves them as sequences grow, direct callers need not).
            starts: [rows] position of each row's first token in its sequence (= tokens already in its slot; a
                prompt-tuning prefix is not counted: the first chunk, at 0, brings it in).
            adapters: per row, an adapter name or None for the base model.
            every_position: a prefill chunk's logits at each of its positions (prompt log-probabilities); the last
                one's are computed alone, as without it, so the first token chosen from them is the same.
        """
        rows, length = tokens.shape
        given = length
        if rows > 1 and length > 1:
            raise ValueError("a forward is either one prefill chunk (rows = 1) or one decoding step (T = 1)")
        weights = self.weights
        if length == 1 and rows > self.dense_rows_from and self.packed_note is None:
            self.pack_for(rows)
        if self.packed and rows * length > self.dense_rows_from:  # (a step the packed weights will compute)
            self._repack_if_changed()
        groups = []
        if adapters and any(adapters):
            for name in sorted({a for a in adapters if a}):
                groups.append((name, torch.tensor([i for i, a in enumerate(adapters) if a == name],
                                                  device=self.device)))
        x = weights.embed[tokens.to(self.device)]  # [rows, T, C]
        if weights.embed_scale is not None:
            x = x * weights.embed_scale
        start_list = starts.tolist()
        if self.prefix is not None and start_list == [0]:  # a sequence's first chunk: the prefix goes first
            x = torch.cat([self.prefix[None], x], dim=1)
            length += self.prefix_len
        else:  # every later position sits after the prefix
            start_list = [start + self.prefix_len for start in start_list]
        slot_list = slots.tolist()
        for sequence in slot_list:
            if sequence not in self.buffers:
                self.reserve(sequence, self.max_len + self.prefix_len)
        positions = torch.tensor(start_list, device=self.device)[:, None] + torch.arange(length, device=self.device)
        tables = {kind: (self.cos[kind][positions][:, None], self.sin_turned[kind][positions][:, None])
                  for kind in weights.rope_types}  # [rows, 1, T, rotary dims]
        masks: dict[int | None, tuple[int, torch.Tensor | None]] = {}
        if length > 1:
            for window in {layer.window for layer in self.layers}:
                masks[window] = self._chunk_mask(start_list[0], length, window)
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        q_width, kv_width = h * d, kv * d
        # decode steps only: a prompt's chunks (scored, or computed after a cached prefix) are the dense forward's
        use_four_bit = length == 1 and rows <= self.four_bit_rows
        compiled = self.compiled.ready if self.compiled is not None else None
        places = self._row_places(slot_list, start_list) if compiled is not None and length == 1 else None
        one_compiled_row = places is not None and rows == 1 and not groups and use_four_bit
        kernel = compiled.get("kernel") if places is not None and not one_compiled_row else None  # type: ignore[union-attr]
        kernel_rows = kernel.rows([self.buffers[s] for s in slot_list], start_list) if kernel is not None else None
        if one_compiled_row:
            x = self._compiled_layers(compiled, x, slot_list[0], places[0], tables["default"])
        for index, layer in enumerate([] if one_compiled_row else self.layers):
            four = self.four_bit.layers[index] if use_four_bit else _DEQUANTIZED
            normed = layer.attn_norm(x)
            qkv = self._project(normed, layer.qkv, layer.qkv_bias, four.qkv)
            if groups:
                qkv = self._plus_lora(qkv, normed, index, weights.qkv_lora, groups,
                                      _widths(weights.qkv_lora, [q_width, kv_width, kv_width]))
            qkv = qkv.view(rows, length, h + 2 * kv, d).transpose(1, 2)  # [rows, h+2kv, T, D]
            cos, sin_turned = tables[layer.rope]
            v = qkv[:, h + kv :]
            if layer.q_norm is None:  # q and k turned in one go (elementwise: the same values as one by one)
                qk = self._rope(qkv[:, : h + kv], cos, sin_turned)
                q, k = qk[:, :h], qk[:, h:]
            else:
                q = self._rope(layer.q_norm(qkv[:, :h]), cos, sin_turned)
                k = self._rope(layer.k_norm(qkv[:, h : h + kv]), cos, sin_turned)  # type: ignore[misc]
            attended = self._attend(index, q, k, v, slot_list, start_list, layer.window,
                                    masks.get(layer.window, (0, None)),
                                    None if places is None else (compiled.get("attention"), places, kernel_rows))  # type: ignore[union-attr]
            attended = attended.transpose(1, 2).reshape(rows, length, q_width)
            out = self._project(attended, layer.o, layer.o_bias, four.o)
            if groups:
                out = self._plus_lora(out, attended, index, ("o_proj",), groups, [x.shape[-1]])
            if layer.attn_out_norm is not None:
                out = layer.attn_out_norm(out)
            x = x + out
            normed = layer.mlp_norm(x)
            gate_up = self._project(normed, layer.gate_up, layer.gate_up_bias, four.gate_up)
            if groups:
                gate_up = self._plus_lora(gate_up, normed, index, weights.gate_up_lora, groups,
                                          _widths(weights.gate_up_lora, [self.intermediate] * 2))
            gate, up = gate_up.split(self.intermediate, dim=-1)
            hidden = layer.act(gate) * up
            out = self._project(hidden, layer.down, layer.down_bias, four.down)
            if groups:
                out = self._plus_lora(out, hidden, index, ("down_proj",), groups, [x.shape[-1]])
            if layer.mlp_out_norm is not None:
                out = layer.mlp_out_norm(out)
            x = x + out
        logits = self._logits(x[:, -1], use_four_bit)
        if every_position and rows == 1 and given > 1:
            logits = torch.cat([self._logits(x[0, -given:-1], False), logits])
        return logits.cpu()

    def _logits(self, x: torch.Tensor, four_bit: bool) -> torch.Tensor:
        """The logits of final hidden states [rows, C], in the model dtype, as transformers returns them (the
        sampler upcasts); through the stored 4-bit output layer with `four_bit`."""
        weights = self.weights
        lm_head = self.four_bit.lm_head if four_bit else None
        logits = self._project(weights.final_norm(x), weights.lm_head, None, lm_head)
        if weights.final_softcap is not None:
            logits = torch.tanh(logits / weights.final_softcap) * weights.final_softcap
        return logits


    def _compiled_layers(self, graphs: dict[str, Any], x: torch.Tensor, sequence: int, place: RowPlace,
                         table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Every layer of one decoding row through the compiled graphs, one call a layer: its norms, projections,
        cache write and attention as `forward` computes them (the same ops in the same order: the same bits, but
        for the order of the attention's sums: `compiled_decode.graph_attention`)."""
        first, middle = graphs["first"], graphs["middle"]
        if self._compiled_weights is None:  # each layer's weights in the graphs' order, listed once
            four, layers = self.four_bit.layers, self.layers
            inputs = [compiled_decode.layer_inputs(four[i], layers[i].attn_norm.weight, layers[i].mlp_norm.weight)
                      for i in range(len(layers))]
            # the last layer's call takes its own first-half weights where a next layer's would be (its q|k|v is
            # dropped: `compiled_decode` has no graph for the last layer alone)
            following = inputs[1:] + inputs[-1:]
            self._compiled_weights = (inputs[0]["first"], [layer["last"] + after["first"]
                                                           for layer, after in zip(inputs, following, strict=True)])
        first_weights, layer_weights = self._compiled_weights
        keys, position = place
        qk, v = first([x, *first_weights, *table])
        for (k_cache, v_cache), weights in zip(self._views[sequence], layer_weights, strict=True):
            x, qk, v = middle([x, qk, v, k_cache, v_cache, keys, position, *weights, *table])
        return x.view(1, 1, -1)


def _kv_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A sequence's KV buffer. On the CPU, in an anonymous mapping of its own, unmapped when the last tensor on it
    goes: from malloc, buffers of a few MB (freed when a sequence grows or ends) land in glibc's heap once its
    mmap threshold has risen past them, and stay resident after they are freed. Measured (bench/RESULTS.md): 32 chat
    streams of the default model peaked at 3.4 GB resident with malloc'd buffers, 1.5 GB this way."""
    count = math.prod(shape)
    if device.type != "cpu" or count == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    try:  # private: adjacent buffers merge into one kernel mapping (vm.max_map_count counts them)
        memory = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # no mapping to be had (their count, the address space): malloc may still have room
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)  # zero pages until written


def _first_key(position: int, window: int | None) -> int:
    """The first position a query at `position` attends to."""
    return 0 if window is None else max(0, position - window + 1)


def _widths(projections: tuple[str, ...], split: list[int]) -> list[int]:
    """Output widths of the LoRA'd projections: one fused module spans all of `split`."""
    return [sum(split)] if len(projections) == 1 else split
