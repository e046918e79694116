"""An adapter's scope: calibrated on a run's own prompts against general ones, kept in its folder, read back or
refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ownllm.errors import OwnLLMError
from ownllm.finetune.replay import replay_prompts
from ownllm.models.scope import ANCHORS_FILE, SCOPE_FILE, AdapterScope, user_texts

ROOT = Path(__file__).resolve().parents[2]
SETS = {"norvale": (ROOT / "examples/data/facts-train.jsonl", ROOT / "examples/data/facts-heldout.jsonl")} | {
    name: (ROOT / f"examples/retention/{name}/train.jsonl", ROOT / f"examples/retention/{name}/heldout.jsonl")
    for name in ("orrin", "pellbrook", "brambleworth")}


def questions(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["question"] if "question" in row else user_texts(row["messages"])[-1] for row in rows]


@pytest.fixture(scope="module")
def general() -> list[str]:
    return replay_prompts(None)


@pytest.mark.parametrize("name", SETS)
def test_every_fact_set_is_a_scope_holding_its_paraphrases_and_no_general_question(name: str, general) -> None:
    """Calibrated on the training phrasings and ownllm's replay prompts only: the held-out phrasings (never seen)
    fall inside, the benchmark's general questions (never seen either) outside."""
    train, heldout = SETS[name]
    scope = AdapterScope.calibrate(questions(train), general)
    assert isinstance(scope, AdapterScope), scope
    assert scope.outside < scope.threshold < scope.inside
    assert all(scope.covers_each(questions(heldout)))
    checks = [json.loads(line)["question"] for line in (ROOT / "examples/retention/general.jsonl").open()]
    assert not any(scope.covers_each(checks))
    assert scope.covers(questions(heldout)[0]) and not scope.covers(checks[0])


def test_a_conversation_is_in_scope_when_any_user_message_is(general) -> None:
    scope = AdapterScope.calibrate(questions(SETS["norvale"][0]), general)
    assert isinstance(scope, AdapterScope)
    fact = {"role": "user", "content": "Who started Norvale Instruments?"}
    other = {"role": "user", "content": [{"type": "text", "text": "And what is 2 plus 2?"}]}
    assert scope.covers([fact, {"role": "assistant", "content": "Edda Varnhagen."}, other])
    assert not scope.covers([{"role": "system", "content": "Who started Norvale Instruments?"}, other])
    assert not scope.covers([])
    assert scope.covers_each([[fact, other], [other], [], "Where is Norvale Instruments based?"]) == [
        True, False, False, True]


def test_broad_prompts_have_no_scope(general) -> None:
    """Training prompts that do not stand apart from general ones (here: general prompts themselves) get no scope,
    and the reason says so: the adapter then applies to every prompt."""
    reason = AdapterScope.calibrate(general[:150], general[150:])
    assert isinstance(reason, str) and "do not stand apart" in reason
    assert "at least two" in AdapterScope.calibrate(["the same", "the same "], general)


