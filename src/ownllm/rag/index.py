"""An index over your documents: build it incrementally, search it, and answer from it with sources.

    >>> from ownllm.rag import Index
    >>> index = Index("docs.db")
    >>> index.build(["handbook/"])
    >>> index.search("how long is the warranty?", k=5)
    >>> index.context("How long is the warranty?").messages()  # the numbered sources and the question
    >>> index.ask("How long is the warranty?", model="smollm2-135m-instruct").text
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ownllm.data.files import check_output_file
from ownllm.errors import OwnLLMError
from ownllm.home import file_sha256
from ownllm.models.embeddings import DEFAULT_EMBEDDING_MODEL, Embedder, load_embedder
from ownllm.rag.chunking import Chunk, chunk_sections
from ownllm.rag.context import DEFAULT_K, DEFAULT_MIN_SCORE, Hit, RagContext
from ownllm.rag.loaders import SUPPORTED, load_file
from ownllm.rag.prompt import IDK
from ownllm.rag.store import SqliteStore, Store, open_store

log = logging.getLogger(__name__)
logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
Mode = Literal["dense", "bm25", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "bm25", "hybrid")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al., 2009)


@dataclass
class BuildReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    chunks: int = 0


def collect_files(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Supported files under the given paths, and the paths that cannot be indexed (with why)."""
    files, problems = [], []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SUPPORTED)
        elif path.is_file():
            if path.suffix.lower() in SUPPORTED:
                files.append(path)
            else:
                problems.append((str(path), f"unsupported file type '{path.suffix}'"))
        else:
            problems.append((str(path), "no such file or folder"))
    return [f.resolve() for f in files], problems


