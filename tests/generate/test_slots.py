"""The slot forward's 4-bit weights kept in the home: a later start reads them instead of the GGUF, and a damaged or
foreign entry is packed again from the file (one cut short or changed by a bit is any kept tensors' case:
tests/test_home.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch


def _same(a: Any, b: Any) -> bool:
    """Two `_FourBit`s hold the same packed integers and scales, matrix by matrix."""
    from ownllm.generate.slots import _four_bit_tensors

    first, second = _four_bit_tensors(a), _four_bit_tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_packed_4bit_weights_are_kept_checked_and_packed_again_when_damaged(default_model: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    from ownllm.generate import slots
    from ownllm.home import tensors_digest
    from ownllm.models.gguf_int4 import remember_gguf
    from ownllm.models.load import load_model

    model = load_model(default_model, dtype="bf16").model
    weights = slots._weights(model)
    gguf = tmp_path / "model.gguf"  # a copy: its time is changed below, the test home's file is left alone
    shutil.copyfile(slots.gguf_path(model), gguf)
    remember_gguf(model, gguf)
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))  # (the model is loaded: only the kept entries land here)

    def packed() -> Any:
        slots._four_bit_built.pop(model, None)  # as a new process would: nothing built yet
        return slots._four_bit(model, weights)

    fresh = packed()
    assert fresh.lm_head is not None and all(layer.qkv and layer.down for layer in fresh.layers)
    [entry] = (tmp_path / slots.FOUR_BIT_FOLDER).glob("int4-*.safetensors")

    def no_file_read(_model: Any) -> dict:
        raise AssertionError("the GGUF was read again")

    with monkeypatch.context() as patched:
        patched.setattr(slots, "four_bit_weights", no_file_read)
        assert _same(packed(), fresh)  # read back as kept, the file untouched

    metadata = {"signature": slots._four_bit_signature(gguf.resolve(), model, weights)}
    tensors = load_file(entry)
    damaged = dict(tensors, **{"3.o.packed": tensors["3.o.packed"].flip(0).contiguous()})  # rows of another order
    # whole by its digest (as a foreign entry would be): the probe against the loaded weights catches it
    save_file(damaged, entry, metadata=metadata | {"sha256": tensors_digest(damaged)})
    assert _same(packed(), fresh)  # packed again from the GGUF...
    assert torch.equal(load_file(entry)["3.o.packed"], tensors["3.o.packed"])  # ...and kept whole again


    # packed bytes of another size than the scales say are refused before the kernel would read past them
    from ownllm.models.gguf_int4 import Int4Weight

    narrow = dict(tensors, **{"3.o.packed": tensors["3.o.packed"][:, :64].contiguous()})
    assert Int4Weight.from_tensors(tensors, "3.o").computes(weights.layers[3].o)
    assert not Int4Weight.from_tensors(narrow, "3.o").computes(weights.layers[3].o)
    assert not slots._four_bit_fits(narrow, weights)
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 1))  # the file changed: another key
    assert slots._four_bit_signature(gguf.resolve(), model, weights) != metadata["signature"]
