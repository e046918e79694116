"""Tensors kept in the home (`ownllm.home.kept_tensors`): read back only whole, computed again otherwise, and a
home that cannot hold them never costs the caller its work."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ownllm.home import kept_path, kept_tensors


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    return tmp_path


def _counting(value: dict[str, torch.Tensor]) -> tuple[list[int], Any]:
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return value

    return calls, compute


def test_an_entry_changed_by_one_bit_is_computed_again(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    value = {"w": torch.arange(64, dtype=torch.bfloat16).reshape(8, 8), "n": torch.tensor([3])}
    calls, compute = _counting(value)
    assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["w"], value["w"])
    assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["w"], value["w"]) and len(calls) == 1
    path = kept_path("cache", "int4", "sig", "safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's bytes: still a well-formed file
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["n"], value["n"]) and len(calls) == 2
    assert "does not check out" in caplog.text
    assert kept_tensors("cache", "int4", "sig", compute) and len(calls) == 2  # kept whole again


def test_one_entry_per_name_a_new_signature_replaces_the_last(home: Path) -> None:
    calls, compute = _counting({"w": torch.zeros(2)})
    kept_tensors("cache", "int4", "file, version 1", compute, entry="/models/a.gguf")
    kept_tensors("cache", "int4", "file, version 2", compute, entry="/models/a.gguf")
    kept_tensors("cache", "int4", "file, version 2", compute, entry="/models/a.gguf")
    assert len(calls) == 2 and len(list((home / "cache").iterdir())) == 1


def test_a_fifo_or_a_folder_in_the_entrys_place_is_passed_by(home: Path) -> None:
    """Nothing but a plain file is opened: a FIFO would block the reader forever."""
    calls, compute = _counting({"w": torch.ones(3)})
    path = kept_path("cache", "int4", "sig", "safetensors")
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["w"], torch.ones(3)) and len(calls) == 1
    path.unlink()
    path.mkdir()
    assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["w"], torch.ones(3)) and len(calls) == 2


def test_a_write_that_fails_costs_a_warning_not_the_value(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A full disk fails inside safetensors with its own error, not an OSError."""
    from safetensors import SafetensorError

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while serializing: IoError(File too large (os error 27))")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    _, compute = _counting({"w": torch.ones(3)})
    with caplog.at_level(logging.WARNING):
        assert torch.equal(kept_tensors("cache", "int4", "sig", compute)["w"], torch.ones(3))
    assert "could not keep the int4" in caplog.text and "File too large" in caplog.text
    assert not list((home / "cache").glob("*.safetensors"))
