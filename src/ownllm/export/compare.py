"""`ownllm quantize compare`: each format measured on the user's own model and data, as deltas to full precision,
so a size/speed/quality trade-off is chosen knowing what it costs.

Formats: fp32 and bf16 (transformers), int8 and nf4 (bitsandbytes, as `--quant` runs them), and GGUF files
exported here (f16, q8_0, q4_0; q4_k_m, q5_k_m, q6_k with llama.cpp's quantizer). Every format runs in a process
of its own (ownllm.export.measure), so its peak RAM is its own. A GGUF's quality (perplexity, QA) is measured on
its weights read back by transformers, exactly as stored; its speed and RAM by llama.cpp, which runs it as
stored, when llama-cpp-python is installed (else by transformers on the dequantized weights, and said so).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.export.formats import GGUF_QUANTS, K_QUANTS, require_llama_quantizer
from ownllm.export.measure import is_question_file
from ownllm.home import atomic_folder

TRANSFORMERS_FORMATS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "fp32"},
    "bf16": {"dtype": "bf16"},
    "int8": {"dtype": "fp32", "quant": "int8"},
    "nf4": {"dtype": "fp32", "quant": "nf4"},
}
GGUF_FORMATS = tuple(q for q in GGUF_QUANTS if q not in ("f32", "bf16"))  # f32/bf16 weights: the rows above
FORMATS = (*TRANSFORMERS_FORMATS, *GGUF_FORMATS)
REFERENCE = "fp32"
REPORT = "report.json"


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def default_formats() -> list[str]:
    formats = ["fp32", "bf16", "int8", "nf4", "q8_0", "q4_0"]
    return [*formats, "q4_k_m"] if llama_cpp_installed() else formats


def check_formats(formats: list[str]) -> list[str]:
    """The formats asked for, fp32 (the reference every delta is to) first; unknown ones are an error."""
    chosen = [f.strip().lower() for f in formats if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise OwnLLMError(f"unknown format '{unknown[0] if unknown else ''}'", param="formats",
                          hint=f"use a comma-separated list of {', '.join(FORMATS)}")
    for fmt in chosen:
        if fmt in K_QUANTS:
            require_llama_quantizer(fmt)
    return [REFERENCE, *dict.fromkeys(f for f in chosen if f != REFERENCE)]


def compare_formats(spec: str, data: Path, out: Path, *, formats: list[str] | None = None, max_new_tokens: int = 32,
                    speed_tokens: int = 32, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure each format of `spec` on `data` (text: perplexity; a question file: QA metrics and the perplexity
    of the reference answers) and write report.json, report.md and chart.png into `out` (whole or not at all).

    Raises:
        OwnLLMError: an unknown format, a k-quant without llama-cpp-python, missing data, a prompt-tuning run,
            an architecture GGUF export does not support (with GGUF formats), or a format that fails to run.
    """
    from ownllm.data.files import check_output_folder
    from ownllm.export.gguf_model import ARCHITECTURES
    from ownllm.export.source import inspect_source

    chosen = check_formats(formats or default_formats())
    if data.is_dir():
        raise OwnLLMError(f"--data {data} is a folder, not a text or questions file", param="data")
    if not data.is_file():
        raise OwnLLMError(f"no such file: {data}", kind="not_found", param="data")
    _check_data(data)  # once, before any model loads: each format's worker reads it again
    check_output_folder(out, param="out", replaces=REPORT)
    gguf_formats = [f for f in chosen if f in GGUF_FORMATS]
    info = inspect_source(spec, supported=ARCHITECTURES if gguf_formats else None)
    say = progress or (lambda message: None)
    llama = llama_cpp_installed()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ownllm-quantize-") as work:
        files = _export_files(info, gguf_formats, Path(work), say)
        for fmt in chosen:
            say(f"measuring {fmt}")
            rows.append(_measure_format(spec, fmt, files.get(fmt), data, llama, max_new_tokens, speed_tokens))
    report = {"model": spec, "data": str(data), "questions": is_question_file(data), "reference": REFERENCE,
              "rows": _with_deltas(rows)}
    with atomic_folder(out) as staging:
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(markdown(report))
        _chart(report, staging / "chart.png")
    return report


def _check_data(data: Path) -> None:
    """A question file's lines (named with file and line when bad), or text that is UTF-8 and not empty."""
    from ownllm.data.files import read_text_file
    from ownllm.evaluate.qa import read_questions

    if is_question_file(data):
        read_questions(data)
    elif not read_text_file(data, param="data").strip():
        raise OwnLLMError(f"--data {data} is empty: give text to measure perplexity on, or a question file",
                          param="data")


