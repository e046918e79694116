"""A pytest plugin: each test's CPU (user and system) with every process it starts, in a cgroup v1 `cpuacct`
group of its own (Linux, root). The test worker and its CLI zygote move into the group for the test, so servers,
CLI children, torchrun workers and job forkservers a test starts are counted to it for their whole lives.

    .venv/bin/python -m pytest -n 2 --dist loadfile -p bench.cpu_per_test ...   # writes /tmp/cpu-per-test/*.jsonl
    .venv/bin/python bench/cpu_per_test.py [FOLDER]                               # totals by file, then by test

Use an unthrottled run (`bench/slower_cpu.sh` puts the suite in a `cpu` group; this uses `cpuacct`, so both work).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GROUPS = Path("/sys/fs/cgroup/cpuacct/ownllm-cpu-per-test")
OUT = Path(os.environ.get("OWNLLM_CPU_PER_TEST", "/tmp/cpu-per-test"))
_count = 0


def _move(pid: int, group: Path) -> None:
    with contextlib.suppress(OSError):  # (a process that ended meanwhile)
        (group / "cgroup.procs").write_text(str(pid))


def _zygote_pid() -> int | None:
    from tests import conftest

    process = getattr(conftest._ZYGOTE, "_process", None)
    return process.pid if process is not None and process.poll() is None else None


def _seconds(group: Path) -> tuple[float, float]:
    return (int((group / "cpuacct.usage_user").read_text()) / 1e9,
            int((group / "cpuacct.usage_sys").read_text()) / 1e9)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _count
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    group = GROUPS / f"{worker}-{_count}"
    _count += 1
    if _count == 1:  # this worker's list starts anew: rows of an earlier run would name groups reset since
        (OUT / f"{worker}.jsonl").unlink(missing_ok=True)
    group.mkdir(parents=True, exist_ok=True)
    # a group of that name left by an earlier run (the same worker and count) still holds its CPU time
    (group / "cpuacct.usage").write_text("0")
    for pid in (os.getpid(), _zygote_pid()):
        if pid is not None:
            _move(pid, group)
    started = time.time()
    yield
    for pid in (_zygote_pid(), os.getpid()):
        if pid is not None:
            _move(pid, GROUPS.parent)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / f"{worker}.jsonl", "a") as handle:
        handle.write(json.dumps({"test": item.nodeid, "group": str(group), "worker": worker, "start": started,
                                 "end": time.time()}) + "\n")


def summary(folder: Path) -> None:
    """By file, then the 30 costliest tests; read at the end, when the processes a test left running are gone."""
    rows: list[dict[str, Any]] = [json.loads(line) for path in sorted(folder.glob("*.jsonl"))
                                  for line in path.read_text().splitlines() if line]
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        row["user"], row["sys"] = _seconds(Path(row["group"]))
        totals = by_file[re.sub(r"::.*", "", row["test"])]
        totals[0] += row["user"]
        totals[1] += row["sys"]
    print(f"all tests: {sum(r['user'] for r in rows):,.0f} user + {sum(r['sys'] for r in rows):,.0f} sys CPU-s")
    timed = [r for r in rows if "start" in r]
    if timed:  # a worker that ends early leaves the other alone: one thread on a two-core quota
        began = min(r["start"] for r in timed)
        for worker in sorted({r["worker"] for r in timed}):
            ended = max(r["end"] for r in timed if r["worker"] == worker)
            print(f"  {worker}: last test ended {ended - began:,.0f} s after the first began")
    for name, (user, system) in sorted(by_file.items(), key=lambda kv: -sum(kv[1]))[:30]:
        print(f"{user + system:8.1f}  sys {system:6.1f}  {name}")
    print()
    for row in sorted(rows, key=lambda r: -(r["user"] + r["sys"]))[:30]:
        print(f"{row['user'] + row['sys']:8.1f}  sys {row['sys']:6.1f}  {row['test']}")


if __name__ == "__main__":
    summary(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
