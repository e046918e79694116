"""A Llama-family forward pass over a slot KV cache, for continuous batching (nanoGPT-sized on purpose).

Each running sequence owns one slot of a preallocated cache [slots, kv_heads, max_len, head_dim] per layer,
so sequences of different lengths decode together in one batched forward: rows are slots, each with its
own position, and attends over its own slot's keys only. Prompts are prefilled in chunks into
their slot. Weights are the loaded transformers model's, fused (q|k|v and gate|up) for fewer, larger
matmuls. Everything else is transformers' forward op for op, with its casts, in the model's dtype: in bf16 a
rounding step done differently (even a more precise one) moves the logits by whole bf16 ulps, which 30 layers
turn into other greedy answers than the CLI's (tests/generate/test_slot_parity.py). LoRA adapters (PEFT
folders) add their low-rank delta per row, as PEFT computes it, so base and adapter requests share a batch.

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


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale in that dtype.

    Not F.rms_norm: that scales by the weight in fp32 and rounds once, so in bf16 a quarter of the values
    land one ulp away from what the model computes everywhere else (0.9 apart in the logits after 30 layers).
    """
    normed = x.to(torch.float32)
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


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
    """Low-rank deltas per layer and projection: x @ A.T @ B.T * scale, in fp32 (see `SlotModel._lora`)."""

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
        self.scaling = getattr(inner.layers[0].self_attn, "scaling", self.head_dim**-0.5)
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
        self.cos, self.sin = self._rotary_tables(inner, max_len)
        self.adapters: dict[str, LoraAdapter] = {}

    def _rotary_tables(self, inner: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_len, head_dim] in the model dtype, from the model's own rotary module where it has one
        (its inv_freq and attention scaling, computed in fp32 and then cast, as in every forward)."""
        positions = torch.arange(max_len)[None]
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is not None:
            with torch.no_grad():
                cos, sin = rotary(torch.empty(0, dtype=self.dtype), positions)
            return cos[0], sin[0]
        theta = (getattr(self.config, "rope_parameters", None) or {}).get("rope_theta") or getattr(
            self.config, "rope_theta", 10000.0)
        inverse = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        angles = positions[0, :, None].float() * inverse
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

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
            # fp32 as PEFT keeps them (it upcasts bf16/fp16 adapter weights when it loads an adapter)
            weights[(layer, projection)] = (tensor.float(), b.float())
        if not weights:
            raise OwnLLMError(f"{folder}: no LoRA weights for {', '.join(_PROJECTIONS)}", param="adapter")
        adapter = LoraAdapter(name, folder, weights, scale)
        self.adapters[name] = adapter
        return adapter

    def _lora(self, x: torch.Tensor, layer: int, projections: tuple[str, ...], groups: list[tuple[str, Any]],
              width: list[int]) -> torch.Tensor | None:
        """The adapters' fp32 delta for a (possibly fused) projection, row groups by adapter; None if none.

        As PEFT's unmerged LoRA forward: input cast to fp32, B(A(x)) * scale in fp32. The caller adds it to
        the base output in fp32 and rounds once to the model dtype (`_plus_lora`); rows without an adapter
        add zeros, which leaves their base output bit for bit.
        """
        if not groups:
            return None
        delta = torch.zeros(*x.shape[:-1], sum(width), dtype=torch.float32)
        for name, rows in groups:
            adapter = self.adapters[name]
            x_rows = x[rows].float()
            offset = 0
            for projection, size in zip(projections, width, strict=True):
                pair = adapter.weights.get((layer, projection))
                if pair is not None:
                    a, b = pair
                    delta[rows, ..., offset : offset + size] = F.linear(F.linear(x_rows, a), b) * adapter.scale
                offset += size
        return delta

    @staticmethod
    def _plus_lora(out: torch.Tensor, lora: torch.Tensor | None) -> torch.Tensor:
        return out if lora is None else (out.float() + lora).to(out.dtype)

    # --- the forward pass -------------------------------------------------------------------
    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: list[int],
                starts: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        """Store k/v in the rows' slots and attend, each row over exactly its own keys.

        The sdpa calls are transformers' own (sdpa_attention_forward on CPU, softmax in fp32 inside the
        kernel): a fresh prompt is causal with no mask, a later chunk gets a mask over the cache, a decoding
        row attends unmasked over its own length. One call per decoding row rather than one over rows padded to
        the longest: padding reorders the kernel's sums (bf16 logits then drift by whole ulps from the CLI's),
        and the per-row calls skip both the padded work and the gather of the slots' caches.
        """
        k_cache, v_cache = self.k_cache[index], self.v_cache[index]
        length = q.shape[2]
        if length > 1:  # one prefill chunk (rows = 1)
            slot, start = slots[0], starts[0]
            k_cache[slot, :, start : start + length] = k[0]
            v_cache[slot, :, start : start + length] = v[0]
            end = start + length
            return F.scaled_dot_product_attention(q, k_cache[slot : slot + 1, :, :end],
                                                  v_cache[slot : slot + 1, :, :end], attn_mask=mask,
                                                  is_causal=mask is None, scale=self.scaling, enable_gqa=True)
        slot_index, start_index = torch.tensor(slots), torch.tensor(starts)
        k_cache[slot_index, :, start_index] = k[:, :, 0]
        v_cache[slot_index, :, start_index] = v[:, :, 0]
        return torch.cat([
            F.scaled_dot_product_attention(q[row : row + 1], k_cache[slot : slot + 1, :, : start + 1],
                                           v_cache[slot : slot + 1, :, : start + 1], scale=self.scaling,
                                           enable_gqa=True)
            for row, (slot, start) in enumerate(zip(slots, starts, strict=True))])

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
        if rows > 1 and length > 1:
            raise ValueError("a forward is either one prefill chunk (rows = 1) or one decoding step (T = 1)")
        groups = []
        if adapters and any(adapters):
            for name in sorted({a for a in adapters if a}):
                groups.append((name, torch.tensor([i for i, a in enumerate(adapters) if a == name])))
        positions = starts[:, None] + torch.arange(length)[None, :]  # [rows, T]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [rows, 1, T, D]
        slot_list, start_list = slots.tolist(), starts.tolist()
        mask = None
        if length > 1 and start_list[0] > 0:  # a later prefill chunk: causal within it, all of the cache before
            mask = torch.arange(start_list[0] + length)[None, None, None, :] <= positions[:, None, :, None]
        h, kv, d, half = self.heads, self.kv_heads, self.head_dim, self.head_dim // 2
        q_width, kv_width = h * d, kv * d
        x = self.embed[tokens]  # [rows, T, C]
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(x, layer.norm1, self.eps)
            qkv = F.linear(normed, layer.qkv, layer.qkv_bias)
            qkv = self._plus_lora(qkv, self._lora(normed, index, ("q_proj", "k_proj", "v_proj"), groups,
                                                  [q_width, kv_width, kv_width]))
            qkv = qkv.view(rows, length, h + 2 * kv, d).transpose(1, 2)  # [rows, h+2kv, T, D]
            qk = qkv[:, : h + kv]
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin
            q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kv :]
            attended = self._attend(index, q, k, v, slot_list, start_list, mask)
            attended = attended.transpose(1, 2).reshape(rows, length, q_width)
            out = self._plus_lora(F.linear(attended, layer.o),
                                  self._lora(attended, index, ("o_proj",), groups, [x.shape[-1]]))
            x = x + out
            normed = _rms_norm(x, layer.norm2, self.eps)
            gate_up = F.linear(normed, layer.gate_up)
            gate_up = self._plus_lora(gate_up, self._lora(normed, index, ("gate_proj", "up_proj"), groups,
                                                          [self.intermediate] * 2))
            gate, up = gate_up.split(self.intermediate, dim=-1)
            hidden = F.silu(gate) * up
            out = self._plus_lora(F.linear(hidden, layer.down),
                                  self._lora(hidden, index, ("down_proj",), groups, [x.shape[-1]]))
            x = x + out
        # logits in the model dtype, as transformers returns them (the sampler upcasts)
        last = _rms_norm(x[:, -1], self.final_norm, self.eps)
        return F.linear(last, self.lm_head)
