"""The data doctor: everything wrong with a training file, by line, before any training starts — and a clean,
deduplicated train/validation split of what is usable.

Checks: invalid JSON, unknown or mixed formats, missing fields, bad roles, empty content, no assistant turn, too
few examples; token statistics with the model's own tokenizer and chat template; examples past `max_length`;
exact and near duplicates (MinHash LSH over word 3-grams); training time from a measured step.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ownllm.data.files import read_text_file
from ownllm.data.formats import FORMATS, Example, Format, detect, normalise
from ownllm.data.jsonl import scan_jsonl
from ownllm.errors import OwnLLMError
from ownllm.home import atomic_folder

MIN_EXAMPLES = 10


@dataclass
class Report:
    file: str
    format: str
    examples: int = 0
    problems: list[str] = field(default_factory=list)  # lines that cannot be used
    warnings: list[str] = field(default_factory=list)
    tokens: dict[str, float] = field(default_factory=dict)  # min / mean / p95 / max / total
    too_long: list[int] = field(default_factory=list)  # lines past max_length
    exact_duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, first seen at)
    near_duplicates: list[tuple[int, int]] = field(default_factory=list)
    estimated_seconds_per_epoch: float | None = None
    measured_tokens_per_second: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_examples(path: Path, fmt: str | None = None) -> tuple[Format, list[Example], list[str]]:
    """All usable examples and the problems with the rest. Text files and folders are plain text. A JSONL file
    with no usable line at all is an error (the CLI's one-line message); `scan_examples` returns it instead."""
    if fmt is not None and fmt not in FORMATS:
        raise OwnLLMError(f"unknown format '{fmt}'", param="format", hint=f"one of {', '.join(FORMATS)}")
    if _is_text(path):
        return _read_text(path)
    records, chosen, examples, problems = _read_jsonl(path, fmt)  # type: ignore[arg-type]
    if not records:
        first = problems[0] if problems else "the file is empty"
        raise OwnLLMError(f"{path}: no usable examples ({len(problems)} bad lines, first: {first})", param="data")
    if chosen is None:
        raise OwnLLMError(f"{path}: no line matches a known format (keys like messages, conversations, "
                          "instruction/output, prompt/completion, prompt/chosen/rejected, text)", param="data")
    return chosen, examples, problems


def scan_examples(path: Path, fmt: Format | None = None) -> tuple[Format | None, list[Example], list[str]]:
    """Like read_examples, but never raising on what is in the file: a file with nothing usable (not JSON, not
    UTF-8, no known format) comes back as no examples and a line-numbered problem per line (the format None when
    no line has one). A server needs that to fail a fine-tuning job with a message instead of retrying it."""
    if _is_text(path):
        return _read_text(path)
    _, chosen, examples, problems = _read_jsonl(path, fmt)
    return chosen, examples, problems


def _is_text(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in (".txt", ".md")


def _read_text(path: Path) -> tuple[Format, list[Example], list[str]]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".md")) if path.is_dir() else [path]
    examples, problems = [], []
    for number, file in enumerate(files, 1):
        if not file.is_file():
            continue
        try:
            text = read_text_file(file)
        except OwnLLMError as exc:  # not UTF-8, or unreadable: a problem of this file, not of the whole read
            problems.append(exc.message)
            continue
        if text.strip():
            examples.append(Example(number, text=text))
        else:
            problems.append(f"{file}: empty")
    return "text", examples, problems


def _read_jsonl(path: Path, fmt: Format | None) -> tuple[int, Format | None, list[Example], list[str]]:
    """(lines that are JSON objects, the format, usable examples, problems)."""
    scanned, problems = scan_jsonl(path)  # a missing file raises; bad bytes or JSON are problems
    records = [(r.line, r.data) for r in scanned]
    if not records:
        return 0, fmt, [], problems
    detected = [detect(r) for _, r in records]
    chosen: Format | None = fmt or (Counter(d for d in detected if d).most_common(1) or [(None, 0)])[0][0]  # type: ignore[assignment]
    if chosen is None:
        problems.extend(f"{path.name} line {number}: no known format (keys: {', '.join(sorted(record)) or 'none'}; "
                        "expected messages, conversations, instruction/output, prompt/completion, "
                        "prompt/chosen/rejected or text)" for number, record in records)
        return len(records), None, [], problems
    examples = []
    for (number, record), kind in zip(records, detected, strict=True):
        if fmt is None and kind != chosen:
            problems.append(f"{path.name} line {number}: looks like {kind or 'no known format'}, not {chosen} "
                            f"(keys: {', '.join(sorted(record)) or 'none'})")
            continue
        example = normalise(record, chosen, number, path.name, problems)
        if example is not None:
            examples.append(example)
    return len(records), chosen, examples, problems


