"""Text-to-SQL measured by execution: run the model's query and the gold query on the same SQLite database and
compare what they return.

Model output is hostile input, so a query runs only if it is one SELECT (or WITH ... SELECT) statement, on a
connection that cannot write: the file is opened read-only (`mode=ro` URI), `query_only` is on, an authorizer
refuses every action but reading (no ATTACH, PRAGMA, writes), a progress handler stops a query past its time
limit (a runaway recursive CTE), and at most MAX_ROWS rows are read back.

Scores per item: execution accuracy (the result sets are equal: as multisets, or as lists when the gold query
orders its rows with ORDER BY), exact match (the query text, whitespace and case aside) and valid SQL (it ran).
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ownllm.data.jsonl import fail_if_any, read_jsonl
from ownllm.errors import OwnLLMError
from ownllm.generate.engine import Engine
from ownllm.generate.params import SamplingParams
from ownllm.models.chat_template import Message

TIMEOUT_S = 2.0  # per query; the gold queries of the shipped example take milliseconds
MAX_ROWS = 10_000  # rows read back from one query: a cross join must not fill memory
MAX_VALUE_BYTES = 1_000_000  # the longest string or blob a query may make
SQL_PARAMS = SamplingParams(max_new_tokens=128)
_PROGRESS_OPS = 1_000  # SQLite VM instructions between two deadline checks
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_FENCE = re.compile(r"```[a-zA-Z]*[ \t]*\n?(.*?)(?:```|$)", re.S)  # the first fenced block, closed or cut off
_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)


class QueryError(Exception):
    """A query that was refused or failed; its message says which (shown per item in the results)."""


@dataclass(frozen=True)
class SQLItem:
    line: int
    messages: list[Message]  # the prompt: system (schema) and user question
    gold: str

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class SQLResult:
    line: int
    question: str
    gold: str
    predicted: str
    execution: float  # 1.0 when the result sets are equal
    exact: float
    valid: float  # 1.0 when the predicted query ran
    error: str | None = None


class ReadOnlyDatabase:
    """A SQLite file opened so that nothing run on it can change it or run past `timeout` seconds."""

    def __init__(self, path: Path, *, timeout: float = TIMEOUT_S) -> None:
        path = Path(path)
        if path.is_dir():
            raise OwnLLMError(f"{path} is a folder, not a SQLite database file", param="db")
        if not path.is_file():
            raise OwnLLMError(f"no such database: {path}", kind="not_found", param="db")
        self.path, self.timeout = path, timeout
        try:
            self.connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                              check_same_thread=False)
            self.connection.execute("PRAGMA query_only = ON")
            self.connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise OwnLLMError(f"{path} is not a SQLite database ({exc})", param="db") from None
        self.connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)  # zeroblob(1e9) is refused
        self.connection.set_authorizer(_authorize)
        self._deadline = math.inf
        self.connection.set_progress_handler(self._past_deadline, _PROGRESS_OPS)

    def _past_deadline(self) -> int:
        return 1 if time.monotonic() > self._deadline else 0  # non-zero interrupts the query

    def run(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows `sql` returns; QueryError when it is not a single read-only query, fails or times out."""
        query = check_query(sql)
        self._deadline = time.monotonic() + self.timeout
        try:
            cursor = self.connection.execute(query)
            rows = cursor.fetchmany(MAX_ROWS + 1)
        except sqlite3.Warning as exc:  # "You can only execute one statement at a time."
            raise QueryError(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            if "interrupted" in str(exc):
                raise QueryError(f"timed out after {self.timeout:g} s") from None
            raise QueryError(str(exc)) from None
        finally:
            self._deadline = math.inf
        if len(rows) > MAX_ROWS:
            raise QueryError(f"more than {MAX_ROWS} rows")
        return rows

    def close(self) -> None:
        self.connection.close()


def _authorize(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def extract_sql(reply: str) -> str:
    """The query in a model's reply: the first ``` fenced block if there is one (small models wrap it in prose),
    else the whole reply; without a trailing semicolon."""
    text = reply.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    return text.rstrip().rstrip(";").rstrip()


def check_query(sql: str) -> str:
    """`sql` if it is one SELECT or WITH statement (a trailing semicolon allowed); QueryError otherwise."""
    query = sql.strip().rstrip(";").strip()
    bare = _COMMENT.sub(" ", query).strip()
    if not bare:
        raise QueryError("empty query")
    if not re.match(r"(?i)(select|with)\b", bare):
        raise QueryError(f"only a SELECT query may run, not '{bare.split()[0][:20]}'")
    if not sqlite3.complete_statement(query + ";") or _more_statements(query):
        raise QueryError("only one SQL statement may run")
    return query


def _more_statements(query: str) -> bool:
    """A semicolon outside quotes and comments: a second statement follows."""
    text = _COMMENT.sub(" ", re.sub(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"", "''", query))
    return ";" in text


def normalize_sql(sql: str) -> str:
    """For exact match: whitespace collapsed, case folded outside string literals, no trailing semicolon."""
    parts = re.split(r"('(?:[^']|'')*')", " ".join(sql.strip().rstrip(";").split()))
    return "".join(part if part.startswith("'") else part.lower() for part in parts)


def is_ordered(sql: str) -> bool:
    """The gold query orders its result at the top level (a final ORDER BY), so row order counts."""
    return re.search(r"(?i)\border\s+by\b[^()]*$", _COMMENT.sub(" ", sql)) is not None


def _row_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    # 2.0 and 2, 0.1+0.2 and 0.3: the same answer
    return tuple(round(float(v), 6) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in row)


def same_result(predicted: list[tuple[Any, ...]], gold: list[tuple[Any, ...]], *, ordered: bool) -> bool:
    """Equal result sets: the same rows (as lists when `ordered`, else as multisets)."""
    mine, theirs = [_row_key(r) for r in predicted], [_row_key(r) for r in gold]
    return mine == theirs if ordered else Counter(mine) == Counter(theirs)


def score_query(db: ReadOnlyDatabase, predicted: str, gold: str, gold_rows: list[tuple[Any, ...]] | None = None
                ) -> tuple[float, float, float, str | None]:
    """(execution, exact, valid, error) for one predicted query against its gold query."""
    exact = float(normalize_sql(predicted) == normalize_sql(gold))
    rows_gold = gold_rows if gold_rows is not None else db.run(gold)
    try:
        rows = db.run(predicted)
    except QueryError as exc:
        return 0.0, exact, 0.0, str(exc)
    return float(same_result(rows, rows_gold, ordered=is_ordered(gold))), exact, 1.0, None


def read_sql_set(path: Path) -> list[SQLItem]:
    """JSONL, one item per line: `messages` whose last turn is the assistant's gold query (the rest is the
    prompt), or `question` and `sql` (with an optional `system` prompt)."""
    items, problems = [], []
    for record in read_jsonl(path):
        data, where = record.data, f"{path.name} line {record.line}"
        messages = data.get("messages")
        if isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                            for m in messages):
            if messages[-1].get("role") != "assistant" or len(messages) < 2:
                problems.append(f"{where}: the last message must be the assistant's gold SQL query")
                continue
            items.append(SQLItem(record.line, [{"role": m["role"], "content": m["content"]} for m in messages[:-1]],
                                 messages[-1]["content"]))
        elif isinstance(data.get("question"), str) and isinstance(data.get("sql"), str):
            prompt: list[Message] = [{"role": "system", "content": data["system"]}] if isinstance(
                data.get("system"), str) else []
            items.append(SQLItem(record.line, [*prompt, {"role": "user", "content": data["question"]}], data["sql"]))
        else:
            problems.append(f"{where}: needs 'messages' (ending with the gold query) or 'question' and 'sql'")
    fail_if_any(problems)
    if not items:
        raise OwnLLMError(f"{path}: no questions", param="data")
    return items


def check_gold(db: ReadOnlyDatabase, items: list[SQLItem], path: Path) -> list[list[tuple[Any, ...]]]:
    """Run every gold query before any model runs; one that fails is an error naming its file and line."""
    results = []
    for item in items:
        try:
            results.append(db.run(item.gold))
        except QueryError as exc:
            raise OwnLLMError(f"{path.name} line {item.line}: the gold query fails on {db.path.name}: {exc}",
                              param="data") from None
    return results


def run_sql_eval(engine: Engine, db: ReadOnlyDatabase, items: list[SQLItem], gold_rows: list[list[tuple[Any, ...]]],
                 params: SamplingParams | None = None, *, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> list[SQLResult]:
    """Generate a query for every item through `engine` (greedy by default) and score it by execution."""
    params = params or SQL_PARAMS
    prompts = [engine.render_with_recall(item.messages, max_new_tokens=params.max_new_tokens) for item in items]
    completions = engine.generate_batch(prompts, params, max_batch=batch_size, progress=progress,
                                        labels=[f"line {item.line}" for item in items],
                                        adapters=engine.routes([item.messages for item in items]))
    results: list[SQLResult] = []
    for item, rows, completion in zip(items, gold_rows, completions, strict=True):
        predicted = extract_sql(completion.text)
        execution, exact, valid, error = score_query(db, predicted, item.gold, rows)
        results.append(SQLResult(item.line, item.question, item.gold, predicted, execution, exact, valid, error))
    return results


def summarize_sql(results: list[SQLResult]) -> dict[str, Any]:
    count = len(results)

    def share(name: str) -> float:
        return sum(getattr(r, name) for r in results) / count if count else 0.0

    return {"items": count, "execution_accuracy": share("execution"), "exact_match": share("exact"),
            "valid_sql": share("valid")}


def results_as_rows(results: list[SQLResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
