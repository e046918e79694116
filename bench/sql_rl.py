"""Text-to-SQL by execution, base -> SFT -> SFT+GRPO on the shipped example (examples/sql/), with the time of
every stage. Each stage runs the `ownllm` CLI as a user would; results go to OUT/results.json and a markdown
table on stdout.

    OMP_NUM_THREADS=1 python bench/sql_rl.py --out /tmp/sql-bench [--grpo-steps 30] [--limit N] [--keep] [--control]

GRPO (examples/sql/grpo.yaml) trains on rl.jsonl, questions SFT never saw, with their gold queries as the
reward's reference and as guidance. --control adds the fair comparison for that: SFT on train.jsonl + rl.jsonl
with their gold queries (the same questions and answers GRPO had, taught directly).
--keep reuses a stage whose run folder or result already exists in OUT (to continue an interrupted bench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sql"
BASE = "smollm2-135m-instruct"


def ownllm(*args: str) -> tuple[str, float]:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "ownllm", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if done.returncode != 0:
        raise SystemExit(f"ownllm {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, time.time() - started


def evaluate(model: str, out: Path, name: str, limit: int | None, keep: bool) -> dict:
    file = out / f"eval-{name}.json"
    if keep and file.is_file():
        return json.loads(file.read_text())
    extra = ["--limit", str(limit)] if limit else []
    stdout, seconds = ownllm("eval", "sql", model, "--db", str(EXAMPLE / "shop.sqlite"), "--data",
                             str(EXAMPLE / "test.jsonl"), "--json", "--out", str(out / f"items-{name}"), *extra)
    result = {**json.loads(stdout), "eval_seconds": round(seconds, 1)}
    file.write_text(json.dumps(result, indent=2))
    return result


def train(config: str, out: Path, name: str, keep: bool, *extra: str, model: str | None = None) -> float:
    run = out / name
    if keep and (run / "final").is_dir():
        return json.loads((run / "meta.json").read_text())["seconds"]
    _, seconds = ownllm("finetune", *([model] if model else []), "--config", str(EXAMPLE / config), "--out", str(run),
                        "--overwrite", *extra)
    return round(seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ownllm-sql-bench"))
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test questions")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--control", action="store_true", help="also SFT on train.jsonl + rl.jsonl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {}
    stages["base"] = {"train_seconds": 0.0, **evaluate(BASE, args.out, "base", args.limit, args.keep)}
    sft_seconds = train("sft.yaml", args.out, "sft", args.keep)
    stages["SFT"] = {"train_seconds": sft_seconds, **evaluate(str(args.out / "sft"), args.out, "sft", args.limit,
                                                              args.keep)}
    grpo_seconds = train("grpo.yaml", args.out, "grpo", args.keep, "--max-steps", str(args.grpo_steps),
                         model=str(args.out / "sft"))
    stages["SFT+GRPO"] = {"train_seconds": grpo_seconds, **evaluate(str(args.out / "grpo"), args.out, "grpo",
                                                                    args.limit, args.keep)}
    if args.control:
        both = args.out / "train+rl.jsonl"
        both.write_text((EXAMPLE / "train.jsonl").read_text() + (EXAMPLE / "rl.jsonl").read_text())
        control_seconds = train("sft.yaml", args.out, "sft-train+rl", args.keep, "--data", str(both))
        stages["control: SFT on train+rl"] = {"train_seconds": control_seconds, **evaluate(
            str(args.out / "sft-train+rl"), args.out, "sft-train+rl", args.limit, args.keep)}
    (args.out / "results.json").write_text(json.dumps(stages, indent=2))
    print("| stage | execution accuracy | exact match | valid SQL | train time | eval time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in stages.items():
        print(f"| {name} | {row['execution_accuracy']:.1%} | {row['exact_match']:.1%} | {row['valid_sql']:.1%} | "
              f"{row['train_seconds']:.0f} s | {row['eval_seconds']:.0f} s |")
    print(f"({stages['base']['items']} test questions)")


if __name__ == "__main__":
    main()
