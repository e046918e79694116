"""Reading JSONL the way users need it: every problem named with its file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    data: dict[str, Any]


def scan_jsonl(path: Path) -> tuple[list[Record], list[str]]:
    """The JSON objects of a JSONL file, and a line-numbered problem for every line that is not one."""
    if not path.is_file():
        raise OwnLLMError(f"no such file: {path}", kind="not_found", param="data")
    records, problems = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} line {number}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(value, dict):
                problems.append(f"{path.name} line {number}: expected a JSON object, got {type(value).__name__}")
                continue
            records.append(Record(number, value))
    return records, problems


def read_jsonl(path: Path) -> list[Record]:
    """All JSON objects in a JSONL file; blank lines are skipped, anything else broken is an error."""
    records, problems = scan_jsonl(path)
    if problems:
        raise OwnLLMError(_summarise(problems), param="data")
    if not records:
        raise OwnLLMError(f"{path} is empty", param="data")
    return records


def fail_if_any(problems: list[str]) -> None:
    if problems:
        raise OwnLLMError(_summarise(problems), param="data")


def _summarise(problems: Iterable[str], shown: int = 5) -> str:
    problems = list(problems)
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more
