"""OpenAI reinforcement graders as reward functions: templates, operations, fuzzy similarity, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.finetune.graders import grader_problem
from ownllm.finetune.rewards import load_reward, validate_rewards
from tests.conftest import deeply_nested

CHECK = {"type": "string_check", "name": "city", "input": "{{ sample.output_text }}", "reference": "{{item.answer}}",
         "operation": "ilike"}


def reward_for(grader: dict, tmp_path: Path):
    path = tmp_path / "grader.json"
    path.write_text(json.dumps(grader))
    return load_reward(f"openai-grader:{path}")


def test_string_check_and_text_similarity_score_like_openai(tmp_path: Path) -> None:
    completions = ["It is Paris.", "Lyon", [{"role": "assistant", "content": "PARIS"}]]
    columns = {"answer": ["paris", "Paris", "Paris"]}
    assert reward_for(CHECK, tmp_path)(prompts=["q"] * 3, completions=completions, **columns) == [1.0, 0.0, 1.0]
    eq = reward_for({**CHECK, "operation": "eq", "input": "{{sample.output_text}}"}, tmp_path)
    assert eq(prompts=["q"] * 3, completions=completions, **columns) == [0.0, 0.0, 0.0]
    nested = reward_for({**CHECK, "operation": "like", "reference": "{{item.meta.city}}"}, tmp_path)
    assert nested(prompts=["q"], completions=["in Rome"], meta=[{"city": "Rome"}]) == [1.0]
    similar = reward_for({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                          "evaluation_metric": "fuzzy_match"}, tmp_path)
    same, close, far = similar(prompts=["q"] * 3, completions=["Paris", "Pariss", "xyz"], answer=["Paris"] * 3)
    assert same == 1.0 and 0.8 < close < 1.0 and far < 0.3


def test_graders_ownllm_cannot_run_are_refused_with_a_reason(tmp_path: Path) -> None:
    assert grader_problem({"type": "python", "source": "print(1)"})[1].startswith("python graders run the request's")
    assert grader_problem({"type": "score_model"})[0] == "type"
    assert grader_problem({**CHECK, "operation": "glob"}) == ("operation", "must be one of eq, ne, like, ilike")
    assert grader_problem({**CHECK, "input": "{{sample.output_json}}"})[0] == "input"
    assert grader_problem({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "x",
                           "evaluation_metric": "bleu"})[0] == "evaluation_metric"
    assert grader_problem(CHECK) is None
    with pytest.raises(OwnLLMError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_reward(f"openai-grader:{tmp_path / 'bad.json'}")


def test_a_field_the_grader_reads_must_be_on_every_line(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "x"}, {"prompt": "b"}]
    with pytest.raises(OwnLLMError, match=r"data\.jsonl line 7: needs 'answer'"):
        validate_rewards([reward_for(CHECK, tmp_path)], rows, ["data.jsonl line 3", "data.jsonl line 7"])


def test_malformed_templates_and_types_are_refused_up_front() -> None:
    for grader, field in (({**CHECK, "type": ["string_check"]}, "type"), ({**CHECK, "reference": "{{item.}}"},
                          "reference"), ({**CHECK, "reference": "{{item.a..b}}"}, "reference"),
                          ({**CHECK, "reference": "{{item-answer}}"}, "reference"),
                          ({**CHECK, "input": "{{sample.output_text}} {{ bogus"}, "input"),
                          ({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "x",
                            "evaluation_metric": "fuzzy_match", "pass_threshold": float("inf")}, "pass_threshold")):
        assert grader_problem(grader)[0] == field, grader


def test_a_field_whose_type_changes_between_lines_is_named(tmp_path: Path) -> None:
    from ownllm.finetune.grpo import as_table, load_prompts

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "answer": "x"}\n{"prompt": "b", "answer": 5}\n')
    with pytest.raises(OwnLLMError, match=r"mixed\.jsonl line 2: 'answer' is a number, but text on line 1"):
        load_prompts(mixed)
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"prompt": "a", "meta": {"n": 1}}\n{"prompt": "b", "meta": {"n": "x"}}\n')
    with pytest.raises(OwnLLMError, match=r"nested\.jsonl: its fields do not form one table"):
        as_table(load_prompts(nested), nested)


def test_unknown_fields_and_single_brace_fields_are_refused(tmp_path: Path) -> None:
    assert grader_problem({**CHECK, "extra": deeply_nested(600)}) == (  # nothing unchecked is stored with a job
        "extra", "is not a field of a string_check grader (its fields: type, name, input, reference, operation)")
    assert grader_problem({**CHECK, "reference": "{item.answer}"}) == (
        "reference", "{item.answer} has single braces: a field is written {{item.answer}}")
    assert grader_problem({**CHECK, "reference": "{ sample.output_text } and {{item.answer}}"})[0] == "reference"
    assert grader_problem({**CHECK, "reference": "{literal} {{item.answer}}"}) is None  # braces that are no field
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(OwnLLMError, match="nested too deeply"):
        load_reward(f"openai-grader:{tmp_path / 'deep.json'}")
