"""Memory estimates (numbers from the rules of thumb) and the dtype choice."""

from __future__ import annotations

import hashlib
import json
import logging
import types

import pytest

from ownllm.errors import OwnLLMError
from ownllm.models import dtype as dtype_module
from ownllm.models.memory import estimate, parse_size, shape_for_size

GB = 1e9


def test_7b_weights() -> None:
    est = estimate(shape_for_size(parse_size("7B")))
    assert est.weights["fp32"] / GB == pytest.approx(28, rel=0.01)
    assert est.weights["bf16"] / GB == pytest.approx(14, rel=0.01)
    assert est.weights["int8"] / GB == pytest.approx(7, rel=0.01)
    assert est.weights["4-bit"] / GB == pytest.approx(3.5, rel=0.01)


def test_7b_kv_cache_and_training() -> None:
    est = estimate(shape_for_size(7_000_000_000), batch_size=1, seq_len=512)
    # Llama-2-7B: 32 layers x 32 kv heads x 128 dims x K,V x 2 bytes = 512 KiB per token
    assert est.kv_per_token == 2 * 32 * 32 * 128 * 2
    assert est.kv_full_context == est.kv_per_token * 4096
    full, lora, qlora = (est.training[k] for k in ("full (Adam)", "LoRA (bf16 base)", "QLoRA (4-bit base)"))
    assert full >= 16 * 7e9  # ~112 GB of weights, gradients and Adam state before activations
    assert qlora < lora < full
    assert est.lora_params == 16 * (4096 + 4096) * 4 * 32  # r x (in + out) for q, k, v, o in 32 layers
    assert est.training_no_ckpt["full (Adam)"] > full


def test_sizes_parse() -> None:
    assert parse_size("135M") == 135_000_000 and parse_size("1.5b") == 1_500_000_000
    assert parse_size("seven") is None
    with pytest.raises(OwnLLMError):
        estimate(shape_for_size(10**9), lora_targets="everything")


@pytest.mark.slow
def test_shape_from_a_local_model(default_model: str) -> None:
    from ownllm.models.memory import shape_of

    shape = shape_of(default_model)
    assert shape.params == 134_515_008 and shape.layers == 30 and shape.kv_heads == 3
    assert shape.context == 8192


def test_dtype_choice(monkeypatch) -> None:
    assert dtype_module.choose_dtype("bf16").dtype == "bfloat16"
    assert dtype_module.choose_dtype("fp32").dtype == "float32"
    with pytest.raises(OwnLLMError, match="unknown dtype"):
        dtype_module.choose_dtype("fp8")
    with pytest.raises(OwnLLMError, match=r"unknown dtype 'x{40}\.\.\.' \(use"):
        dtype_module.choose_dtype("x" * 100_000)
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: {"avx2", "fma"})
    choice = dtype_module.choose_dtype("auto", "cpu")
    assert choice.dtype == "float32" and "no native bf16" in choice.reason
    assert dtype_module.choose_dtype("Auto", "cpu") == choice  # any case, as FP32 or BF16


