"""Decode speed: ownllm's engine vs plain `AutoModelForCausalLM.generate` vs llama-cpp-python.

Every contestant generates the same number of new tokens (EOS suppressed) from the same prompt on the
same default model, each in its own process so peak RSS is its own. Prints tok/s, peak RSS, ratios,
and the memory-bandwidth limit (weight bytes / measured read bandwidth) for each dtype.

    python bench/decode.py [--tokens 256] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def _bandwidth_gbps() -> float:
    import torch

    data = torch.ones(256 * 1024 * 1024 // 4 * 4)  # 1 GiB of fp32, far past any cache
    data.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def _ownllm(model: str, tokens: int, dtype: str, backend: str = "auto") -> dict:
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(model, dtype=dtype, backend=backend)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    engine.generate(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    completion = engine.generate(PROMPT, params)
    elapsed = time.perf_counter() - start
    label = getattr(getattr(engine, "loaded", None), "dtype", None)
    return {"tokens": completion.completion_tokens, "seconds": elapsed,
            "dtype": label.dtype if label else "Q4_1 (gguf)", "reason": label.reason if label else ""}


def _hf_generate(model: str, tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ownllm.models.resolve import resolve

    folder = resolve(model).location
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        lm.generate(**ids, max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        out = lm.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    return {"tokens": out.shape[1] - ids.input_ids.shape[1], "seconds": elapsed, "dtype": dtype}


def _llama_cpp(model: str, tokens: int) -> dict:
    import os

    from llama_cpp import Llama

    from ownllm.models.resolve import resolve

    gguf = resolve(model).path / "model.gguf"
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    eos = llm.token_eos()
    llm.create_completion(PROMPT, max_tokens=8)
    start = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, logit_bias={eos: -1e9})
    elapsed = time.perf_counter() - start
    return {"tokens": out["usage"]["completion_tokens"], "seconds": elapsed, "dtype": "Q4_1 (gguf)"}


CONTESTANTS = {
    "ownllm (dtype auto)": lambda m, n: _ownllm(m, n, "auto"),
    "ownllm fp32": lambda m, n: _ownllm(m, n, "fp32"),
    "HF generate fp32": lambda m, n: _hf_generate(m, n, "float32"),
    "HF generate bf16": lambda m, n: _hf_generate(m, n, "bfloat16"),
    "ownllm llama.cpp backend": lambda m, n: _ownllm(m, n, "auto", backend="llama.cpp"),
    "llama-cpp-python": _llama_cpp,
}


def _run_one(name: str, model: str, tokens: int) -> None:
    if name == "bandwidth":
        print(json.dumps({"gbps": _bandwidth_gbps()}))
        return
    result = CONTESTANTS[name](model, tokens)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _child(name: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", name, "--model", args.model,
                           "--tokens", str(args.tokens)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:100])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _run_one(args.one, args.model, args.tokens)
        return
    from ownllm.models.dtype import cpu_flags, cpu_model
    from ownllm.models.pull import pull
    from ownllm.models.registry import local_model

    pull(args.model)
    params = local_model(args.model).manifest["params"]
    # Each measurement runs in a fresh process: Linux carries ru_maxrss across exec, so the parent stays small.
    bandwidth = _child("bandwidth", args)["gbps"]
    print(f"CPU: {cpu_model()}; native bf16: {bool(cpu_flags() & {'avx512_bf16', 'amx_bf16'})}")
    print(f"read bandwidth {bandwidth:.1f} GB/s; {params / 1e6:.1f}M params; bandwidth limit: "
          f"fp32 {bandwidth * 1e9 / (4 * params):.0f} tok/s, bf16 {bandwidth * 1e9 / (2 * params):.0f} tok/s")
    results = {}
    for name in CONTESTANTS:
        try:
            results[name] = _child(name, args)
        except RuntimeError as exc:
            print(f"{name:28s} skipped: {exc}")
    base = results.get("HF generate fp32")
    print(f"\n{'contestant':28s} {'dtype':12s} {'tok/s':>7s} {'vs HF fp32':>10s} {'vs limit':>9s} {'peak RSS':>9s}")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        bytes_per_param = 4 if r["dtype"] == "float32" else 2 if r["dtype"] in ("bfloat16", "float16") else None
        limit = bandwidth * 1e9 / (bytes_per_param * params) if bytes_per_param else None
        ratio = f"{rate / (base['tokens'] / base['seconds']):.2f}x" if base else "-"
        of_limit = f"{rate / limit:.2f}" if limit else "-"
        print(f"{name:28s} {r['dtype']:12s} {rate:7.1f} {ratio:>10s} {of_limit:>9s} {r['peak_rss_mb']:7.0f}MB")


if __name__ == "__main__":
    main()
