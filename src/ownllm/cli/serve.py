"""`ownllm serve` (an OpenAI-compatible server) and `ownllm bench serve` (a load test for any such server)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import (
    BackendOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    QuantOpt,
    at_least_one,
    check_url,
    quiet_model_libraries,
)
from ownllm.errors import OwnLLMError


def serve(
    model: ModelArg,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER of a LoRA adapter (repeatable)")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(help="accepted API key (repeatable); none: no auth")] = None,
    metrics_public: Annotated[bool, typer.Option(help="serve /metrics without a key even when keys are set")] = False,
    max_batch: Annotated[int, typer.Option(help="sequences decoded together")] = 16,
    max_queue: Annotated[int, typer.Option(help="waiting requests before 429")] = 64,
    max_body: Annotated[int, typer.Option(help="largest request body in bytes (413 above)")] = 1 << 20,
    max_model_len: Annotated[int | None, typer.Option(help="context per sequence (default min(model, 2048))")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="the most tokens one request may generate: longer asks are cut "
                                                        "to it (finish_reason \"length\"); default: what the context "
                                                        "has left")] = None,
    kv_memory: Annotated[str | None, typer.Option(help="KV memory for all sequences and the prefix cache, e.g. 2GiB "
                                                       "(default: max-batch full sequences, at most a quarter of free "
                                                       "memory); taken as sequences grow")] = None,
    prefix_cache: Annotated[bool, typer.Option("--prefix-cache/--no-prefix-cache",
                                               help="start requests from the KV of earlier ones that began the same "
                                                    "way")] = True,
    gguf_int4: Annotated[bool, typer.Option("--gguf-int4/--no-gguf-int4",
                                            help="run a GGUF model's Q4_0/Q4_1/Q4_K tensors as stored (int4 kernel on "
                                                 "the CPU, bf16 activations) in decode steps of few rows, where "
                                                 "measured faster; off: every step uses the dequantized "
                                                 "weights")] = True,
    embedding_model: Annotated[str, typer.Option(help="model for /v1/embeddings")] = "all-MiniLM-L6-v2",
    rag_store: Annotated[str | None, typer.Option(help="document store for chat requests with \"rag\"")] = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="files and fine-tuning jobs (default: OWNLLM_HOME/server)")
                        ] = None,
    jobs: Annotated[bool, typer.Option("--jobs/--no-jobs", help="offer /v1/files and /v1/fine_tuning/jobs")] = True,
    max_jobs: Annotated[int, typer.Option(min=1, help="fine-tuning jobs trained at the same time")] = 1,
    job_threads: Annotated[int | None, typer.Option(min=1, help="CPU threads per training job (default: half the "
                                                              "cores; serving keeps the rest)")] = None,
    classifier: Annotated[list[str] | None, typer.Option(help="NAME=RUN of a classification run (ownllm finetune "
                                                              "--task classify) for POST /v1/classify "
                                                              "(repeatable)")] = None,
) -> None:
    """Serve an OpenAI-compatible API (chat, completions, embeddings, models, files, fine-tuning jobs) with
    continuous batching."""
    _serve(**locals())


def _serve(model: str, *, adapter: list[str] | None, host: str, port: int, api_key: list[str] | None,
           metrics_public: bool, max_batch: int, max_queue: int, max_body: int, max_model_len: int | None,
           max_tokens: int | None, kv_memory: str | None, prefix_cache: bool, gguf_int4: bool, embedding_model: str,
           rag_store: str | None, backend: str, dtype: str, quant: str | None, data_dir: Path | None, jobs: bool,
           max_jobs: int, job_threads: int | None, classifier: list[str] | None,
           on_listening: Callable[[int], None] | None = None) -> None:
    """`serve`'s work; `on_listening(port)`: called once the server listens, after its start-up line (`ui`)."""
    from ownllm.home import ownllm_home

    if not 0 <= port <= 65535:
        raise OwnLLMError(f"port must be from 0 to 65535, got {port}", param="port")
    at_least_one(max_body=max_body, max_model_len=max_model_len, max_tokens=max_tokens)
    kv_bytes = None
    if kv_memory is not None:
        from ownllm.generate.kv_cache import parse_memory

        try:
            kv_bytes = parse_memory(kv_memory)
        except ValueError:
            raise OwnLLMError(f"--kv-memory takes a size like 2GiB, 512MiB or 1.5G, got '{kv_memory}'",
                              param="kv_memory") from None
    home = (data_dir or ownllm_home() / "server") if jobs else None
    if home is not None:
        from ownllm.data.files import check_output_folder

        check_output_folder(home, param="data_dir")
    keys = list(api_key or []) + [k for k in os.environ.get("OWNLLM_API_KEYS", "").split(",") if k]
    adapters = _named_folders(adapter, "adapter")
    classifiers = _named_folders(classifier, "classifier")
    from ownllm.serve.listen import check_listenable

    check_listenable(host, port)  # (before the model loads: a port in use is said at once)
    quiet_model_libraries()
    from rich.markup import escape

    from ownllm.cli.render import err
    from ownllm.serve.run import build_state, startup_line
    from ownllm.serve.run import serve as run_server

    state = build_state(model, adapters=adapters, api_keys=keys, max_batch=max_batch, max_queue=max_queue,
                        max_body=max_body, max_model_len=max_model_len, max_tokens=max_tokens, dtype=dtype,
                        backend=backend, embedding_model=embedding_model, rag_store=rag_store,
                        data_dir=home, max_jobs=max_jobs, job_threads=job_threads,
                        metrics_public=metrics_public, kv_memory=kv_bytes, prefix_caching=prefix_cache,
                        four_bit=gguf_int4, quant=quant, classifiers=classifiers)
    def say_where(bound: int) -> None:  # once listening, so `--port 0` says the port the system chose
        err.print(f"[dim]{escape(startup_line(state, host, bound))}[/dim]", soft_wrap=True)  # one line, for logs
        if on_listening is not None:
            on_listening(bound)

    run_server(state, host=host, port=port, on_listening=say_where)


