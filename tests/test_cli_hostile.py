"""Hostile paths and values on the command line: each is one `error:` line naming the problem and exit 2 — no
traceback, no half-written output, no lost files. Every case here fails before a model loads (except the one
marked slow), so each costs one process start."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL, assert_user_error, run_cli

BINARY = b"\x80" + random.Random(0).randbytes(4000)  # not UTF-8 from its first byte
CHAT_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A folder of hostile inputs: binary bytes, UTF-16, a plain file, a folder, a pipe, JSON nested too deeply
    to parse, a folder holding a user's file."""
    (tmp_path / "binary.jsonl").write_bytes(BINARY)
    (tmp_path / "binary.txt").write_bytes(BINARY)
    (tmp_path / "utf16.jsonl").write_bytes(json.dumps(CHAT_LINE).encode("utf-16"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(CHAT_LINE) + "\n" for _ in range(12)))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "2+2?", "answers": ["4"]}) + "\n")
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "list.yaml").write_text("- lr\n- 0.1\n")
    (tmp_path / "a-folder").mkdir()
    os.mkfifo(tmp_path / "a-pipe")  # nothing ever writes it: reading it would hang
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("years of work\n")
    return tmp_path


def test_data_check_binary_file(files: Path) -> None:
    """Finding 8: random bytes crashed the JSONL scanner (UnicodeDecodeError) instead of naming the line."""
    assert_user_error(run_cli("data", "check", str(files / "binary.jsonl"), "--no-timing"),
                      "binary.jsonl", "not UTF-8")


def test_rag_index_store_is_a_folder(files: Path) -> None:
    """Finding 8: an existing folder as --store was an sqlite OperationalError traceback."""
    assert_user_error(run_cli("rag", "index", str(files / "train.jsonl"), "--store", str(files / "a-folder")),
                      "a-folder is a folder, not an index file")


def test_finetune_out_is_a_file(files: Path) -> None:
    """Finding 8: --out naming a regular file was a NotADirectoryError traceback; the file is left alone."""
    out = files / "a-file"
    assert_user_error(run_cli("finetune", "--data", str(files / "train.jsonl"), "--out", str(out)),
                      "--out", "is a file, not a folder")
    assert out.read_text() == "not a folder\n"


@pytest.mark.usefixtures("default_model")  # its model is resolved before the bad input is found
def test_a_finetune_that_fails_before_training_leaves_no_folder(files: Path) -> None:
    """Bad data is found after the run folder is made: the folder must go, or it blocks the retry."""
    out = files / "fresh-run"
    assert_user_error(run_cli("finetune", DEFAULT_MODEL, "--data", str(files / "binary.jsonl"), "--out", str(out)),
                      "binary.jsonl")
    assert not out.exists()


