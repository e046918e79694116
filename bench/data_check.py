"""`ownllm data check FILE --model M` with its training-speed measurement taken (an empty hardware.json, as the
first check on a machine, and every check before session 54) against kept (every later check), same run,
alternated, each a real `ownllm` process on a home of its own that shares the pulled models.

    python bench/data_check.py [--model smollm2-135m-instruct] [--data examples/data/facts-train.jsonl] [--rounds 3]

Prints each side's wall seconds and its children's CPU seconds per check (best and median), the ratio of the
medians, and the peak RSS of the largest check.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ownllm.home import ownllm_home

ROOT = Path(__file__).resolve().parents[1]


def one_check(home: Path, model: str, data: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `ownllm data check` in `home` (exit status checked)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ownllm", "data", "check", str(data), "--model", model],
                            env={**os.environ, "OWNLLM_HOME": str(home)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"error: ownllm data check failed: {result.stderr.strip()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "facts-train.jsonl")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"error: {args.data}: no such file", file=sys.stderr)
        return 2
    models = ownllm_home() / "models"
    sides: dict[str, list[tuple[float, float]]] = {"measured": [], "kept": []}
    with tempfile.TemporaryDirectory(prefix="ownllm-bench-check-") as scratch:
        home = Path(scratch)
        if models.is_dir():
            (home / "models").symlink_to(models)
        one_check(home, args.model, args.data)  # the dtype verdicts, so that both sides measure only the speed
        for _ in range(args.rounds):
            kept = home / "hardware.json"
            saved = kept.read_text()
            sides["kept"].append(one_check(home, args.model, args.data))
            kept.write_text(saved.replace('"training_speed"', '"training_speed_dropped"'))  # as if never taken
            sides["measured"].append(one_check(home, args.model, args.data))
    medians = {}
    print(f"ownllm data check {args.data.name} --model {args.model}, {args.rounds} rounds alternated")
    print(f"{'side':>10s} {'wall best':>10s} {'wall median':>12s} {'CPU best':>9s} {'CPU median':>11s}")
    for side, runs in sides.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        medians[side] = statistics.median(walls)
        print(f"{side:>10s} {min(walls):10.2f} {statistics.median(walls):12.2f} {min(cpus):9.2f} "
              f"{statistics.median(cpus):11.2f}")
    print(f"ratio of the medians (measured / kept): {medians['measured'] / medians['kept']:.2f}x")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of the largest check (a measuring one): {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
