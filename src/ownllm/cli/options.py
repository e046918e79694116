"""Options more than one verb takes, declared once (one help text each), and the checks on their values.

Nothing here imports torch or transformers at module level: every verb module imports this one at start-up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ownllm.collector import pause_for_start_up
from ownllm.errors import OwnLLMError

# Set by the root options (--debug, --verbose) before any verb runs.
settings = {"debug": False, "verbose": False}

ModelArg = Annotated[str, typer.Argument(help="alias, pulled name, HF folder, .gguf file or hub id")]
BackendOpt = Annotated[str, typer.Option(help="auto | transformers | llama.cpp")]
DtypeOpt = Annotated[str, typer.Option(help="auto (measured for this machine) | fp32 | bf16 | fp16")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
QuantOpt = Annotated[str | None, typer.Option("--quant", help="run quantized (transformers backend, bitsandbytes): "
                                                             "int8 | nf4", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]

# Sampling: a verb's default for max-new-tokens is its own; None elsewhere means "not given" (see sampling_params).
StrategyOpt = Annotated[str | None, typer.Option(help="greedy | sample | beam (default greedy, or sample when a "
                                                      "sampling option is set)")]
NumBeamsOpt = Annotated[int | None, typer.Option(help="beams for --strategy beam")]
TemperatureOpt = Annotated[float | None, typer.Option(help="sampling temperature (0 = greedy)")]
TopKOpt = Annotated[int | None, typer.Option(help="keep the k most likely tokens (0 = all)")]
TopPOpt = Annotated[float | None, typer.Option(help="nucleus: smallest set reaching this mass")]
MinPOpt = Annotated[float | None, typer.Option(help="keep tokens at least this fraction as likely as the best one")]
RepetitionPenaltyOpt = Annotated[float | None, typer.Option(help=">1 discourages repeats")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="most tokens to generate per reply")]
StopOpt = Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")]
SeedOpt = Annotated[int | None, typer.Option(help="seed for sampling (printed when not given)")]

# Constraints on the output (at most one), enforced token by token: see constraint_option.
SchemaOpt = Annotated[Path | None, typer.Option("--schema", help="JSON schema file: the reply is JSON valid against it",
                                                show_default=False)]
RegexOpt = Annotated[str | None, typer.Option("--regex", help="the reply matches this regular expression",
                                              show_default=False)]
GrammarOpt = Annotated[Path | None, typer.Option("--grammar", help="grammar file the reply follows: Lark (.lark) or "
                                                 "GBNF (.gbnf)", show_default=False)]
ChoiceOpt = Annotated[str | None, typer.Option("--choice", help="comma-separated answers: the reply is exactly one",
                                               show_default=False)]


def sampling_params(**options: Any) -> Any:
    """SamplingParams from the sampling options; with no --strategy, a sampling knob given alone means: sample."""
    from ownllm.generate.params import SamplingParams

    if options.get("strategy") is None:
        knobs = ("temperature", "top_k", "top_p", "min_p")
        options["strategy"] = "sample" if any(options.get(k) is not None for k in knobs) else "greedy"
    return SamplingParams.from_options(**options)


def constraint_option(schema: Path | None = None, regex: str | None = None, grammar: Path | None = None,
                      choice: str | None = None) -> Any:
    """The Constraint (ownllm.generate.constraints) that --schema, --regex, --grammar or --choice asks for, or None;
    files are read and the constraint compiled (without the tokenizer) here, before a model loads."""
    constraint = _constraint_option(schema, regex, grammar, choice)
    if constraint is not None:
        constraint.check()
    return constraint


def _constraint_option(schema: Path | None, regex: str | None, grammar: Path | None, choice: str | None) -> Any:
    import json

    from ownllm.data.files import read_text_file
    from ownllm.generate.constraints import Constraint

    given = [f"--{name}" for name, value in (("schema", schema), ("regex", regex), ("grammar", grammar),
                                             ("choice", choice)) if value is not None]
    if len(given) > 1:
        raise OwnLLMError(f"give at most one of --schema, --regex, --grammar and --choice, got {' and '.join(given)}",
                          param=given[0][2:])
    if schema is not None:
        text = read_text_file(schema, param="schema")
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OwnLLMError(f"--schema {schema}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                              param="schema") from None
        if not isinstance(document, dict):
            raise OwnLLMError(f"--schema {schema}: a JSON schema is a JSON object, this file holds a "
                              f"{type(document).__name__}", param="schema")
        try:
            built = Constraint.json_schema(document)
        except OwnLLMError as exc:
            raise OwnLLMError(f"--schema {schema}: {exc.message}", param="schema") from None
        return built.named("schema", f"--schema {schema}")
    if regex is not None:
        if not regex:
            raise OwnLLMError("--regex is empty", param="regex")
        return Constraint.regex(regex).named("regex", "--regex")
    if grammar is not None:
        kinds = {".lark": Constraint.lark, ".gbnf": Constraint.gbnf}
        build = kinds.get(grammar.suffix.lower())
        if build is None:
            raise OwnLLMError(f"--grammar {grammar}: the file name must end in .lark or .gbnf (it says which grammar "
                              "format the file is in)", param="grammar")
        text = read_text_file(grammar, param="grammar")
        if not text.strip():
            raise OwnLLMError(f"--grammar {grammar}: the file is empty", param="grammar")
        return build(text).named("grammar", f"--grammar {grammar}")
    if choice is not None:
        options = [option.strip() for option in choice.split(",")]
        if not all(options):
            raise OwnLLMError(f"--choice {choice!r}: empty answer in the list (write them as a,b,c)", param="choice")
        try:
            return Constraint.choice(options).named("choice", "--choice")
        except OwnLLMError as exc:
            raise OwnLLMError(f"--choice {choice!r}: {exc.message}", param="choice") from None
    return None


def quiet_model_libraries() -> None:
    """Pause the garbage collector until a model's or tokenizer's load begins, or the verb ends
    (ownllm/collector.py: ~20% of the model libraries' import time), then, unless --verbose, keep transformers'
    info lines and progress bars off the terminal. It imports transformers, so only a verb about to load a model
    calls it, first thing: the other verbs start without torch."""
    pause_for_start_up()
    if settings["verbose"]:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def at_least_one(**values: int | None) -> None:
    """Options that count something (tokens, requests, rows): given, each must be at least 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise OwnLLMError(f"{name.replace('_', '-')} must be at least 1, got {value}", param=name)


def finite(**values: float | None) -> None:
    """Float options: inf and nan parse as floats, but mean nothing here."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise OwnLLMError(f"{name.replace('_', '-')} must be a finite number, got {value}", param=name)


def check_url(url: str, param: str = "url", label: str | None = None) -> None:
    """An http(s) URL with a host, before any request goes out (httpx raises on some malformed ones)."""
    import httpx

    label = label or f"--{param.replace('_', '-')}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise OwnLLMError(f"{label} {url!r} is not a valid URL ({exc})", param=param) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise OwnLLMError(f"{label} {url!r} is not an http:// or https:// URL", param=param,
                          hint="e.g. http://127.0.0.1:8000")

