"""Pick the compute dtype from what the hardware really does fast, not from what it claims.

On CPUs without native bf16 (AVX2-only), bf16 paths run many times slower than fp32; even with
AVX-512 BF16 / AMX, bf16 matrix-vector products are not always faster. So on a CPU with native bf16
we time both on the shapes decoding uses and keep the faster; the verdict is cached per CPU + torch.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from ownllm.errors import OwnLLMError
from ownllm.home import atomic_write_json, ownllm_home

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
        raise OwnLLMError(
            f"unknown dtype '{requested}'", param="dtype", hint="use auto, fp32, bf16 or fp16"
        ) from None


def choose_dtype(requested: str = "auto", device: str = "cpu") -> DtypeChoice:
    """The dtype to compute in: the user's choice, else the fastest correct one for this device."""
    import torch

    if requested != "auto":
        return DtypeChoice(normalize_dtype(requested), "requested")
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "GPU with native bf16")
        return DtypeChoice("float16", "GPU without bf16")
    flags = cpu_flags()
    if not flags & _NATIVE_BF16_FLAGS:
        return DtypeChoice("float32", "CPU has no native bf16 (bf16 would be many times slower)")
    return _measured_cpu_choice(flags)


def _measured_cpu_choice(flags: set[str]) -> DtypeChoice:
    import torch

    key = hashlib.sha256(f"{cpu_model()}|{sorted(flags)}|{torch.__version__}".encode()).hexdigest()[:16]
    cache = ownllm_home() / "hardware.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return DtypeChoice(cached["dtype"], cached["reason"])
    except (OSError, ValueError, KeyError):
        pass
    decode32, batch32 = _time_matmuls(torch.float32)
    decode16, batch16 = _time_matmuls(torch.bfloat16)
    measured = f"decode {decode32 / decode16:.2f}x, batch {batch32 / batch16:.2f}x vs fp32"
    # Decoding (one row at a time) dominates generation: bf16 must not lose there.
    if decode16 <= 1.05 * decode32 and batch16 < 0.85 * batch32:
        choice = DtypeChoice("bfloat16", f"native bf16 measured faster ({measured})")
    else:
        choice = DtypeChoice("float32", f"native bf16 measured no faster ({measured})")
    atomic_write_json(cache, {"key": key, "dtype": choice.dtype, "reason": choice.reason})
    return choice


def _time_matmuls(dtype: object, hidden: int = 2048, reps: int = 6) -> tuple[float, float]:
    """Seconds for decode-shaped (1 row) and batch-shaped (64 rows) products on an out-of-cache weight."""
    import torch

    weight = torch.randn(4 * hidden, hidden).to(dtype)  # type: ignore[arg-type]
    times = []
    with torch.inference_mode():
        for rows in (1, 64):
            x = torch.randn(rows, hidden).to(dtype)  # type: ignore[arg-type]
            torch.nn.functional.linear(x, weight)
            start = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, weight)
            times.append(time.perf_counter() - start)
    return times[0], times[1]
