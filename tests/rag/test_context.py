"""Index.context: what `ownllm rag ask` and the server's chat with `rag` both answer from (real embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.rag.context import IDK, RagContext
from ownllm.rag.index import Index
from ownllm.rag.prompt import SYSTEM, format_sources, source_label

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rag"
FOUNDER = "Who founded Lumen Bikes?"


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    built = Index(tmp_path_factory.mktemp("context") / "docs.db")
    built.build([EXAMPLES / "docs"])
    return built


def test_numbered_sources_and_the_prompt(index: Index) -> None:
    context = index.context(FOUNDER, k=3)
    assert isinstance(context, RagContext) and not context.abstain
    assert context.best_similarity >= 0.3 and len(context.hits) == 3
    assert [s["index"] for s in context.sources] == [1, 2, 3]
    assert context.sources[0]["source"].endswith("company.html")
    assert context.sources == [{"index": n, "source": h.chunk.source, "page": h.chunk.page,
                                "heading": h.chunk.heading, "score": h.score} for n, h in enumerate(context.hits, 1)]
    numbered = format_sources(context.hits)
    for n, hit in enumerate(context.hits, 1):
        assert f"[{n}] ({source_label(hit.chunk)}) {hit.chunk.text}" in numbered
    # alone: the instructions, then the sources and the question (`ownllm rag ask`)
    assert context.messages() == [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"Sources:\n{numbered}\n\nQuestion: {FOUNDER}"}]
    # a conversation: its turns under one system prompt with the sources, which replaces its own (the server)
    conversation = [{"role": "system", "content": "Talk like a pirate."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Ahoy!"}, {"role": "user", "content": FOUNDER}]
    assert context.system_prompt == f"{SYSTEM}\n\nSources:\n{numbered}"
    assert context.messages(conversation) == [{"role": "system", "content": context.system_prompt},
                                              *conversation[1:]]
    assert IDK in SYSTEM  # the model is told to say exactly what abstaining says


def test_abstains_below_min_score_or_without_hits(index: Index) -> None:
    strict = index.context(FOUNDER, k=2, min_score=0.99)
    assert strict.abstain and len(strict.hits) == 2  # what was found is still there to show
    assert strict.best_similarity == index.context(FOUNDER, k=2).best_similarity < 0.99
    unknown = index.context("What is the capital of Peru?")
    assert unknown.abstain and unknown.best_similarity < 0.3
    # only stopwords: BM25 finds nothing, whatever the dense similarity
    nothing = index.context("the of and", mode="bm25", min_score=-1)
    assert nothing.hits == [] and nothing.abstain and nothing.sources == []


@pytest.mark.parametrize(("options", "param", "message"), [
    ({"min_score": float("nan")}, "min_score", "min-score must be a finite number"),
    ({"min_score": float("inf")}, "min_score", "min-score must be a finite number"),
    ({"min_score": "0.3"}, "min_score", "min-score must be a finite number"),
    ({"k": 0}, "k", "k must be a whole number of at least 1"),
    ({"k": 2.5}, "k", "k must be a whole number of at least 1"),
    ({"mode": "fuzzy"}, "mode", "mode must be one of"),
])
def test_bad_options_are_named(index: Index, options: dict, param: str, message: str) -> None:
    with pytest.raises(OwnLLMError, match=message) as caught:
        index.context(FOUNDER, **options)
    assert caught.value.param == param


def test_ask_answers_through_the_context_and_abstains_without_a_model(index: Index) -> None:
    # abstaining never opens the model: a name that does not exist is never looked up
    answer = index.ask("What is the capital of Peru?", model="no-such-model")
    assert answer.abstained and answer.text == IDK and answer.sources == []
    assert answer.best_similarity == index.context("What is the capital of Peru?").best_similarity
    text, last = index.stream_answer(FOUNDER, model="no-such-model", min_score=0.99)
    assert text == IDK and last.abstained and last.text == IDK