def test_a_scope_survives_its_folder_and_a_damaged_one_is_named(tmp_path: Path, general) -> None:
    from safetensors.numpy import save_file

    scope = AdapterScope.calibrate(questions(SETS["pellbrook"][0]), general)
    assert isinstance(scope, AdapterScope)
    assert AdapterScope.load(tmp_path) is None
    scope.save(tmp_path)
    again = AdapterScope.load(tmp_path)
    assert again is not None and again.threshold == scope.threshold and np.array_equal(again.anchors, scope.anchors)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ANCHORS_FILE, SCOPE_FILE])  # no staging files
    # both as readable as the adapter's other files (safetensors alone writes 0600)
    assert (tmp_path / ANCHORS_FILE).stat().st_mode & 0o777 == (tmp_path / SCOPE_FILE).stat().st_mode & 0o777

    (tmp_path / SCOPE_FILE).write_text("{not json")
    with pytest.raises(OwnLLMError, match=f"{SCOPE_FILE}: the adapter's scope cannot be read"):
        AdapterScope.load(tmp_path)
    scope.save(tmp_path)
    (tmp_path / ANCHORS_FILE).write_bytes(b"\0" * 10)
    with pytest.raises(OwnLLMError, match="cannot be read"):
        AdapterScope.load(tmp_path)
    scope.save(tmp_path)
    meta = json.loads((tmp_path / SCOPE_FILE).read_text())
    (tmp_path / SCOPE_FILE).write_text(json.dumps(meta | {"version": 99}))
    with pytest.raises(OwnLLMError, match="not a scope this version"):
        AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text(json.dumps(meta | {"threshold": "high"}))
    with pytest.raises(OwnLLMError, match="cannot be read"):
        AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text(json.dumps(meta | {"threshold": float("nan")}))
    with pytest.raises(OwnLLMError, match="not a scope this version"):
        AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text(json.dumps(meta))
    short = scope.anchors[:, :100] / np.linalg.norm(scope.anchors[:, :100], axis=1, keepdims=True)
    save_file({"anchors": short.astype(np.float32)}, str(tmp_path / ANCHORS_FILE))
    with pytest.raises(OwnLLMError, match="100-dimension anchors do not match all-MiniLM-L6-v2's 384"):
        AdapterScope.load(tmp_path)
    for anchors in (np.full_like(scope.anchors, np.nan), scope.anchors * 100):  # not finite, not unit length
        save_file({"anchors": anchors}, str(tmp_path / ANCHORS_FILE))
        with pytest.raises(OwnLLMError, match="not a scope this version"):
            AdapterScope.load(tmp_path)
    scope.save(tmp_path)
    for model in ("", "/tmp", "someone/any-hub-model"):  # never loaded: a file must not pick the code that runs
        (tmp_path / SCOPE_FILE).write_text(json.dumps(meta | {"embedding_model": model}))
        with pytest.raises(OwnLLMError, match="embedding_model must be all-MiniLM-L6-v2"):
            AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text("[" * 100_000)
    with pytest.raises(OwnLLMError, match="cannot be read"):
        AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text(json.dumps(meta))
    (tmp_path / ANCHORS_FILE).unlink()
    os.mkfifo(tmp_path / ANCHORS_FILE)  # reading it would wait forever
    with pytest.raises(OwnLLMError, match="not a regular file"):
        AdapterScope.load(tmp_path)


def test_recall_puts_the_nearest_training_examples_before_an_in_scope_question(tmp_path: Path, general) -> None:
    """A scope that keeps its training examples gives a conversation whose latest user message is within it the
    three nearest as turns just before that message (the nearest last); nothing otherwise."""
    from ownllm.data.doctor import read_examples
    from ownllm.finetune.scoping import _answers
    from ownllm.models.scope import RECALLED, with_recalled

    _, examples, _ = read_examples(SETS["norvale"][0])
    prompts = [text for example in examples for text in user_texts(example.messages)]
    scope = AdapterScope.calibrate(prompts, general, answers=_answers(examples))
    assert isinstance(scope, AdapterScope) and len(scope.recall) == len(scope.anchors) == 80
    assert "nearest of its training examples" in scope.describe()
    question = {"role": "user", "content": "Who was the founder of Norvale Instruments?"}
    recalled = scope.recalled([question])
    assert len(recalled) == 2 * RECALLED
    assert [turn["role"] for turn in recalled] == ["user", "assistant"] * RECALLED
    assert "Ilsa Varnhagen" in recalled[-1]["content"]  # the nearest: a phrasing of the same fact
    assert all(turn["content"] in dict(scope.recall).values() or turn["content"] in dict(scope.recall)
               for turn in recalled)
    general_question = {"role": "user", "content": "What is the capital of Japan?"}
    assert scope.recalled([general_question]) == []
    assert scope.recalled([question, {"role": "assistant", "content": "Edda."}, general_question]) == []
    assert scope.recalled("Who was the founder of Norvale Instruments?") == []  # a plain prompt is the caller's own
    assert scope.recalled([]) == []
    assert scope.without_recall().recalled([question]) == []
    system = {"role": "system", "content": "Be brief."}
    assert with_recalled([system, question], recalled) == [system, *recalled, question]
    assert with_recalled([question], []) == [question]
    # a later turn: the earlier ones stay the previous request's prompt (a prefix cache holds them)
    earlier = [system, general_question, {"role": "assistant", "content": "Tokyo."}]
    assert scope.recalled([*earlier, question]) == recalled
    assert with_recalled([*earlier, question], recalled) == [*earlier, *recalled, question]
    # the latest user message is what recall reads: blank recalls nothing; text parts read joined, as the server does
    assert scope.recalled([question, {"role": "assistant", "content": "x"}, {"role": "user", "content": " "}]) == []
    parts = {"role": "user", "content": [{"type": "text", "text": "Who was the founder of "},
                                         {"type": "text", "text": "Norvale Instruments?"}]}
    assert scope.recalled([parts]) == recalled

    scope.save(tmp_path)
    again = AdapterScope.load(tmp_path)
    assert again is not None and again.recall == scope.recall and again.recalled([question]) == recalled
    meta = json.loads((tmp_path / SCOPE_FILE).read_text())
    for damaged in (meta["recall"][:-1], [["q", 3]] * 80, "all", [["q"]] * 80):  # by file, never a traceback
        (tmp_path / SCOPE_FILE).write_text(json.dumps(meta | {"recall": damaged}))
        with pytest.raises(OwnLLMError, match=SCOPE_FILE):
            AdapterScope.load(tmp_path)
    (tmp_path / SCOPE_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "recall"}))
    older = AdapterScope.load(tmp_path)  # a scope written before recall: routes as before, recalls nothing
    assert older is not None and older.recall == () and older.recalled([question]) == []


