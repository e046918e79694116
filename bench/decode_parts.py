"""What one decode step is made of, part by part, on this CPU (issue 15's 8-stream target; session 65).

    python bench/decode_parts.py [--threads 1] [--parts int4,attention,one-stream]

- `int4`: torch's int4 kernel (the GGUF's 4-bit weights, `gguf_int4.int4_matmul`) against a bf16 dense product,
  for the default model's projection shapes at 1-16 rows.
- `attention`: one row's decode attention (9 query heads on 3 KV heads, bf16 cache) through the compiled
  `RowAttention` graph of a compiled set in $OWNLLM_HOME (when one is there: start `ownllm serve` once with the
  same thread count), through torch's sdpa in bf16 and on an fp32 upcast, and 8 rows of one length batched.
- `one-stream`: 128 greedy tokens of the default model in bf16 through the batch scheduler's compiled one-row steps
  (the server's path for one user); waits for the compile the first time.

Times are medians of repeated calls in microseconds (tok/s for `one-stream`).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time
from collections.abc import Callable

import torch

from ownllm.home import ownllm_home

MODEL = "smollm2-135m-instruct"
SHAPES = {"q|k|v": (960, 576), "o": (576, 576), "gate|up": (3072, 576), "down": (576, 1536), "output": (49152, 576)}


def timed(repeats: int, call: Callable[..., object], *args: object) -> float:
    """Median microseconds of `call(*args)` over `repeats` rounds of 10 calls (after 5 to warm up)."""
    for _ in range(5):
        call(*args)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            call(*args)
        rounds.append((time.perf_counter() - start) / 10 * 1e6)
    return statistics.median(rounds)


def int4_rows() -> None:
    from ownllm.models.gguf_int4 import GROUP

    print("int4 kernel against bf16 dense, us (per row)")
    for name, (out_features, in_features) in SHAPES.items():
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = torch.rand(in_features // GROUP, out_features, 2).to(torch.bfloat16)
        dense = torch.randn(out_features, in_features).to(torch.bfloat16)
        repeats = 5 if out_features > 10_000 else 20
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            four = timed(repeats, torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, GROUP, scales)
            plain = timed(repeats, torch.nn.functional.linear, x, dense)
            print(f"  {name:8} {rows:2} rows: int4 {four:9.1f} ({four / rows:7.1f})  bf16 {plain:9.1f}"
                  f" ({plain / rows:7.1f})")


def attention() -> None:
    from ownllm.generate.compiled_decode import decode_attention

    threads = torch.get_num_threads()
    graphs = []
    for folder in sorted(glob.glob(str(ownllm_home() / "compiled" / "decode-*" / "attention"))):
        try:
            graphs.append(torch._C._aoti.AOTIModelPackageLoader(folder, "model", False, 1, -1).run)
        except RuntimeError as exc:  # a set of another torch, CPU or thread count
            print(f"  (skipped {folder}: {str(exc)[:80]})")
    print(f"decode attention of one row, us ({threads} threads; compiled sets found: {len(graphs)})")
    dtype, capacity = torch.bfloat16, 2048
    for keys in (200, 800, 1500):
        query = torch.randn(1, 9, 1, 64).to(dtype)
        cache = [torch.randn(1, 3, capacity, 64).to(dtype) for _ in range(2)]
        k_cache, v_cache = (c[:, :, :keys] for c in cache)
        sdpa = timed(20, decode_attention, query, k_cache, v_cache, 0.125, False)
        upcast = timed(20, decode_attention, query, k_cache, v_cache, 0.125, True)
        line = f"  {keys:5} keys: sdpa bf16 {sdpa:8.1f}  sdpa fp32 upcast {upcast:8.1f}"
        if graphs:
            new = [torch.randn(3, 1, 64).to(dtype) for _ in range(2)]
            where = [torch.empty(keys, dtype=torch.int8), torch.tensor([keys - 1])]
            inputs = [query, *new, cache[0][0], cache[1][0], *where]
            graph = timed(20, graphs[0], inputs)
            gigabytes = 2 * 3 * keys * 64 * dtype.itemsize / graph / 1e3
            line += f"  compiled graph {graph:8.1f} ({gigabytes:.1f} GB/s of cache)"
        queries, rows = torch.randn(8, 9, 1, 64).to(dtype), [torch.randn(8, 3, keys, 64).to(dtype) for _ in range(2)]
        batched = timed(5, decode_attention, queries, *rows, 0.125, True)
        print(line + f"  | 8 rows batched, upcast: {batched / 8:8.1f} a row")


def one_stream() -> None:
    from ownllm.generate.batching import BatchScheduler, Request
    from ownllm.generate.engine import Completion
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(MODEL, dtype="bf16")
    scheduler = BatchScheduler(engine, max_batch=4, max_len=512, four_bit=True)
    if scheduler.model.compiled is not None:
        scheduler.model.compiled.thread.join()
    prompt = engine.render_chat([{"role": "user", "content": "Tell me about the sea."}])
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)

    def run() -> float:
        done: dict[int, Completion] = {}
        scheduler.submit_all([Request(prompt, params, 0, lambda e: done.update({0: e}) if isinstance(e, Completion)
                                      else None)])
        start = time.perf_counter()
        scheduler.run_until_done()
        assert len(done[0].token_ids) == 128
        return 128 / (time.perf_counter() - start)

    run()
    speeds = [run() for _ in range(5)]
    print(f"one stream ({scheduler.model.compiled_steps}): median {statistics.median(speeds):.1f} tok/s, "
          f"runs {', '.join(f'{s:.1f}' for s in speeds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="int4,attention,one-stream")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"int4": int4_rows, "attention": attention, "one-stream": one_stream}
    for name in args.parts.split(","):
        parts[name.strip()]()


if __name__ == "__main__":
    main()
