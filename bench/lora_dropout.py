"""LoRA dropout on a CPU: torch's `nn.Dropout` against ownllm's `QuickDropout`, same run, same inputs (the shapes a
LoRA branch of SmolLM2 sees in the tool recipe: [batch 4, ~280 tokens, 576 or 1536 features]), one thread.

    OMP_NUM_THREADS=1 python bench/lora_dropout.py [--p 0.05] [--calls 200]

Prints milliseconds per call for each side, the ratio, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from ownllm.finetune.lora_dropout import QuickDropout

SHAPES = ((4, 280, 576), (4, 280, 1536))  # six of a layer's seven LoRA inputs are 576 wide, down_proj's 1536


def per_call_ms(dropout: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    dropout(x)  # warm
    started = time.perf_counter()
    for _ in range(calls):
        dropout(x)
    return (time.perf_counter() - started) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'input':<18}{'torch nn.Dropout':>18}{'QuickDropout':>14}{'ratio':>8}")
    for shape in SHAPES:
        x = torch.randn(shape)
        before = per_call_ms(torch.nn.Dropout(args.p).train(), x, args.calls)
        after = per_call_ms(QuickDropout(args.p).train(), x, args.calls)
        print(f"{list(shape)!s:<18}{before:>15.2f} ms{after:>11.2f} ms{before / after:>7.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