def _named_folders(items: list[str] | None, option: str) -> dict[str, Path]:
    """NAME=FOLDER options (--adapter, --classifier) as {name: folder}; a name given twice is an error."""
    named: dict[str, Path] = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise OwnLLMError(f"--{option} takes NAME=FOLDER, got '{item}'", param=option)
        if name in named:
            raise OwnLLMError(f"--{option} names '{name}' twice", param=option)
        named[name] = Path(folder)
    return named


def ui(
    model: ModelArg,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=FOLDER of a LoRA adapter (repeatable)")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[list[str] | None, typer.Option(help="accepted API key (repeatable); none: no auth")] = None,
    rag_store: Annotated[str | None, typer.Option(help="document store for the Documents page (default: one in the "
                                                       "data folder, made by the first upload)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="files, fine-tuning jobs and documents (default: "
                                                        "OWNLLM_HOME/server)")] = None,
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="open the web UI in a browser")] = True,
) -> None:
    """Serve a model with the web UI (playground, data, fine-tuning, documents) and open it in the browser: `ownllm
    serve` plus a browser tab. The same server and API: the UI is a client of it."""
    if not 0 <= port <= 65535:
        raise OwnLLMError(f"port must be from 0 to 65535, got {port}", param="port")
    from ownllm.serve.listen import browser_url

    # the address is checked before the model loads and said once the server listens, with the port it bound
    # (--port 0: the system's choice): a refusal, or a model that does not load, is the one line printed
    def open_page(bound: int) -> None:
        from rich.markup import escape

        from ownllm.cli.render import err

        url = browser_url(host, bound)
        err.print(f"[dim]web UI: {escape(url)}[/dim]", soft_wrap=True, highlight=False)
        if browser:
            import threading

            threading.Thread(target=_open_when_ready, args=(url,), daemon=True).start()

    _serve(model, adapter=adapter, host=host, port=port, api_key=api_key, rag_store=rag_store, data_dir=data_dir,
           metrics_public=False, max_batch=16, max_queue=64, max_body=1 << 20, max_model_len=None, max_tokens=None,
           kv_memory=None, prefix_cache=True, gguf_int4=True, embedding_model="all-MiniLM-L6-v2", backend="auto",
           dtype="auto", jobs=True, max_jobs=1, job_threads=None, quant=None, classifier=None, on_listening=open_page)


def _open_when_ready(url: str, timeout: float = 600.0) -> None:
    """Open the browser once the server answers /health (loading the model takes a while), not before."""
    import time
    import urllib.request
    import webbrowser

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as response:
                if response.status == 200:
                    webbrowser.open(url)
                    return
        except OSError:
            time.sleep(0.5)


def bench_serve(
    url: Annotated[str, typer.Option(help="base URL of any OpenAI-compatible server")] = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option(help="comma-separated levels")] = "1,4,8,16",
    prompts: Annotated[str, typer.Option(help="random, or a .jsonl (prompt/messages) or text file")] = "random",
    workload: Annotated[str, typer.Option(help="random (the prompts above), chat (6-turn conversations resending "
                                               "their history) or rag (a shared 1,000-token system prompt)")
                        ] = "random",
    max_tokens: Annotated[int, typer.Option(help="max tokens per request")] = 128,
    requests: Annotated[int | None, typer.Option(help="requests per level (default 2 x concurrency)")] = None,
    model: Annotated[str | None, typer.Option(help="model name (default: the server's first)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Throughput and latency (TTFT, TPOT, ITL, end to end; p50/p95/p99) at several concurrency levels."""
    from rich.table import Table

    from ownllm.cli.render import out
    from ownllm.client.loadtest import WORKLOADS, run_benchmark

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise OwnLLMError(f"concurrency takes numbers like 1,4,8,16, got '{concurrency}'",
                          param="concurrency") from None
    if min(levels) < 1:
        raise OwnLLMError(f"concurrency levels must be at least 1, got '{concurrency}'", param="concurrency")
    at_least_one(max_tokens=max_tokens, requests=requests)
    check_url(url)
    if prompts != "random":
        from ownllm.data.files import read_text_file

        read_text_file(Path(prompts), param="prompts")  # missing, a folder, not UTF-8: say so before any request
    if workload not in WORKLOADS:
        raise OwnLLMError(f"--workload takes one of {', '.join(WORKLOADS)}, got '{workload}'", param="workload")
    results = run_benchmark(url, concurrency=levels, prompts=prompts, max_tokens=max_tokens,
                            requests_per_level=requests, model=model, api_key=api_key, workload=workload)
    rows = [r.as_dict() for r in results]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"bench serve {url}", title_justify="left")
    columns = ["concurrency", "requests", "errors", "output_tokens_per_s", "requests_per_s", "ttft_p50_ms",
               "ttft_p95_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    if workload == "chat":
        columns += ["turn1_ttft_p50_ms", "turn6_ttft_p50_ms"]  # (all six with --json)
    columns.append("cached_tokens")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(str(row.get(c, "-")) for c in columns))
    out.print(table)
    for row in rows:
        if row.get("first_error"):
            out.print(f"[yellow]concurrency {row['concurrency']}: first error: {row['first_error']}[/yellow]")
