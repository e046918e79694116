"""Sampling parameters: one typed record used by the CLI, the Python API and (later) the server."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ownllm.errors import OwnLLMError
from ownllm.generate.constraints import Constraint

Strategy = Literal["greedy", "sample", "beam"]
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # any int64 (OpenAI's type) or uint64 (what torch's generators take)
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's own limit
MAX_BEAMS = 64  # each beam is a full sequence in memory; past this beam search only burns time
GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM: logits / 1e-40 overflow float32, and the draw is argmax anyway


def reduce_seed(seed: int) -> int:
    """Map any seed in SEED_RANGE (and seed + choice index past its top) onto torch's uint64 seed space."""
    return seed % (1 << 64)


@dataclass
class SamplingParams:
    """How to pick each next token.

    Args:
        strategy: greedy (argmax), sample (temperature / top-k / top-p), or beam (beam search).
        max_new_tokens: most tokens to generate.
        temperature: divides the logits before sampling; 0 means greedy.
        top_k: keep only the k most likely tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches p (1 keeps all).
        min_p: keep only tokens at least this fraction as likely as the most likely one, after top-k and top-p
            (0 keeps all; as in transformers, vLLM and llama.cpp).
        repetition_penalty: >1 makes tokens already in the context less likely (HF's definition).
        presence_penalty: subtracted from the logit of every token already generated (OpenAI's definition).
        frequency_penalty: subtracted once per earlier occurrence in the generated text (OpenAI's definition).
        num_beams: beams for beam search.
        stop: strings that end generation; they are not part of the output.
        seed: makes sampling reproducible; None picks one and reports it.
        logprobs: also return the top-N log-probabilities of each generated token (None: none).
        prompt_logprobs: also return each prompt token's log-probability given the tokens before it, with the
            top-N at its position (None: none; OpenAI's echo with logprobs, vLLM's prompt_logprobs). The prompt
            is then computed in full: the prefix cache gives it nothing, since its positions' logits are needed.
        explain: record, for each step, a table of the top-N candidates through every filter.
        ignore_eos: keep generating past the end-of-sequence token (benchmarks).
        logit_bias: token id -> value in [-100, 100] added to that token's logit before any choice
            (OpenAI's definition; -100 bans a token, 100 all but forces it).
        constraint: what the output must be (a JSON schema, regex, grammar or choice: `Constraint`); the sampler
            picks only tokens it allows, and the sequence ends ("stop") when it is complete. Checked (compiled)
            by `Engine.check_request` before any generation; beam search cannot follow one.
    """

    strategy: Strategy = "greedy"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_beams: int = 4
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    explain: int = 0
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                problems.append((name, f"{name.replace('_', '-')} must be a finite number, got {value!r}"))
        if problems:  # the range checks below assume numbers
            raise OwnLLMError("; ".join(msg for _, msg in problems), param=problems[0][0])
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            problems.append(("seed", f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, "
                                     f"got {self.seed!r}"))
        problems += _logit_bias_problems(self.logit_bias)
        if self.strategy not in ("greedy", "sample", "beam"):
            problems.append(("strategy", f"strategy must be greedy, sample or beam, got '{self.strategy}'"))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(("max_new_tokens", f"max-new-tokens must be at least 1, got {self.max_new_tokens}"))
        if self.temperature < 0:
            problems.append(("temperature", f"temperature must be >= 0, got {self.temperature}"))
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", f"top-p must be in (0, 1], got {self.top_p}"))
        if not 0 <= self.min_p <= 1:
            problems.append(("min_p", f"min-p must be between 0 and 1, got {self.min_p}"))
        if self.top_k < 0:
            problems.append(("top_k", f"top-k must be >= 0, got {self.top_k}"))
        if not 1 <= self.num_beams <= MAX_BEAMS:
            problems.append(("num_beams", f"num-beams must be at least 1 and at most {MAX_BEAMS}, "
                                          f"got {self.num_beams}"))
        if self.repetition_penalty <= 0:
            problems.append(
                ("repetition_penalty", f"repetition-penalty must be > 0, got {self.repetition_penalty}")
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append((name, f"{name.replace('_', '-')} must be between -2 and 2, got {getattr(self, name)}"))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20):
                problems.append((name, f"{name.replace('_', '-')} must be between 0 and 20, got {value!r}"))
        if self.explain < 0:
            problems.append(("explain", f"explain must be >= 0, got {self.explain}"))
        if any(not s for s in self.stop):
            problems.append(("stop", "stop strings must not be empty"))
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            problems.append(("constraint", f"constraint must be a Constraint (ownllm.generate.constraints), got "
                                           f"{type(self.constraint).__name__}"))
        elif self.constraint is not None and self.strategy == "beam":
            problems.append(("strategy", f"beam search cannot follow a constraint (the {self.constraint.description}"
                                         f" in {self.constraint.where}): use greedy or sample"))
        if problems:
            raise OwnLLMError("; ".join(msg for _, msg in problems), param=problems[0][0])
        if self.strategy == "sample" and self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.strategy = "greedy"  # OpenAI's convention: temperature 0 is greedy decoding

    def seed_for(self, index: int = 0) -> int:
        """The seed of choice `index` (n > 1 and batches: seed + index, so each row is reproducible alone), in
        torch's seed space; a fresh random one when no seed was given (reported back with the result)."""
        if self.seed is None:
            return int.from_bytes(os.urandom(4), "little")
        return reduce_seed(self.seed + index)

    @classmethod
    def from_options(cls, **options: Any) -> SamplingParams:
        """Build from keyword options, ignoring those left as None; unknown names are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise OwnLLMError(f"unknown generation option(s): {', '.join(sorted(unknown))}",
                              hint=f"known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in options.items() if v is not None})


def _logit_bias_problems(bias: dict[int, float]) -> list[tuple[str, str]]:
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        return [("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(bias)}")]
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            return [("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got {token!r}")]
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            return [("logit_bias", f"logit_bias values must be numbers from -100 to 100, got {value!r} for "
                                   f"token {token}")]
    return []
