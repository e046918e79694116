"""Quantization trade-offs measured: `ownllm quantize compare` on the default model (general-knowledge questions
it answers) and on a run of the shipped fine-tuning example (its held-out fact questions), every format's size,
peak RAM, single-stream tok/s, perplexity and QA accuracy as deltas to fp32. With llama-cpp-python installed the
GGUF rows' speed and RAM are llama.cpp's own (and q4_k_m joins the list).

    python bench/quantize.py [--run runs/facts] [--formats fp32,bf16,int8,nf4,q8_0,q4_0] [--out bench/quantize-out]

--run: a finished run of examples/finetune-facts.yaml (`ownllm finetune --config examples/finetune-facts.yaml`);
without it only the default model is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ownllm.export.compare import compare_formats, default_formats, markdown
from ownllm.models.pull import pull

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--run", type=Path, help="a finished run of examples/finetune-facts.yaml")
    parser.add_argument("--formats", default=",".join(default_formats()))
    parser.add_argument("--out", type=Path, default=Path("bench/quantize-out"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--speed-tokens", type=int, default=64)
    args = parser.parse_args()
    pull(args.model)
    cases = [(args.model, DATA / "general-retention.jsonl", args.out / "default-model")]
    if args.run is not None:
        cases.append((str(args.run), DATA / "facts-heldout.jsonl", args.out / "facts-run"))
    for spec, data, out in cases:
        report = compare_formats(spec, data, out, formats=args.formats.split(","),
                                 max_new_tokens=args.max_new_tokens, speed_tokens=args.speed_tokens,
                                 progress=lambda message: print(message, flush=True))
        print(markdown(report), flush=True)


if __name__ == "__main__":
    main()
