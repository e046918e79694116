"""The CLI as users run it: a subprocess per call, exit codes, stdout, stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ownllm.cli import COMMANDS, Group
from tests.conftest import assert_user_error, run_cli

MODEL_LIBRARIES = ("torch", "transformers", "peft", "sentence_transformers", "fastapi")


def _listed(help_text: str) -> set[str]:
    """The first word of each row of a help screen: the verbs (and options) it lists."""
    return {line.strip(" │|").split()[0] for line in help_text.splitlines() if line.strip(" │|")}


def test_help_lists_every_verb_in_the_table() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in COMMANDS:
        assert verb in _listed(result.stdout), verb
    for name, group in COMMANDS.items():
        if isinstance(group, Group):
            listed = _listed(run_cli(name, "--help").stdout)
            for verb in group.verbs:
                assert verb in listed, f"{name} {verb}"


def test_cheap_verbs_and_clients_load_no_model_libraries(tmp_path: Path) -> None:
    """Verbs that load no model start without torch & co. (a module check, not a timing): the CLI imports them
    inside the verbs that need them, and the HTTP clients import nothing server-side."""
    data = tmp_path / "train.jsonl"
    line = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text("".join(json.dumps({**line, "n": n}) + "\n" for n in range(12)))
    script = f"""
import json, sys
import ownllm.client.jobs, ownllm.client.loadtest
from ownllm.cli import main
codes = [main(args) for args in (["--help"], ["models", "--json"], ["jobs", "list", "--url", "http://127.0.0.1:9"],
                                 ["data", "check", {str(data)!r}], ["estimate", "7B", "--json"])]
loaded = [m for m in {MODEL_LIBRARIES!r} + ("ownllm.serve", "ownllm.jobs") if m in sys.modules]
print(json.dumps({{"codes": codes, "loaded": loaded}}), file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 2, 0, 0], result.stderr  # the jobs server is not there: a user error
    assert report["loaded"] == []


def test_estimate_7b_json() -> None:
    result = run_cli("estimate", "7B", "--json")
    assert result.returncode == 0, result.stderr
    weights = json.loads(result.stdout)["weights"]
    assert round(weights["fp32"] / 1e9) == 28 and round(weights["bf16"] / 1e9) == 14
    assert round(weights["int8"] / 1e9) == 7 and weights["4-bit"] / 1e9 == pytest.approx(3.5)


def test_estimate_table() -> None:
    result = run_cli("estimate", "7B")
    assert result.returncode == 0
    assert "28.0 GB" in result.stdout and "QLoRA" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "no-such-model", "hi"], "unknown model 'no-such-model'"),
        (["generate", "/nowhere/model.gguf", "hi"], "no such file"),
        (["tokenize", "no-such-model", "hi"], "unknown model"),
        (["estimate", "no-such-model"], "unknown model"),
        (["estimate", "7B", "--lora-targets", "some"], "lora-targets"),
    ],
)
def test_bad_models_are_user_errors(args: list[str], needle: str) -> None:
    assert_user_error(run_cli(*args), needle)


def test_corrupt_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x01" * 32)
    assert_user_error(run_cli("generate", str(bad), "hi"), "corrupt or truncated GGUF")


