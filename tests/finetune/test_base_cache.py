"""The base model's answers kept across runs: reused while the model's files and the input are the same."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ownllm.finetune.base_cache import model_signature, remembered_together


def remembered(kind: str, signature: str, compute: Callable[[], Any],
               valid: Callable[[Any], bool] = lambda value: True) -> Any:
    """One value kept under `signature` (the check scores' and replay answers' way, with one name)."""
    return remembered_together(kind, {"value": signature}, lambda missing: {"value": compute()}, valid)["value"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_value_is_computed_once_and_again_when_its_entry_is_damaged(home: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"answer": 42}

    assert remembered("checks", "sig", compute) == {"answer": 42}
    assert remembered("checks", "sig", compute) == {"answer": 42} and len(calls) == 1
    assert remembered("checks", "other", compute) and len(calls) == 2
    for entry in (home / "finetune-cache").iterdir():
        entry.write_text("{not json")
    assert remembered("checks", "sig", compute) == {"answer": 42} and len(calls) == 3


def test_a_home_that_cannot_be_written_only_loses_the_saving(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "finetune-cache").write_text("a file where the folder would be")
    assert remembered("replay", "sig", lambda: [1, 2]) == [1, 2]


def test_the_model_signature_follows_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"0" * 16)
    before = model_signature(str(folder), "fp32")
    assert model_signature(str(folder), "fp32") == before
    assert model_signature(str(folder), "bf16") != before
    weights.write_bytes(b"1" * 32)
    os.utime(weights, ns=(1, 1))
    assert model_signature(str(folder), "fp32") != before


def test_tensors_are_kept_with_their_signature_and_recomputed_when_damaged(home: Path) -> None:
    import torch

    from ownllm.finetune.base_cache import remembered_tensors

    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"ids": torch.arange(6, dtype=torch.int32).reshape(2, 3), "logprobs": torch.zeros(2, 3)}

    first = remembered_tensors("teacher", "sig", compute)
    again = remembered_tensors("teacher", "sig", compute)
    assert len(calls) == 1 and torch.equal(first["ids"], again["ids"]) and again["ids"].dtype == torch.int32
    for entry in (home / "finetune-cache").iterdir():
        entry.write_bytes(b"\x00" * 40)
    assert torch.equal(remembered_tensors("teacher", "sig", compute)["ids"], first["ids"]) and len(calls) == 2


def test_a_kept_value_the_caller_finds_wrong_is_computed_again(home: Path) -> None:
    import torch

    from ownllm.finetune.base_cache import remembered_tensors

    assert remembered("replay", "sig", lambda: "not conversations") == "not conversations"
    assert remembered("replay", "sig", lambda: [], valid=lambda value: isinstance(value, list)) == []
    remembered_tensors("teacher", "sig", lambda: {"ids": torch.full((1, 2), 10**9)})
    fresh = remembered_tensors("teacher", "sig", lambda: {"ids": torch.zeros(1, 2)},
                               valid=lambda kept: bool((kept["ids"] < 100).all()))
    assert fresh["ids"].max() == 0


def test_values_kept_by_name_are_computed_only_for_the_names_missing(home: Path) -> None:
    """Replay answers are kept per prompt: a run asking for more of the same prompts computes only the new ones,
    and None (a prompt whose answer is not replayed) is a kept value, but an entry that lost its value is not."""
    import json

    asked: list[list[str]] = []

    def answer(names: list[str]) -> dict[str, str | None]:
        asked.append(names)
        return {name: None if name == "b" else name.upper() for name in names}

    assert remembered_together("replay-answer", {"a": "sig-a", "b": "sig-b"}, answer) == {"a": "A", "b": None}
    assert remembered_together("replay-answer", {"a": "sig-a", "b": "sig-b", "c": "sig-c"}, answer) == {
        "a": "A", "b": None, "c": "C"}
    assert asked == [["a", "b"], ["c"]]
    for entry in (home / "finetune-cache").iterdir():
        if json.loads(entry.read_text())["signature"] == "sig-a":
            entry.write_text(json.dumps({"signature": "sig-a"}))
    assert remembered_together("replay-answer", {"a": "sig-a", "b": "sig-b"}, answer) == {"a": "A", "b": None}
    assert asked[-1] == ["a"]
