"""Structured output (issue 14): what a JSON-schema constraint costs in decode speed, and what it buys in validity.

Speed: the same prompts decoded with and without a JSON-schema constraint, at 1 stream (`Engine.generate`) and at 8
(`generate_together`, the scheduler the server runs), in the same process, interleaved, median of --repeats. The
schema asks for a list longer than the token budget, so every constrained row runs the full budget (as the free
rows do with EOS ignored) through realistic JSON: keys, strings, numbers, nesting. Also the grammar's own cost per
token (mask + advance, replayed over the constrained outputs) and the peak RSS.

Validity: one prompt per schema of tests/generate/json_schemas.py (34), each with the schema in a system message
(as the server's response_format hint); greedy, through the batch scheduler; constrained vs the same prompts
unconstrained. Valid = the whole reply parses (json.loads) and validates (jsonschema, formats checked); the
unconstrained replies are also counted leniently (the first ``` fence or {...}/[...] span taken out of the prose).
The load average is printed: on a shared machine, speed is only comparable within one run.

    python bench/structured.py [--model smollm2-135m-instruct] [--tokens 96] [--repeats 3] [--max-new-tokens 160]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/generate/json_schemas.py: the schema set

PROMPTS = [
    "List the employees of a small company as JSON.",
    "Give the staff directory of a bakery in JSON.",
    "Write the team roster of a football club as JSON.",
    "List the crew of a ship in JSON.",
    "Give the people working in a library, as JSON.",
    "List the members of a band in JSON.",
    "Write the staff of a hospital ward as JSON.",
    "List the teachers of a school as JSON.",
]
# Longer than any budget here: the rows never finish early, so both sides decode the same number of tokens.
STAFF = {"type": "array", "minItems": 1000, "items": {
    "type": "object",
    "properties": {"name": {"type": "string"}, "role": {"enum": ["manager", "engineer", "cook", "clerk"]},
                   "age": {"type": "integer", "minimum": 16, "maximum": 99},
                   "skills": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["name", "role", "age", "skills"], "additionalProperties": False}}


def run_rows(engine: Any, rows: list[tuple[list[int], Any]], max_batch: int = 16) -> list[Any]:
    """Each (prompt ids, params) row through one BatchScheduler, run in this thread: every row its own params."""
    from ownllm.generate.batching import BatchScheduler, Request
    from ownllm.generate.engine import Completion

    results: list[Any] = [None] * len(rows)

    def keep(index: int) -> Any:
        def sink(event: Any) -> None:
            if isinstance(event, Completion | BaseException):
                results[index] = event
        return sink

    longest = max(len(ids) + params.max_new_tokens for ids, params in rows)
    scheduler = BatchScheduler(engine, max_batch=min(max_batch, len(rows)), max_queue=len(rows), max_len=longest)
    scheduler.submit_all([Request(ids, params, 0, keep(i)) for i, (ids, params) in enumerate(rows)])
    scheduler.run_until_done()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def speed(engine: Any, tokens: int, repeats: int) -> dict[str, Any]:
    from ownllm.generate.batching import generate_together
    from ownllm.generate.constraints import Constraint
    from ownllm.generate.params import SamplingParams

    ids = [engine.render_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    constraint = Constraint.json_schema(STAFF)
    engine.check_constraint(constraint)  # compiled once, before any timing
    free = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    bound = SamplingParams(max_new_tokens=tokens, constraint=constraint)
    generate_together(engine, ids[:2], SamplingParams(max_new_tokens=4, ignore_eos=True), [0, 0])  # warm-up
    engine.generate(ids[0], SamplingParams(max_new_tokens=4, constraint=constraint))
    timings: dict[str, list[float]] = {k: [] for k in ("1 free", "1 json", "8 free", "8 json")}
    outputs: list[Any] = []
    for _ in range(repeats):
        for label, params in (("free", free), ("json", bound)):
            started = time.perf_counter()
            single = engine.generate(ids[0], params)
            timings[f"1 {label}"].append(single.completion_tokens / (time.perf_counter() - started))
            started = time.perf_counter()
            batch = generate_together(engine, ids, params, [0] * len(ids))
            timings[f"8 {label}"].append(sum(c.completion_tokens for c in batch) / (time.perf_counter() - started))
            if label == "json":
                assert all(c.finish_reason == "length" and c.completion_tokens == tokens for c in batch)
                outputs = [single, *batch]
    medians = {k: statistics.median(v) for k, v in timings.items()}
    return {"tok_s": medians, "mask_us": grammar_cost(engine, constraint, outputs),
            "sample": outputs[1].text[:160]}


def grammar_cost(engine: Any, constraint: Any, outputs: list[Any]) -> float:
    """Microseconds per token of the grammar's own work (mask, its unpacking, advance), replayed alone."""
    width = engine.vocab_size
    steps, started = 0, time.perf_counter()
    for completion in outputs:
        state = engine.grammars.start(constraint)
        for token in completion.token_ids:
            state.allowed(width)
            state.advance(token)
            steps += 1
    return (time.perf_counter() - started) / steps * 1e6


