"""Serving under load: ownllm serve (prefix cache on and off) vs llama.cpp's `llama-server` (its prompt cache on)
vs `transformers serve --continuous-batching` vs llama-cpp-python's server, same model, same client
(`ownllm bench serve`), 128 tokens per request, on three workloads: `random` prompts, multi-turn `chat` (TTFT per
turn) and `rag` (a shared 1,000-token system prompt). Each server's peak RSS (with its children) is sampled.

llama-server comes from $LLAMA_SERVER, PATH, or the cache of `bench/peers/llama-server.sh` (which builds it).

    python bench/serve.py [--workloads random,chat,rag] [--concurrency 1,8,16,32] [--max-tokens 128]
                          [--only ownllm] [--requests N] [--json results.json] [--warm]

Each server gets one short request before the levels; with --warm also one of each workload, so RAG's system
prompt starts cached (steady traffic) instead of each level starting as a cold burst.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from ownllm.client.loadtest import LevelResult, run_benchmark
from ownllm.models.pull import pull


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LLAMA_SERVER_SLOTS = 16


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {value}")
    return value


def llama_server_binary() -> str | None:
    """$LLAMA_SERVER, llama-server on PATH, or the one bench/peers/llama-server.sh built."""
    found = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if found:
        return found
    cache = Path(os.environ.get("OWNLLM_PEERS", Path.home() / ".cache" / "ownllm" / "peers"))
    built = sorted(cache.glob("llama-server-*/bin/llama-server"))
    return str(built[-1]) if built else None


def contestants(folder: Path, port: int, context: int) -> dict[str, list[str]]:
    gguf = folder / "model.gguf"
    ownllm = [sys.executable, "-m", "ownllm", "serve", str(folder), "--port", str(port), "--no-jobs",
              "--max-batch", "32", "--max-model-len", str(context)]
    found = {
        "ownllm serve": ownllm,
        "ownllm serve --no-prefix-cache": [*ownllm, "--no-prefix-cache"],
        "transformers serve (cb, fp32)": [str(Path(sys.executable).parent / "transformers"), "serve", str(folder),
                                          "--continuous-batching", "--dtype", "float32", "--port", str(port),
                                          "--host", "127.0.0.1"],
    }
    try:
        import llama_cpp.server  # noqa: F401

        found["ownllm serve --backend llama.cpp"] = [*ownllm, "--backend", "llama.cpp"]
        found["llama-cpp-python server"] = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                            "--n_ctx", "4096", "--port", str(port), "--interrupt_requests", "False",
                                            "--n_threads", str(os.cpu_count())]
    except ImportError:
        pass
    binary = llama_server_binary()
    if binary:
        # its prompt cache (cache_prompt) is on by default; each of the slots gets `context` tokens
        found[f"llama-server -np {LLAMA_SERVER_SLOTS}"] = [
            binary, "-m", str(gguf), "-np", str(LLAMA_SERVER_SLOTS), "-c", str(LLAMA_SERVER_SLOTS * context),
            "--port", str(port), "--host", "127.0.0.1", "-t", str(os.cpu_count())]
    return found


class PeakRSS:
    """The largest resident memory of a process and its children, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        import threading

        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                processes = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                return

    def stop(self) -> int:
        self.stopped.set()
        return self.peak


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
    parser.add_argument("--workloads", default="random,chat,rag")
    parser.add_argument("--concurrency", default="1,8,16,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048, help="tokens per sequence (chat reaches ~1,600)")
    parser.add_argument("--only", help="comma-separated: run only contestants whose name contains one of these "
                        "('adapters': only the multi-LoRA measurement)")
    parser.add_argument("--cache-off-at", default="8", help="concurrency levels at which the cache-off server "
                        "runs (it is the reference for TTFT, not a contestant)")
    parser.add_argument("--requests", type=positive, help="requests per level (chat: conversations); default 2 x the "
                        "streams, at least 4 (chat: the streams, at least 10)")
    parser.add_argument("--json", type=Path, help="write every level's numbers here")
    parser.add_argument("--warm", action="store_true", help="before the levels, one request of each workload (the "
                        "RAG system prompt then starts cached, as in steady traffic, not a cold burst)")
    args = parser.parse_args()
    folder = pull(args.model).path
    if args.only == "adapters":
        adapter_overhead(folder)
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    wanted = args.only.split(",") if args.only else None
    table: dict[tuple[str, str], list[LevelResult]] = {}
    peaks: dict[str, int] = {}
    for name in contestants(folder, 0, args.context):
        if wanted and not any(w in name for w in wanted):
            continue
        port = free_port()
        command = contestants(folder, port, args.context)[name]
        its_levels = [int(c) for c in args.cache_off_at.split(",") if c] if "no-prefix-cache" in name else levels
        if not its_levels:
            continue
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, process)
                run_benchmark(url, concurrency=[1], max_tokens=8, requests_per_level=1)  # warm-up
                for workload in workloads if args.warm else []:
                    run_benchmark(url, concurrency=[1], max_tokens=8, requests_per_level=1, workload=workload)
                memory = PeakRSS(process.pid)
                for workload in workloads:
                    table[(name, workload)] = run_benchmark(url, concurrency=its_levels, max_tokens=args.max_tokens,
                                                            requests_per_level=args.requests, workload=workload)
                    print(f"{name} / {workload}: done", flush=True)
                peaks[name] = memory.stop()
            except RuntimeError as exc:
                log.seek(0)
                print(f"{name}: skipped ({exc}): {log.read()[-300:]!r}", flush=True)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    report(table, peaks, workloads)
    if args.json:
        rows = [{"server": name, "workload": workload, "peak_rss_mb": peaks.get(name, 0) >> 20, **level.as_dict()}
                for (name, workload), results in table.items() for level in results]
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.only:
        adapter_overhead(folder)


