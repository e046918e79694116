"""One resolver for every way a user names a model: alias → local HF folder → .gguf file → hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ownllm.errors import OwnLLMError
from ownllm.finetune.run_folder import final_model_path  # the declared leaf: the run-folder format
from ownllm.models.adapters import CONFIG_FILE as ADAPTER_CONFIG
from ownllm.models.adapters import Adapter
from ownllm.models.aliases import load_aliases
from ownllm.models.registry import list_local_models, local_model

SourceKind = Literal["folder", "gguf", "hub", "adapter"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights of a model the user named are."""

    spec: str
    kind: SourceKind
    location: str  # folder path, .gguf path or hub id
    name: str

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def gguf_file(self) -> Path | None:
        """The GGUF file the weights are (a .gguf) or were converted from (a pulled folder keeps it), if any."""
        if self.kind == "gguf":
            return self.path
        if self.kind == "folder" and (self.path / "model.gguf").is_file():
            return self.path / "model.gguf"
        return None


def resolve(spec: str) -> ResolvedModel:
    """Turn what the user typed into a place to load from, or an error that says what exists."""
    if not spec or not spec.strip():
        raise OwnLLMError("no model given", param="model", hint="name an alias, a folder, a .gguf file or a hub id")
    spec = spec.strip()
    pulled = local_model(spec)
    if pulled is not None:
        return ResolvedModel(spec, "folder", str(pulled.path), pulled.name)
    aliases = load_aliases()
    if spec in aliases:
        raise OwnLLMError(
            f"model '{spec}' is known but not pulled yet",
            kind="not_found",
            param="model",
            hint=f"run: ownllm pull {spec}",
        )
    path = Path(spec).expanduser()
    if path.is_dir() and final_model_path(path).is_dir():  # a fine-tuning run folder: use what it produced
        path = final_model_path(path)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return ResolvedModel(spec, "adapter", str(path.resolve()), path.resolve().parent.name)
        if (path / "config.json").is_file():
            return ResolvedModel(spec, "folder", str(path.resolve()), path.resolve().name)
        raise OwnLLMError(
            f"folder '{spec}' holds no config.json, so it is not a Hugging Face model folder",
            kind="not_found",
            param="model",
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(spec, "gguf", str(path.resolve()), path.stem)
        raise OwnLLMError(f"'{spec}' is a file but not a .gguf model", param="model")
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise OwnLLMError(f"no such file or folder: {spec}", kind="not_found", param="model")
    if _HUB_ID.match(spec):
        return ResolvedModel(spec, "hub", spec, spec.split("/")[-1])
    raise unknown_model_error(spec)


def unknown_model_error(spec: str) -> OwnLLMError:
    local = [m.name for m in list_local_models()]
    pullable = sorted(set(load_aliases()) - set(local))
    listing = f"local models: {', '.join(local) or 'none'}; aliases you can pull: {', '.join(pullable)}"
    return OwnLLMError(
        f"unknown model '{spec}' ({listing})",
        kind="not_found",
        param="model",
        hint="pull one with: ownllm pull NAME, or pass a folder, a .gguf file or a hub id",
    )


def files_identity(spec: str, *, adapter_files: bool = False) -> list[str]:
    """What identifies a model's weights on this machine: its kind, its location and, for a local folder or file,
    each file's name, size and modification time (a hub id is its name; its cached snapshot is fixed by revision).
    Measurements and answers kept for a model are keyed by it, so that replacing the files retakes them. An adapter
    is its place alone unless `adapter_files`: then its own files and its base's identity too (the fine-tuning
    cache keys adapters by place, and its kept keys must not change)."""
    source = resolve(spec)
    files: list[str] = []
    adapter = adapter_files and source.kind == "adapter"
    if source.kind in ("folder", "gguf") or adapter:
        place = source.path
        for entry in sorted(place.iterdir()) if place.is_dir() else [place]:
            if entry.is_file():
                stat = entry.stat()
                files.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
    if adapter:
        base = Adapter.open(source.path).base_model  # its base by place only: a base naming itself cannot recurse
        files += ["base", *files_identity(base)] if base else []
    return [source.kind, source.location, *files]
