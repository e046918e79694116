"""`ownllm generate`, `ownllm chat`, `ownllm tokenize`: run a model on text, see how it reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import (
    BackendOpt,
    ChoiceOpt,
    DeviceOpt,
    DtypeOpt,
    GrammarOpt,
    JsonOpt,
    MaxNewTokensOpt,
    MinPOpt,
    ModelArg,
    NumBeamsOpt,
    QuantOpt,
    RegexOpt,
    RepetitionPenaltyOpt,
    SchemaOpt,
    SeedOpt,
    StopOpt,
    StrategyOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    constraint_option,
    finite,
    quiet_model_libraries,
    sampling_params,
)
from ownllm.errors import OwnLLMError


def _read_text(text: str | None, file: Path | None, what: str) -> str:
    """The text argument, else --file, else stdin ('-' or nothing)."""
    if file is not None:
        from ownllm.data.files import read_text_file

        return read_text_file(file, param="file")
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise OwnLLMError(f"no {what} given", param=what, hint="pass it as an argument, --file or stdin")
        return sys.stdin.read()
    return text


def tokenize(
    model: ModelArg,
    text: Annotated[str | None, typer.Argument(help="text to tokenize ('-' or nothing: stdin)")] = None,
    file: Annotated[Path | None, typer.Option(help="read the text from a file")] = None,
    price_per_1m: Annotated[float | None, typer.Option(help="price per 1M tokens, to print a cost")] = None,
    show_tokens: Annotated[bool, typer.Option(help="list every token")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Show how a model's tokenizer splits a text, with counts and cost."""
    content = _read_text(text, file, "text")
    finite(price_per_1m=price_per_1m)
    if price_per_1m is not None and price_per_1m < 0:
        raise OwnLLMError("price-per-1m must be >= 0", param="price_per_1m")
    quiet_model_libraries()
    from ownllm.cli.render import out, token_summary, token_table
    from ownllm.models.load import load_tokenizer
    from ownllm.models.tokens import token_report

    report = token_report(load_tokenizer(model), content, price_per_1m=price_per_1m)
    if as_json:
        out.print_json(data=report.as_dict())
        return
    if show_tokens:
        out.print(token_table(report))
    out.print(token_summary(report))


