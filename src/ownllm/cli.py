"""`ownllm` command line: parse, call the library, print. Heavy imports stay inside the verbs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from ownllm.errors import OwnLLMError

app = typer.Typer(
    name="ownllm",
    help="Run, fine-tune, evaluate and serve your own LLM, locally, on your own data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


bench_app = typer.Typer(help="Benchmarks users can run against their own setup.", no_args_is_help=True)


@bench_app.command(name="serve")
def bench_serve(
    url: Annotated[str, typer.Option(help="base URL of any OpenAI-compatible server")] = "http://127.0.0.1:8000",
    concurrency: Annotated[str, typer.Option(help="comma-separated levels")] = "1,4,8,16",
    prompts: Annotated[str, typer.Option(help="random, or a .jsonl (prompt/messages) or text file")] = "random",
    max_tokens: Annotated[int, typer.Option(help="max tokens per request")] = 128,
    requests: Annotated[int | None, typer.Option(help="requests per level (default 2 x concurrency)")] = None,
    model: Annotated[str | None, typer.Option(help="model name (default: the server's first)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Throughput and latency (TTFT, TPOT, ITL, end to end; p50/p95/p99) at several concurrency levels."""
    from rich.table import Table

    from ownllm.render import out
    from ownllm.serve.benchmark import run_benchmark

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
    results = run_benchmark(url, concurrency=levels, prompts=prompts, max_tokens=max_tokens,
                            requests_per_level=requests, model=model, api_key=api_key)
    rows = [r.as_dict() for r in results]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=f"bench serve {url}", title_justify="left")
    columns = ["concurrency", "requests", "errors", "output_tokens_per_s", "requests_per_s", "ttft_p50_ms",
               "ttft_p95_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms"]
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    out.print(table)
    for row in rows:
        if row.get("first_error"):
            out.print(f"[yellow]concurrency {row['concurrency']}: first error: {row['first_error']}[/yellow]")


def _register_subcommands() -> None:
    from ownllm.cli_data import data_app
    from ownllm.cli_eval import eval_app
    from ownllm.cli_jobs import jobs_app
    from ownllm.cli_rag import rag_app

    if not app.registered_groups:
        app.add_typer(eval_app, name="eval")
        app.add_typer(rag_app, name="rag")
        app.add_typer(bench_app, name="bench")
        app.add_typer(data_app, name="data")
        app.add_typer(jobs_app, name="jobs")

ModelArg = Annotated[str, typer.Argument(help="alias, pulled name, HF folder, .gguf file or hub id")]
BackendOpt = Annotated[str, typer.Option(help="auto | transformers | llama.cpp")]
DtypeOpt = Annotated[str, typer.Option(help="auto (measured for this machine) | fp32 | bf16 | fp16")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what happens")] = False,
) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # its optional hub kernel cannot be fetched offline; the built-in CPU path it falls back to is fine
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def at_least_one(**values: int | None) -> None:
    """Options that count something (tokens, requests, rows): given, each must be at least 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise OwnLLMError(f"{name.replace('_', '-')} must be at least 1, got {value}", param=name)


def finite(**values: float | None) -> None:
    """Float options: inf and nan parse as floats, but mean nothing here."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise OwnLLMError(f"{name.replace('_', '-')} must be a finite number, got {value}", param=name)


def check_url(url: str, param: str = "url", label: str | None = None) -> None:
    """An http(s) URL with a host, before any request goes out (httpx raises on some malformed ones)."""
    import httpx

    label = label or f"--{param.replace('_', '-')}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise OwnLLMError(f"{label} {url!r} is not a valid URL ({exc})", param=param) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise OwnLLMError(f"{label} {url!r} is not an http:// or https:// URL", param=param,
                          hint="e.g. http://127.0.0.1:8000")


def _read_text(text: str | None, file: Path | None, what: str) -> str:
    if file is not None:
        from ownllm.data.files import read_text_file

        return read_text_file(file, param="file")
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise OwnLLMError(f"no {what} given", param=what, hint="pass it as an argument, --file or stdin")
        return sys.stdin.read()
    return text