def test_dtype_is_measured_where_bf16_is_native(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    choice = dtype_module.choose_dtype("auto", "cpu")
    assert choice.dtype in ("float32", "bfloat16") and "measured" in choice.reason
    assert (tmp_path / "hardware.json").is_file()  # cached: the next load does not measure again


def test_fp32_is_timed_as_the_slot_forward_computes_a_few_rows(monkeypatch, tmp_path) -> None:
    """MKL's F.linear of one fp32 row is slow where the transposed product is not: the verdict for a few rows times
    fp32 as the slot forward computes them, by the slot forward's own narrow verdict (the same kept measurement), and
    never where the forward will not use them: a GGUF's 4-bit weights run as stored (bf16 only), batch invariance."""
    import torch

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    monkeypatch.setattr(dtype_module, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    narrow_asked: list[tuple] = []

    def narrow_verdict(dtype, shapes, layers, output) -> int:
        narrow_asked.append((shapes, layers, output))
        return 5

    monkeypatch.setattr(dtype_module, "narrow_product_rows", narrow_verdict)
    timed: list[int] = []

    def turns(runs: list, rounds: int = 5) -> list[float]:  # fp32 F.linear 3, bf16 2, fp32 transposed 1
        timed.append(len(runs))
        return [1.0 if run.func is dtype_module.narrow_products else
                3.0 if run.args[0][0].dtype == torch.float32 else 2.0 for run in runs]

    monkeypatch.setattr(dtype_module, "best_of_turns", turns)
    config = types.SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=3, vocab_size=256)
    choice = dtype_module.choose_dtype("auto", "cpu", config, rows=1)
    assert choice.dtype == "float32" and "transposed products" in choice.reason and timed == [2]
    # the slot forward's own question: its fused shapes, its layers and output layer
    assert narrow_asked == [(dtype_module.slot_product_shapes(64, 4, 2, 16, 128), 3, (256, 64))]
    assert dtype_module.choose_dtype("auto", "cpu", config, rows=1, narrow_fp32=False).dtype == "bfloat16"
    assert dtype_module.choose_dtype("auto", "cpu", config, rows=6).dtype == "bfloat16"  # past the narrow verdict
    assert timed == [2, 2, 2]  # each verdict measured once, and kept apart
    monkeypatch.setenv("OWNLLM_BATCH_INVARIANT", "1")  # the slot forward then never computes them so
    assert dtype_module.choose_dtype("auto", "cpu", config, rows=1).dtype == "bfloat16"
    assert dtype_module.decoder_narrow_rows(config) == 0 and dtype_module.decoder_narrow_rows(None) == 0


def test_decode_attention_dtype_is_measured_once_and_kept(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    first = dtype_module.upcast_decode_attention(4, 2, 16, context=64)
    kept = json.loads((tmp_path / "hardware.json").read_text())["decode_attention"]
    assert list(kept.values()) == ["fp32" if first else "bf16"]
    monkeypatch.setattr(dtype_module, "_measure_decode_attention", lambda *args: pytest.fail("measured again"))
    assert dtype_module.upcast_decode_attention(4, 2, 16, context=64) == first
    (tmp_path / "hardware.json").write_text(json.dumps({"decode_attention": {k: "fp64" for k in kept}}))
    monkeypatch.setattr(dtype_module, "_measure_decode_attention", lambda *args: "fp32")
    assert dtype_module.upcast_decode_attention(4, 2, 16, context=64)  # a damaged verdict is measured again


def test_measurements_kept_by_another_process_meanwhile_are_kept_too(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    path = tmp_path / "hardware.json"
    path.write_text(json.dumps({"choices": {"old": "x"}, "stray": 5}))

    def measure_while_another_process_writes() -> str:
        path.write_text(json.dumps({"choices": {"old": "x", "theirs": "y"}, "int4_rows": {"a": 12}}))
        return "ours"

    assert dtype_module.remembered_measurement("choices", "sig", lambda v: True,
                                               measure_while_another_process_writes) == "ours"
    kept = json.loads(path.read_text())
    assert kept["int4_rows"] == {"a": 12} and set(kept["choices"]) == {"old", "theirs",
                                                                        hashlib.sha256(b"sig").hexdigest()[:16]}


def test_processes_measuring_the_same_at_once_agree_on_the_first_verdict_kept(monkeypatch, tmp_path) -> None:
    """Two ranks of one torchrun choose their training precision at once: each measures, the first keeps its
    verdict, and the second returns that one instead of its own."""
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))

    def measure_while_another_rank_keeps_its_verdict() -> str:
        assert dtype_module.remembered_measurement("choices", "sig", lambda v: True, lambda: "bfloat16") == "bfloat16"
        return "float32"

    assert dtype_module.remembered_measurement("choices", "sig", lambda v: True,
                                               measure_while_another_rank_keeps_its_verdict) == "bfloat16"
    assert list(json.loads((tmp_path / "hardware.json").read_text())["choices"].values()) == ["bfloat16"]
    # a kept verdict the caller wants measured afresh is replaced by the new measurement
    assert dtype_module.remembered_measurement("choices", "sig", lambda v: v == "float32", lambda: "float32") == \
        "float32"


def test_turns_time_every_run_each_round() -> None:
    calls: list[str] = []
    best = dtype_module.best_of_turns([lambda: calls.append("a"), lambda: calls.append("b")], rounds=3)
    assert calls == ["a", "b"] * 3 and len(best) == 2 and all(0 <= t < 1 for t in best)


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_a_narrow_product_is_f_linear_up_to_rounding(rows: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 48, generator=generator)
    x = torch.randn(1, rows, 48, generator=generator)  # [batch, tokens, in], as the slot forward hands it
    product = dtype_module.narrow_product(x, weight)
    assert product.shape == (1, rows, 96) and product.is_contiguous()
    torch.testing.assert_close(product, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_narrow_products_are_measured_once_and_kept(monkeypatch, tmp_path) -> None:
    import torch

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    shapes = [(64, 32), (32, 64)]
    first = dtype_module.narrow_product_rows(torch.float32, shapes, layers=2, output=(128, 32))
    assert 0 <= first <= dtype_module.NARROW_ROWS_PROBED
    kept = json.loads((tmp_path / "hardware.json").read_text())["narrow_products"]
    assert list(kept.values()) == [first]
    monkeypatch.setattr(dtype_module, "best_of_turns", lambda *args: pytest.fail("measured again"))
    assert dtype_module.narrow_product_rows(torch.float32, shapes, layers=2, output=(128, 32)) == first
    (tmp_path / "hardware.json").write_text(json.dumps({"narrow_products": {k: True for k in kept}}))
    monkeypatch.setattr(dtype_module, "best_of_turns", lambda runs: [2.0, 1.0] * (len(runs) // 2))  # narrow wins
    assert dtype_module.narrow_product_rows(torch.float32, shapes, layers=2, output=(128, 32)) == \
        dtype_module.NARROW_ROWS_PROBED  # a damaged verdict is measured again


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_packed_product_is_f_linear_up_to_rounding_and_rows_round_alike(dtype: str) -> None:
    import torch

    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(96, 48, generator=generator).to(getattr(torch, dtype))
    bias = torch.randn(96, generator=generator).to(weight.dtype)
    x = torch.randn(1, 16, 48, generator=generator).to(weight.dtype)  # [batch, tokens, in]
    packed = dtype_module.pack_weight(weight)
    product = dtype_module.packed_linear(x, packed, bias)
    assert product.shape == (1, 16, 96) and product.dtype == weight.dtype
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(product, torch.nn.functional.linear(x, weight, bias), rtol=tolerance, atol=tolerance)
    for rows in range(2, 16):  # a row's values do not depend on how many rows share the product
        assert torch.equal(dtype_module.packed_linear(x[:, :rows], packed, bias), product[:, :rows])


def test_packed_products_are_measured_once_and_kept(monkeypatch, tmp_path) -> None:
    import torch

    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    shapes = [(64, 32), (32, 64)]
    first = dtype_module.packed_products_win(torch.float32, shapes, layers=2, output=(128, 32))
    kept = json.loads((tmp_path / "hardware.json").read_text())["packed_products"]
    assert list(kept.values()) == [first]
    monkeypatch.setattr(dtype_module, "best_of_turns", lambda *args: pytest.fail("measured again"))
    assert dtype_module.packed_products_win(torch.float32, shapes, layers=2, output=(128, 32)) is first
    (tmp_path / "hardware.json").write_text(json.dumps({"packed_products": {k: 3 for k in kept}}))
    monkeypatch.setattr(dtype_module, "best_of_turns", lambda runs: [2.0, 1.0] * (len(runs) // 2))  # packed wins
    assert dtype_module.packed_products_win(torch.float32, shapes, layers=2, output=(128, 32)) is True
    monkeypatch.setattr(dtype_module, "best_of_turns", lambda runs: [1.0, 1.0] * (len(runs) // 2))  # a tie loses
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path / "other"))
    assert dtype_module.packed_products_win(torch.float32, shapes, layers=2, output=(128, 32)) is False


def test_a_hardware_json_that_cannot_be_written_is_warned_about_once(monkeypatch, tmp_path, caplog) -> None:
    """(review: hardware.json made a folder gave a server start 9 identical warnings, one per measurement)"""
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    (tmp_path / "hardware.json").mkdir()
    with caplog.at_level(logging.DEBUG, logger=dtype_module.log.name):
        for section in ("choices", "int4_rows", "choices"):
            assert dtype_module.remembered_measurement(section, section, lambda v: True, lambda: "x") == "x"
    said = [r for r in caplog.records if "could not keep the measurement" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