class Index:
    """Documents → chunks → embeddings in a store; dense, BM25 and hybrid search; cited answers.

    Args:
        store: a SQLite file path, `qdrant://host:port/collection`, or `qdrant+local:FOLDER`.
        embedding_model: sentence-transformers model; default: the store's, else all-MiniLM-L6-v2.
        chunk_size: most tokens per chunk (embedding tokenizer), capped at the embedder's window.
        chunk_overlap: most tokens a chunk repeats from the previous one.
    """

    def __init__(self, store: str | Path, *, embedding_model: str | None = None, chunk_size: int = 512,
                 chunk_overlap: int = 64) -> None:
        if chunk_size < 16 or not 0 <= chunk_overlap < chunk_size:
            raise OwnLLMError("chunk-size must be >= 16 and chunk-overlap in 0..chunk-size-1", param="chunk_size")
        self.store: Store = open_store(store)
        self._meta = self.store.meta()
        if self._meta is not None and embedding_model and embedding_model != self._meta["embedding_model"]:
            raise OwnLLMError(
                f"the index at {store} was built with embedding model '{self._meta['embedding_model']}', "
                f"not '{embedding_model}'", param="embedding_model",
                hint="query with the same model, or build a new index")
        self.embedding_model = (self._meta or {}).get("embedding_model") or embedding_model or DEFAULT_EMBEDDING_MODEL
        self.chunk_size = (self._meta or {}).get("chunk_size", chunk_size)
        self.chunk_overlap = (self._meta or {}).get("chunk_overlap", chunk_overlap)
        self._embedder: Embedder | None = None
        self._keyword: tuple[Any, list[Chunk]] | None = None
        self._last_query: tuple[str, np.ndarray] | None = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.embedding_model)
        return self._embedder

    # --- building ---------------------------------------------------------------------------
    def build(self, paths: list[str | Path], *, text_field: str = "text",
              progress: Callable[[str, int, int], None] | None = None) -> BuildReport:
        """Index new and changed files, drop removed ones; a bad file is reported and skipped."""
        if self._meta is None and isinstance(self.store, SqliteStore):  # fail before loading the embedder
            check_output_file(self.store.path, param="store")
        roots = [Path(p).expanduser() for p in paths]
        files, problems = collect_files(roots)
        if not files:
            why = "".join(f"; {path}: {reason}" for path, reason in problems)
            raise OwnLLMError(f"no supported documents under {', '.join(map(str, roots))}{why}",
                              param="paths", hint=f"supported: {', '.join(SUPPORTED)}")
        report = BuildReport(failed=problems)
        if self._meta is None:
            size = min(self.chunk_size, self.embedder.max_tokens)
            self._meta = {"embedding_model": self.embedder.name, "dimensions": self.embedder.dimensions,
                          "chunk_size": size, "chunk_overlap": min(self.chunk_overlap, size - 1)}
            self.chunk_size, self.chunk_overlap = self._meta["chunk_size"], self._meta["chunk_overlap"]
            self.store.create(self._meta)
        known = self.store.files()
        for number, path in enumerate(files, 1):
            source = str(path)
            if progress:
                progress(source, number, len(files))
            try:
                digest = file_sha256(path)
            except OSError as exc:  # unreadable (permissions), or gone since it was listed
                report.failed.append((source, f"cannot read it ({exc.strerror or exc.__class__.__name__})"))
                continue
            if known.get(source) == digest:
                report.unchanged.append(source)
                continue
            try:
                chunks = self._chunk(path, text_field)
            except OwnLLMError as exc:
                report.failed.append((source, exc.message))
                continue
            vectors = self.embedder.embed([c.text for c in chunks]) if chunks else np.zeros((0, 1), np.float32)
            self.store.replace_file(source, digest, chunks, vectors)
            (report.updated if source in known else report.added).append(source)
            report.chunks += len(chunks)
        present = {str(f) for f in files}
        resolved_roots = [r.resolve() for r in roots]
        for source in known:
            inside = any(Path(source) == r or r in Path(source).parents for r in resolved_roots)
            if inside and source not in present and not Path(source).exists():
                self.store.delete_file(source)
                report.removed.append(source)
        self._keyword = None
        return report

    def _chunk(self, path: Path, text_field: str) -> list[Chunk]:
        sections = load_file(path, text_field=text_field)
        tokenizer = self.embedder.tokenizer

        def split_tokens(text: str, n: int) -> list[str]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return [tokenizer.decode(ids[i : i + n]) for i in range(0, len(ids), n)]

        return chunk_sections(sections, size=self.chunk_size, overlap=self.chunk_overlap,
                              count=self.embedder.count_tokens, split_tokens=split_tokens)

    # --- searching --------------------------------------------------------------------------
    def _require(self) -> None:
        if self._meta is None:
            raise OwnLLMError(f"no index at {self.store.location}", kind="not_found", param="store",
                              hint="build one with: ownllm rag index DOCS --store PATH")

    def search(self, query: str, *, k: int = 5, mode: Mode = "hybrid") -> list[Hit]:
        """The k best chunks for the query: dense (cosine), bm25 (keywords) or hybrid (rank fusion)."""
        self._require()
        if not query.strip():
            raise OwnLLMError("the query is empty", param="query")
        if mode not in MODES:
            raise OwnLLMError(f"mode must be one of {', '.join(MODES)}", param="mode")
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise OwnLLMError(f"k must be a whole number of at least 1, got {k!r}", param="k")
        if mode == "dense":
            return self._dense(query, k)
        if mode == "bm25":
            return self._bm25(query, k)
        depth = max(k * 4, 20)
        fused: dict[tuple[str, int], tuple[Chunk, float]] = {}
        for hits in (self._dense(query, depth), self._bm25(query, depth)):
            for hit in hits:
                chunk, score = fused.get(hit.chunk.key, (hit.chunk, 0.0))
                fused[hit.chunk.key] = (chunk, score + 1.0 / (RRF_K + hit.rank))
        ranked = sorted(fused.values(), key=lambda item: (-item[1], item[0].key))[:k]
        return [Hit(chunk, score, rank) for rank, (chunk, score) in enumerate(ranked, 1)]

    def _query_vector(self, query: str) -> np.ndarray:
        """The query's embedding, kept for the next call: `ask` searches and then checks similarity."""
        last = self._last_query
        if last is None or last[0] != query:
            last = (query, self.embedder.embed([query])[0])
            self._last_query = last
        return last[1]

    def _dense(self, query: str, k: int) -> list[Hit]:
        pairs = self.store.dense(self._query_vector(query), k)
        return [Hit(chunk, score, rank) for rank, (chunk, score) in enumerate(pairs, 1)]

    def _bm25(self, query: str, k: int) -> list[Hit]:
        import bm25s

        if self._keyword is None:
            chunks = self.store.all_chunks()
            retriever = bm25s.BM25()
            if chunks:
                retriever.index(bm25s.tokenize([c.text for c in chunks], stopwords="en", show_progress=False),
                                show_progress=False)
            self._keyword = (retriever, chunks)
        retriever, chunks = self._keyword
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not chunks or not tokens.vocab:
            return []
        ids, scores = retriever.retrieve(tokens, k=min(k, len(chunks)), show_progress=False)
        hits = [(chunks[i], float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]
        return [Hit(chunk, score, rank) for rank, (chunk, score) in enumerate(hits, 1)]

    def close(self) -> None:
        self.store.close()

    # --- answering --------------------------------------------------------------------------
    def context(self, question: str, *, k: int = DEFAULT_K, min_score: float = DEFAULT_MIN_SCORE,
                mode: Mode = "hybrid") -> RagContext:
        """The k best chunks for the question as numbered sources, and whether to answer from them.

        Args:
            min_score: if no chunk in the store reaches this cosine similarity to the question, or the search
                finds nothing, the context says to abstain: the answer is "I don't know." without asking the model.
        """
        if isinstance(min_score, bool) or not isinstance(min_score, Real) or not math.isfinite(min_score):
            raise OwnLLMError(f"min-score must be a finite number, got {min_score}", param="min_score")
        hits = self.search(question, k=k, mode=mode)  # checks the question, k and mode
        best = max((score for _, score in self.store.dense(self._query_vector(question), 1)), default=0.0)
        return RagContext(question, hits, best, abstain=not hits or best < min_score)

    def ask(self, question: str, *, model: Any, k: int = DEFAULT_K, min_score: float = DEFAULT_MIN_SCORE,
            max_new_tokens: int = 256, mode: Mode = "hybrid") -> Answer:
        """Answer from the top chunks, citing them as [n]; see `stream_answer`."""
        answer = None
        for event in self.stream_answer(question, model=model, k=k, min_score=min_score,
                                        max_new_tokens=max_new_tokens, mode=mode):
            if isinstance(event, Answer):
                answer = event
        assert answer is not None
        return answer

    def stream_answer(self, question: str, *, model: Any, k: int = DEFAULT_K, min_score: float = DEFAULT_MIN_SCORE,
                      max_new_tokens: int = 256, mode: Mode = "hybrid") -> Iterator[str | Answer]:
        """Stream the answer's text, then one Answer with the sources.

        Args:
            model: an ownllm Engine, or a model name to open one.
            min_score: if no retrieved chunk reaches this cosine similarity to the question, the answer
                is "I don't know." without asking the model — retrieval found nothing relevant.
        """
        from ownllm.generate.engine import Completion, Engine, TextDelta
        from ownllm.generate.params import SamplingParams

        context = self.context(question, k=k, min_score=min_score, mode=mode)
        if context.abstain:
            yield IDK
            yield Answer(IDK, [], abstained=True, best_similarity=context.best_similarity)
            return
        engine = model if isinstance(model, Engine) else _open_engine(model)
        params = SamplingParams(max_new_tokens=max_new_tokens)
        text = ""
        # routed (an adapter's scope) by the question itself, as the server routes by the user's own messages
        asked = [{"role": "user", "content": question}]
        prompt = engine.render_with_recall(context.messages(), asked, max_new_tokens=max_new_tokens)
        events = engine.stream(prompt, params, adapter=engine.route(asked))
        for event in events:
            if isinstance(event, TextDelta) and event.text:
                text += event.text
                yield event.text
            elif isinstance(event, Completion):
                text = event.text
        yield Answer(text.strip(), context.hits, abstained=False, best_similarity=context.best_similarity)


@dataclass
class Answer:
    """An answer from the documents: `sources` are the hits it was given as [1], [2], ... (none if it abstained)."""

    text: str
    sources: list[Hit]
    abstained: bool
    best_similarity: float


def _open_engine(spec: str) -> Any:
    from ownllm.generate.open import open_engine

    return open_engine(spec)
