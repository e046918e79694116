"""Retrieval benchmark: index throughput and query latency at 1k and 10k chunks (synthetic text), and
recall@5 of dense vs BM25 vs hybrid on the shipped example set — one run.

    python bench/rag.py [--sizes 1000,10000] [--store sqlite|qdrant]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from ownllm.rag.evaluation import evaluate_retrieval, read_retrieval_questions
from ownllm.rag.index import Index

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "rag"
WORDS = ("bicycle frame wheel battery motor warranty store city river bridge market garden winter summer "
         "engine signal harbour train ticket museum library school doctor kitchen window market coffee bread "
         "mountain forest valley island weather storm sunlight energy copper silver ocean desert village").split()


def synthetic_paragraph(rng: random.Random, words: int = 80) -> str:
    sentences, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 16))
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        sentences.append(sentence.capitalize() + ".")
        left -= n
    return " ".join(sentences)


def write_corpus(folder: Path, chunks: int, per_file: int = 100, seed: int = 0) -> None:
    rng = random.Random(seed)
    for start in range(0, chunks, per_file):
        paragraphs = [synthetic_paragraph(rng) for _ in range(min(per_file, chunks - start))]
        (folder / f"doc{start // per_file:05d}.txt").write_text("\n\n".join(paragraphs))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--store", choices=("sqlite", "qdrant"), default="sqlite")
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    rng = random.Random(1)
    print(f"{'chunks':>7s} {'index s':>8s} {'chunks/s':>9s} {'mode':>7s} {'p50 ms':>7s} {'p95 ms':>7s}")
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as work:
            docs = Path(work) / "docs"
            docs.mkdir()
            write_corpus(docs, size)
            store = Path(work) / "i.db" if args.store == "sqlite" else f"qdrant+local:{Path(work) / 'q'}"
            index = Index(store, chunk_size=128, chunk_overlap=0)
            index.embedder.embed(["warm up"])
            start = time.perf_counter()
            report = index.build([docs])
            elapsed = time.perf_counter() - start
            queries = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(args.queries)]
            for mode in ("dense", "bm25", "hybrid"):
                index.search(queries[0], k=5, mode=mode)  # first keyword query builds the BM25 index
                times = []
                for query in queries:
                    t = time.perf_counter()
                    index.search(query, k=5, mode=mode)
                    times.append((time.perf_counter() - t) * 1000)
                print(f"{report.chunks:7d} {elapsed:8.1f} {report.chunks / elapsed:9.0f} {mode:>7s} "
                      f"{percentile(times, 50):7.1f} {percentile(times, 95):7.1f}")
            index.close()
    with tempfile.TemporaryDirectory() as work:
        index = Index(Path(work) / "examples.db")
        index.build([EXAMPLES / "docs"])
        results = evaluate_retrieval(index, read_retrieval_questions(EXAMPLES / "questions.jsonl"))
    print("\nshipped set (examples/rag):", ", ".join(f"{mode} recall@5 {m['recall@5']:.3f} MRR {m['mrr']:.3f}"
                                                     for mode, m in results.items()))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB ({args.store} store)")


if __name__ == "__main__":
    main()