@app.command()
def pull(
    source: Annotated[str, typer.Argument(help="alias, local .gguf file, or hub id")],
    name: Annotated[str | None, typer.Option(help="local name (default: from the source)")] = None,
    force: Annotated[bool, typer.Option(help="pull again even if present")] = False,
) -> None:
    """Get a model once and convert it to a safetensors folder in the model home."""
    from ownllm.models.pull import pull as pull_model
    from ownllm.render import err, human_bytes, out

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise OwnLLMError(f"--name {name!r} is not a plain model name", param="name",
                          hint="letters, digits, '.', '_' and '-'; no '/', no leading dot")
    with err.status(f"pulling {source} (download + convert, once)"):
        model = pull_model(source, name=name, force=force)
    out.print(f"{model.name}: {model.path} ({human_bytes(model.size_bytes)}, {model.manifest['dtype']}, "
              f"context {model.manifest['context_length']})")


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """List local models and the aliases you can pull."""
    from rich.table import Table

    from ownllm.home import models_dir
    from ownllm.models.aliases import load_aliases
    from ownllm.models.registry import list_local_models
    from ownllm.render import human_bytes, human_count, out

    local = list_local_models()
    pullable = {n: a for n, a in load_aliases().items() if n not in {m.name for m in local}}
    if as_json:
        rows = [{"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes, **m.manifest} for m in local]
        out.print_json(data={"models": rows, "pullable": sorted(pullable)})
        return
    table = Table(title=f"models in {models_dir()}", title_justify="left")
    for column in ("name", "params", "size on disk", "dtype", "context", "source"):
        table.add_column(column)
    for m in local:
        table.add_row(m.name, human_count(m.manifest["params"]), human_bytes(m.size_bytes), m.manifest["dtype"],
                      str(m.manifest["context_length"]), m.manifest["source"])
    out.print(table)
    for alias in pullable.values():
        out.print(f"[dim]not pulled: {alias.name} — {alias.description} (ownllm pull {alias.name})[/dim]")


@app.command()
def tokenize(
    model: ModelArg,
    text: Annotated[str | None, typer.Argument(help="text to tokenize ('-' or nothing: stdin)")] = None,
    file: Annotated[Path | None, typer.Option(help="read the text from a file")] = None,
    price_per_1m: Annotated[float | None, typer.Option(help="price per 1M tokens, to print a cost")] = None,
    show_tokens: Annotated[bool, typer.Option(help="list every token")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Show how a model's tokenizer splits a text, with counts and cost."""
    from ownllm.models.load import load_tokenizer
    from ownllm.models.tokens import token_report
    from ownllm.render import out, token_summary, token_table

    content = _read_text(text, file, "text")
    finite(price_per_1m=price_per_1m)
    if price_per_1m is not None and price_per_1m < 0:
        raise OwnLLMError("price-per-1m must be >= 0", param="price_per_1m")
    report = token_report(load_tokenizer(model), content, price_per_1m=price_per_1m)
    if as_json:
        out.print_json(data=report.as_dict())
        return
    if show_tokens:
        out.print(token_table(report))
    out.print(token_summary(report))


def _sampling(**options: Any) -> Any:
    from ownllm.generate.params import SamplingParams

    if options["strategy"] is None:  # a sampling knob given alone means: sample
        knobs = ("temperature", "top_k", "top_p")
        options["strategy"] = "sample" if any(options[k] is not None for k in knobs) else "greedy"
    return SamplingParams.from_options(**options)


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str | None, typer.Argument(help="the prompt ('-' or nothing: stdin)")] = None,
    file: Annotated[Path | None, typer.Option(help="read the prompt from a file")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt as a user turn in the chat template")] = False,
    strategy: Annotated[str | None, typer.Option(help="greedy | sample | beam (default greedy, "
                                                 "or sample when a sampling option is set)")] = None,
    num_beams: Annotated[int | None, typer.Option(help="beams for --strategy beam")] = None,
    temperature: Annotated[float | None, typer.Option(help="sampling temperature (0 = greedy)")] = None,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens (0 = all)")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus: smallest set reaching this mass")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help=">1 discourages repeats")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 128,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for sampling (printed when not given)")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they come")] = False,
    explain: Annotated[int, typer.Option(help="show the top-N candidates and every filter at each step")] = 0,
    logprobs: Annotated[int | None, typer.Option(help="return the top-N logprobs per token")] = None,
    as_json: JsonOpt = False,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Generate text, with any decoding strategy, and optionally see each step's probabilities."""
    from ownllm.generate.engine import Completion
    from ownllm.generate.open import open_engine
    from ownllm.render import completion_json, err, explanation_table, out

    text = _read_text(prompt, file, "prompt")
    if not text.strip():
        raise OwnLLMError("the prompt is empty", param="prompt")
    params = _sampling(strategy=strategy, num_beams=num_beams, temperature=temperature, top_k=top_k,
                       top_p=top_p, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                       stop=stop or None, seed=seed, explain=explain, logprobs=logprobs)
    engine = open_engine(model, backend=backend, dtype=dtype, device=device)
    source = engine.render_chat([{"role": "user", "content": text}]) if chat else text
    completion: Completion | None = None
    for event in engine.stream(source, params):
        if isinstance(event, Completion):
            completion = event
        elif stream and not as_json and event.text:
            out.print(event.text, end="", soft_wrap=True)
            out.file.flush()
    assert completion is not None
    if as_json:
        out.print_json(json.dumps(completion_json(completion)))
        return
    if completion.explanations:
        temp = params.temperature if params.strategy == "sample" else 1.0
        for index, step in enumerate(completion.explanations):
            out.print(explanation_table(index, step, temp))
    if not stream:
        out.print(completion.text, soft_wrap=True, end="")
    out.print()
    seed_note = f", seed {completion.seed}" if completion.seed is not None else ""
    err.print(f"[dim]{completion.completion_tokens} tokens, {completion.tokens_per_second:.1f} tok/s, "
              f"finish: {completion.finish_reason}, {engine.backend}{seed_note}[/dim]")


