"""CLI start-up: wall time, CPU time and peak RSS of the verbs that load no model (issue 13), and of one that does
(`generate` of one token with the default model, which must be pulled).

Each command runs in a fresh `python -m ownllm` process, `--runs` times; we report the median and the fastest wall
time (the fastest is the least disturbed by other load), the median CPU time (user + system) and the largest peak
RSS (from the child's own rusage). Point PYTHONPATH at another checkout's src/ to measure that one instead.

    python bench/cli_startup.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "facts-train.jsonl"
COMMANDS = {
    "ownllm --help": ["--help"],
    "ownllm models": ["models"],
    "ownllm jobs list --url http://127.0.0.1:9": ["jobs", "list", "--url", "http://127.0.0.1:9"],
    "ownllm data check examples/data/facts-train.jsonl": ["data", "check", str(DATA)],
    "ownllm generate smollm2-135m-instruct hi --max-new-tokens 1": ["generate", "smollm2-135m-instruct", "hi",
                                                                    "--max-new-tokens", "1"],
}


def measure(args: list[str]) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS in bytes, exit code, CPU seconds) of one `python -m ownllm ARGS`."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "ownllm", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the sum over all children
    process.returncode = os.waitstatus_to_exitcode(status)
    return (time.perf_counter() - start, usage.ru_maxrss * 1024, process.returncode,
            usage.ru_utime + usage.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for label, argv in COMMANDS.items():
        runs = [measure(argv) for _ in range(args.runs)]
        rows.append({"command": label, "exit_code": runs[0][2],
                     "wall_s_median": round(statistics.median(r[0] for r in runs), 2),
                     "wall_s_min": round(min(r[0] for r in runs), 2),
                     "cpu_s_median": round(statistics.median(r[3] for r in runs), 2),
                     "peak_rss_mb": round(max(r[1] for r in runs) / 1e6)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| command | exit code | wall, median | wall, fastest | CPU, median | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| `{row['command']}` | {row['exit_code']} | {row['wall_s_median']:.2f} s | {row['wall_s_min']:.2f} s "
              f"| {row['cpu_s_median']:.2f} s | {row['peak_rss_mb']} MB |")


if __name__ == "__main__":
    main()
