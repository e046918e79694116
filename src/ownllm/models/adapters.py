"""PEFT adapter folders (LoRA and prompt tuning), read in one place for every use of them.

Loading a model merges a LoRA adapter into its base or puts a prompt-tuning prefix before every prompt;
batched serving keeps a LoRA adapter's deltas apart and adds them per row; `ownllm merge` folds LoRA into the
base. All of them open the folder here, so they accept and refuse the same folders with the same messages.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ownllm.errors import OwnLLMError
from ownllm.finetune.run_folder import read_record  # the declared leaf: the run-folder format, no upward import
from ownllm.models.scope import SCOPE_FILE

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
AdapterKind = Literal["lora", "prompt_tuning"]
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's safe and pickle formats
_KINDS: dict[str, AdapterKind] = {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning"}
_LABELS: dict[AdapterKind, str] = {"lora": "LoRA", "prompt_tuning": "prompt-tuning"}


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA adapter's low-rank deltas per (layer, projection) in fp32: x @ A.T @ B.T * scale."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float


@dataclass(frozen=True)
class Adapter:
    """A PEFT adapter folder ownllm can use, checked when opened.

    Attributes:
        kind: "lora" (weight deltas) or "prompt_tuning" (learned virtual tokens before every prompt).
        path: the folder (adapter_config.json + adapter_model.safetensors or .bin).
        base_model: the model it was trained on: ownllm's run record, else PEFT's base_model_name_or_path;
            None when neither says.
        config: adapter_config.json as read.
    """

    kind: AdapterKind
    path: Path
    base_model: str | None
    config: dict[str, Any]

    @classmethod
    def open(cls, folder: Path, *, kinds: tuple[AdapterKind, ...] = ("lora", "prompt_tuning"),
             param: str = "model") -> Adapter:
        """Read and check an adapter folder; `kinds` are the kinds the caller can use (others are refused).

        Raises:
            OwnLLMError: naming the missing file (not_found), an unreadable config, or the PEFT type that
                is not one of `kinds` (unsupported).
        """
        folder = Path(folder)
        label = " or ".join(_LABELS[kind] for kind in kinds) + " adapter folder"
        config_file = folder / CONFIG_FILE
        if not folder.is_dir():
            what = "it is a file" if folder.exists() else "it does not exist"
            raise OwnLLMError(f"{folder} is not a {label}: {what}", kind="not_found", param=param)
        if not config_file.is_file():
            raise OwnLLMError(f"{folder} is not a {label}: it has no {CONFIG_FILE}", kind="not_found", param=param)
        if not any((folder / name).is_file() for name in WEIGHTS_FILES):
            raise OwnLLMError(f"{folder} is not a {label}: it has no {' or '.join(WEIGHTS_FILES)}",
                              kind="not_found", param=param)
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:  # unreadable (permissions, I/O): named like a bad folder, not a traceback
            raise OwnLLMError(f"{config_file} cannot be read: {exc.strerror or exc}", param=param) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OwnLLMError(f"{config_file} is not valid JSON: {exc}", param=param) from None
        if not isinstance(config, dict):
            raise OwnLLMError(f"{config_file} must hold a JSON object", param=param)
        peft_type = config.get("peft_type")
        kind = _KINDS.get(peft_type) if isinstance(peft_type, str) else None
        if kind not in kinds:
            usable = " and ".join(_LABELS[k] for k in kinds)
            raise OwnLLMError(f"{config_file}: peft_type {peft_type} cannot be used here ({usable} adapters can)",
                              kind="unsupported", param=param)
        if config.get("task_type") == "SEQ_CLS":  # its head scores or labels text; the LM head never trained
            raise OwnLLMError(f"{folder} is a scoring head (a reward-model or classification run), not a model that "
                              "writes text", kind="unsupported", param=param,
                              hint="use ownllm score, ownllm classify or ownllm eval reward|classify")
        record = read_record(folder)
        base = record.base_model if record is not None else config.get("base_model_name_or_path")
        return cls(kind=kind, path=folder, base_model=base or None, config=config)

    @property
    def virtual_tokens(self) -> int:
        """How many learned tokens a prompt-tuning adapter puts before every prompt (0 for LoRA)."""
        return int(self.config.get("num_virtual_tokens") or 0) if self.kind == "prompt_tuning" else 0

    def lora_weights(self) -> LoraWeights:
        """The deltas per (decoder layer, projection module), in fp32 as PEFT keeps them (it upcasts bf16/fp16
        adapter weights when it loads an adapter), and the scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        from peft.utils import load_peft_weights

        self.check_separable()
        config = self.config
        alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
        scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
        tensors = load_peft_weights(str(self.path), device="cpu")
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in tensors.items():
            if "lora_embedding_" in key:
                raise OwnLLMError(f"{self.path}: the LoRA weight {key} is on an embedding, not a projection",
                                  kind="unsupported", param="adapter")
            if ".lora_A." not in key:
                continue
            parts = key.split(".")
            if "layers" not in parts:
                raise OwnLLMError(f"{self.path}: the LoRA weight {key} is not on a decoder layer",
                                  kind="unsupported", param="adapter")
            layer = int(parts[parts.index("layers") + 1])
            projection = parts[parts.index("lora_A") - 1]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weights[(layer, projection)] = (a.float(), b.float())
        return LoraWeights(weights, scale)

    def check_separable(self) -> None:
        """What `lora_weights` needs of the config alone, so that it can be checked before any model loads: LoRA
        without DoRA or per-module ranks and alphas, whose deltas can be kept apart from the base."""
        self._require("lora")
        config = self.config
        if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
            raise OwnLLMError(f"{self.path / CONFIG_FILE}: DoRA and per-module ranks or alphas are not supported "
                              "for adapters kept apart from the base", kind="unsupported", param="adapter",
                              hint="load it with the model (ownllm generate/serve FOLDER), which merges it")

    def prefix_embeddings(self, model: Any) -> torch.Tensor:
        """A prompt-tuning adapter's learned tokens [virtual tokens, hidden], in `model`'s dtype and device."""
        from peft import PeftModel

        self._require("prompt_tuning")
        tuned = PeftModel.from_pretrained(model, str(self.path))
        prefix = tuned.get_prompt_embedding_to_save(adapter_name="default").detach()
        return prefix.to(model.dtype).to(model.device)

    def check_mergeable(self, *, param: str = "model") -> None:
        """Only LoRA changes weights; prompt tuning has nothing that could be folded into a model."""
        if self.kind == "prompt_tuning":
            raise OwnLLMError(
                f"prompt tuning learns a prefix of {self.virtual_tokens} virtual tokens, not weights: there is "
                "nothing to merge; serve or generate with the run folder itself",
                kind="unsupported", param=param)

    def merge_into(self, model: Any) -> Any:
        """`model` with the LoRA deltas added to its weights (PEFT's merge_and_unload), in eval mode."""
        from peft import PeftModel

        self.check_mergeable()
        if (self.path / SCOPE_FILE).is_file():  # said once, where merge, export and a merged load all pass
            log.warning("%s has a scope (%s): merged weights apply the adapter to every prompt, so they keep less of "
                        "what the base knew than the adapter served by ownllm, which answers only prompts within its "
                        "scope, and they recall no training examples before a question", self.path, SCOPE_FILE)
        merged = PeftModel.from_pretrained(model, str(self.path)).merge_and_unload()
        merged.eval()
        return merged

    def _require(self, kind: AdapterKind) -> None:
        if self.kind != kind:
            raise OwnLLMError(f"{self.path} is a {_LABELS[self.kind]} adapter, not a {_LABELS[kind]} one",
                              kind="unsupported", param="adapter")
