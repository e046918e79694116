"""How soon a fine-tuning job starts training: workers forked from the server's forkserver (the default) against a
fresh interpreter per worker (`OWNLLM_JOB_FORKSERVER=0`, what every job did before), in the same run.

    python bench/job_start.py [--jobs 3]

Each side gets its own `ownllm serve` (the default model, its own data folder) and runs JOBS one-step jobs on the
shipped facts' first 16 lines, one after another; the clock runs from the create request to the job's first
training-step event. The first job of a forkserver server also starts the forkserver (it imports once, then forks):
it is reported apart from the later ones. Prints each side's times, the ratio, and the peak RSS of the server's
process tree while a job trains (a sum over processes: pages a forked worker shares with the forkserver count
twice, so it overstates the forked side).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo.extend(children.get(current, []))
    return total


def side(fork: bool, jobs: int, data: Path) -> tuple[list[float], int]:
    """Seconds from create to the first step for each job, and the peak RSS of the server's tree."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="job-start-"))
    env = {**os.environ, "OWNLLM_JOB_FORKSERVER": "1" if fork else "0"}
    with (folder / "serve.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "ownllm", "serve", MODEL, "--port", str(port), "--data-dir",
                                   str(folder / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {(folder / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        with data.open("rb") as handle:
            file_id = client.files.create(file=handle, purpose="fine-tune").id
        times, peak = [], 0
        for _ in range(jobs):
            started = time.monotonic()
            job = client.fine_tuning.jobs.create(model=MODEL, training_file=file_id,
                                                 hyperparameters={"batch_size": 4, "max_steps": 1, "n_epochs": 1})
            first_step = None
            while True:
                events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
                if first_step is None and any(e.message.startswith("Step ") for e in events):
                    first_step = time.monotonic() - started
                peak = max(peak, tree_rss(server.pid))
                status = client.fine_tuning.jobs.retrieve(job.id).status
                if status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
            if status != "succeeded" or first_step is None:
                raise SystemExit(f"job {job.id} ended {status}")
            times.append(first_step)
        return times, peak
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "facts.jsonl"
        data.write_text("".join((ROOT / "examples" / "data" / "facts-train.jsonl").read_text().splitlines(True)[:16]))
        fresh, fresh_rss = side(False, args.jobs, data)
        forked, forked_rss = side(True, args.jobs, data)
    print(f"{'workers':<34}{'first job':>10}{'later jobs (median)':>21}{'peak RSS':>11}")
    for name, times, rss in (("fresh interpreter (FORKSERVER=0)", fresh, fresh_rss),
                             ("forked from the forkserver", forked, forked_rss)):
        later = statistics.median(times[1:]) if len(times) > 1 else float("nan")
        print(f"{name:<34}{times[0]:>9.1f}s{later:>20.1f}s{rss / 2**30:>9.2f}GiB")
    if len(forked) > 1:
        print(f"later jobs start {statistics.median(fresh[1:]) / statistics.median(forked[1:]):.2f}x sooner forked")


if __name__ == "__main__":
    main()
