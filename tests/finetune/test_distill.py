"""Replay by distillation on the real default model: the KL term, logits only where learned, the training loss."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ownllm.data.formats import Example
from ownllm.finetune.dataset import encode
from ownllm.finetune.distill import (
    TOP_K,
    TeacherCollator,
    attach_teacher,
    distill_trainer_class,
    kl_to_teacher,
    learned_positions,
    logits_only_at,
    teacher_targets,
)
from ownllm.finetune.replay import replay_prompts

ROOT = Path(__file__).resolve().parents[2]


def test_kl_is_zero_against_itself_and_grows_with_distance() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 1000) * 3
    top = logits.log_softmax(-1).topk(TOP_K, dim=-1)
    assert kl_to_teacher(logits, top.indices, top.values).abs().max() < 1e-5
    near = kl_to_teacher(logits + 0.1 * torch.randn(5, 1000), top.indices, top.values)
    far = kl_to_teacher(torch.randn(5, 1000) * 3, top.indices, top.values)
    assert (near > 0).all() and (far > near).all()


@pytest.fixture(scope="module")
def model_and_rows(engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.loaded.source.location, dtype=torch.float32)
    conversations = [[{"role": "user", "content": "What is the capital of Poland?"},
                      {"role": "assistant", "content": "The capital of Poland is Warsaw."}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]]
    rows = [encode(Example(i, messages=m), engine.tokenizer, 512) for i, m in enumerate(conversations)]
    return model, rows, engine.tokenizer.eos_token_id


def test_logits_only_at_learned_positions_match_the_full_logits(model_and_rows) -> None:
    model, rows, pad = model_and_rows
    batch = TeacherCollator(pad)(rows)
    positions = learned_positions(batch["labels"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with logits_only_at(model, positions):
            some = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert some.shape == (int(positions.sum()), full.shape[-1])
    torch.testing.assert_close(some, full[positions], atol=1e-4, rtol=1e-4)


def test_targets_come_back_in_the_rows_order_whatever_the_batches(model_and_rows) -> None:
    """The rows are batched by length; each row's targets still come back in its own place, whatever order the rows
    are given in and however they fall into batches."""
    model, rows, pad = model_and_rows
    (long, short), counts = rows, [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    assert len(long["input_ids"]) != len(short["input_ids"]) and counts[0] != counts[1]
    together = teacher_targets(model, [long, short], pad)
    swapped = teacher_targets(model, [short, long], pad)
    alone = [teacher_targets(model, [row], pad, batch_size=1) for row in (long, short)]
    assert together["counts"].tolist() == counts and swapped["counts"].tolist() == counts[::-1]
    for key in ("ids", "logprobs"):
        mine = together[key].split(counts)
        torch.testing.assert_close(swapped[key].split(counts[::-1])[::-1], mine, atol=1e-4, rtol=1e-4)
        for row_targets, single in zip(mine, alone, strict=True):
            assert row_targets.shape == single[key].shape


def test_training_loss_is_cross_entropy_on_facts_and_zero_kl_on_replay_before_training(model_and_rows,
                                                                                        tmp_path: Path) -> None:
    from transformers import TrainingArguments

    model, rows, pad = model_and_rows
    facts, replay = [dict(rows[0])], [dict(rows[1])]
    targets = teacher_targets(model, replay, pad)
    attach_teacher(replay, targets)
    assert replay[0]["teacher_ids"].shape[1] == TOP_K
    with pytest.raises(ValueError, match="do not match"):
        attach_teacher(facts, targets)  # another row's targets are refused, not misapplied
    trainer = distill_trainer_class()(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True,
                                                                          report_to=[]))
    collate = TeacherCollator(pad)
    with torch.no_grad():
        kl_only = trainer.compute_loss(model, collate(replay))
        fact_loss = trainer.compute_loss(model, collate(facts))
        batch = collate(facts)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert abs(float(kl_only)) < 1e-4  # the model is still the base: nothing to correct
    assert float(fact_loss) == pytest.approx(float(reference), rel=1e-4)


def test_targets_read_under_the_training_steps_autocast_start_the_kl_nearer_zero(model_and_rows,
                                                                                 tmp_path: Path) -> None:
    """Where the training steps run under bf16 autocast, targets read under it too leave the student before its
    first step at (near) zero KL; fp32 targets would push it towards fp32's logits from the first step."""
    from transformers import TrainingArguments

    model, rows, pad = model_and_rows
    trainer = distill_trainer_class()(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True,
                                                                          report_to=[]))
    kl = {}
    for mixed in (False, True):
        replay = [dict(rows[0]), dict(rows[1])]
        attach_teacher(replay, teacher_targets(model, replay, pad, mixed_bf16=mixed))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            kl[mixed] = abs(float(trainer.compute_loss(model, TeacherCollator(pad)(replay))))
    assert kl[True] < 1e-3 and kl[True] < kl[False], kl


def test_shipped_replay_prompts_are_not_the_benchmark_questions() -> None:
    """Retention is measured on questions replay never saw: not the same question, nor the same content words
    under another instruction ("Reply in one word: what do bees make?" is "What do bees make?")."""
    instruction = set("what is the a an of in on to do does you which how are for with by and or one word words "
                      "reply answer give just number single only oneword say called call name".split())

    def content(text: str) -> frozenset[str]:
        text = text.lower().replace("colour", "color").replace("one-word", "oneword")
        return frozenset(re.sub(r"[^a-z0-9 ]", " ", text).split()) - instruction

    lines = (ROOT / "examples" / "retention" / "general-candidates.jsonl").read_text().splitlines()
    lines += (ROOT / "examples" / "data" / "general-retention.jsonl").read_text().splitlines()
    measured = {content(json.loads(line)["question"]) for line in lines}
    prompts = replay_prompts(None)
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert not [p for p in prompts if content(p) in measured]


def test_replay_passes_fold_the_data_epochs_and_the_replay_into_one_pass() -> None:
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import _fold, _folded

    rows = [{"input_ids": [i]} for i in range(10)]
    assert _fold(rows, 2.5, seed=0)[:20] == rows * 2 and len(_fold(rows, 2.5, seed=0)) == 25
    assert len({r["input_ids"][0] for r in _fold(rows, 2.5, seed=0)[20:]}) == 5  # half of one more, no repeats
    assert _folded(load_config(None, data="x", replay=8, replay_passes=1))
    assert not _folded(load_config(None, data="x", replay=8))
    assert not _folded(load_config(None, data="x", replay=8, replay_passes=1, method="dpo"))  # no replay there


def test_damaged_teacher_targets_do_not_fit(model_and_rows) -> None:
    from ownllm.finetune.distill import teacher_fits

    model, rows, pad = model_and_rows
    replay = [dict(rows[1])]
    targets = teacher_targets(model, replay, pad)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    assert teacher_fits(replay, targets, vocabulary)
    assert not teacher_fits(replay, {**targets, "counts": targets["counts"] + 1}, vocabulary)
    assert not teacher_fits(replay, {**targets, "ids": targets["ids"] + vocabulary}, vocabulary)
    assert not teacher_fits(replay, {**targets, "logprobs": targets["logprobs"].double()}, vocabulary)
    assert not teacher_fits(replay, {"ids": targets["ids"]}, vocabulary)