def report(table: dict[tuple[str, str], list[LevelResult]], peaks: dict[str, int], workloads: list[str]) -> None:
    """One table per workload; ratios against llama-server at the same level (tok/s: higher is better for ownllm;
    TTFT: lower is)."""
    for workload in workloads:
        reference = next((results for (name, w), results in table.items()
                          if w == workload and name.startswith("llama-server")), None)
        by_level = {level.concurrency: level for level in reference or []}
        later = "  T2-6 p50" if workload == "chat" else ""
        print(f"\n{workload}\n{'server':32s} {'conc':>4s} {'tok/s':>7s} {'vs llama-server':>15s} {'TTFT p50':>9s} "
              f"{'TTFT p95':>9s}{later} {'cached':>7s} {'errors':>6s} {'peak RSS':>9s}")
        for (name, w), results in table.items():
            if w != workload:
                continue
            for level in results:
                peer = by_level.get(level.concurrency)
                ratio = (f"{level.tokens_per_second / peer.tokens_per_second:.2f}x"
                         if peer and peer.tokens_per_second else "-")
                turns = f" {level.later_turns_ttft(50):8.2f}s" if workload == "chat" else ""
                cached = f"{level.cached_tokens / level.prompt_tokens:.0%}" if level.prompt_tokens else "-"
                print(f"{name:32s} {level.concurrency:4d} {level.tokens_per_second:7.1f} {ratio:>15s} "
                      f"{level.percentile('ttft', 50):8.2f}s {level.percentile('ttft', 95):8.2f}s{turns} "
                      f"{cached:>7s} {level.errors:6d} {peaks.get(name, 0) / 2**20:8.0f}MB")
                if level.first_error:
                    print(f"    first error: {level.first_error}")
        if workload == "chat":
            print("TTFT p50 by turn:")
            for (name, w), results in table.items():
                if w == workload:
                    for level in results:
                        turns = " ".join(f"{t}:{sorted(v)[len(v) // 2]:.2f}s"
                                         for t, v in sorted(level.ttft_by_turn.items()))
                        print(f"  {name:32s} {level.concurrency:4d}  {turns}")


if __name__ == "__main__":
    main()
