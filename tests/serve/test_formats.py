"""OpenAI's usage object from engine results."""

from __future__ import annotations

from ownllm.generate.engine import Completion
from ownllm.serve.formats import usage


def done(tokens: int, cached: int) -> Completion:
    return Completion("x" * tokens, list(range(tokens)), "stop", prompt_tokens=0, seed=None, sequence_logprob=0.0,
                      cached_tokens=cached)


def test_a_prompts_cached_tokens_are_the_least_its_choices_got() -> None:
    # a new prompt with n=2: the second choice starts from the first one's KV, which no cache held before
    assert usage(59, [done(3, 0), done(4, 58)], n=2) == {
        "prompt_tokens": 59, "completion_tokens": 7, "total_tokens": 66, "prompt_tokens_details": {"cached_tokens": 0}}
    # two prompts, n=2 each: per prompt, then summed, never above prompt_tokens
    assert usage(100, [done(1, 40), done(1, 49), done(1, 0), done(1, 49)], n=2)["prompt_tokens_details"] == {
        "cached_tokens": 40}
    assert usage(10, [done(1, 9), done(1, 9), done(1, 9)], n=1)["prompt_tokens_details"] == {"cached_tokens": 10}
