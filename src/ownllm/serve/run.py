"""`ownllm serve`: load the model once, start the scheduler, run uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownllm.collector import freeze_heap
from ownllm.errors import OwnLLMError
from ownllm.serve.listen import http_address
from ownllm.serve.state import Limits, ServerState

log = logging.getLogger(__name__)


def build_state(model: str, *, adapters: dict[str, Path] | None = None, api_keys: list[str] | None = None,
                max_batch: int = 16, max_queue: int = 64, max_body: int = 1 << 20, max_model_len: int | None = None,
                max_tokens: int | None = None, dtype: str = "auto", backend: str = "auto",
                embedding_model: str = "all-MiniLM-L6-v2", rag_store: str | None = None,
                default_max_tokens: int = 512, data_dir: Path | None = None,
                max_jobs: int = 1, job_threads: int | None = None, metrics_public: bool = False,
                kv_memory: int | None = None, prefix_caching: bool = True, four_bit: bool = True,
                quant: str | None = None, classifiers: dict[str, Path] | None = None) -> ServerState:
    """Everything a server needs: engine, scheduler (not started yet: `serve` runs it, or call
    `state.scheduler.start()` to run it in a thread), adapters, limits; with `data_dir`, the files and
    fine-tuning jobs API (its manager not started yet: `serve` starts it, or call `state.jobs.start()`). `kv_memory`
    caps the KV of all sequences and the prefix cache in bytes (`ownllm.generate.kv_cache.kv_budget`);
    `prefix_caching` lets requests start from the KV of earlier ones that began the same way; `four_bit` runs a
    GGUF model's Q4 tensors as stored in decode steps of few rows, where measured faster (a single user's speed);
    `max_tokens` cuts every request's max_tokens to it (none: what the context has left). `quant` (int8, nf4) runs
    the transformers backend's weights through bitsandbytes (one request at a time: the batched forward needs plain
    weights). `classifiers` (name: classification run) are answered by POST
    /v1/classify."""
    from ownllm.generate.batching import make_scheduler
    from ownllm.generate.open import open_engine

    if max_batch < 1 or max_queue < 1:
        raise OwnLLMError("max-batch and max-queue must be at least 1", param="max_batch")
    # the name clients send: what the user typed, or the last part of a path or hub id (open_engine resolves it)
    model_name = model if "/" not in model else Path(model.rstrip("/")).name
    reserved = {model, model_name, embedding_model, f"sentence-transformers/{embedding_model}"}
    clashes = sorted((set(adapters or {}) & set(classifiers or {})) | ({*(adapters or {}), *(classifiers or {})}
                                                                       & reserved))
    if clashes:
        raise OwnLLMError(f"the name '{clashes[0]}' is given twice: each adapter and classifier needs its own name, "
                          "not the model's or the embedding model's", param="classifier")
    for name, folder in (adapters or {}).items():  # named now, not after the seconds the model takes to load
        ServerState.check_adapter(name, Path(folder))
    loaded_classifiers = {}
    if classifiers:
        from ownllm.finetune.classify import Classifier

        loaded_classifiers = {name: Classifier(Path(run)) for name, run in classifiers.items()}
    engine = open_engine(model, dtype=dtype, backend=backend, batch_rows=min(max_batch, 8), quant=quant,
                         gguf_int4=four_bit)
    scheduler = make_scheduler(engine, max_batch=max_batch, max_queue=max_queue,
                               max_len=max_model_len or min(engine.context_length, 2048), kv_memory=kv_memory,
                               prefix_caching=prefix_caching, four_bit=four_bit)
    pack_for = getattr(getattr(scheduler, "model", None), "pack_for", None)
    if pack_for is not None:  # a server batches for its life: weights packed now, not in its first busy step
        pack_for(max_batch, reserve=scheduler.kv.budget * scheduler.model.token_bytes)  # (the KV grows into it)
    rag_index = None
    if rag_store is not None:
        from ownllm.rag.index import Index

        rag_index = Index(rag_store)
        rag_index.search("warm up", k=1)  # fails now, not on the first request, if the store is missing
    spec = str(Path(model).resolve()) if Path(model).exists() else model  # workers may run elsewhere
    state = ServerState(engine=engine, scheduler=scheduler, model_name=model_name, model_spec=spec,
                        api_keys=list(api_keys or []), metrics_public=metrics_public,
                        limits=Limits(max_body=max_body, default_max_tokens=default_max_tokens,
                                      max_tokens=max_tokens),
                        embedding_model=embedding_model, rag_index=rag_index, classifiers=loaded_classifiers)
    for name, folder in (adapters or {}).items():
        state.add_adapter(name, Path(folder))  # its weights, and its scope when it has one
    if data_dir is not None:
        from ownllm.jobs.manager import JobManager
        from ownllm.jobs.store import JobStore

        state.jobs = JobManager(JobStore(data_dir), spec, on_model_ready=state.add_adapter,
                                on_model_removed=state.remove_adapter, max_running=max_jobs, threads=job_threads)
    return state


def startup_line(state: ServerState, host: str, port: int) -> str:
    """What the server says when it starts: the model, the backend, whether requests decode together (and how
    many) or one at a time and why, the context window per sequence, the address."""
    batching = state.scheduler.batching
    if batching["mode"] == "batched":
        if batching["kv_bytes"]:
            memory = f"KV budget {batching['kv_bytes'] / 2**30:.2f} GiB = {batching['kv_tokens']:,} tokens"
        else:
            memory = f"KV for {batching['kv_tokens']:,} tokens"
        caching = "prefix cache on" if batching["prefix_caching"] else "prefix cache off"
        if batching.get("prefix_exact_chunks"):
            caching += (f" (whole {batching['prefix_exact_chunks']}-token prefill chunks only: a hit never changes "
                        "a token)")
        mode = f"batched, up to {batching['max_batch']} sequences, {memory}, {caching}"
        if rows := batching.get("int4_rows"):
            mode += (", GGUF 4-bit weights as stored in one-row decode steps" if rows == 1 else
                     f", GGUF 4-bit weights as stored in decode steps of up to {rows} rows")
        elif batching.get("int4_note"):
            mode += f", {batching['int4_note']}"
        if batching.get("narrow_rows"):
            mode += f", fp32 steps of up to {batching['narrow_rows']} tokens as transposed products (faster here)"
        if batching.get("packed_weights"):
            mode += f", {batching['packed_weights']}"
        if batching.get("compiled_steps"):
            mode += f", {batching['compiled_steps']}"
        if batching.get("batch_invariant") is False:
            remedy = batching.get("invariance_note") or "OWNLLM_BATCH_INVARIANT=1 stops that"
            mode += f", a seeded request's tokens can vary with the requests beside it ({remedy})"
    else:
        mode = f"one request at a time: {batching['reason']}"
    heads = f"; classifiers {', '.join(sorted(state.classifiers))} at /v1/classify" if state.classifiers else ""
    scopes = [f"{state.model_name}: {state.engine.scope.describe()}"] if state.engine.scope is not None else []
    scopes += [f"{name}: {scope.describe()}" for name, scope in sorted(state.scopes.items())]
    scoped = f"; scoped adapters ({'; '.join(scopes)})" if scopes else ""
    cap = f", at most {state.limits.max_tokens:,} new tokens a request" if state.limits.max_tokens else ""
    return (f"serving {state.model_name} ({state.engine.backend}, {mode}, context {state.context_length}{cap}) on "
            f"{http_address(host, port)}/v1{heads}{scoped}")


def _bound_port(server: Any, asked: int) -> int:
    """The port uvicorn's first socket listens on: `asked`, or the one the system picked for 0."""
    for listening in getattr(server, "servers", []):
        for sock in getattr(listening, "sockets", []) or []:
            return int(sock.getsockname()[1])
    return asked


