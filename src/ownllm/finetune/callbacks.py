"""What a training run shows and keeps while it runs: a progress bar (loss, tokens/s, ETA), a metrics.jsonl
line per step, and a clean stop with a checkpoint on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ownllm.home import atomic_write_text

if TYPE_CHECKING:
    from ownllm.finetune.dataset import EpochRows


class MetricsLog(TrainerCallback):
    """Every logged step as one JSON line; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and state.is_world_process_zero:
            with self.path.open("a") as handle:
                handle.write(json.dumps({**_progress(state, self.started), **logs}) + "\n")


def _progress(state: Any, started: float) -> dict[str, Any]:
    """Step, epoch, seconds and non-padding tokens seen (all processes together) with their rate."""
    elapsed = time.time() - started
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    return {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "seconds": round(elapsed, 2),
            "tokens_seen": tokens, "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else 0.0}


class ProgressBar(TrainerCallback):
    """One tqdm bar over the run's steps (its ETA included) with the latest loss and tokens/s beside it;
    validation losses are printed above the bar as they come."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.started = time.time()
        self.tokens_at_start = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
            self.started = time.time()
            self.tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is None or not logs:
            return
        if "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")
        elif "loss" in logs:
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens_at_start
            rate = tokens / max(time.time() - self.started, 1e-9)
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:.0f}", refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM ends the run at the next step boundary with a checkpoint, so `--resume` loses
    nothing. A second Ctrl-C stops at once. With several processes they agree on the stop (all-reduce), so none
    is left waiting for the others."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if _agree(self.requested):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _agree(flag: bool) -> bool:
    """True on every process when any process has `flag` set."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class VariantEpochs(TrainerCallback):
    """Tells EpochRows (finetune.dataset) which epoch begins, so that its rows are that epoch's variants; the
    epoch comes from the trainer's state, so a resumed run continues with the epoch it stopped in."""

    def __init__(self, rows: EpochRows) -> None:
        self.rows = rows

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows.epoch = int(state.epoch or 0)