@app.command(name="chat")
def chat_cmd(
    model: ModelArg,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    strategy: Annotated[str | None, typer.Option(help="greedy | sample | beam")] = None,
    temperature: Annotated[float | None, typer.Option()] = None,
    top_k: Annotated[int | None, typer.Option()] = None,
    top_p: Annotated[float | None, typer.Option()] = None,
    repetition_penalty: Annotated[float | None, typer.Option()] = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    seed: Annotated[int | None, typer.Option()] = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Chat with streaming replies. Commands: /reset, /save FILE, /exit. Also reads turns from a pipe."""
    from ownllm.data.files import check_output_file
    from ownllm.generate.chat import ChatSession
    from ownllm.generate.engine import Completion, TextDelta
    from ownllm.generate.open import open_engine
    from ownllm.render import err, out

    params = _sampling(strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed)
    engine = open_engine(model, backend=backend, dtype=dtype, device=device)
    session = ChatSession(engine=engine, system=system, params=params)
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"[dim]{engine.name} ({engine.backend}), context {engine.context_length} tokens. "
                  "/reset, /save FILE, /exit[/dim]")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            err.print("[dim]history cleared[/dim]")
            continue
        if line.startswith("/save"):
            target = line.removeprefix("/save").strip()
            if not target:
                err.print("usage: /save FILE")
                continue
            try:
                check_output_file(Path(target))
            except OwnLLMError as exc:  # a bad path must not end the chat (and lose the conversation)
                err.print(f"error: {exc}", markup=False, highlight=False)
                continue
            session.save(Path(target))
            err.print(f"[dim]saved {len(session.messages())} messages to {target}[/dim]")
            continue
        if not interactive:
            out.print(f"you> {line}")
        out.print("assistant> ", end="")
        for event in session.send(line):
            if isinstance(event, int):
                if event:
                    err.print(f"[yellow][dropped the {event} oldest message(s) to stay within the "
                              f"{engine.context_length}-token context window][/yellow]")
            elif isinstance(event, TextDelta):
                out.print(event.text, end="", soft_wrap=True)
                out.file.flush()
            elif isinstance(event, Completion):
                out.print()


@app.command()
def estimate(
    model_or_size: Annotated[str, typer.Argument(help="a size like 7B or 135M, a local model, or a hub id")],
    batch_size: Annotated[int, typer.Option(help="sequences per step / concurrent sequences")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="tokens per training sequence")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    lora_targets: Annotated[str, typer.Option(help="attention | all-linear")] = "attention",
    measure: Annotated[bool, typer.Option("--measure", help="load the model and measure its memory")] = False,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory for inference (fp32/bf16/int8/4-bit, KV cache) and training (full, LoRA, QLoRA)."""
    from ownllm.models.memory import estimate as estimate_memory
    from ownllm.models.memory import shape_of
    from ownllm.render import estimate_json, estimate_tables, out

    at_least_one(seq_len=seq_len, lora_rank=lora_rank)
    result = estimate_memory(shape_of(model_or_size), batch_size=batch_size, seq_len=seq_len,
                             lora_rank=lora_rank, lora_targets=lora_targets)
    measured = None
    if measure:
        from ownllm.generate.probe import measure_inference

        measured = measure_inference(model_or_size, dtype=dtype)
    if as_json:
        out.print_json(json.dumps(estimate_json(result, measured)))
        return
    for table in estimate_tables(result, measured):
        out.print(table)


@app.command()
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
    max_model_len: Annotated[int | None, typer.Option(help="context per sequence (default min(model, 2048)); a KV "
                                                           "cache of max-batch such sequences is allocated at start")
                             ] = None,
    embedding_model: Annotated[str, typer.Option(help="model for /v1/embeddings")] = "all-MiniLM-L6-v2",
    rag_store: Annotated[str | None, typer.Option(help="document store for chat requests with \"rag\"")] = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="files and fine-tuning jobs (default: OWNLLM_HOME/server)")
                        ] = None,
    jobs: Annotated[bool, typer.Option("--jobs/--no-jobs", help="offer /v1/files and /v1/fine_tuning/jobs")] = True,
    max_jobs: Annotated[int, typer.Option(min=1, help="fine-tuning jobs trained at the same time")] = 1,
    job_threads: Annotated[int | None, typer.Option(min=1, help="CPU threads per training job (default: half the "
                                                              "cores; serving keeps the rest)")] = None,
) -> None:
    """Serve an OpenAI-compatible API (chat, completions, embeddings, models, files, fine-tuning jobs) with
    continuous batching."""
    from ownllm.home import ownllm_home
    from ownllm.render import err
    from ownllm.serve.run import build_state
    from ownllm.serve.run import serve as run_server

    if not 0 <= port <= 65535:
        raise OwnLLMError(f"port must be from 0 to 65535, got {port}", param="port")
    at_least_one(max_body=max_body, max_model_len=max_model_len)
    home = (data_dir or ownllm_home() / "server") if jobs else None
    if home is not None:
        from ownllm.data.files import check_output_folder

        check_output_folder(home, param="data_dir")
    keys = list(api_key or []) + [k for k in os.environ.get("OWNLLM_API_KEYS", "").split(",") if k]
    adapters = {}
    for item in adapter or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise OwnLLMError(f"--adapter takes NAME=FOLDER, got '{item}'", param="adapter")
        adapters[name] = Path(folder)
    state = build_state(model, adapters=adapters, api_keys=keys, max_batch=max_batch, max_queue=max_queue,
                        max_body=max_body, max_model_len=max_model_len, dtype=dtype, backend=backend,
                        embedding_model=embedding_model, rag_store=rag_store,
                        data_dir=home, max_jobs=max_jobs, job_threads=job_threads,
                        metrics_public=metrics_public)
    kind = type(state.scheduler).__name__
    err.print(f"[dim]serving {state.model_name} ({state.engine.backend}, {kind}, batch {state.scheduler.max_batch}, "
              f"context {state.context_length}) on http://{host}:{port}/v1[/dim]")
    run_server(state, host=host, port=port)


