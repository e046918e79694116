"""The files and folders users name, checked before any work: a text file to read, a folder or file to write.

Each problem is an OwnLLMError that names the path and the option it came from, so the CLI prints one line
instead of a traceback, and an output path that cannot be written fails before a model loads, not after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ownllm.errors import OwnLLMError


def is_wide_text(head: bytes) -> bool:
    """The first bytes of a file look like UTF-16 or UTF-32 text: a byte order mark, then an ASCII character as
    those encode it (a zero byte beside it), so random bytes that happen to start like a mark are not taken."""
    if head.startswith(b"\x00\x00\xfe\xff"):  # UTF-32 BE
        return True
    if head.startswith(b"\xff\xfe"):  # UTF-16 LE (or UTF-32 LE): '{' is 7b 00
        return len(head) > 3 and head[3] == 0
    return head.startswith(b"\xfe\xff") and len(head) > 2 and head[2] == 0  # UTF-16 BE: '{' is 00 7b


def _option(param: str | None) -> str:
    return f"--{param.replace('_', '-')} " if param else ""


def read_text_file(path: Path, *, param: str | None = None) -> str:
    """A UTF-8 text file's text (a UTF-8 byte order mark is dropped); a missing path, a folder, bytes that are
    not UTF-8 or a file that cannot be read is an OwnLLMError naming the file (and the line, for bad bytes)."""
    if path.is_dir():
        raise OwnLLMError(f"{_option(param)}{path} is a folder, not a file", param=param)
    if not path.exists():
        raise OwnLLMError(f"no such file: {path}", kind="not_found", param=param)
    if not path.is_file():  # a pipe would block or a device never end
        raise OwnLLMError(f"{_option(param)}{path} is not a regular file (a pipe or a device)", param=param,
                          hint="save it to a file first")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OwnLLMError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}", param=param) from None
    if is_wide_text(raw[:4]):
        raise OwnLLMError(f"{path}: UTF-16 or UTF-32 text, not UTF-8", param=param, hint="save it as UTF-8")
    try:
        return raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise OwnLLMError(f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at line {line}, column {column})",
                          param=param, hint="is it a binary file?") from None


def read_json_file(path: Path, *, param: str | None = None, prefix: str = "", noun: str = "file") -> Any:
    """A JSON file's value; a missing file (`no such NOUN`), one `read_text_file` refuses, or text that is not
    JSON is an OwnLLMError naming the file, each message after `prefix` (e.g. "reward json-schema: ")."""
    if not path.exists():
        raise OwnLLMError(f"{prefix}no such {noun}: {path}", kind="not_found", param=param)
    try:
        return json.loads(read_text_file(path, param=param))
    except json.JSONDecodeError as exc:
        raise OwnLLMError(f"{prefix}{path} is not valid JSON: {exc}", param=param) from None
    except RecursionError:
        raise OwnLLMError(f"{prefix}{path} is not valid JSON here: nested too deeply", param=param) from None


def _writable_parent(path: Path, param: str | None) -> None:
    """The nearest existing folder above `path` must be a folder we may write in (missing ones get created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OwnLLMError(f"{_option(param)}{path}: {parent} is a file, not a folder", param=param)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OwnLLMError(f"{_option(param)}{path}: no permission to write in {parent}", param=param)
            return


def check_output_folder(path: Path, *, param: str | None = "out", replaces: str | None = None) -> None:
    """`path` can become (or already is) an output folder. With `replaces`, the folder is replaced whole, so one
    that holds anything must be an earlier output (it has the file `replaces`): never delete a user's files."""
    if path.exists() and not path.is_dir():
        raise OwnLLMError(f"{_option(param)}{path} is a file, not a folder", param=param,
                          hint="name a new or empty folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OwnLLMError(f"{_option(param)}{path}: no permission to write in it", param=param)
        if replaces is not None and any(path.iterdir()) and not (path / replaces).exists():
            raise OwnLLMError(f"{_option(param)}{path} already holds other files (no {replaces}); refusing to "
                              "replace it", param=param, hint="name a new or empty folder")
        return
    _writable_parent(path, param)


def check_output_file(path: Path, *, param: str | None = None, hint: str | None = None) -> None:
    """`path` can be (or already is) a file we write: not a folder, under a folder we may write in."""
    if path.is_dir():
        raise OwnLLMError(f"{_option(param)}{path} is a folder, not a file", param=param, hint=hint)
    if path.exists() and not path.is_file():
        raise OwnLLMError(f"{_option(param)}{path} is not a regular file", param=param)
    _writable_parent(path, param)

