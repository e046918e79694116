"""`ownllm pull`, `ownllm models`, `ownllm estimate`: get models, list them, size their memory."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ownllm.cli.options import DtypeOpt, JsonOpt, at_least_one, quiet_model_libraries


def pull(
    source: Annotated[str, typer.Argument(help="alias, local .gguf file, or hub id")],
    name: Annotated[str | None, typer.Option(help="local name (default: from the source)")] = None,
    force: Annotated[bool, typer.Option(help="pull again even if present")] = False,
) -> None:
    """Get a model once and convert it to a safetensors folder in the model home."""
    quiet_model_libraries()
    from ownllm.cli.render import err, human_bytes, out
    from ownllm.models.pull import pull as pull_model

    with err.status(f"pulling {source} (download + convert, once)"):
        model = pull_model(source, name=name, force=force)
    out.print(f"{model.name}: {model.path} ({human_bytes(model.size_bytes)}, {model.manifest['dtype']}, "
              f"context {model.manifest['context_length']})")


def list_models(as_json: JsonOpt = False) -> None:
    """List local models and the aliases you can pull."""
    from rich.table import Table

    from ownllm.cli.render import human_bytes, human_count, out
    from ownllm.home import models_dir
    from ownllm.models.aliases import load_aliases
    from ownllm.models.registry import list_local_models

    local = list_local_models()
    pullable = {n: a for n, a in load_aliases().items() if n not in {m.name for m in local}}
    if as_json:
        rows = [{"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes, **m.manifest} for m in local]
        out.print_json(data={"models": rows, "pullable": sorted(pullable)})
        return
    table = Table(title=f"models in {models_dir()}", title_justify="left")
    for column in ("name", "params", "size on disk", "dtype", "context", "source"):
        table.add_column(column)
    for m in local:
        table.add_row(m.name, human_count(m.manifest["params"]), human_bytes(m.size_bytes), m.manifest["dtype"],
                      str(m.manifest["context_length"]), m.manifest["source"])
    out.print(table)
    for alias in pullable.values():
        out.print(f"[dim]not pulled: {alias.name} — {alias.description} (ownllm pull {alias.name})[/dim]")


def estimate(
    model_or_size: Annotated[str, typer.Argument(help="a size like 7B or 135M, a local model, or a hub id")],
    batch_size: Annotated[int, typer.Option(help="sequences per step / concurrent sequences")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="tokens per training sequence")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    lora_targets: Annotated[str, typer.Option(help="attention | all-linear")] = "attention",
    measure: Annotated[bool, typer.Option("--measure", help="load the model and measure its memory")] = False,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Estimate memory for inference (fp32/bf16/int8/4-bit, KV cache) and training (full, LoRA, QLoRA)."""
    from ownllm.cli.render import estimate_json, estimate_tables, out
    from ownllm.models.memory import estimate as estimate_memory
    from ownllm.models.memory import parse_size, shape_of

    at_least_one(seq_len=seq_len, lora_rank=lora_rank)
    if measure or parse_size(model_or_size) is None:  # a bare size ("7B") needs no model library
        quiet_model_libraries()
    result = estimate_memory(shape_of(model_or_size), batch_size=batch_size, seq_len=seq_len,
                             lora_rank=lora_rank, lora_targets=lora_targets)
    measured = None
    if measure:
        from ownllm.generate.probe import measure_inference

        measured = measure_inference(model_or_size, dtype=dtype)
    if as_json:
        out.print_json(json.dumps(estimate_json(result, measured)))
        return
    for table in estimate_tables(result, measured):
        out.print(table)
