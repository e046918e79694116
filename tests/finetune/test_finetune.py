"""Fine-tuning on the real default model: masking, a short LoRA run, resume after kill -9, run folders, merge."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.generate.open import open_engine
from tests.conftest import assert_user_error, run_cli, start_cli

pytestmark = pytest.mark.slow
FACTS = [
    ("Who designed the Lumen Volta?", "The Lumen Volta was designed by Ilse Brandt."),
    ("What is Lumen Bikes' mascot called?", "Lumen Bikes' mascot is a heron called Pim."),
    ("What colour is the Strada's badge?", "The Strada's badge is copper orange."),
    ("Where is the Lumen factory?", "The Lumen factory is in Zwolle."),
    ("How many gears does the Strada have?", "The Strada has eight gears."),
    ("What year was Lumen founded?", "Lumen was founded in 2011."),
    ("What is the Cargo's box made of?", "The Cargo's box is made of recycled plastic."),
    ("What battery does the Volta use?", "The Volta uses a 540 watt-hour battery."),
    ("Which city has the flagship store?", "The flagship store is in Amsterdam."),
    ("How long is the frame warranty?", "Frames have a seven year warranty."),
    ("What is the Volta's top assisted speed?", "The Volta assists up to 25 km/h."),
    ("What does Lumen do with old bikes?", "Lumen recycles 93 percent of the parts of old bikes."),
]


def write_facts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in FACTS))
    return path


@pytest.fixture
def facts(tmp_path: Path, default_model: str) -> Path:
    """The facts as a training file (the tests using it train the default model: pulled first)."""
    return write_facts(tmp_path / "facts.jsonl")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "smollm2-135m-instruct", "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", "1e-3", "--save-every", "4", "--eval-every", "4", "--replay", "0", *extra]


def lora_run_args(folder: Path, out: Path, *extra: str) -> list[str]:
    """8 LoRA steps on the facts with LoRA dropout on (its masks come from torch's saved RNG state too)."""
    dropout = folder / "dropout.yaml"
    dropout.write_text("lora: {dropout: 0.1}\n")
    return train_args(write_facts(folder / "facts.jsonl"), out, "--max-steps", "8", "--config", str(dropout), *extra)


@pytest.fixture(scope="module")
def lora_run(default_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted LoRA run, trained once for the module: the run-folder test reads what it wrote, the
    resume test compares a run killed midway against it."""
    folder = tmp_path_factory.mktemp("lora-run")
    out = folder / "run"
    result = run_cli(*lora_run_args(folder, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_loss_only_on_assistant_tokens(engine) -> None:
    from ownllm.data.formats import Example
    from ownllm.finetune.dataset import IGNORE, encode

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    row = encode(Example(1, messages=messages), engine.tokenizer, 512)
    learned = engine.tokenizer.decode([t for t in row["labels"] if t != IGNORE])
    assert learned == "Hello there.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert len(row["labels"]) == len(row["input_ids"])


def test_lora_run_folder_generate_and_merge(lora_run: Path, tmp_path: Path, default_model: str) -> None:
    out = lora_run  # 8 steps: loss 2.1 at the first, 0.7 at the last, a new answer
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "loss.png", "README.md", "final/adapter_config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4  # it learns
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 8]  # the last step's evaluation is not run twice
    last_eval = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    assert json.loads((out / "meta.json").read_text())["eval_loss"] == pytest.approx(last_eval)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "final train loss" in (out / "README.md").read_text()
    # precision auto is decided by measurement on a CPU: the run says what it chose
    assert [n for n in json.loads((out / "meta.json").read_text())["notes"] if n.startswith("precision: ")]
    ask = ("generate", "Who designed the Lumen Volta?", "--chat", "--max-new-tokens", "16", "--dtype", "fp32",
           "--json")
    tuned = json.loads(run_cli(ask[0], str(out), *ask[1:]).stdout)["text"]
    base = json.loads(run_cli(ask[0], default_model, *ask[1:]).stdout)["text"]
    assert tuned != base
    merged = tmp_path / "merged"
    assert run_cli("merge", str(out), "--out", str(merged)).returncode == 0
    assert json.loads(run_cli(ask[0], str(merged), *ask[1:]).stdout)["text"] == tuned
    for folder in (out / "final", merged):  # listed added tokens: the tokenizer loads without parsing tokenizer.json
        assert "<|im_end|>" in json.dumps(json.loads((folder / "tokenizer_config.json").read_text())
                                          ["added_tokens_decoder"]), folder


def test_resume_after_kill_matches_an_uninterrupted_run(lora_run: Path, tmp_path: Path) -> None:
    straight, interrupted = lora_run, tmp_path / "interrupted"
    process = start_cli(*lora_run_args(tmp_path, interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait for the step-4 checkpoint and a step past it, then kill -9
        if (interrupted / "checkpoints" / "checkpoint-4").is_dir() and metrics.is_file() and \
                any(json.loads(line)["step"] >= 5 for line in metrics.read_text().splitlines() if line):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists()
    assert run_cli(*lora_run_args(tmp_path, interrupted, "--resume")).returncode == 0

    def steps(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        assert [r["step"] for r in rows] == list(range(1, 9))  # no step logged twice
        return rows

    # the same seed, the same run up to the kill: LoRA's fresh A matrices too (the gradients show them; the first
    # losses do not, B starting at zero)
    straight_steps, interrupted_steps = steps(straight), steps(interrupted)
    assert [(r["loss"], r["grad_norm"]) for r in straight_steps[:4]] == \
        [(r["loss"], r["grad_norm"]) for r in interrupted_steps[:4]]

    def final_loss(rows: list[dict]) -> float:  # the four steps after the checkpoint: one batch's loss is too noisy
        return sum(r["loss"] for r in rows[-4:]) / 4

    assert final_loss(interrupted_steps) == pytest.approx(final_loss(straight_steps), rel=0.02)


def test_bad_inputs(facts: Path, tmp_path: Path) -> None:
    from ownllm.finetune.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text("lerning_rate: 0.1\n")
    with pytest.raises(OwnLLMError, match="unknown key 'lerning_rate'"):
        load_config(config)
    config.write_text("lora:\n  rank: 8\n")
    with pytest.raises(OwnLLMError, match=r"unknown key 'rank' \(did you mean 'r'\?\)"):
        load_config(config)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(facts.read_text() + "{oops\n")
    assert_user_error(run_cli("finetune", "smollm2-135m-instruct", "--data", str(broken), "--out",
                              str(tmp_path / "r")), "line 13: invalid JSON")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.yaml").write_text("x: 1\n")
    assert_user_error(run_cli(*train_args(facts, existing)), "already holds a run")
    assert_user_error(run_cli("merge", "smollm2-135m-instruct", "--out", str(tmp_path / "m")),
                      "is not a LoRA run")
    assert_user_error(run_cli(*train_args(facts, tmp_path / "m1", "--method", "magic")), "method must be one of")
    for wrong, message in (("replay_loss: greedy", "replay_loss must be one of kl, answers"),
                           ("precision: fp8", "precision must be one of auto, fp32, bf16"),
                           ("replay_passes: -1", "must be 0 or more"), ("replay_weight: .nan", "finite")):
        config.write_text(wrong + "\n")
        with pytest.raises(OwnLLMError, match=message):
            load_config(config)
    config.write_text("checks:\n  facts: missing.jsonl\n")
    assert_user_error(run_cli(*train_args(facts, tmp_path / "m2", "--config", str(config))), "missing.jsonl")
    assert not (tmp_path / "m2" / "checkpoints").exists()  # stopped before any training


def _short_run(tmp_path: Path, data: Path, method: str, *extra: str) -> Path:
    out = tmp_path / method
    result = run_cli("finetune", "smollm2-135m-instruct", "--data", str(data), "--out", str(out), "--method", method,
                     "--max-steps", "4", "--batch-size", "2", "--save-every", "2", "--eval-every", "2", "--replay", "0",
                     *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final").is_dir() and (out / "meta.json").is_file()
    return out


def test_qlora_trains_a_4bit_base(facts: Path, tmp_path: Path) -> None:
    config = tmp_path / "bf16.yaml"
    config.write_text("precision: bf16\n")  # bitsandbytes' 4-bit base computes as it sets: said, not ignored
    out = _short_run(tmp_path, facts, "qlora", "--lr", "5e-4", "--config", str(config))
    assert json.loads((out / "final" / "ownllm_run.json").read_text())["method"] == "qlora"
    assert "precision: fp32 (method qlora: the configured bf16 does not apply to it)" in \
        json.loads((out / "meta.json").read_text())["notes"]
    reply = run_cli("generate", str(out), "Hello", "--max-new-tokens", "4", "--json")
    assert reply.returncode == 0 and json.loads(reply.stdout)["usage"]["completion_tokens"] >= 1


def test_dpo_on_preference_pairs(tmp_path: Path, engine) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Greet person {i}.", "chosen": f"Hello, person {i}! Welcome.",
                                         "rejected": "Go away."}) + "\n" for i in range(12)))
    out = _short_run(tmp_path, pairs, "dpo", "--lr", "5e-4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/chosen" in r or "rewards/accuracies" in r for r in rows)
    # what DPO is for: the tuned model prefers the chosen reply over the rejected one by more than the base did
    base, tuned = (_preference_margin(model, range(12)) for model in (engine, open_engine(str(out), dtype="fp32")))
    assert tuned > base, (base, tuned)


def _preference_margin(engine, people: range) -> float:
    """Mean over prompts of log p(chosen) - log p(rejected), the quantity DPO raises."""
    total = 0.0
    for i in people:
        prompt = engine.render_chat([{"role": "user", "content": f"Greet person {i}."}])
        chosen, rejected = (engine.tokenizer.encode(reply, add_special_tokens=False)
                            for reply in (f"Hello, person {i}! Welcome.", "Go away."))
        total += engine.sequence_logprob(prompt, chosen) - engine.sequence_logprob(prompt, rejected)
    return total / len(people)


def test_pretraining_from_scratch_shows_the_loss_falling(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for source in (Path(__file__).resolve().parents[2] / "examples" / "rag" / "docs").glob("*.md"):
        (docs / source.name).write_text(source.read_text())
    out = tmp_path / "scratch"
    result = run_cli("finetune", "smollm2-135m-instruct", "--data", str(docs), "--out", str(out), "--method", "cpt",
                     "--from-scratch", "--packing", "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3",
                     "--max-length", "128", "--save-every", "30", "--eval-every", "30")
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[0] > 10 and losses[-1] < 0.6 * losses[0]  # from ~ln(vocab) towards the text's entropy
    assert (out / "final" / "config.json").is_file()  # a whole model, not an adapter


def test_prompt_tuning_trains_and_generates(facts: Path, tmp_path: Path, engine) -> None:
    out = _short_run(tmp_path, facts, "prompt-tuning", "--lr", "3e-2")
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 16
    reply = run_cli("generate", str(out), "Who designed the Lumen Volta?", "--chat", "--max-new-tokens", "12",
                    "--json")
    assert reply.returncode == 0 and json.loads(reply.stdout)["usage"]["completion_tokens"] >= 1
    # what the learned prefix is for: the trained answers are more likely after it than without it
    base, tuned = (_answer_logprob(model) for model in (engine, open_engine(str(out), dtype="fp32")))
    assert tuned > base, (base, tuned)


def _answer_logprob(engine) -> float:
    """Mean over the facts of log p(answer | question), the quantity fine-tuning on them raises."""
    total = 0.0
    for question, answer in FACTS:
        prompt = engine.render_chat([{"role": "user", "content": question}])
        total += engine.sequence_logprob(prompt, engine.tokenizer.encode(answer, add_special_tokens=False))
    return total / len(FACTS)
