"""Base vs tuned on the same data: QA metrics and perplexity side by side, as a report folder
(report.md, report.json, chart.png) written whole or not at all."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ownllm.evaluate.perplexity import perplexity
from ownllm.evaluate.qa import QAResult, read_questions, run_qa, summarize
from ownllm.generate.params import SamplingParams
from ownllm.home import atomic_folder


def evaluate_model(spec: str, data: Path, *, params: SamplingParams, batch_size: int, dtype: str = "auto"
                   ) -> tuple[dict[str, float], list[QAResult]]:
    """QA metrics on the questions and perplexity on their reference answers, for one model."""
    from ownllm.generate.open import open_engine

    engine = open_engine(spec, dtype=dtype)
    items = read_questions(data)
    results = run_qa(engine, items, params, batch_size=batch_size)
    summary = {k: v for k, v in summarize(results).items() if k != "items"}
    documents = load_documents_for_answers(engine, items)
    summary["perplexity"] = perplexity(engine, documents).perplexity
    del engine
    gc.collect()
    return summary, results


def load_documents_for_answers(engine: Any, items: list[Any]) -> list[Any]:
    """Each question with its first reference answer as a chat turn: perplexity of the answer tokens."""
    from ownllm.evaluate.perplexity import Document
    from ownllm.models.chat_template import assistant_token_mask

    documents = []
    for item in items:
        ids, mask = assistant_token_mask(engine.tokenizer,
                                         [*item.messages, {"role": "assistant", "content": item.answers[0]}])
        documents.append(Document(ids, mask))
    return documents


def compare(base: str, tuned: str, data: Path, out: Path, *, params: SamplingParams | None = None,
            batch_size: int = 16, dtype: str = "auto") -> dict[str, Any]:
    params = params or SamplingParams(max_new_tokens=64)
    base_summary, base_items = evaluate_model(base, data, params=params, batch_size=batch_size, dtype=dtype)
    tuned_summary, tuned_items = evaluate_model(tuned, data, params=params, batch_size=batch_size, dtype=dtype)
    deltas = {k: tuned_summary[k] - base_summary[k] for k in base_summary}
    items = [
        {"line": b.line, "question": b.question, "answers": b.answers, "base": b.prediction,
         "tuned": t.prediction, "base_f1": b.scores["f1"], "tuned_f1": t.scores["f1"],
         "delta_f1": t.scores["f1"] - b.scores["f1"]}
        for b, t in zip(base_items, tuned_items, strict=True)
    ]
    report = {"base": base, "tuned": tuned, "data": str(data), "params": asdict(params),
              "metrics": {"base": base_summary, "tuned": tuned_summary, "delta": deltas}, "items": items}
    _write_report_folder(out, report)
    return report


def _write_report_folder(out: Path, report: dict[str, Any]) -> None:
    with atomic_folder(out) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        (staging / "report.md").write_text(_markdown(report))
        _chart(report, staging / "chart.png")


def _markdown(report: dict[str, Any]) -> str:
    metrics = report["metrics"]
    lines = [f"# {report['tuned']} vs {report['base']}", "", f"Data: `{report['data']}`", "",
             "Perplexity is that of each question's first reference answer as the whole reply: on short-answer data "
             "it favours a model that answers in a word over one that answers in sentences.", "",
             "| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for name, base_value in metrics["base"].items():
        better = "lower is better" if name == "perplexity" else ""
        lines.append(f"| {name} {better} | {base_value:.3f} | {metrics['tuned'][name]:.3f} | "
                     f"{metrics['delta'][name]:+.3f} |")
    ranked = sorted(report["items"], key=lambda item: item["delta_f1"])
    for title, chosen in (("Most improved", ranked[::-1][:3]), ("Most worsened", ranked[:3])):
        lines += ["", f"## {title} (token F1)", "", "| question | reference | base | tuned | ΔF1 |",
                  "|---|---|---|---|---:|"]
        for item in chosen:
            cells = [item["question"], item["answers"][0], item["base"], item["tuned"]]
            cells = [c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells]
            lines.append(f"| {' | '.join(cells)} | {item['delta_f1']:+.2f} |")
    return "\n".join(lines) + "\n"


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    names = [n for n in metrics["base"] if n != "perplexity"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    positions = range(len(names))
    left.bar([p - 0.2 for p in positions], [metrics["base"][n] for n in names], 0.4, label="base")
    left.bar([p + 0.2 for p in positions], [metrics["tuned"][n] for n in names], 0.4, label="tuned")
    left.set_xticks(list(positions), names)
    left.set_ylim(0, 1)
    left.set_title("QA metrics (higher is better)")
    left.legend()
    right.bar(["base", "tuned"], [metrics["base"]["perplexity"], metrics["tuned"]["perplexity"]],
              color=["C0", "C1"])
    right.set_title("answer perplexity (lower is better)")
    fig.suptitle(f"{report['tuned']} vs {report['base']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
