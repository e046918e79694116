"""`ownllm export` and `ownllm quantize compare`: take a model anywhere, choose a quantization by measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ownllm.cli.options import ModelArg, quiet_model_libraries


def _interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a container stopping) ends an export as Ctrl-C does: its temp file removed, not left behind."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def export(
    model: Annotated[str, typer.Argument(help="a model (alias, folder, .gguf, hub id) or a fine-tuning run folder")],
    out: Annotated[Path, typer.Option("--out", help="the .gguf file to write (a folder for --format hf)")],
    format: Annotated[str, typer.Option("--format", help="gguf | gguf-lora (a LoRA run's adapter alone) | hf")
                      ] = "gguf",
    quant: Annotated[str | None, typer.Option("--quant", help="gguf: f32 | f16 (default) | bf16 | q8_0 | q4_0 | "
                                                             "q4_k_m | q5_k_m | q6_k (k-quants: the llama extra)")
                     ] = None,
) -> None:
    """Export a model or a tuned run: GGUF for llama.cpp / Ollama / LM Studio (a LoRA or full run is merged
    first), a LoRA run's adapter as a GGUF LoRA, or a merged HF folder."""
    from ownllm.export.formats import check_request

    check_request(format, quant, out)  # a typo or a missing folder is reported before anything loads
    _interrupt_on_sigterm()
    quiet_model_libraries()
    from ownllm.cli.render import out as console
    from ownllm.export.export import export as run_export

    written = run_export(model, format=format, out=out, quant=quant)
    size = written.stat().st_size if written.is_file() else sum(p.stat().st_size for p in written.rglob("*"))
    console.print(f"exported: {written} ({size / 1e6:.1f} MB)")


def quantize_compare(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", help="text to score (.txt, .md, .jsonl with text/messages), or a "
                                                     "question file (JSONL with question + answer): QA metrics too")],
    formats: Annotated[str | None, typer.Option("--formats", help="comma-separated: fp32, bf16, int8, nf4 "
                                                                  "(bitsandbytes), f16, q8_0, q4_0, q4_k_m, q5_k_m, "
                                                                  "q6_k (GGUF); default fp32,bf16,int8,nf4,q8_0,q4_0 "
                                                                  "(+q4_k_m with the llama extra)")] = None,
    out: Annotated[Path, typer.Option("--out", help="report folder: report.json, report.md, chart.png")
                   ] = Path("quantize-report"),
    max_new_tokens: Annotated[int, typer.Option(help="longest answer per question")] = 32,
    speed_tokens: Annotated[int, typer.Option(help="tokens generated for the tok/s measurement")] = 32,
) -> None:
    """Measure each quantization on your model and data: size, peak RAM, tok/s, perplexity (and QA metrics for a
    question file), each as a change from full precision (fp32)."""
    from ownllm.cli.options import at_least_one
    from ownllm.export.compare import check_formats

    at_least_one(max_new_tokens=max_new_tokens, speed_tokens=speed_tokens)
    if formats is not None:
        check_formats(formats.split(","))
    quiet_model_libraries()
    from ownllm.cli.render import err
    from ownllm.cli.render import out as console
    from ownllm.export.compare import compare_formats, markdown

    report = compare_formats(model, data, out, formats=formats.split(",") if formats else None,
                             max_new_tokens=max_new_tokens, speed_tokens=speed_tokens,
                             progress=lambda message: err.print(f"[dim]{message}[/dim]"))
    console.print(markdown(report), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {out / 'report.json'}, chart: {out / 'chart.png'}")
