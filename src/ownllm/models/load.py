"""The one model-loading path: resolved source + device + dtype → (model, tokenizer)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.collector import start_up_done
from ownllm.errors import OwnLLMError
from ownllm.models.adapters import Adapter, LoraWeights
from ownllm.models.dtype import DtypeChoice, choose_dtype
from ownllm.models.gguf_file import check_gguf, gguf_tensors, one_reader_per_file
from ownllm.models.gguf_int4 import remember_gguf
from ownllm.models.memory import context_length_of
from ownllm.models.resolve import ResolvedModel, resolve
from ownllm.models.scope import AdapterScope

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    source: ResolvedModel
    dtype: DtypeChoice
    device: str
    prefix_embeds: Any = None  # [virtual tokens, hidden]: a prompt-tuning adapter, put before every prompt
    # a LoRA adapter with a scope (models/scope.py), kept apart from `model` (the base) and routed per prompt
    lora: LoraWeights | None = None
    scope: AdapterScope | None = None

    @property
    def context_length(self) -> int:
        return context_length_of(self.model.config, self.tokenizer)


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise OwnLLMError("CUDA was asked for but no GPU is visible", param="device", kind="unsupported")
    return requested


def _source_args(source: ResolvedModel) -> tuple[str, dict[str, Any]]:
    """What from_pretrained needs for this source: a location plus keyword arguments."""
    if source.kind == "gguf":
        check_gguf(source.path)
        return str(source.path.parent), {"gguf_file": source.path.name}
    return source.location, {}


def load_gguf_weights(path: Path, *, dtype: Any) -> Any:
    """transformers' model from a GGUF file, dequantized to `dtype`; refused where the file's tensors do not make
    the model its metadata describes: tensors missing (transformers would fill them with random values), a shape
    that does not fit, or layers past its block count (transformers would drop them without a word)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    with gguf_errors(path):
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True),
            ignore_mismatched_sizes=True, output_loading_info=True)  # mismatches listed below, not raised unnamed
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, expected = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise OwnLLMError(f"'{path}': {key} is stored as {list(stored)}, but the architecture its metadata "
                          f"describes takes {list(expected)}{more}", param="model",
                          hint="is it a complete GGUF? download or export it again")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise OwnLLMError(f"'{path}' lacks {len(missing)} of the weights its architecture needs ({shown}): it "
                          "would run with random values there", param="model",
                          hint="is it a complete GGUF? download or export it again")
    _, tensors = gguf_tensors(path)
    blocks = {int(match[1]) for tensor in tensors if (match := re.match(r"blk\.(\d+)\.", tensor.name))}
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if layers < 1 or (blocks and max(blocks) >= layers):
        raise OwnLLMError(f"'{path}' holds tensors of {max(blocks) + 1 if blocks else 0} layers, but its metadata "
                          f"says {layers} (block_count): the model would run without the rest", param="model",
                          hint="is its metadata intact? download or export it again")
    return model


@contextlib.contextmanager
def gguf_errors(path: Path) -> Iterator[None]:
    """What transformers or gguf raise on a GGUF whose metadata `check_gguf` does not read (a version, an
    architecture transformers does not load, text that is not UTF-8) as an error that names the file."""
    try:
        yield
    except _GGUF_LOAD_ERRORS as exc:
        raise _gguf_error(path, exc) from None


_GGUF_LOAD_ERRORS = (ValueError, UnicodeDecodeError, OverflowError, KeyError, IndexError)


def _gguf_error(path: Path, exc: BaseException) -> OwnLLMError:
    return OwnLLMError(f"'{path}' cannot be loaded: {exc.__class__.__name__}: {_first_line(exc)}", param="model",
                       hint="is it a complete GGUF of a supported architecture?")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def load_tokenizer(spec: str | ResolvedModel) -> Any:
    """Only the tokenizer: cheap, for `ownllm tokenize` and data statistics."""
    from transformers import AutoTokenizer

    start_up_done()  # (the llama.cpp backend, classifier and reward heads load through here, not load_model)
    source = spec if isinstance(spec, ResolvedModel) else resolve(spec)
    if source.kind == "adapter" and not (source.path / "tokenizer_config.json").is_file():
        return load_tokenizer(_adapter_base(source))  # PEFT saves none: its base's, as load_model uses then
    location, args = _source_args(source)
    with _hub_errors(source), _gguf_reading(source):
        return AutoTokenizer.from_pretrained(location, **args)


def _gguf_reading(source: ResolvedModel) -> contextlib.AbstractContextManager[None]:
    return one_reader_per_file() if source.kind == "gguf" else contextlib.nullcontext()


