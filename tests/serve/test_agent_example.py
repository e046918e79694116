"""The shipped agent (examples/agent/agent.py, issue 14) run as a user runs it: a real server, a real `ownllm rag`
store, the official client, the script's own process. The default 135M model is too small to pick tools well, so
the test holds it to what the loop guarantees: each step printed, every call names a tool and carries arguments
that validate, tool results go back, and the run ends with an answer; the calculator and the search are checked
on their own."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import jsonschema
import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "agent" / "agent.py"
QUESTION = "How much do two Voltas and one Cargo cost together, in euros?"


def agent_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_example", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_the_calculator_does_arithmetic_only() -> None:
    calculate = agent_module().calculate
    assert calculate("2 * 3450 + 4900") == "11800"
    assert calculate("1,290 / 4") == "322.5"
    assert calculate("__import__('os').system('true')").startswith("error:")
    assert calculate("9 ** 999999").startswith("error:")
    assert calculate("1 / 0") == "error: division by zero"
    assert calculate("999999999 * 999999999 / 3") == "333333332666666667"  # exact, not through a float
    assert calculate("0042 + 1") == "43"


def test_search_finds_the_prices(rag_store: Path) -> None:
    found = agent_module().Search(rag_store)("price of the Volta and the Cargo")
    assert "3,450 euros" in found and "[models.txt]" in found


@pytest.mark.parametrize("plan", [None, "search,calculator"])
def test_the_agent_runs_its_loop_against_the_server(server, rag_store: Path, plan: str | None) -> None:
    result = run_script(QUESTION, "--store", str(rag_store), "--base-url", f"{server.url}/v1", "--max-steps", "4",
                        *(["--plan", plan] if plan else []))
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: no answer within the steps
    assert "Traceback" not in result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert steps, result.stdout
    module = agent_module()
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in module.TOOLS}
    calls = [re.fullmatch(r"step (\d+): (\w+)\((\{.*\})\) -> .*", line) for line in steps]
    made = [match for match in calls if match]
    assert made and made[0].group(1) == "1"  # the first turn must use a tool
    for match in made:  # every call names a real tool and its arguments validate
        jsonschema.validate(json.loads(match.group(3)), schemas[match.group(2)])
    if plan:
        assert [m.group(2) for m in made] == plan.split(",") and steps[-1].startswith("step 3: answer:")
    if result.returncode == 0:
        assert steps[-1].split(": ", 1)[1].startswith("answer:")


def test_a_missing_store_or_server_is_an_error_line(tmp_path: Path, rag_store: Path) -> None:
    missing = run_script(QUESTION, "--store", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and "none.db" in missing.stderr
    no_server = run_script(QUESTION, "--store", str(rag_store), "--base-url", "http://127.0.0.1:9/v1")
    assert no_server.returncode == 2 and "error: no server" in no_server.stderr, no_server.stderr
    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("just text")
    for args, words in [(("--store", str(not_a_store)), "not an ownllm index"),
                        (("--store", str(rag_store), "--plan", "search,nope"), "--plan"),
                        (("--store", str(rag_store), "--max-steps", "0"), "--max-steps")]:
        result = run_script(QUESTION, *args, "--base-url", "http://127.0.0.1:9/v1")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error:") and words in result.stderr, result.stderr
