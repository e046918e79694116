"""`ownllm pull` of the default model into an empty home: the GGUF's conversion as ownllm does it (one parse of the
metadata for tokenizer, config and weights, `one_reader_per_file`) against transformers' own loading of the same
file (a parse per use, a tensor-name map per module), same run, each side in a fresh process and home.

    python bench/pull.py [--model smollm2-135m-instruct] [--runs 2]

Prints each side's conversion seconds (median of the runs), the ratio, and the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def convert_once(model: str, one_parse: bool) -> dict[str, float]:
    """In the child process: pull `model` into the (empty) home given by $OWNLLM_HOME."""
    from ownllm.models import pull as pulling

    if not one_parse:  # transformers' own loading: each of tokenizer, config and weights parses the file
        pulling.one_reader_per_file = contextlib.nullcontext  # type: ignore[assignment]
    started = time.perf_counter()
    pulling.pull(model)
    return {"seconds": time.perf_counter() - started,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def side(model: str, one_parse: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "OWNLLM_HOME": home, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, __file__, "--child", model, str(int(one_parse))], env=env,
                                capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(convert_once(sys.argv[2], sys.argv[3] == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    for name, one_parse in (("transformers' own loading (a parse per use)", False),
                            ("ownllm (one parse, one name map)", True)):
        runs = [side(args.model, one_parse) for _ in range(args.runs)]
        rows[name] = (statistics.median(r["seconds"] for r in runs), max(r["peak_rss_mib"] for r in runs))
    print(f"{'pull ' + args.model:<46}{'seconds':>9}{'peak RSS':>11}")
    for name, (seconds, rss) in rows.items():
        print(f"{name:<46}{seconds:>9.1f}{rss:>8.0f} MiB")
    (before, _), (after, _) = rows.values()
    print(f"ratio: {before / after:.2f}x faster")


if __name__ == "__main__":
    main()
