"""The alias table: data shipped in aliases.yaml, extended by the user's $OWNLLM_HOME/aliases.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ownllm.errors import OwnLLMError
from ownllm.home import ownllm_home

_FIELDS = {"description", "pypi", "file", "hub", "dtype"}


@dataclass(frozen=True)
class Alias:
    name: str
    description: str = ""
    pypi: str | None = None
    file: str | None = None
    hub: str | None = None
    dtype: str = "bfloat16"


def _parse(table: Any, origin: str) -> dict[str, Alias]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise OwnLLMError(f"{origin}: expected a mapping of alias names to entries")
    aliases = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise OwnLLMError(f"{origin}: alias '{name}' must be a mapping with fields {sorted(_FIELDS)}")
        unknown = set(entry) - _FIELDS
        if unknown:
            raise OwnLLMError(
                f"{origin}: alias '{name}' has unknown field(s) {sorted(unknown)}",
                hint=f"allowed fields: {', '.join(sorted(_FIELDS))}",
            )
        if not entry.get("hub") and not (entry.get("pypi") and entry.get("file")):
            raise OwnLLMError(f"{origin}: alias '{name}' needs 'hub', or 'pypi' and 'file'")
        aliases[str(name)] = Alias(name=str(name), **entry)
    return aliases


def load_aliases() -> dict[str, Alias]:
    """Shipped aliases, overridden by the user's own file when it exists."""
    shipped = resources.files("ownllm.models").joinpath("aliases.yaml").read_text(encoding="utf-8")
    aliases = _parse(yaml.safe_load(shipped), "ownllm/models/aliases.yaml")
    user_file = ownllm_home() / "aliases.yaml"
    if user_file.is_file():
        try:
            user_table = yaml.safe_load(user_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise OwnLLMError(f"{user_file}: not valid YAML ({exc.__class__.__name__})") from None
        aliases.update(_parse(user_table, str(user_file)))
    return aliases
