"""Retrieval on real files, real embeddings (all-MiniLM-L6-v2 from its package), real SQLite and Qdrant."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.rag.index import IDK, Index
from ownllm.rag.loaders import load_file
from tests.conftest import assert_user_error, run_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rag"


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    shutil.copytree(EXAMPLES / "docs", folder)
    return folder


def make_pdf(path: Path, pages: list[str], password: str | None = None) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    if password:
        pdf.set_encryption(owner_password=password, user_password=password)
    pdf.output(str(path))
    return path


def test_loaders(tmp_path: Path, docs: Path) -> None:
    md = load_file(docs / "warranty.md")
    assert [s.heading for s in md] == ["Lumen Bikes warranty policy", "Frames", "Electric drive units",
                                      "How to make a claim"]
    html = load_file(docs / "company.html")
    text = " ".join(s.text for s in html)
    assert "Marit de Vries" in text and "Cart" not in text and "analytics" not in text and "Cookie" not in text
    assert {s.heading for s in html} >= {"About us", "Our factory"}
    pdf = load_file(make_pdf(tmp_path / "two.pdf", ["The first page talks about frames.", "Page two: tyres."]))
    assert [(s.page, "tyres" in s.text) for s in pdf] == [(1, False), (2, True)]
    assert len(load_file(docs / "faq.jsonl")) == 3
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("id,body\n1,hello there\n2,general kenobi\n")
    assert [s.text for s in load_file(csv_file, text_field="body")] == ["hello there", "general kenobi"]
    with pytest.raises(OwnLLMError, match="no column 'text'"):
        load_file(csv_file)
    assert load_file(docs / "models.txt")[0].text.startswith("The Lumen Bikes range")


def test_bad_pdfs_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(OwnLLMError, match="unreadable PDF"):
        load_file(broken)
    locked = make_pdf(tmp_path / "locked.pdf", ["secret"], password="pw")
    with pytest.raises(OwnLLMError, match="encrypted"):
        load_file(locked)
    with pytest.raises(OwnLLMError, match="unsupported file type"):
        load_file(tmp_path / "notes.docx")


def test_chunks_respect_size_and_overlap(tmp_path: Path) -> None:
    text = tmp_path / "long.txt"
    sentences = [f"Sentence number {i} is about bicycles and their many parts." for i in range(200)]
    text.write_text(" ".join(sentences[:100]) + "\n\n" + " ".join(sentences[100:]))
    index = Index(tmp_path / "chunks.db", chunk_size=64, chunk_overlap=16)
    index.build([text])
    chunks = index.store.all_chunks()
    assert len(chunks) > 10
    count = index.embedder.count_tokens
    assert all(c.tokens <= 64 and count(c.text) == c.tokens for c in chunks)
    for previous, current in itertools.pairwise(chunks):
        shared = [s for s in sentences if s in previous.text and s in current.text]
        assert sum(count(s) for s in shared) <= 16
    assert any(s in chunks[1].text for s in sentences if s in chunks[0].text)  # overlap happens
    assert index.chunk_size == 64


def test_default_chunk_size_fits_the_embedder(tmp_path: Path, docs: Path) -> None:
    index = Index(tmp_path / "i.db")
    index.build([docs])
    assert index.chunk_size == 256  # all-MiniLM-L6-v2 reads at most 256 tokens; 512 would be cut silently


def test_incremental_reindex(tmp_path: Path, docs: Path) -> None:
    store = tmp_path / "i.db"
    first = Index(store).build([docs])
    assert len(first.added) == 6 and not first.failed
    again = Index(store).build([docs])
    assert len(again.unchanged) == 6 and again.chunks == 0
    (docs / "models.txt").write_text("The Lumen Bikes range now has one model, the Nova, a folding bike.")
    (docs / "stores.md").unlink()
    (docs / "new.md").write_text("# Opening hours\nThe Haarlem store opens on Sundays from noon.")
    report = Index(store).build([docs])
    assert [Path(p).name for p in report.updated] == ["models.txt"]
    assert [Path(p).name for p in report.removed] == ["stores.md"]
    assert [Path(p).name for p in report.added] == ["new.md"]
    index = Index(store)
    sources = {Path(c.source).name for c in index.store.all_chunks()}
    assert "stores.md" not in sources and "new.md" in sources
    assert "Nova" in index.search("folding bike", k=1)[0].chunk.text


def test_sqlite_and_qdrant_give_the_same_results(tmp_path: Path, docs: Path) -> None:
    sqlite, qdrant = Index(tmp_path / "s.db"), Index(f"qdrant+local:{tmp_path / 'q'}")
    sqlite.build([docs])
    qdrant.build([docs])
    for question in ("How much does the Cargo cost?", "who started the company", "battery winter storage"):
        for mode in ("dense", "bm25", "hybrid"):
            a = [(h.chunk.key, round(h.score, 4)) for h in sqlite.search(question, k=5, mode=mode)]
            b = [(h.chunk.key, round(h.score, 4)) for h in qdrant.search(question, k=5, mode=mode)]
            assert a == b, (question, mode)
    qdrant.close()


def test_hybrid_beats_or_ties_the_weaker_mode(tmp_path: Path, docs: Path) -> None:
    from ownllm.rag.evaluation import evaluate_retrieval, read_retrieval_questions

    index = Index(tmp_path / "i.db")
    index.build([docs])
    results = evaluate_retrieval(index, read_retrieval_questions(EXAMPLES / "questions.jsonl"))
    for metric in ("recall@5", "mrr"):
        assert results["hybrid"][metric] >= min(results["dense"][metric], results["bm25"][metric])
    assert results["hybrid"]["recall@10"] == 1.0


def test_one_bad_file_is_skipped_the_rest_indexed(tmp_path: Path, docs: Path) -> None:
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (docs / "notes.docx").write_bytes(b"binary")
    report = Index(tmp_path / "i.db").build([docs, docs / "notes.docx"])
    assert len(report.added) == 6
    assert sorted(Path(f).name for f, _ in report.failed) == ["broken.pdf", "notes.docx"]


def test_an_interrupted_run_leaves_a_consistent_resumable_store(tmp_path: Path, docs: Path, monkeypatch) -> None:
    store = tmp_path / "i.db"
    index = Index(store)
    real_embed, calls = index.embedder.embed, []

    def failing_embed(texts, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user hit Ctrl-C while the third file was being embedded
        return real_embed(texts, **kw)

    monkeypatch.setattr(index.embedder, "embed", failing_embed)
    with pytest.raises(KeyboardInterrupt):
        index.build([docs])
    monkeypatch.undo()
    done = Index(store).store.files()
    assert len(done) == 2  # two files fully indexed, the third not at all
    chunk_sources = {c.source for c in Index(store).store.all_chunks()}
    assert chunk_sources == set(done)
    report = Index(store).build([docs])
    assert len(report.unchanged) == 2 and len(report.added) == 4


def test_bad_inputs(tmp_path: Path, docs: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OwnLLMError, match="no supported documents"):
        Index(tmp_path / "i.db").build([empty])
    with pytest.raises(OwnLLMError, match="no index at"):
        Index(tmp_path / "missing.db").search("anything")
    Index(tmp_path / "i.db").build([docs])
    with pytest.raises(OwnLLMError, match="built with embedding model 'all-MiniLM-L6-v2', not 'other/model'"):
        Index(tmp_path / "i.db", embedding_model="other/model")


def test_cli_index_query_eval(tmp_path: Path, docs: Path) -> None:
    store = tmp_path / "cli.db"
    result = run_cli("rag", "index", str(docs), "--store", str(store))
    assert result.returncode == 0 and "6 added" in result.stdout, result.stderr
    result = run_cli("rag", "query", "How much does the Strada weigh?", "--store", str(store), "-k", "2",
                     "--mode", "dense", "--json")
    hits = json.loads(result.stdout)
    assert len(hits) == 2 and hits[0]["source"].endswith("models.txt")
    result = run_cli("rag", "eval", "--store", str(store), "--questions", str(EXAMPLES / "questions.jsonl"),
                     "--json")
    assert set(json.loads(result.stdout)) == {"dense", "bm25", "hybrid"}
    assert_user_error(run_cli("rag", "query", "x", "--store", str(tmp_path / "nope.db")), "no index at")
    assert_user_error(run_cli("rag", "index", str(tmp_path / "nothing-here"), "--store", str(store)),
                      "no supported documents")


@pytest.mark.slow
def test_ask_answers_with_sources_and_knows_what_it_does_not_know(tmp_path: Path, docs: Path,
                                                                 default_model: str) -> None:
    index = Index(tmp_path / "i.db")
    index.build([docs])
    answer = index.ask("Who founded Lumen Bikes?", model=default_model, max_new_tokens=48)
    assert not answer.abstained and answer.sources
    assert Path(answer.sources[0].chunk.source).name == "company.html"
    assert "Marit" in answer.text or "Okke" in answer.text
    unknown = index.ask("What is the capital of Peru?", model=default_model)
    assert unknown.abstained and unknown.text == IDK and unknown.best_similarity < 0.3
    result = run_cli("rag", "ask", "What is the boiling point of mercury?", "--store", str(tmp_path / "i.db"),
                     "--model", default_model)
    assert result.returncode == 0 and "I don't know" in result.stdout
