"""The run folder `ownllm finetune` writes, as one format: its file names, its record, and how to read them.

    config.yaml  meta.json  metrics.jsonl  loss.png  README.md (run card)  checks-base.json  replay.jsonl
    checkpoints/checkpoint-N/   final/ (the adapter or the whole model, with ownllm_run.json beside the weights)

Layering: this module imports nothing from ownllm but `ownllm.errors`, so that the layers below fine-tuning
(models/ resolving and loading a run, jobs/ reading one) may import it. It is the one declared exception to
"imports point down" (listed in tests/test_layering.py); keep it a leaf.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ownllm.errors import OwnLLMError

CONFIG_FILE = "config.yaml"  # written first, before any training: it marks a folder as a run folder
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
CARD_FILE = "README.md"
BASE_CHECKS_FILE = "checks-base.json"  # the base model's scores on the check sets, kept for resume
REPLAY_FILE = "replay.jsonl"  # the base model's replay answers, kept for resume
OUTCOME_FILE = "train_outcome.json"  # what the torchrun processes hand back to the launcher
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' Trainer names them checkpoint-STEP
FINAL_DIR = "final"
RECORD_FILE = "ownllm_run.json"  # in final/: which base the result belongs to


@dataclass(frozen=True)
class RunRecord:
    """What final/ was made from: the base model's location, the method, and the model as the user named it."""

    base_model: str
    method: str = ""
    spec: str = ""


def is_run_folder(path: Path) -> bool:
    """A folder `ownllm finetune` made (finished or not)."""
    return (path / CONFIG_FILE).is_file()


def final_model_path(run: Path) -> Path:
    """Where a run keeps what it produced (an adapter or a whole model); it exists once training finished."""
    return run / FINAL_DIR


def checkpoints_path(run: Path) -> Path:
    return run / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(checkpoint: Path) -> int:
    """The training step a checkpoint folder was saved at."""
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint (Trainer writes trainer_state.json last)."""
    found = [p for p in checkpoints_path(run).glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()]
    return max(found, key=checkpoint_step, default=None)


def read_record(model_folder: Path) -> RunRecord | None:
    """The run record in `model_folder` (a run's final/), or None when the folder has none (not made by a run)."""
    path = model_folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OwnLLMError(f"{path} is not valid JSON: {exc}", param="model") from None
    if not isinstance(data, dict) or not isinstance(data.get("base_model"), str) or not data["base_model"]:
        raise OwnLLMError(f"{path} does not name the base model (its field base_model)", param="model")
    return RunRecord(**{f.name: str(data[f.name]) for f in fields(RunRecord) if data.get(f.name) is not None})


def write_record(model_folder: Path, record: RunRecord) -> Path:
    """Write the run record into `model_folder` whole or not at all (temp file + rename)."""
    from ownllm.home import atomic_write_text

    path = model_folder / RECORD_FILE
    atomic_write_text(path, json.dumps(asdict(record), indent=2, ensure_ascii=False) + "\n")
    return path
