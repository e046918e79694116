"""`ownllm serve` start-up with the GGUF's packed 4-bit weights read back from the home against packed afresh.

Each round starts a real `python -m ownllm serve MODEL --port 0 --no-jobs` twice, alternating which goes first: once
with `$OWNLLM_HOME/int4-cache` emptied (the server unpacks the GGUF's 4-bit tensors, checks each against the loaded
weight and packs it for the int4 kernel, as every start did before), once with the entry that start left. Each is
timed to its start-up line (the socket listens), with the server's CPU seconds then and its peak RSS, and stopped.
The model must be pulled; other kept state (compiled graphs, hardware.json) is left as it is for both sides.

    OWNLLM_HOME=<home with the model> python bench/server_start.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ownllm.home import ownllm_home

FOLDER = "int4-cache"  # (ownllm.generate.slots.FOUR_BIT_FOLDER, without importing torch here)


def start_once(model: str) -> tuple[float, float, int, str]:
    """(wall s to the start-up line, the server's CPU s then, its peak RSS bytes then, the line)."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        began = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "ownllm", "serve", model, "--port", "0", "--no-jobs"],
                                  stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(server.pid)
        peak, line = 0, ""
        try:
            while not line:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {Path(log.name).read_text()[-2000:]}")
                peak = max(peak, watched.memory_info().rss)
                found = re.search(r"^serving .*$", Path(log.name).read_text(), re.MULTILINE)
                line = found.group(0) if found else ""
                time.sleep(0.02)
            wall = time.perf_counter() - began
            times = watched.cpu_times()
            cpu = times.user + times.system
        finally:
            server.terminate()
            server.wait(timeout=60)
    return wall, cpu, peak, line


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kept = ownllm_home() / FOLDER
    start_once(args.model)  # warm the page cache and leave an entry
    results: dict[str, list[tuple[float, float, int]]] = {"packed afresh": [], "read back": []}
    for round_index in range(args.rounds):
        order = ["packed afresh", "read back"] if round_index % 2 == 0 else ["read back", "packed afresh"]
        for side in order:
            if side == "packed afresh":
                shutil.rmtree(kept, ignore_errors=True)
            elif not any(kept.glob("int4-*.safetensors")):
                start_once(args.model)  # (the other side just emptied it)
            wall, cpu, peak, line = start_once(args.model)
            if "GGUF 4-bit weights as stored" not in line:
                raise SystemExit(f"this server does not run the GGUF's 4-bit weights: {line}")
            results[side].append((wall, cpu, peak))
            print(f"round {round_index + 1} {side:14s} wall {wall:6.2f} s  CPU {cpu:6.2f} s  "
                  f"RSS {peak / 2**20:6.0f} MiB", flush=True)
    print(f"\n{'side':14s} {'wall best':>9s} {'median':>7s} {'CPU best':>9s} {'median':>7s} {'peak RSS':>9s}")
    medians = {}
    for side, rows in results.items():
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        medians[side] = (statistics.median(walls), statistics.median(cpus))
        print(f"{side:14s} {min(walls):9.2f} {medians[side][0]:7.2f} {min(cpus):9.2f} {medians[side][1]:7.2f} "
              f"{max(r[2] for r in rows) / 2**20:7.0f} MiB")
    wall_ratio = medians["packed afresh"][0] / medians["read back"][0]
    cpu_ratio = medians["packed afresh"][1] / medians["read back"][1]
    print(f"ratio of the medians (afresh / read back): wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x")
    entry = max(kept.glob("int4-*.safetensors"), key=os.path.getmtime, default=None)
    if entry is not None:
        print(f"kept entry: {entry.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
