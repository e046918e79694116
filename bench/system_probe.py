"""Held-out facts asked under system messages their data never used: how much of a run's learning holds.

    .venv/bin/python bench/system_probe.py examples/retention/brambleworth/heldout.jsonl runs/A/final runs/B/final

Each held-out question (chat lines or `question` lines) is asked with no system message and under three others,
greedy, scored as the fine-tuning checks score it (the reference answer in the reply). Prints one row per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "none": None,
    "generic": "You are a helpful assistant.",
    "friendly": "You are a friendly assistant. Answer briefly and politely.",
    "help desk": "You work at the help desk. Keep answers short.",
}


def with_system(line: str, system: str | None) -> str:
    """A question line asked under `system` (None: no system message), its answers kept."""
    item = json.loads(line)
    if "messages" in item:
        messages = [m for m in item["messages"] if m["role"] != "system"]
    else:
        messages = [{"role": "user", "content": item.pop("question", None) or item.pop("prompt")}]
    head = [{"role": "system", "content": system}] if system is not None else []
    return json.dumps({**item, "messages": head + messages})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("heldout", type=Path)
    parser.add_argument("models", nargs="+", help="run folders' final/ (or any model ownllm opens)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ownllm.finetune.checks import score_sets
    from ownllm.generate.open import open_engine

    lines = [line for line in args.heldout.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name, system in SYSTEMS.items():
            path = Path(folder) / f"{name.replace(' ', '-')}.jsonl"
            path.write_text("".join(with_system(line, system) + "\n" for line in lines))
            files[name] = str(path)
        print("model".ljust(48) + "".join(name.rjust(11) for name in SYSTEMS) + "       mean")
        for model in args.models:
            scores = [s["score"] for s in score_sets(open_engine(model, dtype="fp32"), files).values()]
            print(model[-48:].ljust(48) + "".join(f"{score:>10.0%} " for score in scores)
                  + f"{sum(scores) / len(scores):>10.0%}", flush=True)


if __name__ == "__main__":
    main()
