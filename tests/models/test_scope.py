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