def serve(state: ServerState, *, host: str = "127.0.0.1", port: int = 8000,
          on_listening: Callable[[int], None] | None = None) -> None:
    """HTTP in a thread, the engine loop in this (main) thread; SIGTERM/SIGINT shut down gracefully: no new
    requests, running streams finish (up to 15 s), then the engine stops. Everything alive when it starts is frozen
    out of the garbage collector's scans (ownllm/collector.py): call it once, for the process's serving life.
    `on_listening` gets the port the socket is bound to (the one the system chose for `port=0`) once it listens."""
    import signal
    import threading
    import time

    import uvicorn

    from ownllm.serve.app import READ_HEADER_BYTES, create_app

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=15, http="h11",
                            h11_max_incomplete_event_size=READ_HEADER_BYTES)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, name="ownllm-http", daemon=True)

    def shut_down(signum: int, frame: object) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    freeze_heap()  # what start-up loaded stays for the server's life: its collections skip it from here on
    if state.jobs is not None:
        state.jobs.start()
    http.start()
    watcher = threading.Thread(target=lambda: (http.join(), state.scheduler.stop(0)), daemon=True)
    watcher.start()
    if on_listening is not None:
        def announce() -> None:
            while not server.started and http.is_alive():
                time.sleep(0.02)
            if server.started:
                on_listening(_bound_port(server, port))

        threading.Thread(target=announce, name="ownllm-announce", daemon=True).start()
    state.scheduler.run_here()
    http.join(timeout=20)
    if state.jobs is not None:
        state.jobs.stop()  # running jobs checkpoint and resume when the server is back
    if not server.started:
        raise OwnLLMError(f"could not listen on {host}:{port} (in use, or not an address of this machine)",
                          kind="resource", param="port")