def load_model(spec: str | ResolvedModel, *, dtype: str = "auto", device: str = "auto", batch_rows: int = 1,
               quantize: str | None = None, scoped: bool = False, gguf_int4: bool = False) -> LoadedModel:
    """Load weights and tokenizer for inference.

    Args:
        spec: alias, pulled name, HF folder, .gguf file or hub id.
        dtype: auto (measured for this hardware), fp32, bf16 or fp16.
        device: auto, cpu or cuda[:N].
        batch_rows: how many sequences will usually decode together (the dtype is measured for that).
        gguf_int4: the caller runs a GGUF's 4-bit tensors as stored where it can (a server's `--gguf-int4`): that
            kernel then runs the few-row steps in either dtype, so fp32 is timed as F.linear alone (`choose_dtype`'s
            `narrow_fp32`).
        quantize: "4bit" (QLoRA) or "nf4" loads the weights as NF4 with bitsandbytes, computing in `dtype`;
            "int8" as LLM.int8 (bitsandbytes' 8-bit absmax with outliers kept in 16 bits).
        scoped: a LoRA adapter folder with a scope (ownllm.models.scope) comes back as the base model with the
            adapter's deltas and scope beside it (`lora`, `scope`), for an engine that routes each prompt; without
            it (or for any other adapter) the adapter is merged, as training, merging and export need.
    """
    import torch
    import transformers.modeling_utils  # noqa: F401  (from_pretrained's own import, done before start_up_done)
    from transformers import AutoConfig, AutoModelForCausalLM

    start_up_done()  # the model libraries are in: a CLI verb's start-up collector pause ends here
    source = spec if isinstance(spec, ResolvedModel) else resolve(spec)
    if quantize is not None:
        check_quant(quantize)
        if source.kind == "gguf":  # transformers cannot put bitsandbytes on weights it dequantizes from a GGUF
            raise OwnLLMError(f"--quant applies to Hugging Face model folders; {source.path} is a GGUF file, already "
                              "quantized as stored", param="quant",
                              hint="run it as it is (no --quant), or --backend llama.cpp")
    if source.kind == "adapter":
        return _load_adapter(source, dtype=dtype, device=device, batch_rows=batch_rows, quantize=quantize,
                             scoped=scoped, gguf_int4=gguf_int4)
    device = pick_device(device)
    with _gguf_reading(source):  # tokenizer, config and weights from one parse of a GGUF's metadata
        tokenizer = load_tokenizer(source)
        location, args = _source_args(source)
        with _hub_errors(source):
            config = AutoConfig.from_pretrained(location, **args)
        # fp32 steps of a few rows run as transposed products in the slot forward, unless the weights are
        # bitsandbytes' or a GGUF's 4-bit ones run as stored
        narrow = quantize is None and not (gguf_int4 and source.gguf_file is not None)
        choice = choose_dtype(dtype, device, config, batch_rows, narrow_fp32=narrow)
        with _hub_errors(source):
            if source.kind == "gguf":
                model = load_gguf_weights(source.path, dtype=getattr(torch, choice.dtype))
            else:
                extra = {} if quantize is None else (
                    _eight_bit(device) if quantize == "int8" else _four_bit(choice.dtype, device))
                model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, choice.dtype), **extra)
    if quantize is None:
        model.to(device)
    model.eval()
    if quantize is None and device == "cpu" and source.gguf_file is not None:
        remember_gguf(model, source.gguf_file)  # its 4-bit tensors can then run as stored (generate/slots.py)
    log.info("loaded %s on %s in %s (%s)", source.name, device, choice.dtype, choice.reason)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, dtype=choice, device=device)


