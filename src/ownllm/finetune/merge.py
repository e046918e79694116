"""`ownllm merge`: a fine-tuning run's LoRA adapter folded into its base, saved as a standalone model folder."""

from __future__ import annotations

import json
from pathlib import Path

from ownllm.data.files import check_output_folder
from ownllm.errors import OwnLLMError
from ownllm.home import atomic_folder
from ownllm.models.tokenizer_files import save_tokenizer

MERGE_RECORD = "merged_from.json"  # marks a folder as merge output, so a later merge may replace it


def merge(run: str, out: Path) -> Path:
    """Write base + LoRA adapter as one HF folder at `out` (whole or not at all); greedy output is unchanged.

    Raises:
        OwnLLMError: `run` is not an adapter (param run), is a prompt-tuning run, which has no weights to merge
            (kind unsupported, param run), or `out` is not a folder that may be (re)written (param out).
            Nothing is written then.
    """
    from ownllm.models.adapters import Adapter
    from ownllm.models.load import load_model
    from ownllm.models.resolve import resolve

    check_output_folder(out, param="out", replaces=MERGE_RECORD)  # replaced whole: never a user's folder
    source = resolve(run)
    if source.kind != "adapter":
        raise OwnLLMError(f"'{run}' is not a LoRA run or adapter folder", param="run",
                          hint="a full fine-tune's final/ folder is already a standalone model")
    Adapter.open(source.path, param="run").check_mergeable(param="run")
    loaded = load_model(source, dtype="fp32")
    with atomic_folder(out) as staging:
        loaded.model.save_pretrained(staging, safe_serialization=True)
        save_tokenizer(loaded.tokenizer, staging)
        (staging / MERGE_RECORD).write_text(json.dumps({"adapter": str(source.path)}) + "\n")
    return out
