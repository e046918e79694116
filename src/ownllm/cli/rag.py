"""`ownllm rag ...`: index documents, search them, answer from them with sources, evaluate retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import JsonOpt, MaxNewTokensOpt, quiet_model_libraries

StoreOpt = Annotated[str, typer.Option("--store", help="SQLite file, qdrant://host:port/collection, or "
                                                        "qdrant+local:FOLDER")]
KOpt = Annotated[int, typer.Option("-k", help="how many chunks")]
ModeOpt = Annotated[str, typer.Option(help="dense | bm25 | hybrid (reciprocal rank fusion)")]


def index(
    paths: Annotated[list[Path], typer.Argument(help="files or folders (.txt .md .pdf .html .jsonl .csv)")],
    store: StoreOpt,
    embedding_model: Annotated[str | None, typer.Option(help="sentence-transformers model "
                                                             "(default all-MiniLM-L6-v2)")] = None,
    chunk_size: Annotated[int, typer.Option(help="most tokens per chunk")] = 512,
    chunk_overlap: Annotated[int, typer.Option(help="most tokens repeated from the previous chunk")] = 64,
    text_field: Annotated[str, typer.Option(help="the text column of .jsonl/.csv files")] = "text",
) -> None:
    """Index documents; re-running skips unchanged files, replaces changed ones, drops removed ones."""
    quiet_model_libraries()
    from ownllm.cli.render import err, out
    from ownllm.rag.index import Index

    documents = Index(store, embedding_model=embedding_model, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    with err.status("indexing") as status:
        report = documents.build(paths, text_field=text_field,
                             progress=lambda source, n, total: status.update(f"indexing {n}/{total} {source}"))
    for source, why in report.failed:
        err.print(f"[yellow]skipped {source}: {why}[/yellow]")
    out.print(f"{len(report.added)} added, {len(report.updated)} updated, {len(report.removed)} removed, "
              f"{len(report.unchanged)} unchanged, {len(report.failed)} skipped; {report.chunks} chunks written "
              f"(chunks of at most {documents.chunk_size} tokens, {documents.embedding_model})")
    documents.close()


def query(question: Annotated[str, typer.Argument()], store: StoreOpt, k: KOpt = 5, mode: ModeOpt = "hybrid",
              as_json: JsonOpt = False) -> None:
    """Search: the best chunks with their source file, page or heading, and score."""
    quiet_model_libraries()
    from rich.table import Table

    from ownllm.cli.render import out
    from ownllm.rag.index import Index

    hits = Index(store).search(question, k=k, mode=mode)  # type: ignore[arg-type]
    if as_json:
        out.print_json(json.dumps([{"rank": h.rank, "score": h.score, "source": h.chunk.source,
                                    "page": h.chunk.page, "heading": h.chunk.heading, "text": h.chunk.text}
                                   for h in hits]))
        return
    table = Table(title=f"{mode} search: {question}", title_justify="left", show_lines=True)
    for column in ("#", "score", "source", "text"):
        table.add_column(column, overflow="fold")
    for h in hits:
        where = Path(h.chunk.source).name + (f" p.{h.chunk.page}" if h.chunk.page else "") + (
            f"\n{h.chunk.heading}" if h.chunk.heading else "")
        table.add_row(str(h.rank), f"{h.score:.4f}", where, h.chunk.text[:300])
    out.print(table)


def ask(
    question: Annotated[str, typer.Argument()],
    store: StoreOpt,
    model: Annotated[str, typer.Option("--model", help="the model that answers")] = "smollm2-135m-instruct",
    k: KOpt = 4,
    min_score: Annotated[float, typer.Option(help="below this best similarity: 'I don't know' without asking "
                                                  "the model")] = 0.3,
    max_new_tokens: MaxNewTokensOpt = 256,
    as_json: JsonOpt = False,
) -> None:
    """Answer from the documents with numbered citations; lists the sources after the answer."""
    quiet_model_libraries()
    from ownllm.cli.render import out
    from ownllm.rag.index import Answer, Index
    from ownllm.rag.prompt import source_label

    documents = Index(store)
    answer = None
    for event in documents.stream_answer(question, model=model, k=k, min_score=min_score,
                                         max_new_tokens=max_new_tokens):
        if isinstance(event, Answer):
            answer = event
        elif not as_json:
            out.print(event, end="", soft_wrap=True)
            out.file.flush()
    assert answer is not None
    if as_json:
        out.print_json(json.dumps({"answer": answer.text, "abstained": answer.abstained,
                                   "best_similarity": answer.best_similarity,
                                   "sources": [{"n": n, "source": h.chunk.source, "page": h.chunk.page,
                                                "heading": h.chunk.heading} for n, h in enumerate(answer.sources, 1)]}))
        return
    out.print()
    for n, hit in enumerate(answer.sources, 1):
        out.print(f"[{n}] {source_label(hit.chunk)}")


def evaluate(store: StoreOpt,
             questions: Annotated[Path, typer.Option("--questions", help="JSONL: question, source")],
             as_json: JsonOpt = False) -> None:
    """Recall@1/5/10 and MRR of dense, BM25 and hybrid search side by side."""
    quiet_model_libraries()
    from rich.table import Table

    from ownllm.cli.render import out
    from ownllm.rag.evaluation import evaluate_retrieval, read_retrieval_questions
    from ownllm.rag.index import Index

    results = evaluate_retrieval(Index(store), read_retrieval_questions(questions))
    if as_json:
        out.print_json(json.dumps(results))
        return
    table = Table(title=f"retrieval on {questions}", title_justify="left")
    table.add_column("mode")
    metrics = list(next(iter(results.values())))
    for metric in metrics:
        table.add_column(metric, justify="right")
    for mode, values in results.items():
        table.add_row(mode, *(f"{values[m]:.3f}" for m in metrics))
    out.print(table)