@pytest.mark.slow
def test_a_gguf_with_bad_metadata_or_no_tensors_is_named(tmp_path: Path, default_model: str) -> None:
    """Metadata check_gguf does not read (an unknown architecture, a name that is not UTF-8), and a file whose
    tensor table is empty or lacks a tensor (transformers would run random weights): one error line each, naming
    the file."""
    from ownllm.models.resolve import resolve

    real = resolve(default_model).gguf_file
    assert real is not None
    data = real.read_bytes()
    name_at = data.index(b"general.name") + len(b"general.name") + 4 + 8  # past the key, its type, its length
    length = (5).to_bytes(8, "little")  # of the architecture's value, "llama"
    cases = {
        "tensorless.gguf": (data[:8] + (0).to_bytes(8, "little") + data[16:], "corrupt GGUF file (no tensors)"),
        "llamb.gguf": (data.replace(length + b"llama", length + b"llamb", 1), "cannot be loaded"),
        "badname.gguf": (data[:name_at] + b"\xff" + data[name_at + 1:], "cannot be loaded: UnicodeDecodeError"),
        # a tensor renamed to one no architecture reads: layer 0's query weights would be random
        "holed.gguf": (data.replace(b"blk.0.attn_q.weight", b"blk.0.attn_x.weight", 1),
                       "lacks 1 of the weights its architecture needs (model.layers.0.self_attn.q_proj.weight)"),
        # a block count below the file's layers: transformers would drop the rest without a word
        "short.gguf": (_with_number(data, b"llama.block_count", 4, 29), "holds tensors of 30 layers, but its "
                                                                         "metadata says 29 (block_count)"),
        "layerless.gguf": (_with_number(data, b"llama.block_count", 4, 0), "its metadata says 0 (block_count)"),
        # the final norm's one dimension halved (its data still in the file): a shape the architecture cannot take
        "misshapen.gguf": (_with_number(data, b"output_norm.weight", 8, 288),
                           "model.norm.weight is stored as [288], but the architecture its metadata describes "
                           "takes [576]"),
    }
    for name, (content, needle) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        assert_user_error(run_cli("generate", str(bad), "hi", "--max-new-tokens", "2"), name, needle)


def _with_number(data: bytes, key: bytes, size: int, value: int) -> bytes:
    """`data` with the number right after `key`'s 4-byte type or dimension count (a metadata value, or a tensor's
    first dimension) set to `value`."""
    at = data.index(key) + len(key) + 4
    return data[:at] + value.to_bytes(size, "little") + data[at + size:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--temperature", "-3"], "temperature must be >= 0"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["--top-k", "-1"], "top-k must be >= 0"),
        (["--strategy", "beam", "--num-beams", "0"], "num-beams must be at least 1"),
        (["--max-new-tokens", "0"], "max-new-tokens must be at least 1"),
        (["--max-new-tokens", "9000"], "past the context window of 8192"),
    ],
)
def test_bad_generation_options(default_model: str, options: list[str], needle: str) -> None:
    assert_user_error(run_cli("generate", default_model, "Hello", *options), needle)


@pytest.mark.slow
def test_empty_prompt(default_model: str) -> None:
    assert_user_error(run_cli("generate", default_model, ""), "prompt is empty")
    assert_user_error(run_cli("generate", default_model, "-", input="   \n"), "prompt is empty")


