"""`ownllm merge` on run folders made without training (random adapters): LoRA folds in, prompt tuning is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ownllm.errors import OwnLLMError
from ownllm.finetune.merge import merge
from ownllm.finetune.run_folder import RunRecord, final_model_path, write_record
from ownllm.models.adapters import Adapter
from tests.models.test_adapters import save_lora, save_prompt_tuning, tiny_model


def test_a_prompt_tuning_run_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    final = save_prompt_tuning(tiny_model(), final_model_path(run), tokens=5)
    write_record(final, RunRecord(base_model="org/base", method="prompt-tuning", spec="org/base"))
    out = tmp_path / "merged"
    with pytest.raises(OwnLLMError) as info:
        merge(str(run), out)
    error = info.value
    assert (error.kind, error.param) == ("unsupported", "run")
    assert "prompt tuning learns a prefix of 5 virtual tokens, not weights: there is nothing to merge" in str(error)
    assert "serve or generate with the run folder itself" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no output folder, no staging folder beside it

    out.mkdir()  # an earlier merge's output stays as it was
    (out / "merged_from.json").write_text("{}\n")
    with pytest.raises(OwnLLMError, match="nothing to merge"):
        merge(str(run), out)
    assert [p.name for p in out.iterdir()] == ["merged_from.json"]


@pytest.mark.slow
def test_a_lora_run_merges_into_a_standalone_model(default_model: str, tmp_path: Path) -> None:
    from ownllm.models.load import load_model

    base = load_model(default_model, dtype="fp32")
    original = base.model.model.layers[3].self_attn.q_proj.weight.detach().clone()
    run = tmp_path / "run"
    final = save_lora(base.model, final_model_path(run))
    write_record(final, RunRecord(base_model=base.source.location, method="lora", spec=default_model))
    del base
    out = merge(str(run), tmp_path / "merged")
    assert json.loads((out / "merged_from.json").read_text()) == {"adapter": str(final.resolve())}
    merged = load_model(str(out), dtype="fp32")
    assert merged.source.kind == "folder"
    lora = Adapter.open(final).lora_weights()
    a, b = lora.weights[(3, "q_proj")]
    expected = original + (b @ a) * lora.scale
    assert torch.allclose(merged.model.model.layers[3].self_attn.q_proj.weight, expected, atol=1e-6)
