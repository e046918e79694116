"""A model folder's tokenizer loaded with its added tokens listed in tokenizer_config.json (what ownllm writes since
session 49) against the same files without the list (what transformers 5 writes), same run, alternated.

    python bench/tokenizer_load.py [MODEL] [--loads 10]

MODEL: a pulled model or a model folder (default: the default model). Prints the best and median seconds per load
for each side, the ratio, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from ownllm.models.resolve import resolve
from ownllm.models.tokenizer_files import record_added_tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(source: Path, folder: Path, *, listed: bool) -> Path:
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("added_tokens_decoder", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if listed:
        record_added_tokens(folder)
    return folder


def load_seconds(folder: Path) -> float:
    started = time.process_time()
    AutoTokenizer.from_pretrained(str(folder))
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    source = resolve(args.model).path
    with tempfile.TemporaryDirectory() as work:
        without = copy_tokenizer(source, Path(work) / "without", listed=False)
        listed = copy_tokenizer(source, Path(work) / "listed", listed=True)
        load_seconds(without), load_seconds(listed)  # warm: imports, file cache
        times: dict[Path, list[float]] = {without: [], listed: []}
        for _ in range(args.loads):
            for folder in times:
                times[folder].append(load_seconds(folder))
    print(f"{args.model}: tokenizer load, CPU seconds over {args.loads} loads each")
    print(f"{'':<24}{'best':>8}{'median':>9}")
    for name, folder in (("without the list", without), ("added tokens listed", listed)):
        print(f"{name:<24}{min(times[folder]):>8.3f}{statistics.median(times[folder]):>9.3f}")
    ratio = statistics.median(times[without]) / statistics.median(times[listed])
    print(f"ratio (median without / listed): {ratio:.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
