"""The JSON-schema leaf's regex size check: patterns llguidance's lexer cannot build are refused before generation,
ordinary ones pass (review: `^(a{1000}){1000}$` in a tool's parameters failed at the reply's first token)."""

from __future__ import annotations

import pytest

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint, one_line
from ownllm.json_schema import MAX_PATTERN_SIZE, oversized_pattern, pattern_size


@pytest.mark.parametrize(("pattern", "size"), [
    ("a{3}", 3), ("(ab){2,5}", 10), ("a*", 1), ("^[0-9]{1,8}$", 8), ("x|yz", 3), ("(?=ab)c", 3),
    ("^(a{1000}){1000}$", 1_000_000), ("^(0|[1-9][0-9]{0,8})( ?[-+*/] ?(0|[1-9][0-9]{0,8})){1,6}$", 88),
    ("((", None),  # Python cannot read it: left to llguidance, which names the syntax error
])
def test_a_pattern_counts_its_repeats_written_out(pattern: str, size: int | None) -> None:
    assert pattern_size(pattern) == size


def test_an_oversized_pattern_is_found_anywhere_in_a_schema() -> None:
    huge = f"^a{{{MAX_PATTERN_SIZE + 1}}}$"
    assert oversized_pattern({"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]{1,9}$"}}}) \
        is None
    assert "too large" in oversized_pattern({"anyOf": [{"type": "string"}, {"type": "string", "pattern": huge}]})
    assert "too large" in oversized_pattern({"type": "object", "patternProperties": {huge: {}}})
    assert oversized_pattern({"type": "object", "properties": {"pattern": {"type": "string"}}}) is None
    assert oversized_pattern({"type": "string", "maxLength": 10**8}) is None  # a length limit is no pattern


@pytest.mark.parametrize("constraint", [
    Constraint.regex("(a{1000}){1000}"),
    Constraint.json_schema({"type": "string", "pattern": "^(a{1000}){1000}$"}),
])
def test_constraints_with_an_oversized_pattern_are_refused_up_front(constraint: Constraint) -> None:
    with pytest.raises(OwnLLMError, match="too large: 1,000,000 positions"):
        constraint.named("schema").check()


def test_llguidance_state_dumps_stay_out_of_messages() -> None:
    problem = 'token 44: lexer error: too many expressions constructed <state> Tokens: 1 "lexer_cost": 3086 ...'
    assert one_line(problem) == "token 44: lexer error: too many expressions constructed"
