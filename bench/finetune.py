"""Training speed and memory: ownllm finetune (LoRA, QLoRA, full) vs the loop most tutorials show — HF `Trainer`
+ peft LoRA on examples padded to max_length — on the same data, steps and batch, each in its own process
(peak RSS is its own). Train tokens/s counts non-padding tokens only; the validation loss (assistant tokens of
held-out examples, one function for all) shows the speed is not bought with worse learning.

    python bench/finetune.py [--steps 20] [--batch-size 4] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "facts-train.jsonl"
MODEL = "smollm2-135m-instruct"
LR = 2e-4


def _split(work: Path) -> tuple[Path, Path]:
    """The same 80/20 split of the example data for every contestant."""
    lines = DATA.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    cut = int(len(lines) * 0.8)
    (work / "train.jsonl").write_text("".join(lines[:cut]))
    (work / "val.jsonl").write_text("".join(lines[cut:]))
    return work / "train.jsonl", work / "val.jsonl"


def _rows(path: Path, max_length: int) -> tuple[list[dict], Any]:
    from ownllm.finetune.dataset import load_rows
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    return load_rows(path, tokenizer, max_length), tokenizer


def _validation_loss(model: Any, rows: list[dict], pad: int) -> float:
    """Mean loss over the assistant tokens of the validation rows."""
    import torch

    from ownllm.finetune.dataset import Collator

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = Collator(pad)([row])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / count


def _ownllm(method: str, steps: int, batch: int, max_length: int, work: Path) -> dict:
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import run

    train, val = _split(work)
    cfg = load_config(None, model=MODEL, data=str(train), validation=str(val), out=str(work / "run"), method=method,
                      max_steps=steps, batch_size=batch, lr=LR, max_length=max_length, save_every=10_000,
                      eval_every=10_000)
    start = time.perf_counter()
    result = run(cfg)
    return {"seconds": time.perf_counter() - start, "train_seconds": result.seconds,
            "tokens": result.trained_tokens, "val_loss": result.eval_loss}


def _hf_trainer_padded(steps: int, batch: int, max_length: int, work: Path) -> dict:
    """What the tutorials write: tokenizer(..., padding="max_length"), labels = input_ids (pads masked), Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from ownllm.models.load import load_model

    train, val = _split(work)
    val_rows, tokenizer = _rows(val, max_length)
    texts = [json.loads(line)["messages"] for line in train.read_text().splitlines() if line]
    encoded = tokenizer([tokenizer.apply_chat_template(m, tokenize=False) for m in texts], padding="max_length",
                        truncation=True, max_length=max_length, return_tensors="pt")
    labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
    dataset = [{"input_ids": i, "attention_mask": a, "labels": lab}
               for i, a, lab in zip(encoded.input_ids, encoded.attention_mask, labels, strict=True)]
    model = get_peft_model(load_model(MODEL, dtype="fp32").model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "train_seconds": seconds, "tokens": int(trainer.state.num_input_tokens_seen),
            "val_loss": _validation_loss(model, val_rows, tokenizer.pad_token_id)}


CONTESTANTS = {
    "ownllm finetune lora (fp32)": lambda *a: _ownllm("lora", *a),
    "ownllm finetune qlora (nf4)": lambda *a: _ownllm("qlora", *a),
    "ownllm finetune full (fp32)": lambda *a: _ownllm("full", *a),
    "HF Trainer + peft, padded": _hf_trainer_padded,
}
BASELINE = "HF Trainer + peft, padded"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            result = CONTESTANTS[args.one](args.steps, args.batch_size, args.max_length, Path(work))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    from ownllm.models.pull import pull

    pull(MODEL)
    results = {}
    for name in CONTESTANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch-size",
                               str(args.batch_size), "--max-length", str(args.max_length)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}")
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    baseline = results.get(BASELINE)
    print(f"{args.steps} steps of batch {args.batch_size}, max length {args.max_length}, {DATA.name} (80/20 split)")
    print(f"{'run':28s} {'train tok/s':>11s} {'vs HF':>7s} {'train s':>8s} {'val loss':>9s} {'peak RSS':>9s}")
    for name, r in results.items():
        rate = r["tokens"] / r["train_seconds"]
        ratio = f"{rate / (baseline['tokens'] / baseline['train_seconds']):.2f}x" if baseline else "-"
        print(f"{name:28s} {rate:11.0f} {ratio:>7s} {r['train_seconds']:8.1f} {r['val_loss']:9.4f} "
              f"{r['peak_rss_mb']:7.0f}MB")


if __name__ == "__main__":
    main()