def token_counts(examples: list[Example], tokenizer: Any) -> list[int]:
    from ownllm.models.chat_template import render_chat
    from ownllm.models.tool_template import render_tool_chat, uses_tools

    counts = []
    for example in examples:
        if example.text is not None:
            counts.append(len(tokenizer(example.text).input_ids))
        elif example.chosen is not None:
            longer = max(example.chosen, example.rejected or "", key=len)
            counts.append(len(render_chat(tokenizer, [*example.messages, {"role": "assistant", "content": longer}],
                                          add_generation_prompt=False)))
        elif uses_tools(example.messages, example.tools):
            counts.append(len(render_tool_chat(tokenizer, example.messages, example.tools,
                                               parallel=example.parallel_tool_calls, add_generation_prompt=False)))
        else:
            counts.append(len(render_chat(tokenizer, example.messages, add_generation_prompt=False)))
    return counts


def _shingles(text: str) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}


class _NearDuplicateIndex:
    """MinHash signatures banded into buckets (locality-sensitive hashing), candidates confirmed by their exact
    Jaccard similarity. Written out rather than taken from datasketch: its package import pulls in scipy (0.35 s
    of a 0.7 s `ownllm data check`), and 16 bands of 8 rows over 128 hashes is all that is needed here — a pair at
    Jaccard 0.85 shares a bucket with probability 0.994, one at 0.5 with 0.06 (and is then checked and dropped)."""

    BANDS, ROWS = 16, 8
    _PRIME = np.uint64((1 << 61) - 1)

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        generator = np.random.default_rng(1)  # fixed: the same file gives the same report every time
        count = self.BANDS * self.ROWS
        self.a = generator.integers(1, int(self._PRIME), count, dtype=np.uint64)
        self.b = generator.integers(0, int(self._PRIME), count, dtype=np.uint64)
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.shingles: dict[int, set[str]] = {}

    def _bands(self, shingles: set[str]) -> list[tuple[int, bytes]]:
        hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
                           for s in shingles], dtype=np.uint64)
        with np.errstate(over="ignore"):  # the universal hash wraps mod 2^64 before mod p, as datasketch's does
            permuted = (hashes[:, None] * self.a[None, :] + self.b[None, :]) % self._PRIME
        signature = permuted.min(axis=0).reshape(self.BANDS, self.ROWS)
        return [(band, signature[band].tobytes()) for band in range(self.BANDS)]

    def first_similar(self, line: int, shingles: set[str]) -> int | None:
        """The earliest indexed line at least `threshold` similar to these shingles; else index them, None."""
        bands = self._bands(shingles)
        candidates = sorted({other for key in bands for other in self.buckets.get(key, [])})
        for other in candidates:
            seen = self.shingles[other]
            if len(shingles & seen) / len(shingles | seen) >= self.threshold:
                return other
        for key in bands:
            self.buckets.setdefault(key, []).append(line)
        self.shingles[line] = shingles
        return None


def find_duplicates(examples: list[Example], threshold: float = 0.85) -> tuple[list[tuple[int, int]],
                                                                               list[tuple[int, int]]]:
    """(exact, near) duplicates as (line, line of the first copy); near = word-3-gram Jaccard >= threshold."""
    exact, near, seen = [], [], {}
    index = _NearDuplicateIndex(threshold)
    for example in examples:
        key = example.content_key()
        digest = hashlib.sha256(key.encode()).hexdigest()
        if digest in seen:
            exact.append((example.line, seen[digest]))
            continue
        seen[digest] = example.line
        first = index.first_similar(example.line, _shingles(key))
        if first is not None:
            near.append((example.line, first))
    return exact, near


def measure_training_speed(model: str, seq_len: int = 256, steps: int = 2) -> float:
    """Tokens per second of a forward + backward pass of the model on this machine, as a LoRA step computes it
    (ownllm's default method): the weights frozen, gradients through the activations only (a full fine-tune's
    weight gradients would add about half again, and LoRA's own small matrices next to nothing). Taken once per
    model files + CPU (or GPU) + torch + thread count and kept in hardware.json, as the dtype verdicts are: a
    second check of any file with the same model loads nothing (delete hardware.json to measure again)."""
    import torch

    from ownllm.models.dtype import cpu_flags, cpu_model, remembered_measurement
    from ownllm.models.resolve import files_identity

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    signature = json.dumps(["training", files_identity(model, adapter_files=True), cpu_model(), sorted(cpu_flags()),
                            device, torch.__version__, torch.get_num_threads(), seq_len, steps])
    return remembered_measurement(
        "training_speed", signature,
        lambda kept: isinstance(kept, float) and math.isfinite(kept) and kept > 0,
        lambda: _training_speed(model, seq_len, steps))


