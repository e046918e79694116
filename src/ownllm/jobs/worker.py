"""One fine-tuning job in its own process: `python -m ownllm.jobs.worker DATA_DIR JOB_ID BASE_MODEL`.

It trains with `ownllm finetune`'s recipe into DATA_DIR/runs/JOB_ID, reports steps and checkpoints into jobs.db,
and ends the job as succeeded or failed. SIGTERM (cancel, or the server going away) stops it at the next step
with a checkpoint; a job that was not cancelled stays `running`, and the server's job manager starts a new
worker that resumes from that checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ownllm.errors import OwnLLMError
from ownllm.finetune.config import FinetuneConfig, LoraSettings
from ownllm.finetune.outcome import TrainingInterrupted
from ownllm.finetune.replay import replay_rows
from ownllm.finetune.run import run
from ownllm.finetune.run_folder import METRICS_FILE, checkpoint_name, checkpoint_step, latest_checkpoint
from ownllm.home import atomic_write_text
from ownllm.jobs.store import FINAL, JobStore, fine_tuned_name
from ownllm.jobs.validate import validate_or_fail

log = logging.getLogger(__name__)
BASE_LR = 2e-4  # learning_rate_multiplier 1.0


def hyperparameters(job: dict[str, Any]) -> dict[str, Any]:
    """The job's hyper-parameters: the top-level ones (older API) overlaid by method.<type>.hyperparameters."""
    method = json.loads(job["method"])
    values = dict(json.loads(job["hyperparameters"]))
    values.update((method.get(method.get("type", "supervised")) or {}).get("hyperparameters") or {})
    return values


def resolved_hyperparameters(job: dict[str, Any], examples: int) -> dict[str, Any]:
    """`auto` made concrete the way OpenAI describes it: more epochs for small files, batch ~0.2% of the data."""
    given = hyperparameters(job)

    def pick(name: str, auto: Any) -> Any:
        value = given.get(name, "auto")
        return auto if value in ("auto", None) else value

    batch = int(pick("batch_size", max(1, min(8, round(examples * 0.002)) or 1)))
    epochs = int(pick("n_epochs", 3 if examples >= 100 else max(3, min(10, math.ceil(100 / max(examples, 1))))))
    return {"n_epochs": epochs, "batch_size": batch,
            "learning_rate_multiplier": float(pick("learning_rate_multiplier", 1.0)),
            **({"beta": float(given["beta"])} if "beta" in given and given["beta"] != "auto" else {}),
            **({"compute_multiplier": float(pick("compute_multiplier", 1.0))}
               if json.loads(job["method"]).get("type") == "reinforcement" else {}),
            **({"max_steps": int(given["max_steps"])} if given.get("max_steps") else {})}


def config_for(store: JobStore, job: dict[str, Any], base: str, examples: int) -> FinetuneConfig:
    """ownllm's fine-tuning defaults (LoRA, replay by distillation against forgetting) with the job's
    hyper-parameters; about four checkpoints per job, counting the replay rows each epoch adds."""
    hp = resolved_hyperparameters(job, examples)
    method_spec = json.loads(job["method"])
    method = {"dpo": "dpo", "reinforcement": "grpo"}.get(method_spec.get("type"), "lora")
    rl: dict[str, Any] = {}
    if method == "grpo":  # the grader as a reward function, from a file beside the run (the run folder is made later)
        grader = store.runs_dir / f"{job['id']}.grader.json"
        if not grader.is_file():
            atomic_write_text(grader, json.dumps(method_spec["reinforcement"]["grader"]))
        rl = {"reward_fn": [f"openai-grader:{grader}"],
              "num_generations": max(2, round(4 * hp["compute_multiplier"]))}
    cfg = FinetuneConfig(
        model=base, data=str(store.file_path(job["training_file"])),
        validation=str(store.file_path(job["validation_file"])) if job["validation_file"] and method != "grpo"
        else None,
        out=str(store.runs_dir / job["id"]), method=method, epochs=float(hp["n_epochs"]),
        max_steps=hp.get("max_steps", -1), batch_size=hp["batch_size"], lr=BASE_LR * hp["learning_rate_multiplier"],
        val_ratio=0.0, seed=int(job["seed"]), dpo_beta=hp.get("beta", 0.1), lora=LoraSettings(), **rl)
    steps_per_epoch = math.ceil((examples + (0 if rl else replay_rows(cfg, examples))) / hp["batch_size"])
    total = hp.get("max_steps") or steps_per_epoch * hp["n_epochs"]
    cfg.eval_every = cfg.save_every = max(1, math.ceil(total / 4))
    return cfg


