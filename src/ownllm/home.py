"""Where ownllm keeps its models and small state files, and how it writes them safely."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)


def ownllm_home() -> Path:
    """The model home: `$OWNLLM_HOME`, else the user's cache dir (e.g. ~/.cache/ownllm)."""
    env = os.environ.get("OWNLLM_HOME")
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ownllm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = ownllm_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def usual_mode(base: int) -> int:
    """`base` (0o666 for files, 0o777 for folders) under the process umask: the permissions open() and mkdir()
    give, which mkstemp's 0600 and mkdtemp's 0700 would otherwise replace (an output private to its writer)."""
    return base & ~_process_umask()


@functools.cache
def _process_umask() -> int:
    # read once: setting it to learn it leaves a moment in which another thread's files get umask 0
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A staging file beside `path` (created empty, mode 0600) for the caller to fill; on success it replaces
    `path` whole, on failure it disappears, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file."""
    with atomic_file(path) as staging:
        staging.chmod(usual_mode(0o666))
        staging.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def open_lock_file(path: Path) -> int | None:
    """A descriptor of the lock file `path` (created if missing) to flock, or None when it is not a plain file (a
    FIFO, a device). Never follows a link nor waits on a FIFO: a lock file someone replaced can neither point the
    lock elsewhere nor hang the caller. OSError when it cannot be opened at all (a link, a folder)."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW, 0o644)
    if stat.S_ISREG(os.fstat(handle).st_mode):
        return handle
    os.close(handle)
    return None


def give_usual_modes(folder: Path) -> None:
    """Files that writers made private (safetensors: 0600) get the modes open() gives, and so does `folder`."""
    folder.chmod(usual_mode(0o777))
    for written in folder.rglob("*"):
        if written.is_file() and not written.is_symlink() and written.stat().st_mode & 0o777 == 0o600:
            written.chmod(usual_mode(0o666))


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Fill a staging folder beside `out`; on success it replaces `out` whole, on failure it disappears."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        give_usual_modes(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def kept_tensors(folder: str, kind: str, signature: str, compute: Callable[[], dict[str, Any]],
                 valid: Callable[[dict[str, Any]], bool] = lambda value: True, *, entry: str | None = None
                 ) -> dict[str, Any]:
    """The mapping of names to tensors kept in `$OWNLLM_HOME/<folder>` for (`kind`, `signature`) where it reads back
    whole (a digest of every name and byte is kept beside them) and `valid` accepts it, else `compute()`, kept for
    next time (safetensors: nothing in it is executed on load). A damaged, unreadable or rejected entry is computed
    again; a home that cannot be written only loses the saving. `entry`: one file for every signature of it (say,
    one model file's), each new one replacing the last, instead of one file per signature."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    path = kept_path(folder, kind, entry if entry is not None else signature, "safetensors")
    try:
        if stat.S_ISREG(os.stat(path).st_mode):  # (never a FIFO, a device or a folder someone put there)
            with safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                if metadata.get("signature") != signature:
                    log.info("the %s kept in %s is for something else now: computed again", kind, path)
                else:
                    kept = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (no __iter__)
                    if metadata.get("sha256") == tensors_digest(kept) and valid(kept):
                        log.info("reusing the %s kept in %s", kind, path)
                        return kept
                    log.warning("the %s kept in %s does not check out (damaged, or kept by an older ownllm): computed "
                                "again", kind, path)
    except FileNotFoundError:
        pass
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        log.warning("the %s kept in %s cannot be read (%s): computed again", kind, path, exc)
    value = compute()

    def write() -> None:
        contiguous = {name: tensor.contiguous() for name, tensor in value.items()}
        with atomic_file(path) as staging:
            save_file(contiguous, str(staging), metadata={"signature": signature, "sha256": tensors_digest(contiguous)})
        log.info("kept the %s in %s", kind, path)

    keep_quietly(kind, write)
    return value


def tensors_digest(tensors: dict[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` (in name order)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks: what a cache keys on, so an edited file never passes for
    the old one."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kept_path(folder: str, kind: str, key: str, suffix: str) -> Path:
    """Where `kept_tensors` (and other keyed caches of the home) keep the entry of (`kind`, `key`)."""
    hashed = hashlib.sha256(key.encode()).hexdigest()[:24]
    return ownllm_home() / folder / f"{kind}-{hashed}.{suffix}"


def keep_quietly(kind: str, write: Callable[[], None]) -> None:
    """Run `write`; a home that cannot be written (full, read-only, not a folder) costs a warning, never the
    caller's work."""
    try:
        write()
    except Exception as exc:  # (safetensors reports a failed write as its own error, not an OSError)
        log.warning("could not keep the %s for later runs: %s", kind, exc)


_process_umask()  # learnt at import, before the server or a job starts threads
