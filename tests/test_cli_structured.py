"""`ownllm generate|chat --schema/--regex/--grammar/--choice` (issue 14): one run with the real model whose output
follows the schema, and the bad inputs — each one `error:` line naming the option or file, exit 2, before a model
loads (the constraint compiles without the tokenizer first)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from ownllm.cli import main
from tests.conftest import assert_user_error, run_cli

RATING = {"type": "object", "properties": {"movie": {"enum": ["Alien", "Heat", "Up"]},
                                           "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["movie", "stars"], "additionalProperties": False}


@pytest.mark.slow
def test_generate_with_a_schema_file(default_model: str, tmp_path: Path) -> None:
    schema = tmp_path / "rating.json"
    schema.write_text(json.dumps(RATING))
    result = run_cli("generate", default_model, "Rate a movie as JSON.", "--chat", "--schema", str(schema),
                     "--max-new-tokens", "40", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["finish_reason"] == "stop", reply
    jsonschema.validate(json.loads(reply["text"]), RATING)


@pytest.mark.slow
def test_a_choice_answers_with_one_of_the_list(default_model: str) -> None:
    result = run_cli("generate", default_model, "Is the sky blue? Answer yes or no.", "--chat", "--choice", "yes,no")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("yes", "no")
    assert "finish: stop" in result.stderr and "0.0 tok/s" not in result.stderr  # no rate without decode steps


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (every case fails before a model loads): its exit code and output, as a run."""
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    (tmp_path / "ok.json").write_text(json.dumps(RATING))
    (tmp_path / "broken.json").write_text('{"type": "object",\n "properties": {')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "dangling.json").write_text(json.dumps({"$ref": "#/$defs/Nope"}))
    (tmp_path / "unsupported.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    (tmp_path / "answer.txt").write_text('start: "yes"\n')
    (tmp_path / "bad.lark").write_text("start: undefined_rule\n")
    (tmp_path / "bad.gbnf").write_text("root ::= (\n")
    return tmp_path


@pytest.mark.parametrize(("args", "needles"), [
    (["--schema", "{d}/ok.json", "--choice", "a,b"], ["at most one of", "--schema and --choice"]),
    (["--schema", "{d}/missing.json"], ["no such file", "missing.json"]),
    (["--schema", "{d}/broken.json"], ["--schema", "broken.json", "not valid JSON", "line 2"]),
    (["--schema", "{d}/list.json"], ["list.json", "JSON object"]),
    (["--schema", "{d}/dangling.json"], ["--schema", "dangling.json", "/$defs/Nope"]),
    (["--schema", "{d}/unsupported.json"], ["unsupported.json", "uniqueItems"]),
    (["--grammar", "{d}/answer.txt"], ["answer.txt", ".lark or .gbnf"]),
    (["--grammar", "{d}/bad.lark"], ["bad.lark", "undefined_rule"]),
    (["--grammar", "{d}/bad.gbnf"], ["bad.gbnf", "GBNF"]),
    (["--regex", "[0-9"], ["--regex", "regular expression"]),
    (["--choice", "a,,b"], ["--choice", "empty answer"]),
    (["--choice", "a,a"], ["--choice", "twice"]),
    (["--choice", "a,b", "--strategy", "beam"], ["beam search", "--choice"]),
])
@pytest.mark.parametrize("verb", ["generate", "chat"])
def test_bad_constraint_options(capsys: pytest.CaptureFixture[str], inputs: Path, verb: str, args: list[str],
                                needles: list[str]) -> None:
    prompt = ["a prompt"] if verb == "generate" else []
    expanded = [arg.replace("{d}", str(inputs)) for arg in args]
    result = in_process(capsys, verb, "no-such-model-is-loaded", *prompt, *expanded)
    assert_user_error(result, *needles)
