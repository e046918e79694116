"""Online RL on the real default model, a few tiny steps: GRPO with a verifiable reward logs reward, KL and
completion length per step, resumes after kill -9, and stops with a checkpoint naming a reward function that
raises mid-training; RLOO runs through the same path."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ownllm.errors import OwnLLMError
from tests.conftest import assert_user_error, run_cli, start_cli

pytestmark = pytest.mark.slow
TINY = ("--batch-size", "1", "--num-generations", "2", "--max-completion-length", "8", "--lora-r", "4")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Reply with a JSON object whose key \"name\" is {name}."}) + "\n"
                            for name in ("Ada", "Bo", "Cy", "Di")))
    return data


def grpo_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "smollm2-135m-instruct", "--method", "grpo", "--data", str(data), "--out", str(out),
            "--reward-fn", "json-valid", "--reward-fn", "regex:name", *TINY, *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def test_grpo_logs_rewards_and_resumes_after_kill(default_model: str, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    arguments = grpo_args(prompts, out, "--max-steps", "2", "--save-every", "1")
    process = start_cli(*arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file():
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "checkpoints" / "checkpoint-1").is_dir() and not (out / "final").exists()
    result = run_cli(*arguments, "--resume", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in rows(out) if "reward" in r]
    assert [r["step"] for r in logged] == [1, 2]  # no step logged twice, none lost
    for row in logged:
        assert 0 <= row["reward"] <= 2 and "kl" in row and row["completions/mean_length"] > 0
        assert "rewards/json_valid/mean" in row and "rewards/regex_name/mean" in row
    assert (out / "final" / "adapter_config.json").is_file() and (out / "reward.png").is_file()
    card = (out / "README.md").read_text()
    assert "(grpo)" in card and "`json-valid`" in card and "reward.png" in card
    assert "rollouts: ownllm's batched engine" in card  # the default where the batched forward covers the model


def train_here(data: Path, out: Path, method: str, rewards: list[str], max_steps: int, save_every: int = 100,
               rollouts: str = "auto", **settings: Any) -> Any:
    """In this process (the imports and the model load are the slow part of a tiny run; the CLI path is above)."""
    from ownllm.finetune.config import load_config
    from ownllm.finetune.run import run

    return run(load_config(**{**dict(model="smollm2-135m-instruct", data=str(data), out=str(out), method=method,
                                     reward_fn=rewards, batch_size=1, num_generations=2, max_completion_length=8,
                                     lora_r=4, max_steps=max_steps, save_every=save_every, rollouts=rollouts),
                              **settings}))


def test_reference_guidance_puts_the_reference_in_a_group_that_all_fails(default_model: str,
                                                                         tmp_path: Path) -> None:
    """A prompt whose reference no sample can match gets its reference as one completion of its group (and so a
    gradient); a prompt every sample already earns full marks on is left as sampled."""
    data = tmp_path / "guided.jsonl"
    data.write_text(json.dumps({"prompt": "Name a colour.", "reference": "zebra quartz nineteen"}) + "\n"
                    + json.dumps({"prompt": "Say hi.", "reference": "always"}) + "\n")
    seen = tmp_path / "seen.jsonl"
    rewards = tmp_path / "recorder.py"
    rewards.write_text(
        "import json\n"
        "def exact_or_free(prompts, completions, reference, **kwargs):\n"
        f"    with open({str(seen)!r}, 'a') as log:\n"
        "        log.write(json.dumps([[c[0]['content'], r] for c, r in zip(completions, reference)]) + '\\n')\n"
        "    return [1.0 if r == 'always' or c[0]['content'] == r else 0.0 for c, r in zip(completions, reference)]\n")
    out = tmp_path / "run"
    train_here(data, out, "grpo", [f"{rewards}:exact_or_free"], max_steps=2, batch_size=2, num_generations=3,
               max_completion_length=12, reference_guidance=True)
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    # the rewards are tried on the data first; then each step scores its samples and the references (8) to guide
    # its groups, and TRL scores the 6 completions it trains on
    assert [len(call) for call in calls[1:]] == [8, 6, 8, 6]
    trained_on = calls[2::2]
    for call in trained_on:
        by_reference = {reference: [text for text, r in call if r == reference] for _, reference in call}
        assert len(by_reference["zebra quartz nineteen"]) == 3 and len(by_reference["always"]) == 3
        assert by_reference["zebra quartz nineteen"].count("zebra quartz nineteen") == 1  # one member replaced
        assert "always" not in by_reference["always"]  # that group earned full marks as sampled
    logged = [r for r in rows(out) if "reward" in r]
    assert [r["guidance/groups_guided"] for r in logged] == [0.5, 0.5]
    assert all(r["reward"] > 0.5 for r in logged)  # the free group's 1.0 and the reference's


def test_reference_guidance_needs_references_and_runs_in_two_processes(default_model: str, prompts: Path,
                                                                       tmp_path: Path) -> None:
    assert_user_error(run_cli(*grpo_args(prompts, tmp_path / "none", "--reference-guidance")),
                      "prompts.jsonl: reference_guidance needs a 'reference' on some lines")
    # one process's group has a reference and the other's not: both still score together (a collective call)
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps({"prompt": "Name a colour.", "reference": "zebra quartz nineteen"}) + "\n"
                    + json.dumps({"prompt": "Say hi."}) + "\n")
    out = tmp_path / "ddp"
    result = run_cli("finetune", "smollm2-135m-instruct", "--method", "grpo", "--data", str(data), "--out", str(out),
                     "--reward-fn", "exact", "--reference-guidance", "--rollouts", "trl", "--max-steps", "1",
                     *TINY, "--nproc", "2", timeout=900)  # one step: the collective is in every step alike
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in rows(out) if "reward" in r]
    assert [r["step"] for r in logged] == [1]
    assert [r["guidance/groups_guided"] for r in logged] == [0.5]  # both processes' groups counted


def test_a_reward_raising_mid_training_stops_with_a_checkpoint(default_model: str, prompts: Path,
                                                               tmp_path: Path) -> None:
    rewards = tmp_path / "flaky.py"
    rewards.write_text("def flaky(prompts, completions, trainer_state=None, **kwargs):\n"
                       "    if trainer_state is not None and trainer_state.global_step >= 1:\n"
                       "        raise RuntimeError('the grader is down')\n"
                       "    return [0.5 for _ in completions]\n")
    out = tmp_path / "run"
    with pytest.raises(OwnLLMError) as caught:
        train_here(prompts, out, "grpo", [f"{rewards}:flaky"], max_steps=3)
    assert caught.value.kind == "training_failed"  # the CLI: one error line, exit 2
    assert "flaky.py:flaky raised RuntimeError: the grader is down at step 2" in str(caught.value)
    assert "--resume" in str(caught.value)
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()


def test_rloo_runs_one_step_with_trls_own_rollouts(default_model: str, prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "rloo"
    result = train_here(prompts, out, "rloo", ["json-valid"], max_steps=1, rollouts="trl")
    assert result.steps == 1 and [r["step"] for r in rows(out) if "reward" in r] == [1]
    assert result.notes == ["rollouts: TRL's generation (rollouts: trl)"]
    assert (out / "final" / "adapter_config.json").is_file()


def test_too_few_prompts_and_a_completion_past_the_context_are_named(default_model: str, prompts: Path,
                                                                    tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "Say hi."}) + "\n")  # a step takes 4 prompts by default: it never ran
    assert_user_error(run_cli("finetune", default_model, "--method", "grpo", "--data", str(one), "--reward-fn",
                              "json-valid", "--out", str(tmp_path / "one")),
                      "one.jsonl: 1 prompt(s), but a step takes batch_size x grad_accum = 4")
    huge = run_cli(*grpo_args(prompts, tmp_path / "huge", "--max-completion-length", "99999999999999999999"))
    assert_user_error(huge, "max_completion_length 99999999999999999999 leaves no room for a prompt in the "
                            "model's context of 8192 tokens")
    # room for a short prompt, not for this file's: the longest prompt's line is named (it ran past the context)
    tight = run_cli(*grpo_args(prompts, tmp_path / "tight", "--max-completion-length", "8190"))
    assert_user_error(tight, "prompts.jsonl line ", "+ max_completion_length 8190 is past the model's context of 8192")
    # a prompt longer than the context itself: no completion length can help, so the hint says to shorten it
    long = tmp_path / "long.jsonl"
    long.write_text(prompts.read_text() + json.dumps({"prompt": "word " * 9000}) + "\n")
    result = run_cli(*grpo_args(long, tmp_path / "long"))
    assert_user_error(result, f"long.jsonl line {len(prompts.read_text().splitlines()) + 1}: a prompt of ",
                      "leaves no room for a completion in the model's context of 8192 tokens", "shorten the prompt")
    assert "lower max_completion_length" not in result.stderr
