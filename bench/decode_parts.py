"""What one decode step is made of, part by part, on this CPU (issue 15's 8-stream target; session 65).

    python bench/decode_parts.py [--threads 1] [--parts int4,attention,rows,one-stream]

- `int4`: torch's int4 kernel (the GGUF's 4-bit weights, `gguf_int4.int4_matmul`) against a bf16 dense product,
  for the default model's projection shapes at 1-16 rows.
- `attention`: one row's decode attention (9 query heads on 3 KV heads, bf16 cache) through the C kernel of the
  server's compiled set at this thread count (loaded from $OWNLLM_HOME, or compiled there first), through the
  compiled `RowAttention` graph (which serves where the kernel cannot be built), through torch's sdpa in bf16 and
  on an fp32 upcast, and 8 rows of one length batched.
- `rows`: one layer's decode attention for 8 rows of 600-1,500 keys, each row's cache in a KV buffer of all 30
  layers as a server holds it (out of the CPU's caches), through the compiled `RowAttention` graph (a call a row)
  and through the C kernel (`attention_kernel`, one call).
- `one-stream`: 128 greedy tokens of the default model in bf16 through the batch scheduler's compiled one-row steps
  (the server's path for one user).

Times are microseconds, the fastest of several calls with the contestants taking turns (`best_of_turns`, as the
server's own start-up measurements); each product runs on one copy of its matrix, so the smaller ones sit in the
CPU's caches (tok/s, median of five, for `one-stream`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch

from ownllm.models.dtype import best_of_turns

MODEL = "smollm2-135m-instruct"
SHAPES = {"q|k|v": (960, 576), "o": (576, 576), "gate|up": (3072, 576), "down": (576, 1536), "output": (49152, 576)}


def microseconds(runs: list[functools.partial], rounds: int) -> list[float]:
    """Each run's fastest time in microseconds, the runs taking turns (after one call each to warm up)."""
    for run in runs:
        run()
    return [seconds * 1e6 for seconds in best_of_turns(runs, rounds)]


def int4_rows() -> None:
    from ownllm.models.gguf_int4 import GROUP

    print("int4 kernel against bf16 dense, us (per row)")
    for name, (out_features, in_features) in SHAPES.items():
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales = torch.rand(in_features // GROUP, out_features, 2).to(torch.bfloat16)
        dense = torch.randn(out_features, in_features).to(torch.bfloat16)
        rounds = 10 if out_features > 10_000 else 50
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            four, plain = microseconds([
                functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, GROUP, scales),
                functools.partial(torch.nn.functional.linear, x, dense)], rounds)
            print(f"  {name:8} {rows:2} rows: int4 {four:9.1f} ({four / rows:7.1f})  bf16 {plain:9.1f}"
                  f" ({plain / rows:7.1f})")


@functools.cache
def attention_graph() -> Any:
    """The `RowAttention` graph (which serves where the kernel cannot be built) for the bf16 default model at this
    thread count, compiled into a temporary folder (a minute or so of one core)."""
    import tempfile
    from pathlib import Path

    from ownllm.generate.compiled_decode import RowAttention, _dynamic_shapes, _example_inputs

    spec = scheduler().model.compiled.spec
    exported = torch.export.export(RowAttention(spec["scale"]), _example_inputs(spec)["attention"],
                                   dynamic_shapes=_dynamic_shapes()["attention"])
    with tempfile.TemporaryDirectory(prefix="ownllm-bench-") as folder:  # (loading extracts what it runs)
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(folder) / "a.pt2"))
        return torch._inductor.aoti_load_package(package).loader.run


@functools.cache
def scheduler() -> Any:
    """The server's batch scheduler for the default model in bf16, once its compiled one-row steps are ready
    (loaded from the home, or compiled there first: a minute or so of one core)."""
    from ownllm.generate.batching import BatchScheduler
    from ownllm.generate.open import open_engine

    batching = BatchScheduler(open_engine(MODEL, dtype="bf16"), max_batch=4, max_len=512, four_bit=True)
    if batching.model.compiled is not None:
        batching.model.compiled.thread.join()
    return batching


