"""Rollout speed of online RL: TRL's own generation (`model.generate` on the left-padded group) against ownllm's
batched engine (continuous batching, a prompt's group sharing its prefill), in the same process, on the same
trainer, prompts and settings as a GRPO step of the shipped text-to-SQL recipe (examples/sql/grpo.yaml).

    OMP_NUM_THREADS=2 python bench/rollouts.py [--model smollm2-135m-instruct] [--rounds 4] [--questions 2]

Each round samples one step's rollouts (questions x num_generations completions) with each engine, the order
alternating; tokens/s counts completion tokens (EOS included, as the trainer receives them).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
EXAMPLE = ROOT / "examples" / "sql"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model or run folder (e.g. the SFT run)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--questions", type=int, default=2, help="prompts per step (the recipe's batch_size)")
    args = parser.parse_args()

    from ownllm.finetune.config import load_config
    from ownllm.finetune.grpo import build_rl_trainer, load_prompts

    cfg = load_config(EXAMPLE / "grpo.yaml", model=args.model, rollouts="ownllm")
    rows = load_prompts(EXAMPLE / "train.jsonl")
    with tempfile.TemporaryDirectory() as folder:
        trainer, _ = build_rl_trainer(cfg, Path(folder), EXAMPLE / "train.jsonl")
        own = trainer.own_rollouts
        totals = {"trl": [0, 0.0], "ownllm": [0, 0.0]}
        for round_index in range(args.rounds):
            start = round_index * args.questions
            prompts = [row["prompt"] for row in rows[start : start + args.questions] for _ in range(
                cfg.num_generations)]
            prompt_ids = trainer._tokenize_prompts(prompts)[0]
            order = ("trl", "ownllm") if round_index % 2 == 0 else ("ownllm", "trl")
            for name in order:
                trainer.own_rollouts = own if name == "ownllm" else None
                started = time.perf_counter()
                completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, cfg.num_generations)
                seconds = time.perf_counter() - started
                tokens = sum(len(ids) for ids in completions)
                totals[name][0] += tokens
                totals[name][1] += seconds
                print(f"round {round_index + 1} {name:>6}: {len(completions)} completions, {tokens} tokens in "
                      f"{seconds:.2f} s ({tokens / seconds:.1f} tok/s)", flush=True)
    rates = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    print("\n| engine | completion tokens | seconds | tok/s |\n|---|---:|---:|---:|")
    for name, (tokens, seconds) in totals.items():
        print(f"| {name} | {tokens} | {seconds:.1f} | {rates[name]:.1f} |")
    print(f"ownllm / TRL: {rates['ownllm'] / rates['trl']:.2f}x; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (the process, both engines)")


if __name__ == "__main__":
    main()
