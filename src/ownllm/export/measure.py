"""One format measured in a process of its own (`python -m ownllm.export.measure REQUEST_JSON`), so that its
peak RAM is its own: load, perplexity, QA, single-stream speed; one JSON line on stdout.

A request names the model (or a GGUF file), how to run it (transformers in fp32/bf16, bitsandbytes int8/nf4,
a GGUF dequantized by transformers for quality, or llama.cpp for speed and memory) and the data.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

SPEED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """Run the measurements `request` asks for; returns what was measured (missing keys were not asked)."""
    from ownllm.generate.params import SamplingParams

    started = time.perf_counter()
    engine = _open(request)
    result: dict[str, Any] = {"load_seconds": round(time.perf_counter() - started, 2)}
    model = getattr(engine, "model", None)
    if model is not None:  # the weights as held in memory (bitsandbytes' packed ones for int8/nf4)
        result["weights_mb"] = model.get_memory_footprint() / 1e6
    if request.get("quality", True):
        result.update(_quality(engine, Path(request["data"]), int(request.get("max_new_tokens", 32))))
    if request.get("speed", True):
        tokens = int(request.get("speed_tokens", 32))
        params = SamplingParams(strategy="greedy", max_new_tokens=tokens)
        engine.generate(SPEED_PROMPT, SamplingParams(strategy="greedy", max_new_tokens=4))  # warm-up
        completion = engine.generate(engine.render_chat([{"role": "user", "content": SPEED_PROMPT}]), params)
        result["tokens_per_second"] = completion.tokens_per_second
    result["peak_ram_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def _open(request: dict[str, Any]) -> Any:
    from ownllm.generate.open import open_engine

    runtime = request["runtime"]
    if runtime == "llama.cpp":
        from ownllm.generate.llamacpp import LlamaCppEngine
        from ownllm.models.load import load_tokenizer

        return LlamaCppEngine(Path(request["model"]), load_tokenizer(request["tokenizer_from"]), name="measure",
                              n_ctx=2048)
    return open_engine(request["model"], backend="transformers", dtype=request.get("dtype", "fp32"),
                       device="cpu", quant=request.get("quant"))


def _quality(engine: Any, data: Path, max_new_tokens: int) -> dict[str, Any]:
    """Perplexity on the text (or on the reference answers of a question file) and, for questions, QA metrics."""
    from ownllm.evaluate.compare import load_documents_for_answers
    from ownllm.evaluate.perplexity import load_documents, perplexity
    from ownllm.evaluate.qa import read_questions, run_qa, summarize
    from ownllm.generate.params import SamplingParams

    if is_question_file(data):
        items = read_questions(data)
        results = run_qa(engine, items, SamplingParams(strategy="greedy", max_new_tokens=max_new_tokens),
                         batch_size=1)
        summary = {k: v for k, v in summarize(results).items() if k != "items"}
        documents = load_documents_for_answers(engine, items)
        return {"perplexity": perplexity(engine, documents).perplexity, "qa": summary,
                "answers": [r.prediction for r in results]}
    return {"perplexity": perplexity(engine, load_documents(engine, data)).perplexity}


def is_question_file(data: Path) -> bool:
    """A JSONL file whose first record has reference answers (`answer` or `answers`): QA data, not text."""
    if data.suffix.lower() != ".jsonl" or not data.is_file():
        return False
    with data.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and ("answer" in record or "answers" in record)
    return False


def main() -> None:
    """The worker: a JSON request as the one argument, a JSON result (or {"error": ...}) as the last line."""
    import logging

    from ownllm.collector import import_at_start
    from ownllm.errors import OwnLLMError

    logging.disable(logging.WARNING)
    # (its garbage left uncollected adds ~26 MB to each format's peak alike: ownllm/collector.py)
    import_at_start("torch", "transformers", "transformers.modeling_utils")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        print(json.dumps(measure(json.loads(sys.argv[1]))))
    except OwnLLMError as exc:
        print(json.dumps({"error": str(exc)}))
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