def test_calibration_reuses_kept_embeddings_and_recomputes_a_damaged_entry(tmp_path: Path, general,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's scope embeds the shipped general prompts and its own training prompts: kept in the home, a second
    calibration on the same texts loads no embedding model; an entry damaged on disk is computed again."""
    import ownllm.models.embeddings as embeddings

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    prompts = questions(SETS["norvale"][0])
    general = general[:48]  # each damaged entry is embedded again, a dozen times: the shipped 300+ cost ~1 s each
    first = AdapterScope.calibrate(prompts, general)
    assert isinstance(first, AdapterScope), first
    entries = sorted((tmp_path / "embedding-cache").glob("*.npy"))
    assert len(entries) == 2  # the training prompts, the general prompts

    def no_model(name: str):
        raise AssertionError("the embedding model was loaded for kept embeddings")

    monkeypatch.setattr(embeddings, "load_embedder", no_model)
    again = AdapterScope.calibrate(prompts, general)
    assert (again.threshold, again.inside, again.outside) == (first.threshold, first.inside, first.outside)
    assert np.array_equal(again.anchors, first.anchors)
    monkeypatch.undo()
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    for entry, damage in zip(entries, (b"\x93NUMPY garbage", b""), strict=True):
        entry.write_bytes(damage)
    repaired = AdapterScope.calibrate(prompts, general)
    assert np.allclose(repaired.anchors, first.anchors, atol=1e-6) and repaired.threshold == first.threshold
    np.save(entries[0], np.zeros((3, 384), np.float32))  # a readable entry of the wrong shape
    assert AdapterScope.calibrate(prompts, general).threshold == first.threshold
    # what a damaged or foreign entry can hold: not unit length, another model's width (both entries alike or one),
    # a header claiming 1.4 TiB, a FIFO (never opened: it would block)
    kept = {entry: np.load(entry) for entry in entries}
    cases = [lambda entry: np.save(entry, kept[entry] * 100),
             lambda entry: np.save(entry, _unit_rows(len(kept[entry]), 10)),
             lambda entry: entry.write_bytes(_npy_header((10**9, 384))),
             lambda entry: (entry.unlink(), os.mkfifo(entry))]
    for number, damage in enumerate(cases):
        # two entries of one other width agree with each other: only a deliberate forgery of the home makes them
        for damaged in ([entries[0]], [entries[1]]) + (() if number == 1 else (entries,)):
            for entry in entries:
                if entry.exists() and not entry.is_file():
                    entry.unlink()
                np.save(entry, kept[entry])
            for entry in damaged:
                damage(entry)
            scope = AdapterScope.calibrate(prompts, general)
            assert (scope.threshold, scope.inside, scope.outside) == (first.threshold, first.inside, first.outside)


def _unit_rows(rows: int, width: int) -> np.ndarray:
    vectors = np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """An .npy file's header for float32 `shape`, with no data after it."""
    import io

    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return out.getvalue()
