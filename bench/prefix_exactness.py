"""Whether prefix-cache hits change logits: one long prompt, then prompts that share its first 40, 63, ... tokens
(matches ending anywhere in a prefill chunk), each decoded seeded on a cache-off and a cache-on scheduler; a case
is "same" when the tokens and the sequence log-probability are equal bit for bit.

    .venv/bin/python bench/prefix_exactness.py [MODEL] [--dtype fp32|bf16] [--products measured|packed|dense]
    OWNLLM_BATCH_INVARIANT=1 .venv/bin/python bench/prefix_exactness.py    # matches of whole prefill chunks only
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--products", default="measured", choices=["measured", "packed", "dense"],
                        help="packed or dense: force the fp32/bf16 products' choice instead of measuring it")
    args = parser.parse_args()

    from ownllm.generate import slots
    from ownllm.generate.batching import BatchScheduler, Request
    from ownllm.generate.engine import Completion
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    if args.products != "measured":
        slots.packed_products_win = lambda *_: args.products == "packed"
    engine = open_engine(args.model, dtype=args.dtype)
    colours = itertools.cycle(["red", "blue", "small", "large"])
    text = " ".join(f"Item {i} is a {colour} thing." for i, colour in zip(range(60), colours, strict=False))
    base = engine.render_chat([{"role": "user", "content": text}])
    tail = engine.tokenizer.encode(" Now tell me something else entirely, please.", add_special_tokens=False)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)

    def run(scheduler: BatchScheduler, prompt: list[int], seed: int) -> Completion:
        done: list[Completion] = []
        scheduler.submit_all([Request(prompt, params, seed, lambda e: done.append(e) if isinstance(e, Completion)
                                      else None)])
        scheduler.run_until_done()
        return done[0]

    cuts = range(40, len(base) - 20, 23)
    results = {}
    started = time.perf_counter()
    for caching in (False, True):
        scheduler = BatchScheduler(engine, max_batch=2, max_len=1024, prefix_caching=caching)
        run(scheduler, base, 5)
        results[caching] = [run(scheduler, base[:cut] + tail + base[-5:], 9) for cut in cuts]
    batching = scheduler.batching
    print(f"{args.model} {args.dtype}, products {args.products}, prompt of {len(base)} tokens, prefill chunks of "
          f"{scheduler.prefill_chunk}; batch invariant: {batching['batch_invariant']}, "
          f"whole-chunk matches: {bool(batching.get('prefix_exact_chunks'))}")
    print(f"{'shared':>6} {'cached':>6}  same  log-probability off / on")
    differ = 0
    for cut, off, on in zip(cuts, results[False], results[True], strict=True):
        same = off.token_ids == on.token_ids and off.sequence_logprob == on.sequence_logprob
        differ += not same
        print(f"{cut:6d} {on.cached_tokens:6d}  {'yes ' if same else 'NO  '}  {off.sequence_logprob:.9f} / "
              f"{on.sequence_logprob:.9f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"differ: {differ} of {len(cuts)} ({time.perf_counter() - started:.0f} s, peak RSS {peak:,.0f} MiB)")


if __name__ == "__main__":
    main()
