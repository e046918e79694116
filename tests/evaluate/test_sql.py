"""Text-to-SQL by execution: the scorer runs queries read-only with a time limit, refuses anything but one SELECT,
scores the gold queries 1.0, and `ownllm eval sql` stops on a broken gold query before a model loads."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest

from ownllm.errors import OwnLLMError
from ownllm.evaluate.sql import (
    QueryError,
    ReadOnlyDatabase,
    check_gold,
    extract_sql,
    read_sql_set,
    same_result,
    score_query,
)
from tests.conftest import assert_user_error, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sql"


@pytest.fixture
def db(tmp_path: Path) -> ReadOnlyDatabase:
    copy = tmp_path / "shop.sqlite"
    shutil.copy(EXAMPLE / "shop.sqlite", copy)
    database = ReadOnlyDatabase(copy, timeout=0.5)
    yield database
    database.close()


def test_gold_queries_score_one(db: ReadOnlyDatabase) -> None:
    for split in ("train.jsonl", "test.jsonl", "rl.jsonl"):
        items = read_sql_set(EXAMPLE / split)
        rows = check_gold(db, items, EXAMPLE / split)
        assert all(score_query(db, item.gold, item.gold, gold)[:3] == (1.0, 1.0, 1.0)
                   for item, gold in zip(items, rows, strict=True))
    assert len(read_sql_set(EXAMPLE / "train.jsonl")) + len(read_sql_set(EXAMPLE / "test.jsonl")) >= 300


def test_test_split_has_unseen_phrasings_and_values() -> None:
    def pairs(split: str) -> list[tuple[str, str]]:
        return [(i.question, i.gold) for i in read_sql_set(EXAMPLE / split)]

    train, test, rl = pairs("train.jsonl"), pairs("test.jsonl"), pairs("rl.jsonl")
    assert not {sql for _, sql in test} & {sql for _, sql in train + rl}  # no value combination seen in training
    assert not {q for q, _ in test} & {q for q, _ in train + rl}
    # the reinforcement split asks training's value combinations in phrasings neither of the others uses
    assert {sql for _, sql in rl} <= {sql for _, sql in train}
    assert not {q for q, _ in rl} & {q for q, _ in train}


def test_each_template_keeps_its_phrasings_to_one_split() -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from make_data import DB_FILE, templates
    finally:
        sys.path.remove(str(EXAMPLE))
    with closing(sqlite3.connect(f"file:{DB_FILE}?mode=ro", uri=True)) as db:
        for template in templates(db):
            splits = (set(template.train), set(template.test), set(template.rl))
            assert all(splits) and sum(len(split) for split in splits) == len(set().union(*splits)), template.sql


@pytest.mark.parametrize("query", [
    "DROP TABLE customers",
    "UPDATE products SET price = 0",
    "DELETE FROM orders",
    "SELECT 1; DROP TABLE customers",
    "SELECT 1; SELECT 2",
    "WITH doomed AS (SELECT 1) DELETE FROM orders",
    "ATTACH DATABASE 'other.db' AS other",
    "PRAGMA writable_schema = 1",
    "INSERT INTO customers VALUES (999, 'x', 'y', 'z', '2024-01-01')",
])
def test_refuses_anything_but_one_select(db: ReadOnlyDatabase, query: str) -> None:
    before = db.run("SELECT COUNT(*) FROM customers") + db.run("SELECT SUM(price) FROM products")
    with pytest.raises(QueryError):
        db.run(query)
    assert db.run("SELECT COUNT(*) FROM customers") + db.run("SELECT SUM(price) FROM products") == before


def test_the_file_cannot_be_written_even_past_the_checks(db: ReadOnlyDatabase) -> None:
    db.connection.set_authorizer(None)  # with the authorizer gone, the read-only open still refuses writes
    with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only|query_only"):
        db.connection.execute("DELETE FROM orders")


def test_a_runaway_query_times_out(db: ReadOnlyDatabase) -> None:
    with pytest.raises(QueryError, match="timed out"):
        db.run("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n")
    assert db.run("SELECT COUNT(*) FROM products") == [(25,)]  # the connection is still usable


def test_results_compare_as_sets_unless_ordered(db: ReadOnlyDatabase) -> None:
    assert same_result([(1,), (2,)], [(2,), (1,)], ordered=False)
    assert not same_result([(1,), (2,)], [(2,), (1,)], ordered=True)
    assert not same_result([(1,), (1,)], [(1,)], ordered=False)  # multisets: a duplicate row counts
    assert same_result([(2.0,)], [(2,)], ordered=False)
    gold = "SELECT name FROM products WHERE category = 'toys' ORDER BY price DESC"
    reordered = "SELECT name FROM products WHERE category = 'toys' ORDER BY price ASC"
    assert score_query(db, reordered, gold)[0] == 0.0
    unordered_gold = "SELECT name FROM products WHERE category = 'toys'"
    assert score_query(db, reordered, unordered_gold)[:3] == (1.0, 0.0, 1.0)
    assert score_query(db, "SELEC name FROM products", unordered_gold)[2] == 0.0


def test_extract_sql_from_replies() -> None:
    assert extract_sql("SELECT 1;") == "SELECT 1"
    assert extract_sql("Here it is:\n```sql\nSELECT name FROM t;\n```\nThis lists names.") == "SELECT name FROM t"
    assert extract_sql("```sql\nSELECT 1") == "SELECT 1"  # cut off by the token limit


def test_bad_database_and_data(tmp_path: Path) -> None:
    with pytest.raises(OwnLLMError, match="no such database"):
        ReadOnlyDatabase(tmp_path / "missing.sqlite")
    with pytest.raises(OwnLLMError, match="is a folder, not a SQLite database file"):
        ReadOnlyDatabase(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    with pytest.raises(OwnLLMError, match="not a SQLite database"):
        ReadOnlyDatabase(junk)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "sql": "SELECT 1"}\n{"messages": [{"role": "user", "content": "Q"}]}\n')
    with pytest.raises(OwnLLMError, match=r"bad\.jsonl line 2"):
        read_sql_set(bad)


def test_a_question_past_the_context_window_is_named_by_its_line(default_model: str, tmp_path: Path) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text("".join((EXAMPLE / "test.jsonl").read_text().splitlines(True)[:2])
                    + json.dumps({"question": "Count " * 9000 + "?", "sql": "SELECT COUNT(*) FROM customers"}) + "\n")
    result = run_cli("eval", "sql", default_model, "--db", str(EXAMPLE / "shop.sqlite"), "--data", str(data))
    assert_user_error(result, "line 3: prompt (", "past the context window")


@pytest.mark.slow
def test_cli_gold_failure_names_the_line_before_a_model_loads(tmp_path: Path) -> None:
    data = tmp_path / "test.jsonl"
    lines = (EXAMPLE / "test.jsonl").read_text().splitlines(True)[:2]
    data.write_text("".join(lines) + json.dumps({"question": "How many?", "sql": "SELECT COUNT(*) FROM nowhere"})
                    + "\n")
    result = run_cli("eval", "sql", "no-such-model-would-fail-later", "--db", str(EXAMPLE / "shop.sqlite"),
                     "--data", str(data))
    assert_user_error(result, "test.jsonl line 3", "gold query fails", "no such table: nowhere")
    for endless in ("inf", "1e300"):  # the per-query hang guard cannot be switched off
        result = run_cli("eval", "sql", "no-such-model", "--db", str(EXAMPLE / "shop.sqlite"), "--data", str(data),
                         "--timeout", endless)
        assert_user_error(result, "--timeout must be more than 0 and at most 600 seconds")


@pytest.mark.slow
def test_cli_scores_the_base_model(default_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("eval", "sql", default_model, "--db", str(EXAMPLE / "shop.sqlite"), "--data",
                     str(EXAMPLE / "test.jsonl"), "--limit", "2", "--max-new-tokens", "24", "--json", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["items"] == 2 and 0 <= summary["execution_accuracy"] <= summary["valid_sql"] <= 1
    rows = [json.loads(line) for line in (out / "sql.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"predicted", "gold", "execution", "exact", "valid", "error"} <= set(rows[0])
