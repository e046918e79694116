"""Shared fixtures: a test model home (pulled once per machine) and the real default model."""

from __future__ import annotations

import functools
import gc
import os
import subprocess
from pathlib import Path
from typing import Any

import platformdirs
import pytest

from ownllm.collector import import_at_start
from tests.cli_zygote import Zygote

DEFAULT_MODEL = "smollm2-135m-instruct"
TEST_HOME = Path(os.environ.get("OWNLLM_TEST_HOME", platformdirs.user_cache_dir("ownllm-tests")))
os.environ["OWNLLM_HOME"] = str(TEST_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest worker (and every process it starts) gets its share of the cores: two workers each running a
    # full-width torch thread pool on two cores was measured 3.4x slower than one thread each (spinning threads
    # fight over the cores).
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    # what nearly every test file imports, with the garbage collector paused (ownllm/collector.py; not in xdist's
    # controller, which runs no test)
    import_at_start("torch", "transformers", "transformers.modeling_utils", "peft")

# The longest test files, longest first: with `--no-loadscope-reorder` (make test) the runner hands out files in
# collection order, so these start at once instead of meeting each other at the end (29 min with them last).
LONGEST_FILES = (
    "tests/finetune/test_shipped_example.py",
    "tests/finetune/test_finetune.py",
    "tests/finetune/test_tool_example.py",
    "tests/jobs/test_fine_tuning_api.py",
    "tests/export/test_export.py",
    "tests/export/test_quantize.py",
    "tests/serve/test_ui.py",
    "tests/finetune/test_grpo.py",
    "tests/finetune/test_heads.py",
    "tests/generate/test_slot_parity.py",
    "tests/serve/test_fuzz.py",
    "tests/evaluate/test_cli_eval.py",
    "tests/serve/test_server.py",
    "tests/finetune/test_runs.py",
)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (the test modules, and with them torch and transformers) stays for the whole run:
    later garbage collections skip it (ownllm/collector.py)."""
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: index for index, path in enumerate(LONGEST_FILES)}
    root = Path(str(config.rootpath))

    def file_rank(item: pytest.Item) -> int:
        relative = Path(str(item.path)).relative_to(root).as_posix()
        return rank.get(relative, len(rank))

    items.sort(key=file_rank)  # stable: the order inside a file and among the other files is kept


@pytest.fixture(scope="session")
def default_model() -> str:
    """The embedded default model, pulled into the test home (once; later runs reuse it)."""
    from ownllm.models.pull import pull

    pull(DEFAULT_MODEL)
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def engine(default_model: str):
    from ownllm.generate.open import open_engine

    return open_engine(default_model, dtype="fp32")


def _cli_env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200"}


# The zygote starts with the environment as this file left it, not as the first CLI call of a worker happens to
# find it (a test's monkeypatched home would make every later call differ and run as a plain subprocess).
_ZYGOTE = Zygote(functools.partial(dict, _cli_env()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _ZYGOTE.close()  # (in each test worker too: xdist's workers end without running atexit handlers)


@pytest.fixture(autouse=True)
def _environment_as_it_was() -> Any:
    """Each test ends with the environment it started with: libraries run in the test process (a trainer, the
    evaluation harness) set variables of their own, which would otherwise reach every later test's `ownllm`
    processes and, differing from the zygote's, send each of them to a plain subprocess (~6 s more a call)."""
    before = dict(os.environ)
    yield
    for name in [name for name in os.environ if name not in before]:
        del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `ownllm ARGS` the way a user does: a process of its own, real stdin/stdout/stderr and exit status,
    forked from one that has imported torch and transformers already (tests/cli_zygote.py)."""
    return _ZYGOTE.run(list(args), input=input if input is not None else "",
                       env={**_cli_env(), **(env or {})}, timeout=timeout)


def start_cli(*args: str, stdout: Any = None, stderr: Any = None, env: dict[str, str] | None = None) -> Any:
    """Start `ownllm ARGS` and return at once, for a test that watches, signals or stops the process: what
    `subprocess.Popen` returns (pid, poll, wait, send_signal, terminate, kill), forked like `run_cli`'s;
    `stdout`/`stderr`: None, subprocess.DEVNULL or an open file (`stderr` also subprocess.STDOUT)."""
    return _ZYGOTE.popen(list(args), stdout=stdout, stderr=stderr, env={**_cli_env(), **(env or {})})


def deeply_nested(depth: int) -> list:
    """[[[...]]] `depth` lists deep: deeper than a JSON reply can echo (pydantic stops at 255 levels)."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one `error:` line naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="session")
def adapter_dir(default_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights: real peft files, so it changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ownllm.models.load import load_model

    torch.manual_seed(0)
    loaded = load_model(default_model, dtype="fp32")
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(loaded.model, config)
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    return folder


FACT_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "data" / "facts-train.jsonl"


@pytest.fixture(scope="session")
def scoped_adapter(default_model: str, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`adapter_dir`'s weights with the scope a run on the shipped facts would give it (its run record names the
    base, as a run's final/ does): prompts about Norvale Instruments run with the adapter, others with the base."""
    import json
    import shutil

    from ownllm.finetune.replay import replay_prompts
    from ownllm.finetune.run_folder import RunRecord, write_record
    from ownllm.models.scope import AdapterScope, user_texts

    folder = tmp_path_factory.mktemp("scoped") / "final"
    shutil.copytree(adapter_dir, folder)
    write_record(folder, RunRecord(base_model=default_model, method="lora", spec=default_model))
    prompts = [text for line in FACT_PROMPTS.read_text().splitlines()
               for text in user_texts(json.loads(line)["messages"])]
    scope = AdapterScope.calibrate(prompts, replay_prompts(None))
    assert isinstance(scope, AdapterScope), scope
    scope.save(folder)
    return folder
