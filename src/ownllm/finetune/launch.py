"""One training process of a run folder: `python -m ownllm.finetune.launch RUN_DIR [--resume]`.

`ownllm finetune ... --nproc N` starts N of them under torchrun (see distributed.py); `accelerate launch -m
ownllm.finetune.launch RUN_DIR` does the same with FSDP or DeepSpeed (docs/multi-gpu.md). Each reads the run
folder's config.yaml and trains; rank 0 writes the outcome for the launcher.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

from ownllm.finetune.config import load_config
from ownllm.finetune.outcome import TrainingInterrupted
from ownllm.finetune.run import train
from ownllm.finetune.run_folder import CONFIG_FILE, OUTCOME_FILE
from ownllm.home import atomic_write_json


def _worker(run_dir: Path, resume: bool) -> int:
    """One torchrun process: train, then (rank 0) write the outcome for the launcher."""
    cfg = load_config(run_dir / CONFIG_FILE)
    rank = int(os.environ.get("RANK", "0"))
    try:
        outcome = train(cfg, run_dir, Path(cfg.data), resume=resume)
    except TrainingInterrupted as stop:
        if rank == 0:
            atomic_write_json(run_dir / OUTCOME_FILE, {"interrupted_at": stop.step})
        return 130
    if rank == 0:
        atomic_write_json(run_dir / OUTCOME_FILE, asdict(outcome))
    return 0


if __name__ == "__main__":
    import logging

    from ownllm.collector import import_at_start

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    import_at_start("torch", "transformers", "transformers.modeling_utils", "transformers.trainer", "peft")
    arguments = sys.argv[1:]
    raise SystemExit(_worker(Path(arguments[0]), "--resume" in arguments))
