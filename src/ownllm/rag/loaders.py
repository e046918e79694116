"""Document loaders: each turns one file into sections of text with where they came from."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

from ownllm.data.files import read_text_file
from ownllm.errors import OwnLLMError

SUPPORTED = (".txt", ".md", ".markdown", ".pdf", ".html", ".htm", ".jsonl", ".csv")


@dataclass(frozen=True)
class Section:
    text: str
    source: str
    page: int | None = None  # 1-based PDF page
    heading: str | None = None  # nearest Markdown/HTML heading, or the row for tables


def load_file(path: Path, *, text_field: str = "text") -> list[Section]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise OwnLLMError(f"{path}: unsupported file type '{suffix}'", param="path",
                          hint=f"supported: {', '.join(SUPPORTED)}")
    if suffix == ".pdf":
        return _load_pdf(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix in (".md", ".markdown"):
        return _split_markdown(text, str(path))
    if suffix in (".html", ".htm"):
        return _load_html(text, str(path))
    if suffix == ".jsonl":
        return _load_jsonl(path, text_field)
    if suffix == ".csv":
        return _load_csv(path, text_field)
    return [Section(text, str(path))] if text.strip() else []


_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")


def _split_markdown(text: str, source: str) -> list[Section]:
    sections, heading, lines = [], None, []
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            if "".join(lines).strip():
                sections.append(Section("\n".join(lines).strip(), source, heading=heading))
            heading, lines = match.group(2), [line]
        else:
            lines.append(line)
    if "".join(lines).strip():
        sections.append(Section("\n".join(lines).strip(), source, heading=heading))
    return sections


def _load_pdf(path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise OwnLLMError(f"{path}: the PDF is encrypted", param="path")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise OwnLLMError(f"{path}: unreadable PDF ({exc.__class__.__name__})", param="path") from None
    return [Section(text.strip(), str(path), page=number) for number, text in enumerate(pages, 1) if text.strip()]


class _MainText(HTMLParser):
    """Text of an HTML page without its navigation, header, footer, sidebars, scripts and styles."""

    SKIP: ClassVar[set[str]] = {"script", "style", "nav", "header", "footer", "aside", "noscript", "form", "menu",
                                "template", "svg"}
    BLOCK: ClassVar[set[str]] = {"p", "div", "section", "article", "main", "li", "br", "tr", "h1", "h2", "h3", "h4",
                                 "h5", "h6", "pre", "blockquote", "table"}
    HEADINGS: ClassVar[set[str]] = {"h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.source = source
        self.skipping = 0
        self.in_heading = False
        self.heading: str | None = None
        self.buffer: list[str] = []
        self.sections: list[Section] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        role = dict(attrs).get("role") or ""
        if tag in self.SKIP or role in ("navigation", "banner", "contentinfo"):
            self.skipping += 1
        elif tag in self.HEADINGS and not self.skipping:
            self._flush()
            self.in_heading, self.heading = True, ""
        elif tag in self.BLOCK:
            self.buffer.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.HEADINGS and self.in_heading:
            self.in_heading = False
            self.buffer.append((self.heading or "") + "\n")
        elif tag in self.BLOCK:
            self.buffer.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        if self.in_heading:
            self.heading = (self.heading or "") + data.strip()
        else:
            self.buffer.append(data)

    def _flush(self) -> None:
        text = re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", "".join(self.buffer))).strip()
        if text:
            self.sections.append(Section(text, self.source, heading=self.heading))
        self.buffer = []

    def close(self) -> None:
        super().close()
        self._flush()


def _load_html(text: str, source: str) -> list[Section]:
    parser = _MainText(source)
    parser.feed(text)
    parser.close()
    return parser.sections


def _load_jsonl(path: Path, field: str) -> list[Section]:
    sections = []
    for number, line in enumerate(read_text_file(path, param="path").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise OwnLLMError(f"{path} line {number}: invalid JSON", param="path") from None
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise OwnLLMError(f"{path} line {number}: no text field '{field}'", param="text_field",
                              hint="name the column with --text-field")
        if value.strip():
            sections.append(Section(value, str(path), heading=f"line {number}"))
    return sections


def _load_csv(path: Path, field: str) -> list[Section]:
    with io.StringIO(read_text_file(path, param="path"), newline="") as handle:
        reader = csv.DictReader(handle)
        if field not in (reader.fieldnames or []):
            raise OwnLLMError(f"{path}: no column '{field}' (columns: {', '.join(reader.fieldnames or [])})",
                              param="text_field", hint="name the column with --text-field")
        return [Section(row[field], str(path), heading=f"row {number}")
                for number, row in enumerate(reader, 1) if (row[field] or "").strip()]
