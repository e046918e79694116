"""The JSON-schema leaf's regex size check: patterns llguidance's lexer cannot build are refused before generation,
ordinary ones pass (review: `^(a{1000}){1000}$` in a tool's parameters failed at the reply's first token)."""

from __future__ import annotations

import pytest

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint, one_line
from ownllm.json_schema import MAX_PATTERN_SIZE, oversized_pattern, pattern_problem, pattern_size


@pytest.mark.parametrize(("pattern", "size"), [
    ("a{3}", 3), ("(ab){2,5}", 10), ("a*", 1), ("^[0-9]{1,8}$", 8), ("x|yz", 3), ("(?=ab)c", 3),
    ("^(a{1000}){1000}$", 1_000_000), ("^(0|[1-9][0-9]{0,8})( ?[-+*/] ?(0|[1-9][0-9]{0,8})){1,6}$", 88),
    ("((", 0), ("[\\]a]{4}", 4), ("(?i:ab){3}", 6), ("a{1000,}", 1000),
    # the second review's ways around a check that read patterns with Python's parser: syntax Python refuses or
    # reads otherwise than llguidance (Rust) does, and a count past Python's range
    ("a{1000}{1000}", 1_000_000), ("(?<n>a{1000}){1000}", 1_000_000), ("(a{1000}){1000 }", 1_000_000),
    ("(?U)a{5}", 5), ("\\p{L}{7}", 7), ("a{4294967295}", 4_294_967_295),
    # the third review's: verbose mode, where whitespace and #-comments are no part of the pattern, and any
    # whitespace Rust skips inside a count
    ("(?x)(a{1000}) {1 0 0 0}", 1_000_000), ("(?x:(a{10}) # {5}\n{1000})", 10_000), ("(?x)[ ]{3}", 3),
    ("(a{1000}){\u00a01000}", 1_000_000), ("(a{1000}){1000\u3000}", 1_000_000), ("a b{3}", 5),
    ("a{" + "9" * 5000 + "}", 5003),  # more digits than any count llguidance takes: text
])
def test_a_pattern_counts_its_repeats_written_out(pattern: str, size: int) -> None:
    assert pattern_size(pattern) == size


def test_groups_nested_past_pythons_recursion_are_a_problem_not_a_crash() -> None:
    assert pattern_problem("(" * 5000 + "a" + ")" * 5000) == "a pattern nests its groups too deeply"


def test_an_oversized_pattern_is_found_anywhere_in_a_schema() -> None:
    huge = f"^a{{{MAX_PATTERN_SIZE + 1}}}$"
    assert oversized_pattern({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]{1,9}$"}}}) \
        is None
    assert "too large" in oversized_pattern({"anyOf": [{"type": "string"}, {"type": "string", "pattern": huge}]})
    assert "too large" in oversized_pattern({"type": "object", "patternProperties": {huge: {}}})
    assert oversized_pattern({"type": "object", "properties": {"pattern": {"type": "string"}}}) is None
    assert oversized_pattern({"type": "string", "maxLength": 10**8}) is None  # a length limit is no pattern
    # a property or definition named like a keyword is still a schema (third review)
    assert "too large" in oversized_pattern({"type": "object", "properties": {"const": {"pattern": huge}}})
    assert "too large" in oversized_pattern({"$defs": {"default": {"pattern": huge}}, "$ref": "#/$defs/default"})
    # data that happens to hold a "pattern" key is no regex
    assert oversized_pattern({"const": {"pattern": huge}, "examples": [{"pattern": huge}], "enum": [{"pattern": huge}],
                              "default": {"pattern": huge}}) is None


@pytest.mark.parametrize("constraint", [
    Constraint.regex("(a{1000}){1000}"),
    Constraint.json_schema({"type": "string", "pattern": "^(a{1000}){1000}$"}),
])
def test_constraints_with_an_oversized_pattern_are_refused_up_front(constraint: Constraint) -> None:
    with pytest.raises(OwnLLMError, match="too large: 1,000,000 positions") as error:
        constraint.named("schema").check()
    assert ("maxLength" in str(error.value)) == (constraint.kind == "json_schema")  # a hint only where it applies


def test_llguidance_state_dumps_stay_out_of_messages() -> None:
    problem = 'token 44: lexer error: too many expressions constructed <state> Tokens: 1 "lexer_cost": 3086 ...'
    assert one_line(problem) == "token 44: lexer error: too many expressions constructed"
