"""Writing evaluation results: JSONL per item, JSON summaries, all atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ownllm.home import atomic_write_json, atomic_write_text


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_results(out: Path, name: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """`out/NAME.jsonl` (one line per item) and `out/NAME.summary.json`."""
    write_jsonl(out / f"{name}.jsonl", rows)
    atomic_write_json(out / f"{name}.summary.json", summary)