@app.command()
def finetune(
    model: Annotated[str | None, typer.Argument(help="base model (alias, folder, .gguf, hub id); default: the "
                                                     "config's")] = None,
    data: Annotated[str | None, typer.Option("--data", help="training file (chat, ShareGPT, Alpaca, "
                                                            "prompt/completion, text)")] = None,
    out: Annotated[str | None, typer.Option("--out", help="run folder (default runs/finetune)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (options below override it)")] = None,
    method: Annotated[str | None, typer.Option(help="lora | qlora | full | dpo | cpt | prompt-tuning")] = None,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="cpt: pretrain a small fresh model")] = False,
    packing: Annotated[bool, typer.Option("--packing", help="pack examples into full-length rows")] = False,
    validation: Annotated[str | None, typer.Option(help="validation file (default: split from --data)")] = None,
    val_ratio: Annotated[float | None, typer.Option(help="share of --data held out when no --validation")] = None,
    epochs: Annotated[float | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option(help="> 0 overrides epochs")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    grad_accum: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option()] = None,
    eval_every: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    lora_r: Annotated[int | None, typer.Option("--lora-r")] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha")] = None,
    replay: Annotated[int | None, typer.Option(help="mix in the base's answers to N general prompts (less "
                                                    "forgetting)")] = None,
    replay_ratio: Annotated[float | None, typer.Option(help="... or to R prompts per training example")] = None,
    early_stopping: Annotated[int | None, typer.Option(help="stop after N validations without improvement")
                              ] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="training processes (DDP through torchrun)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run folder from its latest checkpoint")
                      ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier run in --out")] = False,
) -> None:
    """Fine-tune on your data (loss on assistant tokens only), with checkpoints, resume, metrics and a loss plot."""
    from ownllm.finetune.config import load_config

    cfg = load_config(config, model=model, data=data, out=out, method=method, validation=validation,
                      val_ratio=val_ratio, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_length=max_length,
                      eval_every=eval_every, save_every=save_every, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
                      from_scratch=from_scratch or None, packing=packing or None, replay=replay,
                      replay_ratio=replay_ratio, early_stopping=early_stopping)
    from ownllm.finetune.run import run as run_training  # after the config: its errors come without the wait
    from ownllm.render import checks_table
    from ownllm.render import out as console

    result = run_training(cfg, resume=resume, overwrite=overwrite, processes=nproc)
    evaluation = f", validation loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    console.print(f"{result.steps} steps in {result.seconds:.0f} s, train loss {result.train_loss:.4f}{evaluation}; "
                  f"run folder {result.run_dir} (use it: ownllm chat {result.run_dir})")
    if result.checks:
        console.print(checks_table(result.checks))


@app.command()
def merge(
    run: Annotated[str, typer.Argument(help="a LoRA run folder (or its final/ adapter)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
) -> None:
    """Fold a LoRA adapter into its base model: a standalone model folder with the same outputs."""
    from ownllm.finetune.merge import merge as merge_run
    from ownllm.render import out as console

    console.print(f"merged model: {merge_run(run, out)}")


def _usage_error_types() -> tuple[type[Exception], ...]:
    """What typer raises for bad usage: its own exception type since it vendors click, click's before."""
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


def _usage_error(exc: Any) -> str:
    """A usage error (unknown option, a value that is not a number, a missing argument) as one line."""
    message = " ".join(exc.format_message().split()).removesuffix(".")
    message = message[:1].lower() + message[1:] if message[1:2].islower() else message
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see: {ctx.command_path} --help)" if ctx is not None else message


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code (2 for a user error or bad usage, 130 for Ctrl-C)."""
    _register_subcommands()
    try:
        code = app(args=argv, prog_name="ownllm", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _usage_error_types() as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed
            return 2
        print(f"error: {_usage_error(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except OwnLLMError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 130 if exc.kind == "interrupted" else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def run() -> None:
    raise SystemExit(main())