def generate(
    model: ModelArg,
    prompt: Annotated[str | None, typer.Argument(help="the prompt ('-' or nothing: stdin)")] = None,
    file: Annotated[Path | None, typer.Option(help="read the prompt from a file")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt as a user turn in the chat template")] = False,
    strategy: StrategyOpt = None,
    num_beams: NumBeamsOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they come")] = False,
    explain: Annotated[int, typer.Option(help="show the top-N candidates and every filter at each step")] = 0,
    logprobs: Annotated[int | None, typer.Option(help="return the top-N logprobs per token")] = None,
    schema: SchemaOpt = None,
    regex: RegexOpt = None,
    grammar: GrammarOpt = None,
    choice: ChoiceOpt = None,
    as_json: JsonOpt = False,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    quant: QuantOpt = None,
) -> None:
    """Generate text, with any decoding strategy, and optionally see each step's probabilities. --schema, --regex,
    --grammar or --choice make the output follow a JSON schema, a pattern, a grammar or a list of answers."""
    text = _read_text(prompt, file, "prompt")
    if not text.strip():
        raise OwnLLMError("the prompt is empty", param="prompt")
    params = sampling_params(strategy=strategy, num_beams=num_beams, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                             max_new_tokens=max_new_tokens,
                             stop=stop or None, seed=seed, explain=explain, logprobs=logprobs,
                             constraint=constraint_option(schema, regex, grammar, choice))
    quiet_model_libraries()
    from ownllm.cli.render import completion_json, err, explanation_table, out
    from ownllm.generate.engine import Completion
    from ownllm.generate.open import open_engine

    engine = open_engine(model, backend=backend, dtype=dtype, device=device, quant=quant)
    if params.constraint is not None:
        engine.check_constraint(params.constraint)
    conversation = [{"role": "user", "content": text}]
    source = engine.render_with_recall(conversation, max_new_tokens=params.max_new_tokens) if chat else text
    completion: Completion | None = None
    for event in engine.stream(source, params, adapter=engine.route(conversation if chat else text)):
        if isinstance(event, Completion):
            completion = event
        elif stream and not as_json and event.text:
            out.print(event.text, end="", soft_wrap=True)
            out.file.flush()
    assert completion is not None
    if as_json:
        out.print_json(json.dumps(completion_json(completion)))
        return
    if completion.explanations:
        temp = params.temperature if params.strategy == "sample" else 1.0
        for index, step in enumerate(completion.explanations):
            out.print(explanation_table(index, step, temp, params.min_p))
    if not stream:
        out.print(completion.text, soft_wrap=True, end="")
    out.print()
    seed_note = f", seed {completion.seed}" if completion.seed is not None else ""
    count = completion.completion_tokens
    # the rate is of decode steps, after the first token: a one-token reply (a --choice answer) has none
    rate = f", {completion.tokens_per_second:.1f} tok/s" if count > 1 else ""
    err.print(f"[dim]{count} token{'s' if count != 1 else ''}{rate}, "
              f"finish: {completion.finish_reason}, {engine.backend}{seed_note}[/dim]")
    if params.constraint is not None and completion.finish_reason == "length":
        err.print(f"[yellow]max-new-tokens ran out before the output was complete: it does not follow "
                  f"{params.constraint.where} yet (raise --max-new-tokens)[/yellow]")


def chat(
    model: ModelArg,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    strategy: StrategyOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    seed: SeedOpt = None,
    schema: SchemaOpt = None,
    regex: RegexOpt = None,
    grammar: GrammarOpt = None,
    choice: ChoiceOpt = None,
    backend: BackendOpt = "auto",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    quant: QuantOpt = None,
) -> None:
    """Chat with streaming replies. Commands: /reset, /save FILE, /exit. Also reads turns from a pipe. --schema,
    --regex, --grammar or --choice constrain every reply."""
    params = sampling_params(strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                             seed=seed,
                             constraint=constraint_option(schema, regex, grammar, choice))
    quiet_model_libraries()
    from ownllm.cli.render import err, out
    from ownllm.data.files import check_output_file
    from ownllm.generate.chat import ChatSession
    from ownllm.generate.engine import Completion, TextDelta
    from ownllm.generate.open import open_engine

    engine = open_engine(model, backend=backend, dtype=dtype, device=device, quant=quant)
    if params.constraint is not None:
        engine.check_constraint(params.constraint)
    session = ChatSession(engine=engine, system=system, params=params)
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"[dim]{engine.name} ({engine.backend}), context {engine.context_length} tokens. "
                  "/reset, /save FILE, /exit[/dim]")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            err.print("[dim]history cleared[/dim]")
            continue
        if line.startswith("/save"):
            target = line.removeprefix("/save").strip()
            if not target:
                err.print("usage: /save FILE")
                continue
            try:
                check_output_file(Path(target))
            except OwnLLMError as exc:  # a bad path must not end the chat (and lose the conversation)
                err.print(f"error: {exc}", markup=False, highlight=False)
                continue
            session.save(Path(target))
            err.print(f"[dim]saved {len(session.messages())} messages to {target}[/dim]")
            continue
        if not interactive:
            out.print(f"you> {line}")
        out.print("assistant> ", end="")
        for event in session.send(line):
            if isinstance(event, int):
                if event:
                    err.print(f"[yellow][dropped the {event} oldest message(s) to stay within the "
                              f"{engine.context_length}-token context window][/yellow]")
            elif isinstance(event, TextDelta):
                out.print(event.text, end="", soft_wrap=True)
                out.file.flush()
            elif isinstance(event, Completion):
                out.print()