def _training_speed(model: str, seq_len: int, steps: int) -> float:
    import torch

    from ownllm.models.load import load_model

    loaded = load_model(model, dtype="auto")
    network = loaded.model.train().requires_grad_(False)
    network.enable_input_require_grads()
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, seq_len), device=loaded.device)
    network(input_ids=ids, labels=ids).loss.backward()  # warm-up
    fastest = math.inf
    for _ in range(steps):  # the fastest step: kept for good, so not one slowed by whatever else ran then
        start = time.perf_counter()
        network(input_ids=ids, labels=ids).loss.backward()
        if torch.device(loaded.device).type == "cuda":
            torch.cuda.synchronize()  # the step's kernels, not only their launch
        fastest = min(fastest, time.perf_counter() - start)
    return seq_len / fastest


def check(path: Path, *, fmt: str | None = None, model: str | None = None, max_length: int = 2048,
          near_threshold: float = 0.85, measure_speed: bool = True) -> tuple[Report, list[Example]]:
    """Examine a training file or folder; the report lists every problem and the usable examples."""
    chosen, examples, problems = read_examples(path, fmt)
    report = Report(file=str(path), format=chosen, examples=len(examples), problems=problems)
    if len(examples) < MIN_EXAMPLES:
        report.warnings.append(f"only {len(examples)} usable examples; fine-tuning needs at least {MIN_EXAMPLES} "
                               "(hundreds for a lasting effect)")
    report.exact_duplicates, report.near_duplicates = find_duplicates(examples, near_threshold)
    if model is not None and examples:
        from ownllm.models.load import load_tokenizer

        counts = token_counts(examples, load_tokenizer(model))
        ordered = sorted(counts)
        report.tokens = {"min": ordered[0], "mean": round(sum(counts) / len(counts), 1),
                         "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1],
                         "total_per_epoch": sum(counts)}
        report.too_long = [e.line for e, n in zip(examples, counts, strict=True) if n > max_length]
        if report.too_long:
            report.warnings.append(f"{len(report.too_long)} examples are longer than {max_length} tokens and would be "
                                   "truncated")
        if measure_speed:
            speed = measure_training_speed(model)
            report.measured_tokens_per_second = round(speed, 1)
            report.estimated_seconds_per_epoch = round(sum(counts) / speed, 1)
    return report, examples


def prepare(path: Path, out: Path, *, fmt: str | None = None, val_ratio: float = 0.1, seed: int = 0,
            near_threshold: float = 0.85) -> dict[str, Any]:
    """Drop unusable lines and duplicates (before splitting), then write train/validation JSONL and a report,
    atomically: the output folder appears whole, or not at all."""
    if not 0 <= val_ratio < 1:
        raise OwnLLMError("val-ratio must be in [0, 1)", param="val_ratio")
    chosen, examples, problems = read_examples(path, fmt)
    if not examples:
        raise OwnLLMError(f"{path}: no usable examples ({len(problems)} problems, first: "
                          f"{problems[0] if problems else 'the file is empty'})", param="data")
    exact, near = find_duplicates(examples, near_threshold)
    dropped = {line for line, _ in exact + near}
    kept = [e for e in examples if e.line not in dropped]
    random.Random(seed).shuffle(kept)
    n_val = round(len(kept) * val_ratio) if len(kept) > 1 else 0
    validation, train = kept[:n_val], kept[n_val:]
    report = {"source": str(path), "format": chosen, "read": len(examples) + len(problems),
              "kept": len(kept), "train": len(train), "validation": len(validation),
              "dropped": {"unusable": problems, "exact_duplicates": exact, "near_duplicates": near}, "seed": seed}
    with atomic_folder(out) as staging:
        for name, rows in (("train.jsonl", train), ("validation.jsonl", validation)):
            with (staging / name).open("w", encoding="utf-8") as handle:
                for example in rows:
                    handle.write(json.dumps(_row(example), ensure_ascii=False) + "\n")
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _row(example: Example) -> dict[str, Any]:
    """Prepared files use one canonical shape per kind: chat messages, preference pairs, or text."""
    if example.text is not None:
        return {"text": example.text}
    if example.chosen is not None:
        return {"prompt": example.messages, "chosen": example.chosen, "rejected": example.rejected}
    if example.tools:
        return {"messages": example.messages, "tools": example.tools,
                "parallel_tool_calls": example.parallel_tool_calls}
    return {"messages": example.messages}