def validity(engine: Any, max_new_tokens: int) -> dict[str, Any]:
    import jsonschema

    from ownllm.generate.constraints import Constraint
    from ownllm.generate.params import SamplingParams
    from tests.generate.json_schemas import SCHEMAS

    def prompt_ids(prompt: str, schema: dict[str, Any]) -> list[int]:
        hint = ("Reply with a single JSON object that follows this JSON schema, and nothing else: "
                f"{json.dumps(schema)}")
        return engine.render_chat([{"role": "system", "content": hint}, {"role": "user", "content": prompt}])

    def valid(schema: dict[str, Any], text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        checker = jsonschema.Draft202012Validator(schema,
                                                  format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        return checker.is_valid(value)

    def leniently_valid(schema: dict[str, Any], text: str) -> bool:
        fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
        span = re.search(r"[{\[].*[}\]]", text, re.DOTALL)
        candidates = [text.strip()] + [m.group(1 if m is fenced else 0).strip() for m in (fenced, span) if m]
        return any(valid(schema, candidate) for candidate in candidates)

    report: dict[str, Any] = {"schemas": len(SCHEMAS)}
    for label in ("unconstrained", "constrained"):
        rows = []
        for _, prompt, schema, *_ in SCHEMAS:
            constraint = Constraint.json_schema(schema) if label == "constrained" else None
            rows.append((prompt_ids(prompt, schema), SamplingParams(max_new_tokens=max_new_tokens,
                                                                    constraint=constraint)))
        started = time.perf_counter()
        replies = run_rows(engine, rows)
        flags = [valid(schema, reply.text) for (_, _, schema, *_), reply in zip(SCHEMAS, replies, strict=True)]
        lenient = [leniently_valid(schema, reply.text) for (_, _, schema, *_), reply in zip(SCHEMAS, replies,
                                                                                           strict=True)]
        finished = [r.finish_reason == "stop" for r in replies]
        report[label] = {"valid": sum(flags), "lenient": sum(lenient), "cut_by_length": finished.count(False),
                         "finished_valid": sum(f and ok for f, ok in zip(finished, flags, strict=True)),
                         "finished": sum(finished),
                         "seconds": round(time.perf_counter() - started, 1),
                         "invalid": [name for (name, *_), ok in zip(SCHEMAS, flags, strict=True) if not ok]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per row in the speed runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=160, help="budget per reply in the validity runs")
    args = parser.parse_args()

    from ownllm.generate.open import open_engine
    from ownllm.models.pull import pull

    pull(args.model)
    engine = open_engine(args.model, backend="transformers", dtype="fp32")
    print(f"{args.model} ({engine.backend}, {engine.batching_mode()[1]}), {args.tokens} tokens per row, "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    fast = speed(engine, args.tokens, args.repeats)
    tok_s = fast["tok_s"]
    for streams in (1, 8):
        free, bound = tok_s[f"{streams} free"], tok_s[f"{streams} json"]
        print(f"  {streams} stream(s): {free:7.1f} tok/s free, {bound:7.1f} tok/s with the JSON schema: "
              f"{bound / free:.3f}x ({(1 - bound / free) * 100:+.1f}% overhead)")
    print(f"  grammar work alone: {fast['mask_us']:.0f} µs per token (mask + advance); load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  a constrained row: {fast['sample']!r}")
    checked = validity(engine, args.max_new_tokens)
    for label in ("unconstrained", "constrained"):
        row = checked[label]
        print(f"  validity {label}: {row['valid']}/{checked['schemas']} valid ({row['lenient']} with the JSON picked "
              f"out of the prose), {row['finished_valid']}/{row['finished']} of the replies that finished; "
              f"{row['cut_by_length']} cut by max-new-tokens; {row['seconds']} s; invalid: "
              f"{', '.join(row['invalid']) or 'none'}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS {peak:.0f} MiB")
    server = shutil.which("llama-server")
    print(f"  llama-server --jinja: {'found at ' + server + ' (not compared here)' if server else 'not installed'}")


if __name__ == "__main__":
    main()
