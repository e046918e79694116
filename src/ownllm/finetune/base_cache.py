"""What the base model says does not change between runs: its check scores and replay answers are kept in
$OWNLLM_HOME/finetune-cache, keyed by the model's files, the input's content and how it was asked, so another run
on the same base (another recipe, another fact set, a retry) skips them and often skips loading the base at all.

A damaged or unreadable entry is computed again; a home that cannot be written only loses the saving.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownllm.home import atomic_write_json, keep_quietly, kept_path, kept_tensors

log = logging.getLogger(__name__)

CACHE_FOLDER = "finetune-cache"
CACHE_VERSION = 1  # raise when what is cached (scoring, replay generation) changes meaning


def model_signature(spec: str, dtype: str) -> str:
    """The base model's identity (`files_identity`: where its files are, each file's name, size and modification
    time), plus the dtype and backend that will answer."""
    from ownllm.models.resolve import files_identity

    kind, location, *files = files_identity(spec)
    llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    return json.dumps([CACHE_VERSION, kind, location, files, dtype, llama_cpp])


def remembered_together(kind: str, signatures: dict[str, str], compute: Callable[[list[str]], dict[str, Any]],
                        valid: Callable[[Any], bool] = lambda value: True) -> dict[str, Any]:
    """{name: value} for named values best computed in one go (one batch of generation for several question sets
    or replay prompts): each name's value kept for (`kind`, its signature) where `valid` accepts it (JSON), the rest
    from one call of `compute(names)` with the names no earlier run kept, then kept for next time."""
    values: dict[str, Any] = {}
    for name, signature in signatures.items():
        path = _entry_path(kind, signature, "json")
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(entry, dict) and entry.get("signature") == signature and "value" in entry \
                    and valid(entry["value"]):
                log.info("reusing the base model's %s from %s", kind, path)
                values[name] = entry["value"]
        except (OSError, ValueError, KeyError):
            pass
    missing = [name for name in signatures if name not in values]
    if missing:
        fresh = compute(missing)
        for name in missing:
            path, record = _entry_path(kind, signatures[name], "json"), {"signature": signatures[name],
                                                                          "value": fresh[name]}
            keep_quietly(kind, lambda path=path, record=record: atomic_write_json(path, record))
            values[name] = fresh[name]
    return {name: values[name] for name in signatures}


def remembered_tensors(kind: str, signature: str, compute: Callable[[], dict[str, Any]],
                       valid: Callable[[dict[str, Any]], bool] = lambda value: True) -> dict[str, Any]:
    """The mapping of names to tensors kept for (`kind`, `signature`) where `valid` accepts it, else `compute()`, kept
    for next time (`ownllm.home.kept_tensors` in the fine-tuning cache)."""
    return kept_tensors(CACHE_FOLDER, kind, signature, compute, valid)


def _entry_path(kind: str, signature: str, suffix: str) -> Path:
    return kept_path(CACHE_FOLDER, kind, signature, suffix)
