"""Serving under load: ownllm serve vs `transformers serve --continuous-batching` vs llama-cpp-python's server
(and llama.cpp's `llama-server` when a binary is on PATH or in $LLAMA_SERVER), same model, same client
(`ownllm bench serve`), concurrency 1, 4, 8, 16, 128 tokens per request.

    python bench/serve.py [--concurrency 1,4,8,16] [--max-tokens 128] [--only ownllm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ownllm.client.loadtest import LevelResult, run_benchmark
from ownllm.models.pull import pull


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def contestants(folder: Path, port: int) -> dict[str, list[str]]:
    gguf = folder / "model.gguf"
    found = {
        "ownllm serve": [sys.executable, "-m", "ownllm", "serve", str(folder), "--port", str(port)],
        "transformers serve (cb, fp32)": [str(Path(sys.executable).parent / "transformers"), "serve", str(folder),
                                          "--continuous-batching", "--dtype", "float32", "--port", str(port),
                                          "--host", "127.0.0.1"],
    }
    try:
        import llama_cpp.server  # noqa: F401

        found["ownllm serve --backend llama.cpp"] = [*found["ownllm serve"], "--backend", "llama.cpp"]
        found["llama-cpp-python server"] = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                            "--n_ctx", "4096", "--port", str(port), "--interrupt_requests", "False",
                                            "--n_threads", str(os.cpu_count())]
    except ImportError:
        pass
    binary = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if binary:
        found["llama-server -np 16"] = [binary, "-m", str(gguf), "-np", "16", "-c", str(16 * 512), "--port",
                                        str(port), "--host", "127.0.0.1", "-t", str(os.cpu_count())]
    return found


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("not ready in time")


def adapter_overhead(folder: Path, rows: int = 8, steps: int = 16) -> None:
    """Mixed batches: one forward for `rows` sequences with 0, half, or all rows on a LoRA adapter (r=16, all
    projections), against the same batch without adapters — what multi-LoRA costs per decode step."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ownllm.generate.open import open_engine
    from ownllm.generate.slots import SlotModel

    engine = open_engine(str(folder), batch_rows=rows)
    with tempfile.TemporaryDirectory() as work:
        peft_model = get_peft_model(open_engine(str(folder), dtype="fp32").model, LoraConfig(
            r=16, lora_alpha=32, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        peft_model.save_pretrained(work)
        slots = SlotModel(engine.model, slots=rows, max_len=512)
        slots.load_adapter("a", Path(work))
    for row in range(rows):
        slots.forward(torch.tensor([list(range(1, 101))]), torch.tensor([row]), torch.tensor([0]))
    print(f"\nmulti-LoRA in one batch ({rows} rows, {engine.loaded.dtype.dtype}):")
    for with_adapter in (0, rows // 2, rows):
        names = ["a"] * with_adapter + [None] * (rows - with_adapter)
        start = time.perf_counter()
        for step in range(steps):
            slots.forward(torch.full((rows, 1), 5), torch.arange(rows), torch.full((rows,), 100 + step), names)
        print(f"  {with_adapter} of {rows} rows on the adapter: {(time.perf_counter() - start) / steps * 1000:.1f} "
              "ms per decode step")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--only", help="run only contestants whose name contains this ('adapters': only the "
                        "multi-LoRA measurement)")
    args = parser.parse_args()
    folder = pull(args.model).path
    if args.only == "adapters":
        adapter_overhead(folder)
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    table: dict[str, list[LevelResult]] = {}
    for name, command in contestants(folder, 0).items():
        if args.only and args.only not in name:
            continue
        port = free_port()
        command = [str(port) if part == "0" else part for part in contestants(folder, port)[name]]
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, process)
                run_benchmark(url, concurrency=[1], max_tokens=8, requests_per_level=1)  # warm-up
                table[name] = run_benchmark(url, concurrency=levels, max_tokens=args.max_tokens)
                print(f"{name}: done", flush=True)
            except RuntimeError as exc:
                log.seek(0)
                print(f"{name}: skipped ({exc}): {log.read()[-300:]!r}", flush=True)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    reference = table.get("transformers serve (cb, fp32)")
    print(f"\n{'server':32s} {'conc':>4s} {'tok/s':>7s} {'vs tf serve':>11s} {'req/s':>6s} {'TTFT p50':>9s} "
          f"{'TTFT p95':>9s} {'ITL p50':>8s} {'errors':>6s}")
    for name, results in table.items():
        for index, level in enumerate(results):
            ratio = (f"{level.tokens_per_second / reference[index].tokens_per_second:.2f}x"
                     if reference and reference[index].tokens_per_second else "-")
            print(f"{name:32s} {level.concurrency:4d} {level.tokens_per_second:7.1f} {ratio:>11s} "
                  f"{level.requests_per_second:6.2f} {level.percentile('ttft', 50):8.2f}s "
                  f"{level.percentile('ttft', 95):8.2f}s {level.percentile('itl', 50) * 1000:6.0f}ms "
                  f"{level.errors:6d}")
    if not args.only:
        adapter_overhead(folder)


if __name__ == "__main__":
    main()
