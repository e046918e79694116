"""`eval qa` throughput: batched generation vs one question at a time, same 64 questions, same run.

    python bench/eval.py [--model smollm2-135m-instruct] [--questions 64] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from ownllm.evaluate.qa import read_questions, run_qa, summarize
from ownllm.generate.open import open_engine
from ownllm.generate.params import SamplingParams
from ownllm.models.pull import pull

QUESTIONS = Path(__file__).resolve().parents[1] / "examples" / "eval" / "qa.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    pull(args.model)
    base = read_questions(QUESTIONS)
    items = (base * (args.questions // len(base) + 1))[: args.questions]
    engine = open_engine(args.model, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    run_qa(engine, items[:2], params, batch_size=2)  # warm-up

    start = time.perf_counter()
    sequential = [engine.generate(engine.render_chat(item.messages), params) for item in items]
    one_at_a_time = time.perf_counter() - start
    print(f"{args.questions} questions, max {args.max_new_tokens} new tokens, {engine.loaded.dtype.dtype}")
    print(f"{'mode':24s} {'seconds':>8s} {'questions/s':>12s} {'vs one-at-a-time':>17s}")
    rate = args.questions / one_at_a_time
    print(f"{'generate, one at a time':24s} {one_at_a_time:8.1f} {rate:12.2f} {'1.00x':>17s}")
    for batch_size in (8, 16, 32):
        start = time.perf_counter()
        results = run_qa(engine, items, params, batch_size=batch_size)
        elapsed = time.perf_counter() - start
        print(f"{f'eval qa, batch {batch_size}':24s} {elapsed:8.1f} {args.questions / elapsed:12.2f} "
              f"{one_at_a_time / elapsed:16.2f}x")
    summary = summarize(results)
    tokens = sum(c.completion_tokens for c in sequential)
    print(f"contains-answer {summary['contains']:.3f}; {tokens} tokens generated one at a time; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
