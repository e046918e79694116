"""The slot forward's wide products on weights packed for oneDNN (the default where measured faster) against
F.linear (`OWNLLM_PACKED_WEIGHTS=0`), same run, alternated, each side a fresh process through the one engine
(`Engine.generate_batch`, as the server, evaluation and fine-tuning checks decode).

    python bench/packed_weights.py [--model smollm2-135m-instruct] [--dtype fp32] [--threads 1] [--rounds 3]

Two workloads per process: `decode`, 8 prompts of ~15 tokens decoding 96 greedy tokens together (steps of 8 rows,
EOS ignored),
and `prefill`, 8 prompts of ~600 tokens decoding 4 (prefill chunks). Prints each side's seconds (best and
median), the ratio of the medians, whether both sides gave the same tokens, and each side's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams
engine = open_engine(sys.argv[1], dtype=sys.argv[2])
story = " ".join(f"Item {i} of the list is a {['red', 'green', 'blue'][i % 3]} box." for i in range(60))
workloads = {
    "decode": ([f"Write a short story about the number {i}." for i in range(8)], 96),
    "prefill": ([f"{story} Which colour is item {i}?" for i in range(8)], 4),
}
engine.generate_batch(["Hello"], SamplingParams(max_new_tokens=2, temperature=0))  # verdicts, packing
out = {}
for name, (prompts, new) in workloads.items():
    start = time.perf_counter()
    done = engine.generate_batch(prompts, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True),
                                 max_batch=8)
    out[name] = {"seconds": time.perf_counter() - start, "tokens": [c.text for c in done]}
out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def one_run(model: str, dtype: str, threads: int, packed: bool) -> dict:
    env = {**os.environ, "OWNLLM_PACKED_WEIGHTS": "1" if packed else "0", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", CHILD, model, dtype, str(threads)], env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the generating process failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        print("error: --rounds and --threads must be at least 1", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"packed": [], "F.linear": []}
    for _ in range(args.rounds):
        for side in runs:
            runs[side].append(one_run(args.model, args.dtype, args.threads, side == "packed"))
    print(f"{args.model}, {args.dtype}, {args.threads} thread(s), {args.rounds} rounds, alternated")
    print(f"{'workload':>9} {'side':>9} {'best s':>8} {'median s':>9}")
    for workload in ("decode", "prefill"):
        medians = {}
        for side, results in runs.items():
            seconds = [r[workload]["seconds"] for r in results]
            medians[side] = statistics.median(seconds)
            print(f"{workload:>9} {side:>9} {min(seconds):8.2f} {medians[side]:9.2f}")
        same = all(r[workload]["tokens"] == runs["F.linear"][0][workload]["tokens"]
                   for results in runs.values() for r in results)
        print(f"{workload:>9} ratio of the medians (F.linear / packed): {medians['F.linear'] / medians['packed']:.2f}x;"
              f" same tokens on both sides: {same}")
    for side, results in runs.items():
        print(f"peak RSS {side}: {max(r['rss_mib'] for r in results):,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
