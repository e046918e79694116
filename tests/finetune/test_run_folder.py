"""The run-folder format: names, the record in final/, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.finetune.run_folder import (
    RECORD_FILE,
    RunRecord,
    checkpoint_step,
    checkpoints_path,
    final_model_path,
    is_run_folder,
    latest_checkpoint,
    read_record,
    write_record,
)


def test_the_record_round_trips_and_bad_ones_are_named(tmp_path: Path) -> None:
    record = RunRecord(base_model="/models/base", method="lora", spec="smollm2-135m-instruct")
    assert read_record(tmp_path) is None
    assert write_record(tmp_path, record) == tmp_path / RECORD_FILE
    assert read_record(tmp_path) == record
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_FILE]  # no temp file left behind
    (tmp_path / RECORD_FILE).write_text('{"base_model": "/models/base"}')  # fields added later are optional
    assert read_record(tmp_path) == RunRecord(base_model="/models/base")
    (tmp_path / RECORD_FILE).write_text("[1, 2")
    with pytest.raises(OwnLLMError, match=f"{RECORD_FILE} is not valid JSON"):
        read_record(tmp_path)
    (tmp_path / RECORD_FILE).write_text('{"method": "lora"}')
    with pytest.raises(OwnLLMError, match="does not name the base model"):
        read_record(tmp_path)


def test_run_folders_and_their_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert not is_run_folder(run) and latest_checkpoint(run) is None
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    assert is_run_folder(run) and final_model_path(run) == run / "final"
    for step, complete in ((4, True), (12, True), (16, False)):  # 16: Trainer was killed while writing it
        folder = checkpoints_path(run) / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    newest = latest_checkpoint(run)
    assert newest == checkpoints_path(run) / "checkpoint-12" and checkpoint_step(newest) == 12
