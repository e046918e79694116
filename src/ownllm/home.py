"""Where ownllm keeps its models and small state files, and how it writes them safely."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import platformdirs


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


_process_umask()  # learnt at import, before the server or a job starts threads
