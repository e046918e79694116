"""Will this run fit? The memory estimate for the method, batch and length, against what the machine has free,
told to the user before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

from ownllm.finetune.config import FinetuneConfig
from ownllm.models.memory import ADAM_BYTES_PER_PARAM, estimate, shape_of

GIB = 1024**3


@dataclass(frozen=True)
class MemoryCheck:
    needed: float  # bytes, estimated peak for one process
    available: float  # bytes free now (RAM, or GPU memory)
    where: str  # "RAM" | "GPU memory"

    @property
    def risky(self) -> bool:
        return self.needed > 0.9 * self.available

    def message(self) -> str:
        return (f"this run needs about {self.needed / GIB:.1f} GiB per process (estimate), "
                f"{self.available / GIB:.1f} GiB {self.where} is free for each: it may run out of memory. "
                "Lower --batch-size or --max-length, or use --method qlora.")


def training_bytes(cfg: FinetuneConfig, *, weights_dtype: str) -> float:
    """Peak for one process: weights, trainable parameters with gradients and Adam state, activations at
    batch_size x max_length without gradient checkpointing (as ownllm trains)."""
    shape = shape_of(cfg.model)
    targets = "all-linear" if cfg.lora.targets == "all-linear" else "attention"
    plan = estimate(shape, batch_size=cfg.batch_size * (2 if cfg.method == "dpo" else 1), seq_len=cfg.max_length,
                    lora_rank=cfg.lora.r, lora_targets=targets)
    activations = plan.training_no_ckpt["full (Adam)"] - shape.params * ADAM_BYTES_PER_PARAM
    trainable = plan.lora_params * ADAM_BYTES_PER_PARAM + activations
    if cfg.method in ("full", "cpt"):
        return shape.params * ADAM_BYTES_PER_PARAM + activations
    if cfg.method == "qlora":
        return plan.weights["4-bit"] + trainable
    return plan.weights[weights_dtype] + trainable


def check_memory(cfg: FinetuneConfig, *, processes: int = 1, available: float | None = None) -> MemoryCheck:
    """The estimate against free memory (all processes share one machine's RAM on CPU)."""
    import torch

    on_gpu = torch.cuda.is_available()
    needed = training_bytes(cfg, weights_dtype="bf16" if on_gpu else "fp32")
    if available is None:
        if on_gpu:
            available = float(torch.cuda.mem_get_info()[0])
        else:
            import psutil

            available = float(psutil.virtual_memory().available)
    share = available if on_gpu else available / processes
    return MemoryCheck(needed, share, "GPU memory" if on_gpu else "RAM")
