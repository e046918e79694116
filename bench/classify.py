"""Classification head + LoRA on the default model vs a logistic regression on MiniLM sentence embeddings of the
same texts (a strong, cheap baseline), on the shipped support tickets (examples/classify/).

    OMP_NUM_THREADS=1 python bench/classify.py --out /tmp/classify-bench [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "classify"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ownllm-classify-bench"))
    parser.add_argument("--epochs", type=float, default=2)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from ownllm.finetune.classify import read_labelled
    from ownllm.models.embeddings import load_embedder

    train, test = read_labelled(DATA / "tickets-train.jsonl"), read_labelled(DATA / "tickets-test.jsonl")
    started = time.time()
    embedder = load_embedder()
    regression = LogisticRegression(max_iter=2000).fit(embedder.embed([i.text for i in train]),
                                                        [i.label for i in train])
    predicted = regression.predict(embedder.embed([i.text for i in test]))
    gold = [i.label for i in test]
    baseline = {"accuracy": accuracy_score(gold, predicted), "macro_f1": f1_score(gold, predicted, average="macro"),
                "seconds": time.time() - started}
    run = args.out / "run"
    started = time.time()
    env = {**os.environ, "COLUMNS": "200"}
    subprocess.run([sys.executable, "-m", "ownllm", "finetune", "smollm2-135m-instruct", "--task", "classify",
                    "--data", str(DATA / "tickets-train.jsonl"), "--out", str(run), "--overwrite", "--epochs",
                    str(args.epochs), "--batch-size", "8", "--lr", "5e-4", "--val-ratio", "0"], check=True, env=env,
                   capture_output=True)
    train_seconds = time.time() - started
    done = subprocess.run([sys.executable, "-m", "ownllm", "eval", "classify", str(run), "--data",
                           str(DATA / "tickets-test.jsonl"), "--out", str(args.out / "eval"), "--json"], check=True,
                          env=env, capture_output=True, text=True)
    head = json.loads(done.stdout)
    print(f"| model | accuracy | macro-F1 | time |\n|---|---:|---:|---:|\n"
          f"| majority class ({head['majority_class']}) | {head['majority_accuracy']:.1%} | - | - |\n"
          f"| logistic regression on MiniLM embeddings | {baseline['accuracy']:.1%} | {baseline['macro_f1']:.3f} | "
          f"{baseline['seconds']:.0f} s |\n"
          f"| SmolLM2-135M + classification head + LoRA ({args.epochs:g} epochs) | {head['accuracy']:.1%} | "
          f"{head['macro_f1']:.3f} | {train_seconds:.0f} s training |\n({head['items']} test texts, {len(train)} "
          "training texts)")


if __name__ == "__main__":
    main()
