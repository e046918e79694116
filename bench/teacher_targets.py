"""Replay's KL teacher targets read in fp32 against under the bf16 autocast the training steps run in (where this
CPU's bf16 is measured faster): CPU seconds, the ratio, and the KL a bf16-autocast student starts at with each.

    .venv/bin/python bench/teacher_targets.py [MODEL] [--rows N] [--rounds N]

The rows are the shipped replay prompts, each with one short answer; the two sides take turns, one thread.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ANSWER = "Here is a short answer to that question, in a sentence or two, as the base model might give it."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rows < 8 or args.rounds < 1:
        parser.error("--rows must be 8 or more and --rounds 1 or more")

    import torch
    from transformers import TrainingArguments

    from ownllm.data.formats import Example
    from ownllm.errors import OwnLLMError
    from ownllm.finetune.dataset import encode
    from ownllm.finetune.distill import TeacherCollator, attach_teacher, distill_trainer_class, teacher_targets
    from ownllm.finetune.replay import replay_prompts
    from ownllm.models.load import load_model

    torch.set_num_threads(1)
    try:
        loaded = load_model(args.model, dtype="fp32")
    except OwnLLMError as exc:
        parser.exit(2, f"error: {exc}\n")
    model, tokenizer = loaded.model, loaded.tokenizer
    pad = tokenizer.eos_token_id
    rows = [encode(Example(i, messages=[{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": ANSWER}]), tokenizer, 512)
            for i, prompt in enumerate(replay_prompts(None)[: args.rows])]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for mixed in (False, True):
            start = time.process_time()
            teacher_targets(model, rows, pad, mixed_bf16=mixed)
            seconds[mixed].append(time.process_time() - start)
    with tempfile.TemporaryDirectory() as folder:
        trainer = distill_trainer_class()(model=model, args=TrainingArguments(folder, use_cpu=True, report_to=[]))
        kl = {}
        for mixed in (False, True):
            taught = [dict(row) for row in rows[:8]]
            attach_teacher(taught, teacher_targets(model, taught, pad, mixed_bf16=mixed))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # training's batches of 4
                kl[mixed] = [float(trainer.compute_loss(model, TeacherCollator(pad)(taught[i : i + 4])))
                             for i in (0, 4)]
    print(f"{args.model}: {len(rows)} replay rows, {sum(len(r['input_ids']) for r in rows)} tokens, one thread")
    print(f"{'teacher targets read':<24}{'CPU-s (median)':>16}{'runs':>22}   KL before step 1 (two batches)")
    for mixed, name in ((False, "fp32"), (True, "under bf16 autocast")):
        runs = ", ".join(f"{s:.2f}" for s in seconds[mixed])
        print(f"{name:<24}{statistics.median(seconds[mixed]):>16.2f}{runs:>22}   "
              + ", ".join(f"{x:.5f}" for x in kl[mixed]))
    print(f"ratio fp32 / autocast: {statistics.median(seconds[False]) / statistics.median(seconds[True]):.2f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