def _four_bit(compute_dtype: str, device: str) -> dict[str, Any]:
    """NF4 with double quantisation; checked before loading, so a missing backend costs no work."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise OwnLLMError("4-bit loading needs bitsandbytes", kind="unsupported", param="method",
                          hint="pip install bitsandbytes (0.45+ has CPU and CUDA backends)") from None
    except RuntimeError as exc:  # installed, but no backend for this hardware
        raise OwnLLMError(f"bitsandbytes cannot run here: {exc}", kind="unsupported", param="method") from None
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    return {"quantization_config": config, "device_map": {"": device}}


QUANTS = ("int8", "nf4")  # what --quant offers for running a model (the transformers backend)


def check_quant(quantize: str) -> None:
    """A --quant value bitsandbytes can load with ("4bit" is QLoRA's own name for nf4)."""
    if quantize not in (*QUANTS, "4bit"):
        raise OwnLLMError(f"unknown quantization '{quantize}' for running a model", param="quant",
                          hint=f"use one of {', '.join(QUANTS)} (or export a GGUF: ownllm export MODEL --quant q8_0)")


def _eight_bit(device: str) -> dict[str, Any]:
    """LLM.int8 (absmax 8-bit with fp16 outliers); checked before loading, so a missing backend costs no work."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise OwnLLMError("8-bit loading needs bitsandbytes", kind="unsupported", param="quant",
                          hint="pip install bitsandbytes (0.45+ has CPU and CUDA backends)") from None
    except RuntimeError as exc:
        raise OwnLLMError(f"bitsandbytes cannot run here: {exc}", kind="unsupported", param="quant") from None
    # "inputs will be cast to float16", once per layer on every forward: how its kernel works, nothing to fix
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device}}


def _load_adapter(source: ResolvedModel, *, dtype: str, device: str, batch_rows: int,
                  quantize: str | None = None, scoped: bool = False, gguf_int4: bool = False) -> LoadedModel:
    """Base model + adapter: LoRA merged for inference speed (the weights in memory are the tuned model), prompt
    tuning as learned embeddings put before every prompt (there is nothing to merge)."""
    adapter = Adapter.open(source.path)  # checked before the base is loaded: a bad folder costs no work
    base = load_model(_adapter_base(source, adapter), dtype=dtype, device=device, batch_rows=batch_rows,
                      quantize=quantize, gguf_int4=gguf_int4)
    tokenizer = load_tokenizer(source) if (source.path / "tokenizer_config.json").is_file() else base.tokenizer
    if adapter.kind == "prompt_tuning":
        return LoadedModel(model=base.model, tokenizer=tokenizer, source=source, dtype=base.dtype,
                           device=base.device, prefix_embeds=adapter.prefix_embeddings(base.model))
    scope = AdapterScope.load(source.path) if scoped else None
    if scope is not None:
        try:
            lora = adapter.lora_weights()
        except OwnLLMError as exc:
            log.warning("%s: its scope is not used, the adapter applies to every prompt (%s)", source.path, exc)
        else:
            log.info("%s: %s", source.path, scope.describe())
            return LoadedModel(model=base.model, tokenizer=tokenizer, source=source, dtype=base.dtype,
                               device=base.device, lora=lora, scope=scope)
    return LoadedModel(model=adapter.merge_into(base.model), tokenizer=tokenizer, source=source, dtype=base.dtype,
                       device=base.device)


def _adapter_base(source: ResolvedModel, adapter: Adapter | None = None) -> ResolvedModel:
    """The model an adapter folder was trained on (itself a tuned run, for a run trained on another); an error
    where it names none, or names the folder itself (which would load in circles)."""
    adapter = adapter or Adapter.open(source.path)
    if adapter.base_model is None:
        raise OwnLLMError(f"{source.path}: the adapter does not say which base model it belongs to",
                          kind="not_found", param="model")
    base = resolve(adapter.base_model)
    if base.kind == "adapter" and base.path.resolve() == source.path.resolve():
        raise OwnLLMError(f"{source.path}: the adapter names itself as its base model", param="model",
                          hint="its adapter_config.json's base_model_name_or_path should name the model it tuned")
    return base


class _hub_errors:
    """Turn the hub's OSError (offline, no such repo) into an error that says how to get the model, and what
    transformers or gguf raise on a GGUF whose metadata `check_gguf` does not read (a version, an architecture
    transformers does not load, text that is not UTF-8) into one that names the file."""

    def __init__(self, source: ResolvedModel) -> None:
        self.source = source

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if self.source.kind == "gguf" and isinstance(exc, _GGUF_LOAD_ERRORS):
            raise _gguf_error(self.source.path, exc) from None
        if self.source.kind == "folder" and isinstance(exc, Exception) and not isinstance(exc, OSError | OwnLLMError):
            # a local folder whose files transformers cannot make a model of (weights cut short, a config with
            # values of the wrong type): name the folder, not a traceback from deep in the loader
            raise OwnLLMError(f"'{self.source.location}' cannot be loaded: {exc.__class__.__name__}: "
                              f"{_first_line(exc)}", param="model",
                              hint="are its config.json and weight files complete? copy or save them again") from None
        if exc is None or not isinstance(exc, OSError):
            return False
        if self.source.kind == "hub":
            raise OwnLLMError(
                f"could not load '{self.source.location}' from the Hugging Face hub or its local cache "
                f"(offline, or no such repository)",
                kind="not_found",
                param="model",
                hint=f"when online run: ownllm pull {self.source.location}; or pass a local folder or .gguf",
            ) from None
        raise OwnLLMError(
            f"could not read model files in '{self.source.location}': {exc}", kind="not_found", param="model"
        ) from None