def attention() -> None:
    from ownllm.generate.compiled_decode import decode_attention

    compiled = scheduler().model.compiled
    graph_run = attention_graph() if compiled and compiled.ready else None
    kernel = compiled.kernel if compiled else None
    print(f"decode attention of one row, us ({torch.get_num_threads()} threads; {scheduler().model.compiled_steps})")
    dtype, capacity = torch.bfloat16, 2048
    for keys in (200, 800, 1500):
        query = torch.randn(1, 9, 1, 64).to(dtype)
        cache = [torch.randn(1, 3, capacity, 64).to(dtype) for _ in range(2)]
        k_cache, v_cache = (c[:, :, :keys] for c in cache)
        queries, rows = torch.randn(8, 9, 1, 64).to(dtype), [torch.randn(8, 3, keys, 64).to(dtype) for _ in range(2)]
        runs = [functools.partial(decode_attention, query, k_cache, v_cache, 0.125, False),
                functools.partial(decode_attention, query, k_cache, v_cache, 0.125, True),
                functools.partial(decode_attention, queries, *rows, 0.125, True)]
        if graph_run is not None:
            new = [torch.randn(3, 1, 64).to(dtype) for _ in range(2)]
            where = [torch.empty(keys, dtype=torch.int8), torch.tensor([keys - 1])]
            runs.append(functools.partial(graph_run, [query, *new, cache[0][0], cache[1][0], *where]))
        if kernel is not None:
            buffer = torch.randn(1, 2, 3, capacity, 64).to(dtype)
            runs.append(functools.partial(kernel, 0, kernel.rows([buffer], [keys - 1]), query,
                                          *[torch.randn(1, 3, 1, 64).to(dtype) for _ in range(2)]))
        sdpa, upcast, batched, *compiled_runs = microseconds(runs, 30)
        line = f"  {keys:5} keys: sdpa bf16 {sdpa:8.1f}  sdpa fp32 upcast {upcast:8.1f}"
        for name, took in zip(["compiled graph"] * bool(graph_run) + ["kernel"] * bool(kernel), compiled_runs,
                              strict=True):
            line += f"  {name} {took:8.1f} ({2 * 3 * keys * 64 * dtype.itemsize / took / 1e3:.1f} GB/s of cache)"
        print(line + f"  | 8 rows batched, upcast: {batched / 8:8.1f} a row")


def rows() -> None:
    compiled = scheduler().model.compiled
    if compiled is None or compiled.ready is None or compiled.kernel is None:
        print(f"8 rows: no attention kernel ({scheduler().model.compiled_steps})")
        return
    graph, kernel, dtype = attention_graph(), compiled.kernel, torch.bfloat16
    positions = [600, 750, 900, 1000, 1100, 1250, 1400, 1500]
    buffers = [torch.randn(30, 2, 3, 2048, 64).to(dtype) for _ in positions]
    q, k, v = torch.randn(8, 9, 1, 64).to(dtype), torch.randn(8, 3, 1, 64).to(dtype), torch.randn(8, 3, 1, 64).to(dtype)
    places = [(torch.empty(p + 1, dtype=torch.int8), torch.tensor([p])) for p in positions]
    layer = iter(range(1 << 30))  # a layer after another, as a step goes: each call reads caches the last did not

    def through_graph() -> None:
        index = next(layer) % 30
        for row, (keys, position) in enumerate(places):
            graph([q[row : row + 1].contiguous(), k[row].contiguous(), v[row].contiguous(), buffers[row][index, 0],
                   buffers[row][index, 1], keys, position])

    def through_kernel() -> None:
        kernel(next(layer) % 30, kernel.rows(buffers, positions), q, k, v)

    graph_time, kernel_time = microseconds([through_graph, through_kernel], 60)
    gigabytes = sum(2 * 3 * (p + 1) * 64 * dtype.itemsize for p in positions) / 1e3
    print(f"8 rows of 600-1,500 keys, one layer ({torch.get_num_threads()} threads): graph {graph_time:8.1f} us "
          f"({gigabytes / graph_time:.1f} GB/s), kernel {kernel_time:8.1f} us ({gigabytes / kernel_time:.1f} GB/s): "
          f"{graph_time / kernel_time:.2f}x")


def one_stream() -> None:
    from ownllm.generate.batching import Request
    from ownllm.generate.engine import Completion
    from ownllm.generate.params import SamplingParams

    batching = scheduler()
    prompt = batching.engine.render_chat([{"role": "user", "content": "Tell me about the sea."}])
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)

    def run() -> float:
        done: dict[int, Completion] = {}
        batching.submit_all([Request(prompt, params, 0, lambda e: done.update({0: e}) if isinstance(e, Completion)
                                     else None)])
        start = time.perf_counter()
        batching.run_until_done()
        assert len(done[0].token_ids) == 128
        return 128 / (time.perf_counter() - start)

    run()
    speeds = [run() for _ in range(5)]
    print(f"one stream ({batching.model.compiled_steps}): median {statistics.median(speeds):.1f} tok/s, "
          f"runs {', '.join(f'{s:.1f}' for s in speeds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="int4,attention,rows,one-stream")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = {"int4": int4_rows, "attention": attention, "rows": rows, "one-stream": one_stream}
    for name in args.parts.split(","):
        parts[name.strip()]()


if __name__ == "__main__":
    main()
