"""Reward functions for online RL: the built-ins score what they say, and a broken user function (missing,
raising, returning non-numbers) stops the run before training with its file and function named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.finetune.config import load_config
from ownllm.finetune.grpo import load_prompts
from ownllm.finetune.rewards import RewardFailed, load_reward, validate_rewards
from tests.conftest import assert_user_error, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sql"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def score(spec: str, completions: list, **columns: list) -> list[float]:
    return load_reward(spec)(prompts=["p"] * len(completions), completions=completions, **columns)


def test_builtins() -> None:
    assert score("exact", ["Paris ", chat("paris")], reference=["Paris", "Paris"]) == [1.0, 0.0]
    assert score("contains", ["It is Paris.", "Lyon"], reference=["paris", "paris"]) == [1.0, 0.0]
    assert score("regex:^\\d+$", ["42", "forty-two"]) == [1.0, 0.0]
    assert score("json-valid", ['{"a": 1}', "```json\n[1, 2]\n```", "{a: 1}"]) == [1.0, 1.0, 0.0]


def test_json_schema_and_sql_exec(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["name"]}))
    assert score(f"json-schema:{schema}", ['{"name": "x"}', '{"other": 1}', "no"]) == [1.0, 0.0, 0.0]
    gold = "SELECT COUNT(*) FROM customers WHERE city = 'Berlin'"
    replies = [gold, "SELECT COUNT(*) FROM products", "DROP TABLE customers", "hello"]
    assert score(f"sql-exec:{EXAMPLE / 'shop.sqlite'}", [chat(r) for r in replies], reference=[gold] * 4) == [
        1.0, 0.0, 0.0, 0.0]


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="unknown reward function 'nope'"):
        load_reward("nope")
    with pytest.raises(OwnLLMError, match="not a valid regular expression"):
        load_reward("regex:(")
    with pytest.raises(OwnLLMError, match="no such schema file"):
        load_reward(f"json-schema:{tmp_path / 'missing.json'}")
    with pytest.raises(OwnLLMError, match="no such database"):
        load_reward(f"sql-exec:{tmp_path / 'missing.sqlite'}")
    with pytest.raises(OwnLLMError, match="needs a 'reference' column"):
        score("exact", ["x"])


@pytest.fixture
def user_rewards(tmp_path: Path) -> Path:
    file = tmp_path / "my_rewards.py"
    file.write_text(
        "def short(prompts, completions, **kwargs):\n"
        "    return [1.0 / (1 + len(c[-1]['content'])) for c in completions]\n"
        "def broken(prompts, completions, **kwargs):\n"
        "    raise ValueError('no idea')\n"
        "def words(prompts, completions, **kwargs):\n"
        "    return ['good' for _ in completions]\n"
        "def too_few(prompts, completions, **kwargs):\n"
        "    return [1.0]\n"
        "def by_column(prompts, completions, topic, **kwargs):\n"
        "    return [float(t == 'sql') for t in topic]\n")
    return file


def test_user_functions_are_checked_on_a_few_rows(user_rewards: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": "q"}], "reference": "abc", "topic": "sql"}] * 5
    validate_rewards([load_reward(f"{user_rewards}:short"), load_reward(f"{user_rewards}:by_column")], rows)
    for name, problem in [("broken", "raised ValueError: no idea"), ("words", "returned 'good', not a finite number"),
                          ("too_few", "returned 1 values for 3 completions")]:
        with pytest.raises(OwnLLMError, match=problem) as caught:
            validate_rewards([load_reward(f"{user_rewards}:{name}")], rows)
        assert f"my_rewards.py:{name}" in str(caught.value)
    with pytest.raises(OwnLLMError, match="has no function 'missing'") as caught:
        load_reward(f"{user_rewards}:missing")
    assert "short" in str(caught.value)  # the hint lists what is there
    with pytest.raises(RewardFailed, match="broken"):  # during training: the error names the function
        load_reward(f"{user_rewards}:broken")(prompts=["p"], completions=["c"])


def test_config_checks_rl_settings(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="needs a reward"):
        load_config(method="grpo", data="x.jsonl")
    with pytest.raises(OwnLLMError, match="num_generations must be at least 2"):
        load_config(method="grpo", reward_fn=["exact"], num_generations=1)
    with pytest.raises(OwnLLMError, match="go with method grpo or rloo"):
        load_config(method="lora", reward_fn=["exact"])
    config = tmp_path / "rl.yaml"
    config.write_text("method: rloo\ndata: d.jsonl\nreward_fn: [sql-exec:shop.sqlite, mine.py:f, exact]\n")
    cfg = load_config(config)
    assert cfg.reward_fn == [f"sql-exec:{tmp_path / 'shop.sqlite'}", f"{tmp_path / 'mine.py'}:f", "exact"]
    assert not cfg.replaying


def test_prompt_files(tmp_path: Path) -> None:
    rows = load_prompts(EXAMPLE / "test.jsonl")
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["reference"].startswith("SELECT")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Say hi", "topic": "x"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n'
                   '{"answer": 1}\n')
    with pytest.raises(OwnLLMError, match=r"bad\.jsonl line 2"):
        load_prompts(bad)
    # a conversation given as "prompt" is checked as "messages" is (the chat template would fail on it mid-load)
    for line in ('{"prompt": [{"role": "user"}]}', '{"prompt": [1, 2]}', '{"prompt": ["hi"]}',
                 '{"prompt": [{"role": "user", "content": 5}]}', '{"prompt": [{"role": "wizard", "content": "hi"}]}',
                 '{"prompt": []}'):
        bad.write_text('{"prompt": "Say hi"}\n' + line + "\n")
        with pytest.raises(OwnLLMError, match=r"bad\.jsonl line 2: 'prompt' must be a list of \{role, content\}"):
            load_prompts(bad)
    bad.write_text('{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n')
    assert load_prompts(bad)[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.slow
def test_cli_stops_a_broken_reward_before_training(user_rewards: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Say hi"}\n' * 3)
    out = tmp_path / "run"
    result = run_cli("finetune", "--method", "grpo", "--data", str(data), "--out", str(out), "--reward-fn",
                     f"{user_rewards}:broken")
    assert_user_error(result, "my_rewards.py:broken", "raised ValueError")
    assert not out.exists()
    result = run_cli("finetune", "--method", "grpo", "--data", str(data), "--out", str(out), "--reward-fn",
                     f"{user_rewards}:nothing_here")
    assert_user_error(result, "my_rewards.py", "no function 'nothing_here'")


def test_a_reward_file_that_exits_is_an_error_not_a_silent_exit(tmp_path: Path) -> None:
    """sys.exit in a user's reward file (at import or in the function) must not end the run quietly with its code."""
    (tmp_path / "exits.py").write_text("raise SystemExit(0)\n")
    with pytest.raises(OwnLLMError, match="SystemExit"):
        load_reward(f"{tmp_path / 'exits.py'}:f")
    (tmp_path / "exits_later.py").write_text("import sys\n\ndef f(prompts, completions, **kw):\n    sys.exit(3)\n")
    reward = load_reward(f"{tmp_path / 'exits_later.py'}:f")
    with pytest.raises(RewardFailed, match="SystemExit"):
        reward(prompts=["p"], completions=["c"])
