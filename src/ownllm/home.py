"""Where ownllm keeps its models and small state files, and how it writes them safely."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Fill a staging folder beside `out`; on success it replaces `out` whole, on failure it disappears."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
