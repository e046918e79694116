"""Retention benchmark: does one fine-tuning recipe teach new facts and keep what the base knew, on fact sets it
was never tuned on? (examples/retention/README.md)

    .venv/bin/python bench/retention.py --select-general      # once per base model: keep what it answers right
    .venv/bin/python bench/retention.py                       # the shipped recipe on every fact set
    .venv/bin/python bench/retention.py --recipe my.yaml --sets orrin,pellbrook --json out.json

Each set: `ownllm finetune --config RECIPE` with the set's training file and two checks (its held-out questions,
the general questions the base answers right), timed end to end. Prints held-out and retention per set, their mean
and worst case over the tuning sets, and the honest set (brambleworth: kept out of every tuning decision) apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SETS_DIR = ROOT / "examples" / "retention"
# (training file, held-out questions); norvale is the shipped example's own data
SETS = {
    "norvale": (ROOT / "examples" / "data" / "facts-train.jsonl", ROOT / "examples" / "data" / "facts-heldout.jsonl"),
    "orrin": (SETS_DIR / "orrin" / "train.jsonl", SETS_DIR / "orrin" / "heldout.jsonl"),
    "pellbrook": (SETS_DIR / "pellbrook" / "train.jsonl", SETS_DIR / "pellbrook" / "heldout.jsonl"),
    "brambleworth": (SETS_DIR / "brambleworth" / "train.jsonl", SETS_DIR / "brambleworth" / "heldout.jsonl"),
}
HONEST = "brambleworth"
GENERAL = SETS_DIR / "general.jsonl"


def select_general(model: str) -> None:
    """Keep the candidate questions the base model answers right (greedy, as the checks ask them)."""
    sys.path.insert(0, str(ROOT / "src"))
    from ownllm.evaluate.qa import read_questions, run_qa
    from ownllm.finetune.checks import CHECK_PARAMS
    from ownllm.generate.open import open_engine
    from ownllm.home import atomic_write_text

    candidates = SETS_DIR / "general-candidates.jsonl"
    lines = candidates.read_text().splitlines()
    items = read_questions(candidates)
    results = run_qa(open_engine(model, dtype="fp32"), items, CHECK_PARAMS)
    kept = [lines[item.line - 1] for item, result in zip(items, results, strict=True) if result.scores["contains"]]
    by_domain: dict[str, list[int]] = {}
    for item, result in zip(items, results, strict=True):
        domain = json.loads(lines[item.line - 1]).get("domain", "other")
        by_domain.setdefault(domain, [0, 0])[0] += int(result.scores["contains"])
        by_domain[domain][1] += 1
    atomic_write_text(GENERAL, "".join(line + "\n" for line in kept))
    print(f"{GENERAL.relative_to(ROOT)}: {len(kept)} of {len(items)} questions the base answers right: "
          + ", ".join(f"{d} {right}/{total}" for d, (right, total) in by_domain.items()))


def run_set(name: str, recipe: Path, out: Path, extra: list[str], model: str | None = None) -> dict[str, float]:
    train, held_out = SETS[name]
    config = yaml.safe_load(recipe.read_text())
    if model:
        config["model"] = model
    config["data"] = str(train)
    config["checks"] = {"held-out": str(held_out), "retention": str(GENERAL)}
    config.pop("out", None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ownllm", "finetune", "--config", handle.name, "--out",
                             str(out / name), "--overwrite", *extra], capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    Path(handle.name).unlink()
    if result.returncode != 0:
        raise SystemExit(f"{name}: finetune failed:\n{result.stderr[-3000:]}")
    checks = json.loads((out / name / "meta.json").read_text())["checks"]
    return {"held_out_base": checks["held-out"]["base"], "held_out": checks["held-out"]["tuned"],
            "retention_base": checks["retention"]["base"], "retention": checks["retention"]["tuned"],
            "general_items": checks["retention"]["items"], "minutes": round(minutes, 1)}


def report(rows: dict[str, dict[str, float]]) -> None:
    print(f"{'set':<14}{'held-out':>10}{'retention':>11}{'minutes':>9}")
    for name, row in rows.items():
        mark = "  (honest: no tuning decision saw it)" if name == HONEST else ""
        print(f"{name:<14}{row['held_out']:>10.0%}{row['retention']:>11.0%}{row['minutes']:>9.1f}{mark}")
    tuning = [row for name, row in rows.items() if name != HONEST]
    if tuning:
        for label, pick in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
            print(f"{label + ' (tuning sets)':<14}{pick([r['held_out'] for r in tuning]):>10.0%}"
                  f"{pick([r['retention'] for r in tuning]):>11.0%}{max(r['minutes'] for r in tuning):>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (default: the recipe's; smollm2-135m-instruct for "
                        "--select-general)")
    parser.add_argument("--select-general", action="store_true", help="rebuild general.jsonl for --model and stop")
    parser.add_argument("--recipe", type=Path, default=ROOT / "examples" / "finetune-facts.yaml")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "retention")
    parser.add_argument("--json", type=Path, help="write every set's figures here")
    args, extra = parser.parse_known_args()  # anything else goes to `ownllm finetune` (e.g. --max-steps 40)
    if args.select_general:
        select_general(args.model or "smollm2-135m-instruct")
        return
    if not GENERAL.is_file():
        raise SystemExit(f"{GENERAL} is missing: run with --select-general first")
    names = args.sets.split(",")
    unknown = [name for name in names if name not in SETS]
    if unknown:
        raise SystemExit(f"unknown set(s) {', '.join(unknown)} (sets: {', '.join(SETS)})")
    rows = {}
    for name in names:
        rows[name] = run_set(name, args.recipe, args.out, extra, args.model)
        print(f"{name}: held-out {rows[name]['held_out']:.0%}, retention {rows[name]['retention']:.0%}, "
              f"{rows[name]['minutes']} min", flush=True)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
