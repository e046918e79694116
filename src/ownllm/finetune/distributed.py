"""Data-parallel training through torchrun: `ownllm finetune ... --nproc N` starts N processes of
`python -m ownllm.finetune.launch RUN_DIR`; transformers' Trainer sees torchrun's environment and wraps the model
in DDP (gloo on CPU, NCCL on GPU). The calling process checks the run folder, makes replay answers and scores
the base before, and reports after, so that work happens once, not once per process.

The processes are named by module, not imported: launch.py runs the recipe (it imports run.py), and run.py
calls this launcher, so the dependency goes one way.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ownllm.errors import OwnLLMError
from ownllm.finetune.outcome import TrainingInterrupted, TrainOutcome
from ownllm.finetune.run_folder import OUTCOME_FILE

WORKER_MODULE = "ownllm.finetune.launch"


def train_distributed(run_dir: Path, processes: int, *, resume: bool) -> TrainOutcome:
    """Train the run in `run_dir` (its config.yaml) in `processes` torchrun processes; rank 0 reports back."""
    outcome_file = run_dir / OUTCOME_FILE
    outcome_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", WORKER_MODULE, str(run_dir), *(["--resume"] if resume else [])]
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