def _export_files(info: Any, formats: list[str], folder: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """Each GGUF format written once from the model in fp32 (loaded here once, then freed)."""
    if not formats:
        return {}
    from ownllm.export.gguf_model import write_model_gguf
    from ownllm.export.source import load_source

    say("exporting GGUF files")
    source = load_source(info)
    files = {fmt: write_model_gguf(source, folder / f"model-{fmt}.gguf", fmt) for fmt in formats}
    del source
    gc.collect()
    return files


def _measure_format(spec: str, fmt: str, gguf: Path | None, data: Path, llama: bool, max_new_tokens: int,
                    speed_tokens: int) -> dict[str, Any]:
    common = {"data": str(data), "max_new_tokens": max_new_tokens, "speed_tokens": speed_tokens}
    if gguf is None:
        result = _worker({**common, "runtime": "transformers", "model": spec, **TRANSFORMERS_FORMATS[fmt]})
        return {"format": fmt, "runtime": "transformers" + (" + bitsandbytes" if fmt in ("int8", "nf4") else ""),
                **result, "size_mb": result.pop("weights_mb")}
    quality = _worker({**common, "runtime": "transformers", "model": str(gguf), "dtype": "fp32",
                       "speed": not llama})
    row = {"format": fmt, **quality, "size_mb": gguf.stat().st_size / 1e6}
    row.pop("weights_mb", None)
    row["runtime"] = "transformers (dequantized GGUF)"
    if llama:
        speed = _worker({**common, "runtime": "llama.cpp", "model": str(gguf), "tokenizer_from": spec,
                         "quality": False})
        row.update(tokens_per_second=speed["tokens_per_second"], peak_ram_mb=speed["peak_ram_mb"],
                   runtime="llama.cpp")
    return row


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """ownllm.export.measure in a fresh process: its peak RAM is this format's alone."""
    done = subprocess.run([sys.executable, "-m", "ownllm.export.measure", json.dumps(request)],
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if done.returncode != 0 or not isinstance(result, dict) or "error" in result:
        detail = result["error"] if isinstance(result, dict) and "error" in result else \
            (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OwnLLMError(f"measuring {request.get('dtype')}/{request.get('quant') or request['runtime']} of "
                          f"{request['model']} failed: {detail}", kind="resource")
    return result


def _with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's numbers next to their change from the reference (the first row): percent for size, RAM, speed
    and perplexity, points for QA metrics."""
    reference = rows[0]
    for row in rows:
        delta: dict[str, Any] = {}
        for key in ("size_mb", "peak_ram_mb", "tokens_per_second", "perplexity"):
            if row.get(key) is not None and reference.get(key):
                delta[f"{key}_pct"] = 100.0 * (row[key] / reference[key] - 1)
        for metric, value in (row.get("qa") or {}).items():
            delta[metric] = value - reference["qa"][metric]
        row["delta"] = delta
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what `quantize compare` prints, and bench/RESULTS.md records)."""
    qa = report["questions"]
    header = "| format | runtime | size MB | peak RAM MB | tok/s | perplexity (Δ%) |" + \
        (" exact match | F1 | contains (Δ) |" if qa else "")
    lines = [f"# Quantization compare: {report['model']}", "", f"Data: `{report['data']}`; deltas to "
             f"{report['reference']}.", "", header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for row in report["rows"]:
        d = row["delta"]
        cells = [row["format"], row["runtime"], f"{row['size_mb']:.0f} ({d.get('size_mb_pct', 0):+.0f}%)",
                 f"{row['peak_ram_mb']:.0f} ({d.get('peak_ram_mb_pct', 0):+.0f}%)",
                 f"{row['tokens_per_second']:.1f} ({d.get('tokens_per_second_pct', 0):+.0f}%)",
                 f"{row['perplexity']:.3f} ({d.get('perplexity_pct', 0):+.2f}%)"]
        if qa:
            q = row["qa"]
            cells += [f"{q['exact_match']:.2f}", f"{q['f1']:.2f}",
                      f"{q['contains']:.2f} ({d.get('contains', 0):+.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["format"] for r in rows]
    panels = [("size (MB): GGUF file, or weights in memory", [r["size_mb"] for r in rows]),
              ("tokens/s, one stream", [r["tokens_per_second"] for r in rows]),
              ("perplexity change (%)", [r["delta"].get("perplexity_pct", 0.0) for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{report['model']}: formats against {report['reference']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
