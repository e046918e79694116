"""Memory estimates for inference and training, from a model's shape or just its size ("7B").

Rules of thumb, stated where they are used:
- weights: bytes per parameter of the dtype (fp32 4, bf16 2, int8 1, 4-bit 0.5);
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes, per token;
- full fine-tuning with Adam: 16 bytes per parameter (weights, gradients, fp32 master copy, two moments);
- activations (bf16, fused attention): about 34 x hidden bytes per token per layer, or 2 x hidden with
  gradient checkpointing (Korthikanti et al., 2022), plus fp32 logits for the whole sequence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "4-bit": 0.5}
ADAM_BYTES_PER_PARAM = 16
NF4_OVERHEAD_BYTES = 0.127 / 8 * 4  # double-quantised block constants, ~0.127 bits per parameter


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    source: str  # where the shape came from, shown to the user


# Public configs of well-known models, used when only a size is given.
_REFERENCE_SHAPES = [
    ("SmolLM2-135M", 134_515_008, 30, 576, 9, 3, 64, 1536, 49152, 8192),
    ("SmolLM2-360M", 361_821_120, 32, 960, 15, 5, 64, 2560, 49152, 8192),
    ("Llama-3.2-1B", 1_235_814_400, 16, 2048, 32, 8, 64, 8192, 128256, 131072),
    ("Llama-3.2-3B", 3_212_749_824, 28, 3072, 24, 8, 128, 8192, 128256, 131072),
    ("Llama-2-7B", 6_738_415_616, 32, 4096, 32, 32, 128, 11008, 32000, 4096),
    ("Llama-3.1-8B", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 131072),
    ("Llama-2-13B", 13_015_864_320, 40, 5120, 40, 40, 128, 13824, 32000, 4096),
    ("Llama-3.1-70B", 70_553_706_496, 80, 8192, 64, 8, 128, 28672, 128256, 131072),
]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT])\s*$")
_UNITS = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: str) -> int | None:
    match = _SIZE.match(text)
    if not match:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def shape_for_size(params: int) -> ModelShape:
    """A shape for a bare parameter count: the reference model nearest in size (log scale)."""
    ref = min(_REFERENCE_SHAPES, key=lambda r: abs(math.log(r[1] / params)))
    name, _, layers, hidden, heads, kv, head_dim, inter, vocab, ctx = ref
    return ModelShape(params, layers, hidden, heads, kv, head_dim, inter, vocab, ctx,
                      source=f"size {params / 1e9:g}B; layer shapes assumed like {name}")


def context_length_of(config: Any, tokenizer: Any = None) -> int:
    """The context window a model config declares; where it declares none, the tokenizer's limit, else 2048."""
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def shape_from_config(config: Any, params: int | None, source: str) -> ModelShape:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layers = config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = config.vocab_size
    if params is None:  # count from the shape: attention + gated MLP + norms per layer, embeddings
        per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter + 2 * hidden
        tied = getattr(config, "tie_word_embeddings", False)
        params = layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden
    return ModelShape(params, layers, hidden, heads, kv_heads, head_dim, inter, vocab,
                      context_length_of(config), source=source)


def shape_of(spec: str) -> ModelShape:
    """From a size ("7B"), a local/pulled model, or a hub config the hub or its cache can serve."""
    size = parse_size(spec)
    if size is not None:
        return shape_for_size(size)
    from transformers import AutoConfig

    from ownllm.models.resolve import resolve

    source = resolve(spec)
    params = None
    manifest = source.path / "ownllm.json" if source.kind == "folder" else None
    if manifest is not None and manifest.is_file():
        import json

        params = json.loads(manifest.read_text())["params"]
    try:
        if source.kind == "gguf":
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            config = AutoConfig.from_pretrained(source.location)
    except OSError:
        raise OwnLLMError(f"could not read a config for '{spec}' (offline, or not a model)",
                          kind="not_found", param="model", hint="give a size like 7B instead") from None
    return shape_from_config(config, params, source=f"config of {Path(source.location).name}")


@dataclass(frozen=True)
class Estimate:
    shape: ModelShape
    weights: dict[str, float]  # dtype -> bytes
    kv_per_token: float  # bytes, bf16
    kv_full_context: float  # bytes, bf16, batch x full context
    training: dict[str, float]  # method -> bytes (with gradient checkpointing)
    training_no_ckpt: dict[str, float]
    lora_params: int
    batch_size: int
    seq_len: int
    lora_rank: int
    lora_targets: str


def lora_param_count(shape: ModelShape, rank: int, targets: str) -> int:
    q_out = shape.heads * shape.head_dim
    kv_out = shape.kv_heads * shape.head_dim
    per_layer = rank * ((shape.hidden + q_out) * 2 + (shape.hidden + kv_out) * 2)  # q, o, k, v
    if targets == "all-linear":
        per_layer += rank * (shape.hidden + shape.intermediate) * 3  # gate, up, down
    return per_layer * shape.layers


def activation_bytes(shape: ModelShape, tokens: int, *, checkpointing: bool) -> float:
    per_token_layer = (2 if checkpointing else 34) * shape.hidden
    logits = 4 * shape.vocab  # fp32 logits for the loss
    return tokens * (per_token_layer * shape.layers + logits)


def estimate(shape: ModelShape, *, batch_size: int = 1, seq_len: int | None = None, lora_rank: int = 16,
             lora_targets: str = "attention") -> Estimate:
    """Inference and training memory for `shape`.

    Args:
        shape: the model's shape.
        batch_size: sequences per step (training) or concurrent sequences (KV cache).
        seq_len: tokens per sequence for training activations (default min(context, 2048)).
        lora_rank: LoRA rank r.
        lora_targets: attention (q, k, v, o) or all-linear.
    """
    if batch_size < 1:
        raise OwnLLMError("batch-size must be at least 1", param="batch_size")
    if lora_targets not in ("attention", "all-linear"):
        raise OwnLLMError("lora-targets must be attention or all-linear", param="lora_targets")
    seq_len = seq_len or min(shape.context, 2048)
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2.0
    tokens = batch_size * seq_len
    lora = lora_param_count(shape, lora_rank, lora_targets)
    weights = {name: shape.params * b for name, b in WEIGHT_BYTES.items()}

    def training(checkpointing: bool) -> dict[str, float]:
        act = activation_bytes(shape, tokens, checkpointing=checkpointing)
        return {
            "full (Adam)": shape.params * ADAM_BYTES_PER_PARAM + act,
            "LoRA (bf16 base)": weights["bf16"] + lora * ADAM_BYTES_PER_PARAM + act,
            "QLoRA (4-bit base)": weights["4-bit"] + shape.params * NF4_OVERHEAD_BYTES
            + lora * ADAM_BYTES_PER_PARAM + act,
        }

    return Estimate(
        shape=shape,
        weights=weights,
        kv_per_token=kv_per_token,
        kv_full_context=kv_per_token * shape.context * batch_size,
        training=training(True),
        training_no_ckpt=training(False),
        lora_params=lora,
        batch_size=batch_size,
        seq_len=seq_len,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
    )
