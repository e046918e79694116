"""Rollout generation for online RL (issue 18): TRL's default — `generate()` of the policy (the base with a fresh
LoRA, fp32 on the CPU, as ownllm's GRPO trains) over one batch of prompts x generations — against ownllm's own
engine generating the same sequences (`generate_batch`: continuous batching, per-sequence KV). Same prompts (the
SQL example's), same sampling (temperature 1.0), same token budget; each in its own process for its own peak RSS.

    OMP_NUM_THREADS=2 python bench/rollouts.py [--prompts 4] [--generations 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def _prompts(count: int) -> list[list[dict[str, str]]]:
    lines = (ROOT / "examples" / "sql" / "train.jsonl").read_text().splitlines()[:count]
    return [[m for m in json.loads(line)["messages"] if m["role"] != "assistant"] for line in lines]


def _trl_style(prompts: list[list[dict[str, str]]], generations: int, tokens: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from ownllm.models.load import load_model

    loaded = load_model(MODEL, dtype="fp32", device="cpu")
    policy = get_peft_model(loaded.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts
             for _ in range(generations)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.inference_mode():
        out = policy.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                              min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    generated = int((out[:, batch.input_ids.shape[1]:] != -1).sum())
    return {"tokens": generated, "seconds": seconds}


def _ownllm(prompts: list[list[dict[str, str]]], generations: int, tokens: int) -> dict:
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(MODEL, dtype="fp32", device="cpu", batch_rows=len(prompts) * generations)
    rendered = [engine.render_chat(p) for p in prompts for _ in range(generations)]
    params = SamplingParams(temperature=1.0, max_new_tokens=tokens, ignore_eos=True, seed=0)
    started = time.perf_counter()
    completions = engine.generate_batch(rendered, params)
    seconds = time.perf_counter() - started
    return {"tokens": sum(c.completion_tokens for c in completions), "seconds": seconds}


def _child(which: str, prompts: int, generations: int, tokens: int) -> None:
    result = (_trl_style if which == "trl" else _ownllm)(_prompts(prompts), generations, tokens)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (GRPO's batch)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (the group)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per completion (EOS ignored)")
    parser.add_argument("--child", choices=["trl", "ownllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.prompts, args.generations, args.tokens)
        return
    results = {}
    for which in ("trl", "ownllm"):
        done = subprocess.run([sys.executable, __file__, "--child", which, "--prompts", str(args.prompts),
                               "--generations", str(args.generations), "--tokens", str(args.tokens)],
                              capture_output=True, text=True, check=True)
        results[which] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.prompts} prompts x {args.generations} generations x {args.tokens} tokens, fp32, sampling at T=1")
    print(f"{'generator':<34}{'tokens/s':>10}{'seconds':>9}{'peak RSS':>11}")
    for which, label in (("trl", "TRL default (policy.generate)"), ("ownllm", "ownllm engine (generate_batch)")):
        row = results[which]
        print(f"{label:<34}{row['tokens'] / row['seconds']:>10.1f}{row['seconds']:>9.1f}{row['peak_rss_mb']:>9.0f}MB")
    ratio = (results["ownllm"]["tokens"] / results["ownllm"]["seconds"]) / (
        results["trl"]["tokens"] / results["trl"]["seconds"])
    print(f"ownllm / TRL: {ratio:.2f}x")


if __name__ == "__main__":
    main()