@pytest.mark.slow
def test_generate_json_is_reproducible(default_model: str) -> None:
    args = ("generate", default_model, "Once upon a time", "--temperature", "0.9", "--top-p", "0.9",
            "--seed", "42", "--max-new-tokens", "12", "--json")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["text"] == b["text"] and a["seed"] == 42
    assert a["usage"]["completion_tokens"] <= 12 and a["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
def test_generate_explain_table(default_model: str) -> None:
    result = run_cli("generate", default_model, "The capital of France is", "--max-new-tokens", "2",
                     "--explain", "4", "--temperature", "0.7", "--top-k", "3", "--min-p", "0.05")
    assert result.returncode == 0, result.stderr
    for header in ("p(T=1)", "p(T=0.7)", "after top-k", "after top-p", "after min-p", "min-p kept", "← chosen",
                   "' Paris'"):
        assert header in result.stdout
    assert "seed" in result.stderr  # the seed that was picked is reported, so the run can be repeated


@pytest.mark.slow
def test_generate_stream_and_stop(default_model: str, engine) -> None:
    """A word the greedy answer surely reaches is the stop string: the streamed text ends right before it."""
    from ownllm.generate.params import SamplingParams

    prompt = "List three colours: red,"
    text = engine.generate(prompt, SamplingParams(max_new_tokens=20)).text  # the fixture's engine is fp32, as below
    stop = next(word for word in text.split() if text[: text.index(word)].strip())
    result = run_cli("generate", default_model, prompt, "--max-new-tokens", "20", "--dtype", "fp32", "--stream",
                     "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert "finish: stop" in result.stderr
    assert result.stdout == text[: text.index(stop)] + "\n"


@pytest.mark.slow
def test_tokenize_json_with_price(default_model: str) -> None:
    result = run_cli("tokenize", default_model, "Hello world, hello tokens!", "--price-per-1m", "2.5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["count"] == len(data["tokens"]) > 3
    assert data["characters"] == 26 and data["words"] == 4
    assert data["cost"] == pytest.approx(data["count"] * 2.5 / 1e6)
    assert "".join(t["token"] for t in data["tokens"]) == "Hello world, hello tokens!"


@pytest.mark.slow
def test_tokenize_from_stdin(default_model: str) -> None:
    result = run_cli("tokenize", default_model, "--no-show-tokens", input="some piped text")
    assert result.returncode == 0 and "tokens: " in result.stdout and "chars/token" in result.stdout


@pytest.mark.slow
def test_chat_from_a_pipe_with_save(default_model: str, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    script = f"What is the capital of France?\n/save {saved}\n/reset\nHello\n"
    result = run_cli("chat", default_model, "--max-new-tokens", "24", "--system", "You are a helpful assistant.",
                     input=script)
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and all(len(r) > len("assistant> ") for r in replies)
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


@pytest.mark.slow
def test_models_lists_the_pulled_model(default_model: str) -> None:
    result = run_cli("models", "--json")
    assert result.returncode == 0
    names = [m["name"] for m in json.loads(result.stdout)["models"]]
    assert default_model in names


def test_serve_bad_arguments(tmp_path: Path) -> None:
    assert_user_error(run_cli("serve", "no-such-model", "--port", "0"), "unknown model")
    assert_user_error(run_cli("serve", "no-such-model", "--adapter", "oops"), "--adapter takes NAME=FOLDER")
    assert_user_error(run_cli("bench", "serve", "--url", "http://127.0.0.1:9", "--concurrency", "1"),
                      "cannot list models")
    assert_user_error(run_cli("bench", "serve", "--concurrency", "a,b"), "concurrency takes numbers")


@pytest.mark.slow
def test_serve_missing_adapter_folder(default_model: str, tmp_path: Path) -> None:
    assert_user_error(run_cli("serve", default_model, "--adapter", f"x={tmp_path / 'missing'}", "--port", "0"),
                      "is not a LoRA adapter folder")


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading_the_model() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # (a model name that does not resolve: the address is refused before the model is looked up)
        assert_user_error(run_cli("serve", "no-such-model", "--port", port), f"127.0.0.1:{port}", "in use")
    assert_user_error(run_cli("serve", "no-such-model", "--host", "no-such-host.invalid"), "does not resolve")
    assert_user_error(run_cli("serve", "no-such-model", "--host", "192.0.2.1", "--port", "0"),
                      "not an address of this machine")


def test_serve_names_a_bad_adapter_before_loading_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ownllm.errors import OwnLLMError
    from ownllm.serve.run import build_state

    monkeypatch.setattr("ownllm.generate.open.open_engine", lambda *_, **__: pytest.fail("the model was loaded"))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    scoped = tmp_path / "scoped"
    scoped.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (scoped / name).write_text('{"peft_type": "LORA"}' if name.endswith(".json") else "x")
    (scoped / "scope.json").write_text("{not json")
    for adapters, words in (({"x": tmp_path / "missing"}, "does not exist"),
                            ({"x": tmp_path}, "DoRA"), ({"<scoped>": scoped}, "reserved"),
                            ({"x": scoped}, "scope")):
        with pytest.raises(OwnLLMError, match=words):
            build_state("any-model", adapters=adapters)


def test_a_model_served_by_path_is_loaded_again_by_that_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Jobs and the web UI's speed estimate load the served model again: by its path made absolute, not by the
    short name clients send (which names no pulled model)."""
    from types import SimpleNamespace

    from ownllm.serve.run import build_state

    monkeypatch.setattr("ownllm.generate.open.open_engine", lambda *_, **__: SimpleNamespace(context_length=64))
    monkeypatch.setattr("ownllm.generate.batching.make_scheduler", lambda *_, **__: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    state = build_state("my-model/", data_dir=tmp_path / "data")
    assert state.model_name == "my-model" and state.model_spec == str((tmp_path / "my-model").resolve())
    assert state.jobs is not None and state.jobs.base == state.model_spec


def test_usage_errors_exit_2_without_traceback() -> None:
    result = run_cli("finetune", "x", "--bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--bogus" in result.stderr
    assert run_cli("no-such-verb").returncode == 2
