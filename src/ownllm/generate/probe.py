"""Measured memory of a loaded model, to put beside the estimate."""

from __future__ import annotations

import resource
from typing import Any

import psutil

from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams


def measure_inference(spec: str, *, dtype: str = "auto", backend: str = "auto") -> dict[str, Any]:
    """Load a model, generate 16 tokens, and report resident memory in bytes."""
    process = psutil.Process()
    before = process.memory_info().rss
    engine = open_engine(spec, dtype=dtype, backend=backend)
    # After a generation every weight page has been touched (loading may only map the file).
    engine.generate("Hello", SamplingParams(max_new_tokens=16, ignore_eos=True))
    loaded = process.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    loaded_model = getattr(engine, "loaded", None)
    return {
        "backend": engine.backend,
        "dtype": loaded_model.dtype.dtype if loaded_model is not None else "gguf",
        "rss_before": before,
        "rss_loaded": loaded,
        "model_delta": loaded - before,
        "peak_rss": peak,
    }
