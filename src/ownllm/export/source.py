"""What an export reads: a model as the user named it, or a fine-tuning run merged into its base first.

The architecture is checked from the config alone, before any weights load, so an unsupported model or a
prompt-tuning run is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ownllm.errors import OwnLLMError
from ownllm.models.adapters import Adapter
from ownllm.models.resolve import ResolvedModel, resolve


@dataclass(frozen=True)
class SourceInfo:
    """A model to export, checked but not loaded: where it is, its config, and its LoRA adapter if it is a run."""

    source: ResolvedModel
    config: Any  # the (base) model's transformers config
    adapter: Adapter | None


@dataclass
class ExportSource:
    """A loaded model to export: full weights in fp32 (a LoRA run already merged), its tokenizer and config."""

    name: str
    model: Any
    tokenizer: Any
    config: Any


def inspect_source(spec: str, *, supported: dict[str, Any] | None = None) -> SourceInfo:
    """Resolve `spec` and read its config; with `supported` (architecture name → anything), refuse others.

    Raises:
        OwnLLMError: no such model, a prompt-tuning run (nothing to merge: kind unsupported, param model), or an
            architecture that is not in `supported` (kind unsupported).
    """
    source = resolve(spec)
    adapter = None
    config_source = source
    if source.kind == "adapter":
        adapter = Adapter.open(source.path)
        adapter.check_mergeable(param="model")
        if adapter.base_model is None:
            raise OwnLLMError(f"{source.path}: the adapter does not say which base model it belongs to",
                              kind="not_found", param="model")
        config_source = resolve(adapter.base_model)
    config = read_config(config_source)
    if supported is not None:
        architecture = getattr(config, "model_type", None)
        if architecture not in supported:
            raise OwnLLMError(f"'{spec}' is a {architecture} model; export to GGUF supports "
                              f"{', '.join(sorted(supported))}", kind="unsupported", param="model",
                              hint="export it as an HF folder (--format hf) and convert it with llama.cpp's "
                                   "convert_hf_to_gguf.py")
    return SourceInfo(source=source, config=config, adapter=adapter)


def read_config(source: ResolvedModel) -> Any:
    """The transformers config of a resolved model (reads config.json or the GGUF header, no weights)."""
    from transformers import AutoConfig

    if source.kind == "gguf":
        location, args = str(source.path.parent), {"gguf_file": source.path.name}
    else:
        location, args = source.location, {}
    try:
        return AutoConfig.from_pretrained(location, **args)
    except (OSError, ValueError, KeyError) as exc:
        raise OwnLLMError(f"cannot read the config of '{source.spec}': {exc}", kind="not_found",
                          param="model") from None


def load_source(info: SourceInfo) -> ExportSource:
    """The weights in fp32 (what every export format starts from: no precision lost before quantizing)."""
    from ownllm.models.load import load_model

    loaded = load_model(info.source, dtype="fp32", device="cpu")
    return ExportSource(name=info.source.name, model=loaded.model, tokenizer=loaded.tokenizer,
                        config=loaded.model.config)
