"""Reading JSONL the way users need it: every problem named with its file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.data.files import is_wide_text
from ownllm.errors import OwnLLMError


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in the file
    data: dict[str, Any]


def scan_jsonl(path: Path) -> tuple[list[Record], list[str]]:
    """The JSON objects of a JSONL file, and a line-numbered problem for every line that is not one: bytes that
    are not UTF-8, invalid JSON (also nested past the parser's limit, or an integer of thousands of digits), or
    a JSON value that is not an object. Never raises on what the file holds; a UTF-8 byte order mark is skipped,
    a UTF-16/32 file is one problem."""
    if path.is_dir():
        raise OwnLLMError(f"{path} is a folder, not a JSONL file", param="data")
    if not path.is_file():
        raise OwnLLMError(f"no such file: {path}", kind="not_found", param="data")
    records, problems = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path.name} line {number}"
            if number == 1:
                if is_wide_text(raw[:4]):
                    return [], [f"{path.name}: UTF-16 or UTF-32 text, not UTF-8 (save it as UTF-8)"]
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON ({exc.msg})")
                continue
            except RecursionError:
                problems.append(f"{where}: invalid JSON (nested too deeply)")
                continue
            except ValueError as exc:  # an integer past Python's digit limit; the text after ':' is advice
                problems.append(f"{where}: invalid JSON ({str(exc).split(':')[0]})")
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a JSON object, got {type(value).__name__}")
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
