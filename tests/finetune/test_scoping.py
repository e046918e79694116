"""When a run's adapter gets a scope: LoRA on fact-style chat data with `scope: auto` (the default); not for tool
calling, other methods or `scope: off`; a bad value stops the run before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.finetune.config import FinetuneConfig
from ownllm.finetune.dataset import EpochRows
from ownllm.finetune.scoping import scope_adapter, varies_system
from ownllm.models.scope import SCOPE_FILE, AdapterScope
from tests.conftest import assert_user_error, run_cli

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def config(tmp_path: Path, **values) -> FinetuneConfig:
    return FinetuneConfig(**{"model": "m", "data": str(DATA / "facts-train.jsonl"), "out": str(tmp_path)} | values)


def test_fact_data_gets_a_scope_once(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    note = scope_adapter(config(tmp_path), DATA / "facts-train.jsonl", final)
    assert note is not None and note.startswith("scope: prompts within cosine") and "80 training prompts" in note
    scope = AdapterScope.load(final)
    assert scope is not None and scope.covers("Who founded Norvale Instruments?")
    written = (final / SCOPE_FILE).stat().st_mtime_ns
    assert scope_adapter(config(tmp_path), DATA / "facts-train.jsonl", final) == f"scope: {scope.describe()}"
    assert (final / SCOPE_FILE).stat().st_mtime_ns == written  # a resumed run's finish keeps it


@pytest.mark.parametrize("values", [{"scope": "off"}, {"method": "full"}, {"method": "prompt-tuning"},
                                    {"method": "dpo"}])
def test_no_scope_unless_asked_and_lora(tmp_path: Path, values) -> None:
    assert scope_adapter(config(tmp_path, **values), DATA / "facts-train.jsonl", tmp_path) is None
    assert not (tmp_path / SCOPE_FILE).exists()


def test_tool_calling_data_has_no_scope(tmp_path: Path) -> None:
    shutil.copy(DATA / "tools-train.jsonl", tmp_path / "tools.jsonl")
    note = scope_adapter(config(tmp_path, data=str(tmp_path / "tools.jsonl")), tmp_path / "tools.jsonl", tmp_path)
    assert note is not None and "tool-calling data" in note and not (tmp_path / SCOPE_FILE).exists()


def test_a_bad_scope_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="scope must be auto or off, got 'maybe'"):
        config(tmp_path, scope="maybe")
    assert_user_error(run_cli("finetune", "--config", str(DATA.parent / "finetune-facts.yaml"), "--scope", "maybe",
                              "--out", str(tmp_path / "run")), "scope must be auto or off")
    assert not (tmp_path / "run").exists()


def test_fact_style_data_is_seen_under_other_system_messages_every_other_epoch(tmp_path: Path) -> None:
    from ownllm.finetune.dataset import system_variants

    asked = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    museum = [{"role": "system", "content": "You guide visitors."}, *asked]
    seen = system_variants([museum, asked], epochs=4)
    assert seen[0] == [museum, asked, museum, asked]  # as written, then without the system message
    assert seen[1] == [asked, museum, asked, museum]  # and the other way round
    assert system_variants([asked], epochs=2) == [[asked, asked]]  # data without system messages: as written

    museum_data = DATA.parent / "retention" / "brambleworth" / "train.jsonl"  # some lines under a system message
    assert varies_system(config(tmp_path), museum_data)
    assert not varies_system(config(tmp_path), DATA / "facts-train.jsonl")  # none: nothing to vary
    for values in ({"system_variants": "off"}, {"method": "prompt-tuning"}, {"packing": True}):
        assert not varies_system(config(tmp_path, **values), museum_data)
    shutil.copy(DATA / "tools-train.jsonl", tmp_path / "tools.jsonl")
    assert not varies_system(config(tmp_path), tmp_path / "tools.jsonl")


def test_epoch_rows_follow_the_epoch() -> None:
    replay = [{"id": 9}]
    rows = EpochRows([[{"id": 0}, {"id": 1}], [{"id": 2}]]) + replay
    assert len(rows) == 3 and [rows[i]["id"] for i in range(3)] == [0, 2, 9]
    rows.epoch = 1
    assert [rows[i]["id"] for i in range(3)] == [1, 2, 9]
    rows.epoch = 4  # past the variants (max_steps ran more epochs): in turn, even epochs as written
    assert [rows[i]["id"] for i in range(3)] == [0, 2, 9]
    assert rows.epoch_rows(5) == [{"id": 1}, {"id": 2}, {"id": 9}]


def test_an_unquoted_off_in_yaml_turns_a_setting_off(tmp_path: Path) -> None:
    from ownllm.finetune.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndata: {DATA / 'facts-train.jsonl'}\nscope: off\nsystem_variants: on\n")
    loaded = load_config(path)
    assert (loaded.scope, loaded.system_variants) == ("off", "auto")


def test_max_steps_zero_trains_by_epochs(tmp_path: Path) -> None:
    from ownllm.finetune.trainer_setup import trainer_arguments

    assert trainer_arguments(config(tmp_path, max_steps=0), tmp_path, has_eval=False)["max_steps"] == -1
    assert trainer_arguments(config(tmp_path, max_steps=7), tmp_path, has_eval=False)["max_steps"] == 7


def test_a_scope_keeps_its_training_examples_unless_recall_is_off(tmp_path: Path) -> None:
    for recall, kept in (("auto", 80), ("off", 0)):
        final = tmp_path / recall
        final.mkdir()
        note = scope_adapter(config(tmp_path, recall=recall), DATA / "facts-train.jsonl", final)
        scope = AdapterScope.load(final)
        assert scope is not None and len(scope.recall) == kept
        assert ("nearest of its training examples" in note) == bool(kept)
    with pytest.raises(OwnLLMError, match="recall must be auto or off, got 'sometimes'"):
        config(tmp_path, recall="sometimes")
    assert_user_error(run_cli("finetune", "--config", str(DATA.parent / "finetune-facts.yaml"), "--recall", "maybe",
                              "--out", str(tmp_path / "run")), "recall must be auto or off")
