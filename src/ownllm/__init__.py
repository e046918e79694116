"""ownllm: run, fine-tune, evaluate and serve your own LLM, locally."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ownllm.api import LLM


def load(model: str, **options: Any) -> LLM:
    """Load a model (see `ownllm.api.load`); heavy imports happen only here."""
    from ownllm.api import load as _load

    return _load(model, **options)


def pull(source: str, **options: Any) -> Any:
    """Pull a model into the model home (see `ownllm.models.pull.pull`)."""
    from ownllm.models.pull import pull as _pull

    return _pull(source, **options)


__all__ = ["__version__", "load", "pull"]
