"""Recall (ownllm.models.scope): what the nearest training examples before an in-scope question do, on first and
follow-up turns, with the same adapter and scope, recall on and off.

    .venv/bin/python bench/recall.py RUN/final HELDOUT.jsonl [GENERAL.jsonl]

Through `Engine.chat`, the path `ownllm chat`, the checks and the server share, greedy as the checks ask:
- held-out: each held-out question alone;
- held-out after a general turn: a general question and the base model's answer to it, then the held-out question;
- general after a fact turn: a held-out question and its reference answer, then a general question (the
  conversation stays with the adapter: its first message is within the scope; recall adds nothing, the latest
  message being outside).
Right = a reference answer in the reply, as the checks score it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's final/ whose scope keeps its training examples")
    parser.add_argument("heldout", type=Path, help="held-out questions with answers (the checks' format)")
    parser.add_argument("general", type=Path, nargs="?", default=ROOT / "examples" / "retention" / "general.jsonl")
    parser.add_argument("--general-count", type=int, default=20, help="general questions used (default 20)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ownllm.finetune.checks import CHECK_PARAMS
    from ownllm.generate.open import open_engine

    engine = open_engine(args.model, dtype="fp32")
    if engine.scope is None or not engine.scope.recall:
        raise SystemExit(f"{args.model}: its scope keeps no training examples (train with recall: auto)")
    facts = [json.loads(line) for line in args.heldout.read_text().splitlines() if line.strip()]
    general = [json.loads(line) for line in args.general.read_text().splitlines() if line.strip()]
    general = general[:: max(1, len(general) // args.general_count)][: args.general_count]

    def right(messages: list[dict[str, str]], answers: list[str]) -> bool:
        reply = engine.chat(messages, CHECK_PARAMS).text.lower()
        return any(answer.lower() in reply for answer in answers)

    def ask(item: dict) -> dict[str, str]:
        return {"role": "user", "content": item["question"] if "question" in item else item["messages"][-1]["content"]}

    base_answers = [engine.chat([ask(g)], CHECK_PARAMS).text for g in general]  # outside: the base's weights
    scope = engine.scope
    for label, used in (("on", scope), ("off", scope.without_recall())):
        engine.scope = used
        alone = sum(right(f.get("messages") or [ask(f)], f["answers"]) for f in facts)  # as the checks ask it
        after_general = sum(right([ask(g), {"role": "assistant", "content": a}, ask(f)], f["answers"])
                            for f, g, a in zip(facts, general * len(facts), base_answers * len(facts), strict=False))
        after_fact = sum(right([ask(f), {"role": "assistant", "content": f["answers"][0]}, ask(g)], g["answers"])
                         for f, g in zip(facts * len(general), general, strict=False))
        print(f"{args.model}: recall {label}: held-out {alone}/{len(facts)}, held-out after a general turn "
              f"{after_general}/{len(facts)}, general after a fact turn {after_fact}/{len(general)}", flush=True)


if __name__ == "__main__":
    main()