# (arguments with {} for the folder of hostile files, what the error line must say)
CASES: list[tuple[list[str], tuple[str, ...]]] = [
    # unreadable bytes
    (["data", "check", "{}/utf16.jsonl", "--no-timing"], ("utf16.jsonl", "UTF-16")),
    (["tokenize", DEFAULT_MODEL, "--file", "{}/binary.txt"], ("binary.txt", "not UTF-8", "line 1")),
    (["finetune", "--data", "{}/train.jsonl", "--out", "{}/run", "--config", "{}/binary.txt"],
     ("binary.txt", "not UTF-8")),
    (["eval", "perplexity", DEFAULT_MODEL, "--data", "{}/binary.txt"], ("binary.txt", "not UTF-8")),
    # a folder where a file is expected, a file where a folder is expected
    (["rag", "query", "cats", "--store", "{}/a-folder"], ("a-folder is a folder",)),
    (["rag", "index", "{}/train.jsonl", "--store", "{}/a-file/index.db"], ("a-file is a file, not a folder",)),
    (["finetune", "--data", "{}/train.jsonl", "--out", "{}/run", "--config", "{}/list.yaml"],
     ("list.yaml", "expected a mapping")),
    (["merge", "{}/a-folder", "--out", "{}/a-file"], ("--out", "is a file, not a folder")),
    (["eval", "qa", DEFAULT_MODEL, "--data", "{}/qa.jsonl", "--out", "{}/a-file"], ("is a file, not a folder",)),
    (["serve", DEFAULT_MODEL, "--data-dir", "{}/a-file"], ("--data-dir", "is a file, not a folder")),
    # numbers: out of range, not finite, not numbers
    (["finetune", "--data", "{}/train.jsonl", "--out", "{}/run", "--seed", "18446744073709551616"],
     ("seed must be from 0 to",)),
    (["finetune", "--data", "{}/train.jsonl", "--out", "{}/run", "--lr", "nan"], ("lr must be a finite number",)),
    (["finetune", "--data", "{}/train.jsonl", "--out", "{}/run", "--max-steps", "many"], ("'--max-steps'",)),
    (["generate", DEFAULT_MODEL, "hi", "--seed", "18446744073709551616"], ("seed",)),
    (["tokenize", DEFAULT_MODEL, "hi", "--price-per-1m", "nan"], ("price-per-1m must be a finite number",)),
    (["estimate", "7B", "--seq-len", "-5"], ("seq-len must be at least 1",)),
    (["serve", DEFAULT_MODEL, "--port", "99999"], ("port must be from 0 to 65535",)),
    (["serve", DEFAULT_MODEL, "--max-tokens", "0"], ("max-tokens must be at least 1",)),
    (["serve", DEFAULT_MODEL, "--kv-memory", "lots"], ("--kv-memory takes a size like 2GiB",)),
    (["serve", DEFAULT_MODEL, "--classifier", "tickets"], ("--classifier takes NAME=FOLDER",)),
    (["serve", DEFAULT_MODEL, "--kv-memory", "1MiB", "--no-jobs", "--port", "0"],
     ("--kv-memory", "less than one sequence of 2,048")),
    (["serve", DEFAULT_MODEL, "--kv-memory", "1TiB", "--no-jobs", "--port", "0"],
     ("--kv-memory", "more than the free memory")),
    (["bench", "serve", "--workload", "games"], ("--workload takes one of random, chat, rag",)),
    (["rag", "ask", "cats", "--store", "{}/none.db", "--min-score", "nan"], ("min-score must be a finite number",)),
    (["bench", "serve", "--concurrency", "0"], ("concurrency levels must be at least 1",)),
    (["jobs", "list", "--url", "http://[::1"], ("--url", "not a valid URL")),
    (["jobs", "create", "{}/train.jsonl", "--model", "m", "--method", "reinforcement", "--grader", "{}/a-pipe"],
     ("--grader", "a-pipe is not a regular file")),
    (["jobs", "create", "{}/train.jsonl", "--model", "m", "--method", "reinforcement", "--grader", "{}/deep.json"],
     ("deep.json is not valid JSON here: nested too deeply",)),
    (["pull", DEFAULT_MODEL, "--name", "../outside"], ("'../outside'", "not a plain model name")),
    (["generate", DEFAULT_MODEL, "x", "--strategy", "beam", "--num-beams", "100000"], ("at most 64",)),
    # bytes that are not UTF-8 in an argument (Python sees them as lone surrogates)
    (["tokenize", DEFAULT_MODEL, "hi \udcff"], ("not valid UTF-8",)),
    (["generate", DEFAULT_MODEL, "\udcff\udcfe", "--max-new-tokens", "2"], ("prompt is not valid UTF-8",)),
]


@pytest.mark.parametrize(("args", "needles"), CASES, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else "")
@pytest.mark.usefixtures("default_model")  # cases that name it resolve it first: pulled, even in a file run alone
def test_hostile_input_is_one_error_line(files: Path, args: list[str], needles: tuple[str, ...]) -> None:
    assert_user_error(run_cli(*(a.replace("{}", str(files)) for a in args)), *needles)


@pytest.mark.parametrize("run", [
    lambda f: run_cli("data", "prepare", str(f / "train.jsonl"), "--out", str(f / "precious")),
    lambda f: run_cli("merge", str(f / "a-folder"), "--out", str(f / "precious")),
], ids=["data prepare", "merge"])
def test_output_folder_replaced_whole_is_never_a_users_folder(files: Path, run: Callable) -> None:
    """These verbs replace --out whole: a folder that is not their earlier output was deleted."""
    assert_user_error(run(files), "precious already holds other files", "refusing to replace it")
    assert (files / "precious" / "thesis.txt").read_text() == "years of work\n"


@pytest.mark.slow
def test_chat_save_to_a_folder_keeps_the_chat_going(default_model: str, files: Path) -> None:
    saved = files / "chat.json"
    result = run_cli("chat", default_model, "--max-new-tokens", "4",
                     input=f"hi\n/save {files / 'a-folder'}\n/save {saved}\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "a-folder is a folder, not a file" in result.stderr
    assert len(json.loads(saved.read_text())["messages"]) == 2


@pytest.mark.parametrize("damage", ["weights cut short", "a config value of the wrong type"])
def test_a_model_folder_that_does_not_load_is_named(default_model: str, tmp_path: Path, damage: str) -> None:
    """A local folder transformers cannot make a model of: one error line naming the folder, before any answer,
    for every verb that loads a model (here generate; serve and ui load through the same path)."""
    from ownllm.models.resolve import resolve

    source = resolve(default_model).path
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    weights = (source / "model.safetensors").read_bytes()
    if damage == "weights cut short":
        (folder / "model.safetensors").write_bytes(weights[:100_000])
    else:
        (folder / "model.safetensors").write_bytes(weights)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    assert_user_error(run_cli("generate", str(folder), "Hi", "--max-new-tokens", "2"), f"'{folder}' cannot be loaded")
