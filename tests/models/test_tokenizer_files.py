"""A tokenizer's added tokens listed in its folder's tokenizer_config.json; files of another shape left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.models.tokenizer_files import record_added_tokens

ADDED = [{"id": 0, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True},
         {"id": 7, "content": "<tool>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": True,
          "special": False}]


def folder_with(tmp_path: Path, config: str, tokenizer: str) -> Path:
    (tmp_path / "tokenizer_config.json").write_text(config)
    (tmp_path / "tokenizer.json").write_text(tokenizer)
    return tmp_path


def test_the_added_tokens_are_listed_with_their_flags(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, json.dumps({"eos_token": "<|endoftext|>"}),
                         json.dumps({"added_tokens": ADDED, "model": {"type": "BPE"}}))
    record_added_tokens(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"] == {"0": {k: v for k, v in ADDED[0].items() if k != "id"},
                                              "7": {k: v for k, v in ADDED[1].items() if k != "id"}}
    listed = (folder / "tokenizer_config.json").read_text()
    record_added_tokens(folder)  # a list already there is kept as it is
    assert (folder / "tokenizer_config.json").read_text() == listed


@pytest.mark.parametrize(("config", "tokenizer"), [
    ("{not json", json.dumps({"added_tokens": ADDED})),
    ("[1, 2]", json.dumps({"added_tokens": ADDED})),
    ("{}", "{not json"),
    ("{}", "[1, 2]"),
    ("{}", json.dumps({"added_tokens": [{"content": "<x>"}]})),  # no id
    ("{}", json.dumps({"added_tokens": ["<x>"]})),
    ("{}", json.dumps({"added_tokens": {"0": "<x>"}})),
])
def test_files_of_another_shape_are_left_alone(tmp_path: Path, config: str, tokenizer: str) -> None:
    folder = folder_with(tmp_path, config, tokenizer)
    record_added_tokens(folder)
    assert (folder / "tokenizer_config.json").read_text() == config


def test_a_folder_without_the_files_is_left_alone(tmp_path: Path) -> None:
    record_added_tokens(tmp_path)
    assert list(tmp_path.iterdir()) == []
