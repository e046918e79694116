"""A short tool-using agent: the official `openai` client against `ownllm serve`, with two real tools.

- `search`: the best passages for a query from an `ownllm rag` document store (a SQLite file on this machine);
- `calculator`: exact arithmetic on whole numbers (+ - * /, fractions kept exact), so the model never has to do
  sums in its head. Called by people (or other models) it also takes ** and parentheses.

The loop is the usual one (OpenAI's function-calling guide, LangGraph's ReAct agent): send the conversation and
the tools; run every call the model makes and send the results back as `tool` messages; stop when it answers in
prose. The server guarantees that each call names a real tool and that its arguments parse and validate against
the tool's JSON schema, so the loop needs no repair code. Each step is printed.

    ownllm rag index examples/rag/docs --store docs.db
    ownllm serve smollm2-135m-instruct &
    python examples/agent/agent.py --store docs.db "How much do two Voltas and one Cargo cost together, in euros?"
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import openai

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "search",
        "description": "Search the company's documents. Returns the passages that best match the query.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "What to look for, in a few words", "maxLength": 120}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly, for example 2 * 3450 + 4900.",
        "parameters": {"type": "object", "properties": {
            "expression": {"type": "string", "description": "Whole numbers joined by + - * /",
                           "maxLength": 80,
                           "pattern": "^(0|[1-9][0-9]{0,8})( ?[-+*/] ?(0|[1-9][0-9]{0,8})){1,6}$"}},
            "required": ["expression"], "additionalProperties": False}}},
]
SYSTEM = ("You answer questions about Lumen Bikes. Look facts up with the search tool; never guess a number. "
          "Use the calculator for any arithmetic. When you have the result, answer in one short sentence.")

_OPERATORS: dict[type, Callable[..., Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """Arithmetic on numbers only: the expression is parsed, never handed to eval(); whole numbers and fractions
    stay exact (999999999 * 999999999 / 3 is 333333332666666667)."""

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or right.denominator != 1):
                raise ValueError("exponents must be whole numbers up to 64")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    try:
        # "0042" is 42 to a person; Python's parser refuses leading zeros
        cleaned = re.sub(r"\b0+(?=\d)", "", expression.replace(",", ""))
        result = value(ast.parse(cleaned, mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, OverflowError) as error:
        return f"error: {error}"
    return str(result.numerator) if result.denominator == 1 else f"{float(result):.10g}"


class Search:
    """The `search` tool: hybrid (vector + BM25) search over an `ownllm rag` store."""

    def __init__(self, store: Path, k: int = 2) -> None:
        from ownllm.rag.index import Index

        self.index, self.k = Index(store), k

    def __call__(self, query: str) -> str:
        hits = self.index.search(query, k=self.k)
        return "\n".join(f"[{Path(hit.chunk.source).name}] {hit.chunk.text}" for hit in hits) or "no results"


def run_agent(client: openai.OpenAI, model: str, question: str, tools: dict[str, Callable[..., str]],
              max_steps: int = 6, plan: list[str] | None = None,
              log: Callable[[str], None] = print) -> tuple[str | None, list[dict[str, Any]]]:
    """Ask `question`, running the tool calls the model makes, until it answers in prose or `max_steps` model
    turns have passed. With a `plan` (tool names), turn i must call plan[i] (the model still writes the arguments)
    and the turn after the plan must answer: small models need that help to chain tools. Returns the answer (None
    when the steps ran out) and the calls made, in order."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    calls: list[dict[str, Any]] = []
    for step in range(1, max_steps + 1):
        response = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, tool_choice=_tool_choice(step, plan),
            parallel_tool_calls=False, temperature=0, max_tokens=160)
        message = response.choices[0].message
        if not message.tool_calls:
            log(f"step {step}: answer: {message.content}")
            return message.content, calls
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for call in message.tool_calls]})
        for call in message.tool_calls:
            arguments = json.loads(call.function.arguments)  # valid JSON for the tool's schema, by construction
            result = tools[call.function.name](**arguments)
            calls.append({"name": call.function.name, "arguments": arguments, "result": result})
            log(f"step {step}: {call.function.name}({json.dumps(arguments)}) -> {_shorten(result)}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    log(f"no answer after {max_steps} steps")
    return None, calls


def _tool_choice(step: int, plan: list[str] | None) -> Any:
    if plan is None:
        # The first turn must use a tool (the answer is in the documents, not in the model); later turns choose.
        # OpenAI's Agents SDK does the same with tool_choice="required" and reset_tool_choice.
        return "required" if step == 1 else "auto"
    if step <= len(plan):
        return {"type": "function", "function": {"name": plan[step - 1]}}
    return "none"


def _quiet_model_libraries() -> None:
    """Keep the embedding model's loading messages (progress bars, bitsandbytes' note) out of the transcript."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _shorten(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--store", type=Path, required=True, help="an `ownllm rag index` store (.db)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--plan", help="tools to call in order, e.g. search,calculator (the model writes the "
                                       "arguments); without it the model chooses")
    args = parser.parse_args(argv)
    names = [tool["function"]["name"] for tool in TOOLS]
    plan = args.plan.split(",") if args.plan else None
    problem = None
    if not args.question.strip():
        problem = "the question is empty"
    elif args.max_steps < 1:
        problem = f"--max-steps must be at least 1, got {args.max_steps}"
    elif plan and any(step not in names for step in plan):
        problem = f"--plan {args.plan!r}: each step must be one of {', '.join(names)}"
    elif not args.store.is_file():
        problem = f"{args.store}: no such document store (make one with `ownllm rag index DOCS --store {args.store}`)"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    _quiet_model_libraries()
    from ownllm.errors import OwnLLMError

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    try:
        answer, _ = run_agent(client, args.model, args.question,
                              {"search": Search(args.store), "calculator": calculate}, args.max_steps, plan=plan)
    except OwnLLMError as error:  # the store is not an ownllm index, or its embedding model is missing
        print(f"error: {error}", file=sys.stderr)
        return 2
    except openai.APIConnectionError:
        print(f"error: no server at {args.base_url} (start one with `ownllm serve {args.model}`)", file=sys.stderr)
        return 2
    except openai.APIStatusError as error:
        detail = error.body.get("message") if isinstance(error.body, dict) else None
        print(f"error: the server said {error.status_code}: {detail or error.message}", file=sys.stderr)
        return 2
    return 0 if answer is not None else 1


if __name__ == "__main__":
    sys.exit(main())
