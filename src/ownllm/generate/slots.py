"""A Llama-family forward pass over a slot KV cache, for continuous batching (nanoGPT-sized on purpose).

Each running sequence owns one slot of a preallocated cache [slots, kv_heads, max_len, head_dim] per layer,
so sequences of different lengths decode together in one batched forward: rows are slots, each with its
own position, and attention is masked to each row's own length. Prompts are prefilled in chunks into
their slot. Weights are the loaded transformers model's, fused (q|k|v and gate|up) for fewer, larger
matmuls; the result matches transformers' own forward (tested). LoRA adapters (PEFT folders) add their
low-rank delta per row, so base and adapter requests share a batch.

Architectures: llama, mistral, qwen2 (the same block, qkv bias optional). Anything else is served by the
one-request-at-a-time path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ownllm.errors import OwnLLMError

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def supports_slots(model: Any) -> bool:
    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    return (config.model_type in SUPPORTED_ARCHITECTURES and rope.get("rope_type", "default") == "default"
            and getattr(config, "hidden_act", "silu") == "silu" and not getattr(config, "sliding_window", None))


@dataclass
class _Layer:
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class LoraAdapter:
    """Low-rank deltas per layer and projection: x @ A.T @ B.T * scale."""

    name: str
    path: Path
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float


class SlotModel:
    def __init__(self, model: Any, *, slots: int, max_len: int) -> None:
        if not supports_slots(model):
            raise OwnLLMError(f"batched serving supports {sorted(SUPPORTED_ARCHITECTURES)} models",
                              kind="unsupported")
        config = model.config
        self.config = config
        self.dtype = next(model.parameters()).dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.slots, self.max_len = slots, max_len
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for block in inner.layers:
                attn, mlp = block.self_attn, block.mlp
                bias = attn.q_proj.bias
                self.layers.append(_Layer(
                    norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
                    qkv_bias=None if bias is None else torch.cat([bias, attn.k_proj.bias, attn.v_proj.bias]),
                    o=attn.o_proj.weight,
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                    down=mlp.down_proj.weight))
        shape = (slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            config, "rope_theta", 10000.0)
        inverse = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(max_len).float(), inverse)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        self.adapters: dict[str, LoraAdapter] = {}

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    # --- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: Path) -> LoraAdapter:
        """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import load_file

        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise OwnLLMError(f"{folder} is not a LoRA adapter folder (adapter_config.json + "
                              "adapter_model.safetensors)", kind="not_found", param="adapter")
        config = json.loads(config_file.read_text())
        if config.get("peft_type") != "LORA":
            raise OwnLLMError(f"{folder}: only LoRA adapters can be served, not {config.get('peft_type')}",
                              kind="unsupported", param="adapter")
        alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
        scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        tensors = load_file(weights_file)
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if ".lora_A." not in key:
                continue
            parts = key.split(".")
            layer = int(parts[parts.index("layers") + 1])
            projection = next(p for p in parts if p in _PROJECTIONS)
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weights[(layer, projection)] = (tensor.to(self.dtype), b.to(self.dtype))
        if not weights:
            raise OwnLLMError(f"{folder}: no LoRA weights for {', '.join(_PROJECTIONS)}", param="adapter")
        adapter = LoraAdapter(name, folder, weights, scale)
        self.adapters[name] = adapter
        return adapter

    def _lora(self, x: torch.Tensor, layer: int, projections: tuple[str, ...], groups: list[tuple[str, Any]],
              width: list[int]) -> torch.Tensor | None:
        """The adapters' delta for a (possibly fused) projection, row groups by adapter; None if no adapter."""
        if not groups:
            return None
        delta = torch.zeros(*x.shape[:-1], sum(width), dtype=x.dtype)
        for name, rows in groups:
            adapter = self.adapters[name]
            offset = 0
            for projection, size in zip(projections, width, strict=True):
                pair = adapter.weights.get((layer, projection))
                if pair is not None:
                    a, b = pair
                    delta[rows, ..., offset : offset + size] += (x[rows] @ a.T @ b.T) * adapter.scale
                offset += size
        return delta

    # --- the forward pass -------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                adapters: list[str | None] | None = None) -> torch.Tensor:
        """Logits of the last position of each row.

        Args:
            tokens: [rows, T] token ids (T = 1 for decoding; rows = 1 for a prefill chunk).
            slots: [rows] cache slot of each row.
            starts: [rows] position of each row's first token (= tokens already in its slot).
            adapters: per row, an adapter name or None for the base model.
        """
        rows, length = tokens.shape
        end = int((starts + length).max())
        groups = []
        if adapters and any(adapters):
            for name in sorted({a for a in adapters if a}):
                groups.append((name, torch.tensor([i for i, a in enumerate(adapters) if a == name])))
        positions = starts[:, None] + torch.arange(length)[None, :]  # [rows, T]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, T, D]
        keys = torch.arange(end)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [rows, 1, T, end]
        h, kv, d, half = self.heads, self.kv_heads, self.head_dim, self.head_dim // 2
        q_width, kv_width = h * d, kv * d
        x = self.embed[tokens]  # [rows, T, C]
        for index, layer in enumerate(self.layers):
            normed = F.rms_norm(x, (x.shape[-1],), layer.norm1, self.eps)
            qkv = F.linear(normed, layer.qkv, layer.qkv_bias)
            lora = self._lora(normed, index, ("q_proj", "k_proj", "v_proj"), groups, [q_width, kv_width, kv_width])
            if lora is not None:
                qkv = qkv + lora
            qkv = qkv.view(rows, length, h + 2 * kv, d).transpose(1, 2)  # [rows, h+2kv, T, D]
            qk = qkv[:, : h + kv]
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]
            if length == 1:
                self.k_cache[index][slots, :, starts] = k[:, :, 0]
                self.v_cache[index][slots, :, starts] = v[:, :, 0]
            else:
                slot, start = int(slots[0]), int(starts[0])
                self.k_cache[index][slot, :, start : start + length] = k[0]
                self.v_cache[index][slot, :, start : start + length] = v[0]
            if rows == 1:
                slot = int(slots[0])
                k_all = self.k_cache[index][slot : slot + 1, :, :end]
                v_all = self.v_cache[index][slot : slot + 1, :, :end]
            else:
                k_all = self.k_cache[index][slots, :, :end]
                v_all = self.v_cache[index][slots, :, :end]
            attended = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
            attended = attended.transpose(1, 2).reshape(rows, length, q_width)
            out = F.linear(attended, layer.o)
            lora = self._lora(attended, index, ("o_proj",), groups, [x.shape[-1]])
            x = x + (out if lora is None else out + lora)
            normed = F.rms_norm(x, (x.shape[-1],), layer.norm2, self.eps)
            gate_up = F.linear(normed, layer.gate_up)
            lora = self._lora(normed, index, ("gate_proj", "up_proj"), groups, [self.intermediate] * 2)
            if lora is not None:
                gate_up = gate_up + lora
            gate, up = gate_up.split(self.intermediate, dim=-1)
            hidden = F.silu(gate) * up
            out = F.linear(hidden, layer.down)
            lora = self._lora(hidden, index, ("down_proj",), groups, [x.shape[-1]])
            x = x + (out if lora is None else out + lora)
        last = F.rms_norm(x[:, -1], (x.shape[-1],), self.final_norm, self.eps)
        return F.linear(last, self.lm_head)
