"""What SERAC's other half would add: held-out facts asked with the nearest training example(s) in context.

    .venv/bin/python bench/fact_hint_probe.py RUN/final TRAIN.jsonl HELDOUT.jsonl

The measurement behind ownllm's recall (ownllm.models.scope, built from it; bench/recall.py measures the built
one): each held-out question's nearest training questions (MiniLM cosine, as the scope measures it) are put into
its context with their answers, as a system message ("Facts you know: Q: ... A: ...") or, with `--style turns`, as
earlier user and assistant turns, and the model answers greedily as the checks ask (the reference answer in the
reply). Prints right/total with no hint, with the nearest one, and with the nearest three.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's final/ or any model ownllm opens")
    parser.add_argument("train", type=Path, help="the run's training chat JSONL")
    parser.add_argument("heldout", type=Path, help="questions with answers (the checks' format)")
    parser.add_argument("--style", choices=("system", "turns"), default="system",
                        help="the hint as a system message (default) or as earlier turns of the conversation")
    parser.add_argument("--show-misses", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ownllm.generate.open import open_engine
    from ownllm.generate.params import SamplingParams
    from ownllm.models.embeddings import DEFAULT_EMBEDDING_MODEL, load_embedder

    answers: dict[str, str] = {}
    for line in args.train.read_text().splitlines():
        messages = json.loads(line)["messages"]
        question = [m["content"] for m in messages if m["role"] == "user"][-1].strip()
        answers[question] = messages[-1]["content"]
    questions = sorted(answers)
    embedder = load_embedder(DEFAULT_EMBEDDING_MODEL)
    anchors = embedder.embed(questions)
    engine = open_engine(args.model, dtype="fp32")
    params = SamplingParams(max_new_tokens=64)
    items = [json.loads(line) for line in args.heldout.read_text().splitlines() if line.strip()]
    for hints in (0, 1, 3):
        right = 0
        for item in items:
            messages = item.get("messages") or [{"role": "user", "content": item["question"]}]
            if hints:
                nearest = np.argsort(-(anchors @ embedder.embed([messages[-1]["content"]])[0]))[:hints]
                own = [m for m in messages if m["role"] == "system"]
                rest = [m for m in messages if m["role"] != "system"]
                if args.style == "turns":
                    shots = [turn for i in reversed(nearest) for turn in (
                        {"role": "user", "content": questions[i]},
                        {"role": "assistant", "content": answers[questions[i]]})]
                    messages = [*own, *shots, *rest]
                else:
                    facts = "Facts you know:\n" + "\n".join(f"Q: {questions[i]} A: {answers[questions[i]]}"
                                                             for i in nearest)
                    messages = [{"role": "system", "content": "".join(m["content"] + "\n" for m in own) + facts},
                                *rest]
            reply = engine.chat(messages, params).text.lower()
            hit = any(answer.lower() in reply for answer in item["answers"])
            right += hit
            if args.show_misses and not hit:
                print(f"  miss ({hints}): {messages[-1]['content']!r} -> {reply!r} (want {item['answers']})")
        print(f"{args.model}: {hints} hint(s) as {args.style}: {right}/{len(items)}", flush=True)


if __name__ == "__main__":
    main()
