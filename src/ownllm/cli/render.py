"""How the CLI shows results: rich tables and plain JSON. Printing lives in the cli package only.

The result types are imported for type checking only: importing this module must not import torch."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ownllm.generate.engine import Completion
    from ownllm.generate.sampling import StepExplanation
    from ownllm.models.memory import Estimate
    from ownllm.models.tokens import TokenReport

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def explanation_table(step: int, explanation: StepExplanation, temperature: float, min_p: float = 0.0) -> Table:
    """One step's candidates through every filter; the min-p column only where min-p is set."""
    kept = f"top-k kept {explanation.kept_top_k}, top-p kept {explanation.kept_top_p}"
    table = Table(title=f"step {step}: {kept}" + (f", min-p kept {explanation.kept_min_p}" if min_p else ""),
                  title_justify="left")
    columns = ["token", "id", "logit", "p(T=1)", f"p(T={temperature:g})", "after top-k", "after top-p"]
    columns += ["after min-p"] if min_p else []
    for column in [*columns, ""]:
        table.add_column(column, justify="right" if column not in ("token", "") else "left",
                         no_wrap=column == "token")
    for row in explanation.rows:
        probs = [row.prob_top_k, row.prob_top_p] + ([row.prob_min_p] if min_p else [])
        table.add_row(
            repr(row.token), str(row.token_id), f"{row.logit:.2f}", f"{row.prob:.4f}",
            f"{row.prob_temperature:.4f}", *(f"{p:.4f}" for p in probs),
            "← chosen" if row.chosen else "",
            style="bold green" if row.chosen else None,
        )
    return table


def completion_json(completion: Completion) -> dict[str, Any]:
    data: dict[str, Any] = {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
        "seed": completion.seed,
        "sequence_logprob": completion.sequence_logprob,
        "tokens_per_second": round(completion.tokens_per_second, 2),
    }
    if completion.logprobs is not None:
        data["logprobs"] = [asdict(lp) for lp in completion.logprobs]
    if completion.explanations is not None:
        data["explain"] = [asdict(e) for e in completion.explanations]
    return data


def token_table(report: TokenReport) -> Table:
    table = Table(title=f"{report.count} tokens", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("id", justify="right")
    table.add_column("token")
    for index, (token_id, piece) in enumerate(report.tokens):
        table.add_row(str(index), str(token_id), repr(piece))
    return table


def token_summary(report: TokenReport) -> str:
    line = (f"tokens: {report.count}  characters: {report.characters}  words: {report.words}  "
            f"chars/token: {report.chars_per_token:.2f}")
    if report.cost is not None:
        line += f"  cost at ${report.price_per_1m:g}/1M tokens: ${report.cost:.6f}"
    return line


def estimate_tables(est: Estimate, measured: dict[str, Any] | None = None) -> list[Table]:
    shape = est.shape
    inference = Table(title=f"{human_count(shape.params)} parameters ({shape.source})", title_justify="left")
    inference.add_column("inference")
    inference.add_column("memory", justify="right")
    for name, value in est.weights.items():
        inference.add_row(f"weights {name}", human_bytes(value))
    inference.add_row("KV cache per token (bf16)", human_bytes(est.kv_per_token))
    inference.add_row(f"KV cache, batch {est.batch_size} x full context {shape.context} (bf16)",
                      human_bytes(est.kv_full_context))
    if measured:
        inference.add_row(f"measured: model + 16 tokens ({measured['backend']}, {measured['dtype']})",
                          human_bytes(measured["model_delta"]), style="cyan")
        inference.add_row("measured: peak RSS of the process", human_bytes(measured["peak_rss"]), style="cyan")
    training = Table(
        title=(f"training, batch {est.batch_size} x {est.seq_len} tokens; LoRA r={est.lora_rank} on "
               f"{est.lora_targets} = {human_count(est.lora_params)} trainable"),
        title_justify="left",
    )
    training.add_column("method")
    training.add_column("with gradient checkpointing", justify="right")
    training.add_column("without", justify="right")
    for method, value in est.training.items():
        training.add_row(method, human_bytes(value), human_bytes(est.training_no_ckpt[method]))
    return [inference, training]


def estimate_json(est: Estimate, measured: dict[str, Any] | None) -> dict[str, Any]:
    data = asdict(est)
    data["measured"] = measured
    return data


def checks_table(checks: dict[str, dict[str, Any]]) -> Table:
    """Before/after of a fine-tuning run: each check set's score (share answered, or share of valid tool calls),
    base vs tuned."""
    from ownllm.finetune.checks import check_rows

    table = Table(title="before and after (greedy replies)")
    for column in ("set", "measured", "items", "base", "tuned"):
        table.add_column(column, justify="left" if column in ("set", "measured") else "right")
    for name, measured, items, base, tuned in check_rows(checks):
        table.add_row(name, measured, "" if items is None else str(items), f"{base:.0%}", f"{tuned:.0%}")
    return table
