"""Generation: sampling parameters, the Engine interface, its backends and chat sessions."""

from ownllm.generate.engine import Completion, Engine, TextDelta
from ownllm.generate.params import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "TextDelta"]
