"""Training speed and memory: ownllm finetune (LoRA, QLoRA, full) vs a plain PyTorch LoRA loop, same data,
same steps, each in its own process (peak RSS is its own).

    python bench/finetune.py [--steps 20] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "examples" / "finetune" / "train.jsonl"
MODEL = "smollm2-135m-instruct"


def _rows() -> tuple[list[dict], object]:
    from ownllm.finetune.dataset import load_rows
    from ownllm.models.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    return load_rows(DATA, tokenizer, 512), tokenizer


def _ownllm(method: str, steps: int, batch: int) -> dict:
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import run

    rows, _ = _rows()
    with tempfile.TemporaryDirectory() as work:
        cfg = load_config(None, model=MODEL, data=str(DATA), out=f"{work}/run", method=method, max_steps=steps,
                          batch_size=batch, lr=1e-4, val_ratio=0, save_every=10_000, eval_every=10_000)
        start = time.perf_counter()
        result = run(cfg)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "train_seconds": result.seconds, "tokens": _tokens(rows, steps, batch)}


def _tokens(rows: list[dict], steps: int, batch: int) -> int:
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return int(mean * batch * steps)


def _naive(steps: int, batch: int) -> dict:
    """The loop people write by hand: LoRA via peft, AdamW, fixed order, no scheduler, no checkpoints."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ownllm.finetune.dataset import Collator
    from ownllm.models.load import load_model

    rows, tokenizer = _rows()
    model = get_peft_model(load_model(MODEL, dtype="fp32").model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collate = Collator(tokenizer.pad_token_id)
    start = time.perf_counter()
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        loss = model(**collate(chunk)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "train_seconds": seconds, "tokens": _tokens(rows, steps, batch)}


CONTESTANTS = {
    "ownllm finetune lora (fp32)": lambda s, b: _ownllm("lora", s, b),
    "ownllm finetune qlora (nf4)": lambda s, b: _ownllm("qlora", s, b),
    "ownllm finetune full (fp32)": lambda s, b: _ownllm("full", s, b),
    "plain PyTorch LoRA loop": _naive,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = CONTESTANTS[args.one](args.steps, args.batch_size)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    from ownllm.models.pull import pull

    pull(MODEL)
    results = {}
    for name in CONTESTANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch-size",
                               str(args.batch_size)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}")
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive = results.get("plain PyTorch LoRA loop")
    print(f"{args.steps} steps of batch {args.batch_size} on {DATA.name}")
    print(f"{'run':30s} {'train tok/s':>11s} {'vs plain loop':>13s} {'train s':>8s} {'total s':>8s} {'peak RSS':>9s}")
    for name, r in results.items():
        rate = r["tokens"] / r["train_seconds"]
        ratio = f"{rate / (naive['tokens'] / naive['train_seconds']):.2f}x" if naive else "-"
        print(f"{name:30s} {rate:11.0f} {ratio:>13s} {r['train_seconds']:8.1f} {r['seconds']:8.1f} "
              f"{r['peak_rss_mb']:7.0f}MB")


if __name__ == "__main__":
    main()
