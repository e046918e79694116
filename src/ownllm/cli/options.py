"""Options more than one verb takes, declared once (one help text each), and the checks on their values.

Nothing here imports torch or transformers at module level: every verb module imports this one at start-up.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

from ownllm.errors import OwnLLMError

# Set by the root options (--debug, --verbose) before any verb runs.
settings = {"debug": False, "verbose": False}

ModelArg = Annotated[str, typer.Argument(help="alias, pulled name, HF folder, .gguf file or hub id")]
BackendOpt = Annotated[str, typer.Option(help="auto | transformers | llama.cpp")]
DtypeOpt = Annotated[str, typer.Option(help="auto (measured for this machine) | fp32 | bf16 | fp16")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]

# Sampling: a verb's default for max-new-tokens is its own; None elsewhere means "not given" (see sampling_params).
StrategyOpt = Annotated[str | None, typer.Option(help="greedy | sample | beam (default greedy, or sample when a "
                                                      "sampling option is set)")]
NumBeamsOpt = Annotated[int | None, typer.Option(help="beams for --strategy beam")]
TemperatureOpt = Annotated[float | None, typer.Option(help="sampling temperature (0 = greedy)")]
TopKOpt = Annotated[int | None, typer.Option(help="keep the k most likely tokens (0 = all)")]
TopPOpt = Annotated[float | None, typer.Option(help="nucleus: smallest set reaching this mass")]
RepetitionPenaltyOpt = Annotated[float | None, typer.Option(help=">1 discourages repeats")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="most tokens to generate per reply")]
StopOpt = Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")]
SeedOpt = Annotated[int | None, typer.Option(help="seed for sampling (printed when not given)")]


def sampling_params(**options: Any) -> Any:
    """SamplingParams from the sampling options; with no --strategy, a sampling knob given alone means: sample."""
    from ownllm.generate.params import SamplingParams

    if options.get("strategy") is None:
        knobs = ("temperature", "top_k", "top_p")
        options["strategy"] = "sample" if any(options.get(k) is not None for k in knobs) else "greedy"
    return SamplingParams.from_options(**options)


def quiet_model_libraries() -> None:
    """Unless --verbose, keep transformers' info lines and progress bars off the terminal. It imports transformers,
    so only a verb about to load a model calls it, first thing: the other verbs start without torch."""
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