class JobProgress(TrainerCallback):
    """Training steps as job events (type `metrics`), saved checkpoints as job checkpoints."""

    def __init__(self, store: JobStore, job: dict[str, Any]) -> None:
        self.store, self.job = store, job
        self.last: dict[str, Any] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            self.last = {"step": step, "train_loss": round(float(logs["loss"]), 6), "total_steps": total}
            message = f"Step {step}/{total}: training loss={logs['loss']:.4f}"
            if "reward" in logs:  # reinforcement: the grader's mean score of this step's samples
                self.last["train_mean_reward"] = round(float(logs["reward"]), 6)
                message += f", mean reward={logs['reward']:.4f}"
            self.store.add_event(self.job["id"], message, data=dict(self.last), kind="metrics")
        elif "eval_loss" in logs:
            self.last["valid_loss"] = round(float(logs["eval_loss"]), 6)
            self.store.add_event(self.job["id"], f"Step {step}/{total}: validation loss={logs['eval_loss']:.4f}",
                                 data={"step": step, "valid_loss": self.last["valid_loss"], "total_steps": total},
                                 kind="metrics")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / checkpoint_name(state.global_step)
        self.store.add_checkpoint(self.job["id"], state.global_step,
                                  {k: v for k, v in self.last.items() if k != "total_steps"}, str(folder))


def metrics_csv(run_dir: Path) -> str:
    """step, train_loss, valid_loss (and train_mean_reward for reinforcement) per step: OpenAI's result file columns
    that apply here."""
    rows: dict[int, dict[str, Any]] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        row = rows.setdefault(record["step"], {"step": record["step"], "train_loss": "", "valid_loss": ""})
        if "loss" in record:
            row["train_loss"] = record["loss"]
        if "eval_loss" in record:
            row["valid_loss"] = record["eval_loss"]
        if "reward" in record:
            row["train_mean_reward"] = record["reward"]
    out = io.StringIO()
    rewarded = any("train_mean_reward" in row for row in rows.values())
    writer = csv.DictWriter(out, fieldnames=["step", "train_loss", "valid_loss", *(["train_mean_reward"] if rewarded
                                                                                  else [])], restval="")
    writer.writeheader()
    writer.writerows(rows[step] for step in sorted(rows))
    return out.getvalue()


def run_job(store: JobStore, job_id: str, base: str) -> None:
    job = store.get_job(job_id)
    if job is None or job["status"] in FINAL:
        return
    examples = validate_or_fail(store, job)
    if examples is None:
        return
    cfg = config_for(store, job, base, examples)
    run_dir = Path(cfg.out)
    checkpoint = latest_checkpoint(run_dir)
    store.set_status(job_id, "running", f"Resuming from step {checkpoint_step(checkpoint)}" if checkpoint
                     else "Fine-tuning job started", worker_pid=os.getpid())
    store.update_job(job_id, hyperparameters=json.dumps(resolved_hyperparameters(job, examples)))
    try:
        result = run(cfg, resume=checkpoint is not None, overwrite=checkpoint is None,
                     callbacks=[JobProgress(store, job)])
    except TrainingInterrupted as stop:
        if store.get_job(job_id)["cancel_requested"]:  # type: ignore[index]
            store.set_status(job_id, "cancelled", "Job cancelled")
        else:
            store.add_event(job_id, f"Paused at step {stop.step} (server stopping); it resumes when the server "
                                    "is back")
        return
    except OwnLLMError as exc:
        store.set_status(job_id, "failed", f"Job failed: {exc}", error={"code": "training_failed",
                                                                      "message": str(exc), "param": exc.param})
        return
    staged = store.files_dir / f".{job_id}.csv.tmp"
    atomic_write_text(staged, metrics_csv(run_dir))
    result_file = store.add_file("step_metrics.csv", "fine-tune-results", staged)
    store.set_status(job_id, "succeeded", "The job has successfully completed",
                     fine_tuned_model=fine_tuned_name(job), trained_tokens=result.trained_tokens,
                     result_files=[result_file["id"]])


def _stop_when_orphaned() -> None:
    """The server gone (killed, or restarted) means nobody manages this job: checkpoint and stop, so the next
    server resumes it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="ownllm-orphan-watch").start()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    data_dir, job_id, base = Path(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # before training: just go; the job resumes later
    _stop_when_orphaned()
    store = JobStore(data_dir)
    try:
        run_job(store, job_id, base)
    except Exception as exc:  # a bug must fail the job with a message, not leave it running forever
        (store.runs_dir / f"{job_id}.error.log").write_text(traceback.format_exc())
        store.set_status(job_id, "failed", f"Job failed: internal error ({exc.__class__.__name__}: {exc})",
                         error={"code": "internal_error", "message": str(exc), "param": None})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
