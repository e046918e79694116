"""`ownllm data check|prepare`: the data doctor, before any training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import JsonOpt, at_least_one, quiet_model_libraries
from ownllm.errors import OwnLLMError

FormatOpt = Annotated[str | None, typer.Option("--format", help="chat | sharegpt | alpaca | completion | "
                                                                "preference | text (default: detected)")]


def check(
    data: Annotated[Path, typer.Argument(help="a JSONL file, or a .txt/.md file or folder")],
    fmt: FormatOpt = None,
    model: Annotated[str | None, typer.Option(help="tokenizer and chat template for token statistics")] = None,
    max_length: Annotated[int, typer.Option(help="examples longer than this would be truncated")] = 2048,
    timing: Annotated[bool, typer.Option(help="measure a training step to estimate time per epoch")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Report every problem by line, token statistics, duplicates and an estimated training time.
    Exit code 2 when nothing in the file is usable."""
    from ownllm.cli.render import out
    from ownllm.data.doctor import check as check_data

    at_least_one(max_length=max_length)
    if model is not None:  # only --model loads a tokenizer (and, with --timing, a model)
        quiet_model_libraries()
    report, examples = check_data(data, fmt=fmt, model=model, max_length=max_length, measure_speed=timing)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        out.print(f"{report.file}: format {report.format}, {report.examples} usable examples, "
                  f"{len(report.problems)} unusable lines")
        for problem in report.problems[:50]:
            out.print(f"  [red]error[/red] {problem}")
        for warning in report.warnings:
            out.print(f"  [yellow]warning[/yellow] {warning}")
        for line, first in report.exact_duplicates[:20]:
            out.print(f"  [yellow]duplicate[/yellow] line {line} repeats line {first}")
        for line, first in report.near_duplicates[:20]:
            out.print(f"  [yellow]near-duplicate[/yellow] line {line} ~ line {first}")
        if report.tokens:
            t = report.tokens
            out.print(f"  tokens per example: min {t['min']}, mean {t['mean']}, p95 {t['p95']}, max {t['max']}; "
                      f"{t['total_per_epoch']} per epoch")
        if report.estimated_seconds_per_epoch is not None:
            out.print(f"  measured {report.measured_tokens_per_second} training tokens/s here: about "
                      f"{report.estimated_seconds_per_epoch / 60:.1f} min per epoch")
    if not examples:
        first = f" (first problem: {report.problems[0]})" if report.problems else ""
        raise OwnLLMError(f"{data}: no usable examples{first}", param="data")


def prepare(
    data: Annotated[Path, typer.Argument()],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for train.jsonl, validation.jsonl, report.json")],
    fmt: FormatOpt = None,
    val_ratio: Annotated[float, typer.Option(help="share held out for validation")] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    near_threshold: Annotated[float, typer.Option(help="MinHash Jaccard similarity that counts as a duplicate")
                              ] = 0.85,
) -> None:
    """Clean, deduplicate (before splitting), split; written atomically with a report of what was dropped."""
    from ownllm.cli.render import out
    from ownllm.data.doctor import prepare as prepare_data
    from ownllm.data.files import check_output_folder

    if not 0 < near_threshold <= 1:
        raise OwnLLMError(f"near-threshold must be in (0, 1], got {near_threshold}", param="near_threshold")
    check_output_folder(out_dir, param="out", replaces="report.json")  # replaced whole: never a user's folder
    report = prepare_data(data, out_dir, fmt=fmt, val_ratio=val_ratio, seed=seed, near_threshold=near_threshold)
    dropped = report["dropped"]
    out.print(f"{report['kept']} kept of {report['read']} ({len(dropped['unusable'])} unusable, "
              f"{len(dropped['exact_duplicates'])} exact and {len(dropped['near_duplicates'])} near duplicates "
              f"dropped): {report['train']} train, {report['validation']} validation in {out_dir}")
