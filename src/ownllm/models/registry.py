"""Models pulled into the model home: one folder each, with an `ownllm.json` manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownllm.home import models_dir

MANIFEST = "ownllm.json"


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def local_model(name: str) -> LocalModel | None:
    """The pulled model called `name`, if its folder is complete (has a manifest)."""
    if not name or "/" in name or name.startswith("."):
        return None
    folder = models_dir() / name
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    return LocalModel(name=name, path=folder, manifest=json.loads(manifest.read_text(encoding="utf-8")))


def list_local_models() -> list[LocalModel]:
    found = (local_model(p.name) for p in sorted(models_dir().iterdir()) if p.is_dir())
    return [m for m in found if m is not None]
