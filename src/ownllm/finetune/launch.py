"""Data-parallel training through torchrun: `ownllm finetune ... --nproc N` starts N processes of
`python -m ownllm.finetune.launch RUN_DIR`; transformers' Trainer sees torchrun's environment and wraps the model
in DDP (gloo on CPU, NCCL on GPU). The calling process checks the run folder, makes replay answers and scores
the base before, and reports after, so that work happens once, not once per process.

Multi-GPU users who want FSDP or DeepSpeed instead: see docs/multi-gpu.md (accelerate configs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ownllm.errors import OwnLLMError

if TYPE_CHECKING:
    from ownllm.finetune.run import TrainOutcome

OUTCOME_FILE = "train_outcome.json"


def train_distributed(run_dir: Path, processes: int, *, resume: bool) -> TrainOutcome:
    from ownllm.finetune.run import TrainingInterrupted, TrainOutcome

    outcome_file = run_dir / OUTCOME_FILE
    outcome_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "ownllm.finetune.launch", str(run_dir), *(["--resume"] if resume else [])]
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():  # the CPU cores are shared out, not oversubscribed
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # the workers got the same Ctrl-C: they agree on a step, checkpoint and stop
            continue
    if outcome_file.is_file():
        data = json.loads(outcome_file.read_text())
        if "interrupted_at" in data:
            raise TrainingInterrupted(run_dir, data["interrupted_at"])
        return TrainOutcome(**data)
    raise OwnLLMError(f"the {processes} training processes failed (exit {code}); their messages are above",
                      kind="training_failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(run_dir: Path, resume: bool) -> int:
    """One torchrun process: train, then (rank 0) write the outcome for the launcher."""
    from dataclasses import asdict

    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import TrainingInterrupted, train
    from ownllm.home import atomic_write_json

    cfg = load_config(run_dir / "config.yaml")
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

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    arguments = sys.argv[1:]
    raise SystemExit(_worker(Path(arguments[0]), "--resume" in arguments))
